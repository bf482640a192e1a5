#include "common/trainer_hello.h"

#include <poll.h>
#include <sys/socket.h>

#include <cerrno>
#include <cstring>
#include <vector>

#include "absl/strings/str_format.h"

namespace ecsnap {
namespace {

constexpr char kMagic[8] = {'E', 'C', 'S', 'N', 'H', 'L', 'O', '2'};
constexpr char kRoleMagic[8] = {'E', 'C', 'S', 'N', 'R', 'O', 'L', '1'};
constexpr uint32_t kFlagWindows = 1;
constexpr uint32_t kFlagPings = 2;

// Native byte order: both ends are on one machine.
struct Wire {
  char magic[8];
  uint32_t admitted;
  uint32_t message_bytes;
  uint64_t fd_bytes;
  uint32_t flags;
  uint32_t reserved;
};
static_assert(sizeof(Wire) == 32, "the hello header is 32 bytes");

struct RoleWire {
  char magic[8];
  uint32_t kind;
  uint32_t reserved;
  char token[kWindowTokenBytes];
};
static_assert(sizeof(RoleWire) == kTrainerRoleBytes, "a role is 32 bytes");

// Waits until `sock` is ready for `events` or the deadline passes.
absl::Status WaitFor(int sock, short events, absl::Time deadline, const char* what) {
  while (true) {
    const absl::Duration left = deadline - absl::Now();
    if (left <= absl::ZeroDuration()) {
      return absl::DeadlineExceededError(absl::StrFormat("timed out %s the trainer hello", what));
    }
    pollfd p{sock, events, 0};
    const int n = ::poll(&p, 1, static_cast<int>(absl::ToInt64Milliseconds(left)) + 1);
    if (n > 0) return absl::OkStatus();
    if (n < 0 && errno != EINTR) {
      return absl::UnavailableError(absl::StrFormat("poll: %s", std::strerror(errno)));
    }
  }
}

// Closes every descriptor carried by `msg`'s control data; returns the
// first one in `*fd` if `fd` is not null, closing the rest.
int CollectFds(msghdr* msg, UniqueFd* fd) {
  int count = 0;
  for (cmsghdr* c = CMSG_FIRSTHDR(msg); c != nullptr; c = CMSG_NXTHDR(msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    const size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (size_t i = 0; i < n; ++i) {
      int got;
      std::memcpy(&got, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
      if (count++ == 0 && fd != nullptr) {
        *fd = UniqueFd(got);
      } else {
        ::close(got);
      }
    }
  }
  return count;
}

// Sends all of [data, data + size) by the deadline; with `fd` >= 0 the
// descriptor rides with the first byte sent. `what` names the message.
absl::Status SendAll(int sock, const char* data, size_t size, int fd, absl::Time deadline,
                     const char* what) {
  size_t sent = 0;
  bool fd_sent = fd < 0;
  while (sent < size) {
    if (absl::Status st = WaitFor(sock, POLLOUT, deadline, "sending"); !st.ok()) return st;
    iovec iov{const_cast<char*>(data) + sent, size - sent};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))];
    if (!fd_sent) {
      std::memset(control, 0, sizeof(control));
      msg.msg_control = control;
      msg.msg_controllen = sizeof(control);
      cmsghdr* c = CMSG_FIRSTHDR(&msg);
      c->cmsg_level = SOL_SOCKET;
      c->cmsg_type = SCM_RIGHTS;
      c->cmsg_len = CMSG_LEN(sizeof(int));
      std::memcpy(CMSG_DATA(c), &fd, sizeof(int));
    }
    const ssize_t n = ::sendmsg(sock, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) continue;
      return absl::UnavailableError(
          absl::StrFormat("cannot send %s: %s", what, std::strerror(errno)));
    }
    fd_sent = true;
    sent += static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status SendTrainerHello(int sock, const TrainerHello& hello, int fd,
                              absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  const std::string message = hello.message.substr(0, kHelloMaxMessageBytes);
  Wire w;
  std::memcpy(w.magic, kMagic, sizeof(kMagic));
  w.admitted = hello.admitted ? 1 : 0;
  w.message_bytes = static_cast<uint32_t>(message.size());
  w.fd_bytes = hello.admitted && fd >= 0 ? hello.fd_bytes : 0;
  w.flags = (hello.windows ? kFlagWindows : 0) | (hello.pings ? kFlagPings : 0);
  w.reserved = 0;
  std::vector<char> bytes(sizeof(w) + message.size());
  std::memcpy(bytes.data(), &w, sizeof(w));
  std::memcpy(bytes.data() + sizeof(w), message.data(), message.size());
  return SendAll(sock, bytes.data(), bytes.size(), hello.admitted ? fd : -1, deadline,
                 "the trainer hello");
}

absl::StatusOr<TrainerHello> ReceiveTrainerHello(int sock, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  TrainerHello hello;
  int fds_seen = 0;
  // Reads exactly `want` bytes into `out`, keeping the first descriptor.
  auto read_exactly = [&](char* out, size_t want) -> absl::Status {
    size_t got = 0;
    while (got < want) {
      if (absl::Status st = WaitFor(sock, POLLIN, deadline, "waiting for"); !st.ok()) return st;
      iovec iov{out + got, want - got};
      msghdr msg{};
      msg.msg_iov = &iov;
      msg.msg_iovlen = 1;
      alignas(cmsghdr) char control[CMSG_SPACE(4 * sizeof(int))];
      msg.msg_control = control;
      msg.msg_controllen = sizeof(control);
      const ssize_t n = ::recvmsg(sock, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
      if (n < 0) {
        if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) continue;
        return absl::UnavailableError(
            absl::StrFormat("cannot read the daemon's hello: %s", std::strerror(errno)));
      }
      fds_seen += CollectFds(&msg, fds_seen == 0 ? &hello.fd : nullptr);
      if ((msg.msg_flags & MSG_CTRUNC) != 0) {
        return absl::DataLossError("the daemon's hello carried more descriptors than one");
      }
      if (n == 0) {
        return absl::UnavailableError(
            "the daemon closed the connection before saying hello");
      }
      got += static_cast<size_t>(n);
    }
    return absl::OkStatus();
  };

  Wire w;
  if (absl::Status st = read_exactly(reinterpret_cast<char*>(&w), sizeof(w)); !st.ok()) return st;
  if (std::memcmp(w.magic, kMagic, sizeof(kMagic)) != 0) {
    return absl::DataLossError(
        "the socket's first bytes are not an ecsnapd hello: not an ecsnapd of this release");
  }
  if (w.message_bytes > kHelloMaxMessageBytes || w.admitted > 1) {
    return absl::DataLossError("the daemon's hello is malformed");
  }
  hello.message.resize(w.message_bytes);
  if (absl::Status st = read_exactly(hello.message.data(), w.message_bytes); !st.ok()) return st;
  hello.admitted = w.admitted == 1;
  if (fds_seen > 1) return absl::DataLossError("the daemon's hello carried more descriptors than one");
  hello.windows = (w.flags & kFlagWindows) != 0;
  hello.pings = (w.flags & kFlagPings) != 0;
  if (!hello.admitted) {
    hello.fd.Reset();
    return hello;
  }
  hello.fd_bytes = hello.fd.valid() ? w.fd_bytes : 0;
  return hello;
}

absl::Status SendTrainerRole(int sock, const TrainerRole& role, absl::Duration timeout) {
  if (role.kind == TrainerRole::Kind::kWindow && role.token.size() != kWindowTokenBytes) {
    return absl::InvalidArgumentError("a window token has 16 bytes");
  }
  RoleWire w{};
  std::memcpy(w.magic, kRoleMagic, sizeof(kRoleMagic));
  w.kind = static_cast<uint32_t>(role.kind);
  std::memcpy(w.token, role.token.data(), role.token.size());
  return SendAll(sock, reinterpret_cast<const char*>(&w), sizeof(w), -1,
                 absl::Now() + timeout, "the connection's role");
}

absl::StatusOr<TrainerRole> ParseTrainerRole(const char* bytes) {
  RoleWire w;
  std::memcpy(&w, bytes, sizeof(w));
  if (std::memcmp(w.magic, kRoleMagic, sizeof(kRoleMagic)) != 0) {
    return absl::DataLossError(
        "the connection did not say what it is for (not an ecsnap client of this release)");
  }
  TrainerRole role;
  switch (w.kind) {
    case static_cast<uint32_t>(TrainerRole::Kind::kGrpc):
      role.kind = TrainerRole::Kind::kGrpc;
      return role;
    case static_cast<uint32_t>(TrainerRole::Kind::kWindow):
      role.kind = TrainerRole::Kind::kWindow;
      role.token.assign(w.token, kWindowTokenBytes);
      return role;
    default:
      return absl::DataLossError(absl::StrFormat("unknown connection role %d", w.kind));
  }
}

}  // namespace ecsnap
