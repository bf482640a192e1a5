#include "daemon/service/trainer_listener.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include <grpcpp/server_posix.h>

#include "absl/base/attributes.h"
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
    const std::string& path, TrainerPolicy policy, WindowFetcher fetch) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr.sun_path)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "socket path %s is longer than the %d bytes a Unix socket allows", path,
        sizeof(addr.sun_path) - 1));
  }
  std::memcpy(addr.sun_path, path.data(), path.size());
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
  return std::unique_ptr<TrainerListener>(
      new TrainerListener(path, std::move(policy), std::move(fd), std::move(fetch)));
}

TrainerListener::TrainerListener(std::string path, TrainerPolicy policy, UniqueFd listen_fd,
                                 WindowFetcher fetch)
    : path_(std::move(path)),
      policy_(std::move(policy)),
      listen_fd_(std::move(listen_fd)),
      fetch_(std::move(fetch)) {}

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

// One thread accepts, greets and reads what each connection is for, all
// without blocking: a process that connects and says nothing holds a slot
// of kMaxPendingConnections for at most kRoleTimeout, never the thread.
void TrainerListener::AcceptLoop(grpc::Server* server) {
  std::vector<Pending> pending;
  std::vector<pollfd> fds;
  while (!stop_) {
    fds.clear();
    fds.push_back({listen_fd_.get(), POLLIN, 0});
    for (const Pending& p : pending) fds.push_back({p.conn.get(), POLLIN, 0});
    if (::poll(fds.data(), fds.size(), kAcceptPollMs) < 0 && errno != EINTR) {
      ::poll(nullptr, 0, kAcceptPollMs);
      continue;
    }
    const absl::Time now = absl::Now();
    std::vector<Pending> still;
    for (size_t i = 0; i < pending.size(); ++i) {
      Pending& p = pending[i];
      if ((fds[i + 1].revents & (POLLIN | POLLHUP | POLLERR)) != 0 && ReadRole(p, server)) {
        continue;
      }
      if (now >= p.deadline) {  // checked on every pass: trickling bytes does not extend it
        LogRefusal(absl::StrFormat("process %d (uid %d) connected and never said what for", p.pid,
                                   p.uid));
        continue;
      }
      still.push_back(std::move(p));
    }
    pending = std::move(still);
    if ((fds[0].revents & POLLIN) == 0) continue;
    UniqueFd conn(::accept4(listen_fd_.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK));
    if (!conn.valid()) {
      if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED) {
        // Out of descriptors or memory: say so, and let them come back
        // rather than spin.
        Log("data plane: cannot accept a trainer: %s", std::strerror(errno));
        ::poll(nullptr, 0, kAcceptPollMs);
      }
      continue;
    }
    Admit(std::move(conn), &pending);
  }
}

void TrainerListener::Admit(UniqueFd conn, std::vector<Pending>* pending) {
  ucred cred{};
  socklen_t len = sizeof(cred);
  std::string refusal;
  if (::getsockopt(conn.get(), SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
    refusal = absl::StrFormat("ecsnapd cannot tell who connected: %s", std::strerror(errno));
  } else {
    refusal = policy_.Refusal(cred.pid, cred.uid, cred.gid);
  }
  if (refusal.empty()) {
    absl::MutexLock lock(&mu_);
    int live = LiveConnections(cred.uid);
    for (const Pending& p : *pending) live += p.uid == cred.uid;
    if (live >= kMaxConnectionsPerUid) {
      refusal = absl::StrFormat(
          "ecsnapd refuses process %d: uid %d already has %d connections open, the most one "
          "user may; a trainer needs one per process",
          cred.pid, cred.uid, live);
    } else if (std::count_if(pending->begin(), pending->end(), [&](const Pending& p) {
                 return p.uid == cred.uid;
               }) >= static_cast<long>(kMaxPendingConnectionsPerUid)) {
      refusal = absl::StrFormat(
          "ecsnapd refuses process %d: uid %d already has %d connections that have not said "
          "what they are for",
          cred.pid, cred.uid, kMaxPendingConnectionsPerUid);
    } else if (pending->size() >= kMaxPendingConnections) {
      refusal = absl::StrFormat(
          "ecsnapd refuses process %d: %d connections are still being set up; try again",
          cred.pid, pending->size());
    }
  }
  TrainerHello hello;
  hello.admitted = refusal.empty();
  hello.message = refusal;
  hello.windows = fetch_ != nullptr;
  hello.pings = true;
  absl::Status sent = SendTrainerHello(conn.get(), hello, -1, kHelloTimeout);
  if (!refusal.empty()) {
    LogRefusal(refusal);
    return;  // closes it
  }
  if (!sent.ok()) {
    Log("data plane: trainer pid %d went away during the hello: %s", cred.pid, sent.message());
    return;
  }
  Pending p;
  p.conn = std::move(conn);
  p.pid = cred.pid;
  p.uid = cred.uid;
  p.deadline = absl::Now() + kRoleTimeout;
  pending->push_back(std::move(p));
}

bool TrainerListener::ReadRole(Pending& p, grpc::Server* server) {
  // Exactly the role's bytes: what follows (gRPC's preface) is gRPC's.
  const ssize_t n = ::recv(p.conn.get(), p.role + p.got, sizeof(p.role) - p.got, MSG_DONTWAIT);
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return false;
  if (n <= 0) return true;  // gone
  p.got += static_cast<size_t>(n);
  if (p.got < sizeof(p.role)) return false;
  absl::StatusOr<TrainerRole> role = ParseTrainerRole(p.role);
  if (!role.ok()) {
    LogRefusal(absl::StrFormat("process %d (uid %d): %s", p.pid, p.uid, role.status().message()));
    return true;
  }
  if (role->kind == TrainerRole::Kind::kWindow) {
    ServeWindow(p, role->token);
    return true;
  }
  struct stat st {};
  if (::fstat(p.conn.get(), &st) != 0) return true;
  {
    absl::MutexLock lock(&mu_);
    admitted_fds_[p.conn.get()] = Admitted{next_generation_++, p.uid, st.st_dev, st.st_ino};
  }
  // gRPC owns the descriptor from here and closes it when the connection ends.
  grpc::AddInsecureChannelFromFd(server, p.conn.Release());
  return true;
}

void TrainerListener::ServeWindow(Pending& p, const std::string& token) {
  TrainerHello reply;
  absl::StatusOr<Arena::WindowFile> window =
      fetch_ ? fetch_(token, p.uid)
             : absl::FailedPreconditionError("this ecsnapd shares no memory with trainers");
  reply.admitted = window.ok();
  if (window.ok()) {
    reply.fd_bytes = window->bytes;
  } else {
    reply.message = std::string(window.status().message());
    LogRefusal(absl::StrFormat("process %d (uid %d) asked for a window: %s", p.pid, p.uid,
                               reply.message));
  }
  // The socket buffer is empty: the reply goes out at once or not at all.
  absl::Status sent = SendTrainerHello(p.conn.get(), reply, window.ok() ? window->fd.get() : -1,
                                       absl::Milliseconds(100));
  if (!sent.ok()) Log("data plane: process %d left before its window: %s", p.pid, sent.message());
}

// True while descriptor number `fd` still names the file (device, inode) it
// named when it was admitted. gRPC closes admitted numbers on its own threads
// and any thread may reuse them (ThreadSanitizer sees that reuse as a race on
// the descriptor; tests/tsan/tsan.supp names this function): the comparison
// is the check, and fstat changes nothing.
ABSL_ATTRIBUTE_NOINLINE static bool StillNames(int fd, dev_t device, ino_t inode) {
  struct stat st {};
  return ::fstat(fd, &st) == 0 && st.st_ino == inode && st.st_dev == device;
}

int TrainerListener::LiveConnections(uid_t uid) {
  int live = 0;
  for (auto it = admitted_fds_.begin(); it != admitted_fds_.end();) {
    // A number gRPC closed is either free or names another file now.
    if (!StillNames(it->first, it->second.device, it->second.inode)) {
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

std::optional<int> TrainerListener::SocketFd(const std::string& peer) {
  int fd = -1;
  if (!IsSocketPeer(peer) || !absl::SimpleAtoi(peer.substr(3), &fd)) return std::nullopt;
  return fd;
}

std::optional<TrainerListener::Admitted> TrainerListener::AdmittedOn(int fd) const {
  absl::MutexLock lock(&mu_);
  auto it = admitted_fds_.find(fd);
  if (it == admitted_fds_.end()) return std::nullopt;
  return it->second;
}

std::optional<uint32_t> TrainerListener::ConnectionUid(const std::string& peer) const {
  const std::optional<int> fd = SocketFd(peer);
  const std::optional<Admitted> a = fd.has_value() ? AdmittedOn(*fd) : std::nullopt;
  if (!a.has_value()) return std::nullopt;
  return a->uid;
}

bool TrainerListener::Cut(const std::string& key) const {
  const size_t hash = key.rfind('#');
  uint64_t generation = 0;
  if (hash == std::string::npos || !absl::SimpleAtoi(key.substr(hash + 1), &generation)) {
    return false;
  }
  const std::optional<int> fd = SocketFd(key.substr(0, hash));
  if (!fd.has_value()) return false;
  // Under the lock: a later admission on the same number (a new generation)
  // is not cut for an old one. The descriptor is the call's connection's as
  // long as a call on it is live (gRPC closes it after its last call).
  absl::MutexLock lock(&mu_);
  auto it = admitted_fds_.find(*fd);
  struct stat st {};
  if (it == admitted_fds_.end() || it->second.generation != generation ||
      ::fstat(*fd, &st) != 0 || st.st_dev != it->second.device || st.st_ino != it->second.inode) {
    return false;
  }
  return ::shutdown(*fd, SHUT_RDWR) == 0;
}

std::string TrainerListener::ConnectionKey(const std::string& peer) const {
  const std::optional<int> fd = SocketFd(peer);
  if (!fd.has_value()) return peer;
  const std::optional<Admitted> a = AdmittedOn(*fd);
  return absl::StrCat(peer, "#", a.has_value() ? a->generation : 0);
}

}  // namespace ecsnap::daemon
