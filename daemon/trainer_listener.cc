#include "daemon/trainer_listener.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include <cerrno>
#include <cstring>

#include <grpcpp/server_posix.h>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/log.h"
#include "common/trainer_hello.h"

namespace ecsnap::daemon {
namespace {

constexpr int kAcceptPollMs = 100;
constexpr absl::Duration kHelloTimeout = absl::Seconds(1);

}  // namespace

std::string TrainerPolicy::Refusal(pid_t pid, uid_t uid, gid_t gid) const {
  if (uid == daemon_uid || uids.count(uid) != 0 || gids.count(gid) != 0) return "";
  return absl::StrFormat(
      "ecsnapd refuses process %d (uid %d, gid %d): only uid %d and the uids and gids in the "
      "daemon's config (daemon.trainer_uids, daemon.trainer_gids) may snapshot on this node",
      pid, uid, gid, daemon_uid);
}

absl::StatusOr<std::unique_ptr<TrainerListener>> TrainerListener::Listen(
    const std::string& path, TrainerPolicy policy, const std::string& arena_path,
    uint64_t arena_bytes) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr.sun_path)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "socket path %s is longer than the %d bytes a Unix socket allows", path,
        sizeof(addr.sun_path) - 1));
  }
  std::memcpy(addr.sun_path, path.data(), path.size());
  UniqueFd arena_fd;
  if (!arena_path.empty()) {
    arena_fd = UniqueFd(::open(arena_path.c_str(), O_RDWR | O_CLOEXEC | O_NOFOLLOW));
    struct stat st {};
    if (!arena_fd.valid() || ::fstat(arena_fd.get(), &st) != 0) {
      return absl::InternalError(absl::StrFormat("cannot open the arena %s to share it: %s",
                                                 arena_path, std::strerror(errno)));
    }
    if (!S_ISREG(st.st_mode) || static_cast<uint64_t>(st.st_size) != arena_bytes) {
      return absl::InternalError(absl::StrFormat(
          "the arena %s changed under the daemon (not the %d-byte file it opened)", arena_path,
          arena_bytes));
    }
  }
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd.valid()) {
    return absl::InternalError(absl::StrFormat("socket: %s", std::strerror(errno)));
  }
  if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    return absl::UnavailableError(absl::StrFormat("cannot serve the data plane on %s: %s", path,
                                                  std::strerror(errno)));
  }
  const mode_t mode = policy.uids.empty() && policy.gids.empty() ? 0600 : 0666;
  if (::chmod(path.c_str(), mode) != 0 || ::listen(fd.get(), 128) != 0) {
    const int err = errno;
    ::unlink(path.c_str());
    return absl::InternalError(
        absl::StrFormat("cannot listen on %s: %s", path, std::strerror(err)));
  }
  return std::unique_ptr<TrainerListener>(new TrainerListener(
      path, std::move(policy), std::move(fd), std::move(arena_fd), arena_bytes));
}

TrainerListener::TrainerListener(std::string path, TrainerPolicy policy, UniqueFd listen_fd,
                                 UniqueFd arena_fd, uint64_t arena_bytes)
    : path_(std::move(path)),
      policy_(std::move(policy)),
      listen_fd_(std::move(listen_fd)),
      arena_fd_(std::move(arena_fd)),
      arena_bytes_(arena_bytes) {}

TrainerListener::~TrainerListener() { Stop(); }

void TrainerListener::Serve(grpc::Server* server) {
  if (stop_ || thread_.joinable()) return;  // stopped, or serving already
  thread_ = std::thread([this, server] { AcceptLoop(server); });
}

void TrainerListener::Stop() {
  if (stop_.exchange(true)) return;
  if (thread_.joinable()) thread_.join();
  ::unlink(path_.c_str());
}

void TrainerListener::AcceptLoop(grpc::Server* server) {
  while (!stop_) {
    pollfd p{listen_fd_.get(), POLLIN, 0};
    if (::poll(&p, 1, kAcceptPollMs) <= 0) continue;
    UniqueFd conn(::accept4(listen_fd_.get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (!conn.valid()) {
      if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED) {
        // Out of descriptors or memory: say so, and let them come back
        // rather than spin.
        Log("data plane: cannot accept a trainer: %s", std::strerror(errno));
        ::poll(nullptr, 0, kAcceptPollMs);
      }
      continue;
    }
    Admit(std::move(conn), server);
  }
}

void TrainerListener::Admit(UniqueFd conn, grpc::Server* server) {
  ucred cred{};
  socklen_t len = sizeof(cred);
  std::string refusal;
  struct stat st {};
  if (::getsockopt(conn.get(), SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0 ||
      ::fstat(conn.get(), &st) != 0) {
    refusal = absl::StrFormat("ecsnapd cannot tell who connected: %s", std::strerror(errno));
  } else {
    refusal = policy_.Refusal(cred.pid, cred.uid, cred.gid);
  }
  if (refusal.empty()) {
    absl::MutexLock lock(&mu_);
    const int live = LiveConnections(cred.uid);
    if (live >= kMaxConnectionsPerUid) {
      refusal = absl::StrFormat(
          "ecsnapd refuses process %d: uid %d already has %d connections open, the most one "
          "user may; a trainer needs one per process",
          cred.pid, cred.uid, live);
    }
  }
  TrainerHello hello;
  hello.admitted = refusal.empty();
  hello.message = refusal;
  hello.arena_bytes = arena_bytes_;
  absl::Status sent = SendTrainerHello(conn.get(), hello, arena_fd_.get(), kHelloTimeout);
  if (!refusal.empty()) {
    LogRefusal(refusal);
    return;  // closes it
  }
  if (!sent.ok()) {
    Log("data plane: trainer pid %d went away during the hello: %s", cred.pid, sent.message());
    return;
  }
  const int flags = ::fcntl(conn.get(), F_GETFL);
  if (flags < 0 || ::fcntl(conn.get(), F_SETFL, flags | O_NONBLOCK) != 0) return;
  {
    absl::MutexLock lock(&mu_);
    admitted_fds_[conn.get()] = Admitted{next_generation_++, cred.uid, st.st_dev, st.st_ino};
  }
  // gRPC owns the descriptor from here and closes it when the connection ends.
  grpc::AddInsecureChannelFromFd(server, conn.Release());
}

int TrainerListener::LiveConnections(uid_t uid) {
  int live = 0;
  for (auto it = admitted_fds_.begin(); it != admitted_fds_.end();) {
    struct stat st {};
    // A number gRPC closed is either free or names another file now.
    if (::fstat(it->first, &st) != 0 || st.st_ino != it->second.inode ||
        st.st_dev != it->second.device) {
      it = admitted_fds_.erase(it);
      continue;
    }
    live += it->second.uid == uid;
    ++it;
  }
  return live;
}

void TrainerListener::LogRefusal(const std::string& why) {
  absl::MutexLock lock(&mu_);
  const absl::Time now = absl::Now();
  if (now - last_refusal_log_ < absl::Seconds(1)) {
    ++refusals_unlogged_;
    return;
  }
  if (refusals_unlogged_ > 0) {
    Log("data plane: refused a trainer connection: %s (and %d more refusals since the last "
        "line)",
        why, refusals_unlogged_);
  } else {
    Log("data plane: refused a trainer connection: %s", why);
  }
  last_refusal_log_ = now;
  refusals_unlogged_ = 0;
}

std::string TrainerListener::ConnectionKey(const std::string& peer) const {
  int fd = -1;
  if (!IsSocketPeer(peer) || !absl::SimpleAtoi(peer.substr(3), &fd)) return peer;
  absl::MutexLock lock(&mu_);
  auto it = admitted_fds_.find(fd);
  return absl::StrCat(peer, "#", it == admitted_fds_.end() ? 0 : it->second.generation);
}

}  // namespace ecsnap::daemon
