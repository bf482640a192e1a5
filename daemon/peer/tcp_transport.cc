#include "daemon/peer/tcp_transport.h"

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <functional>

#include <openssl/crypto.h>
#include <openssl/rand.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/string_view.h"
#include "common/grpc_status.h"
#include "common/log.h"
#include "daemon/peer/grpc_transport.h"
#include "daemon/peer/peer_checks.h"

namespace ecsnap::daemon {
namespace {

constexpr char kMagic[8] = {'E', 'C', 'S', 'N', 'A', 'P', 'B', '1'};
constexpr size_t kTokenBytes = 16;
constexpr size_t kHelloBytes = sizeof(kMagic) + kTokenBytes;
constexpr uint32_t kMaxMessage = 1024;
// Bytes a push is received in before they are folded: small enough to stay
// in the cache between the socket's copy and the fold.
constexpr size_t kReceiveBytes = 256 << 10;
// Bytes handed to one send(2): progress is reported between them, so that a
// holder draining slowly but steadily is never taken for a stalled one.
constexpr size_t kSendBytes = 256 << 10;
// A connection must present its whole hello within this, however it trickles
// it: a worker is never held by a caller without a token for longer.
constexpr absl::Duration kHelloDeadline = absl::Seconds(1);

std::string Errno(const char* what) { return absl::StrFormat("%s: %s", what, std::strerror(errno)); }

// Sends all of `data`; false when the connection broke (or was cut).
bool SendAll(int fd, absl::Span<const uint8_t> data, CallWatchdog::Watch* watch) {
  size_t at = 0;
  while (at < data.size()) {
    const size_t want = std::min(kSendBytes, data.size() - at);
    const ssize_t n = ::send(fd, data.data() + at, want, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    at += static_cast<size_t>(n);
    watch->Progress();
  }
  return true;
}

// Receives exactly `into.size()` bytes; false when the connection ended first.
bool RecvAll(int fd, absl::Span<uint8_t> into, CallWatchdog::Watch* watch) {
  size_t at = 0;
  while (at < into.size()) {
    const ssize_t n = ::recv(fd, into.data() + at, into.size() - at, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    at += static_cast<size_t>(n);
    watch->Progress();
  }
  return true;
}

// Receives exactly `into.size()` bytes before `deadline`.
bool RecvAllBefore(int fd, absl::Span<uint8_t> into, absl::Time deadline) {
  size_t at = 0;
  while (at < into.size()) {
    const int64_t left_ms = absl::ToInt64Milliseconds(deadline - absl::Now());
    if (left_ms <= 0) return false;
    pollfd p{fd, POLLIN, 0};
    const int ready = ::poll(&p, 1, static_cast<int>(left_ms));
    if (ready < 0 && errno == EINTR) continue;
    if (ready <= 0) return false;
    const ssize_t n = ::recv(fd, into.data() + at, into.size() - at, MSG_DONTWAIT);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (n <= 0) return false;
    at += static_cast<size_t>(n);
  }
  return true;
}

void PutU32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
uint32_t GetU32(const uint8_t* p) {
  return uint32_t{p[0]} | uint32_t{p[1]} << 8 | uint32_t{p[2]} << 16 | uint32_t{p[3]} << 24;
}

}  // namespace

namespace {

std::vector<std::string> HostsOf(const std::vector<std::string>& addresses) {
  std::vector<std::string> hosts;
  for (const std::string& a : addresses) hosts.push_back(HostOfAddress(a));
  return hosts;
}

void Close(int fd) {
  while (::close(fd) < 0 && errno == EINTR) {
  }
}

}  // namespace

// ---------------------------------------------------------------------------
// BulkServer.

absl::StatusOr<std::unique_ptr<BulkServer>> BulkServer::Listen(Options options,
                                                               CallWatchdog* watchdog) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* found = nullptr;
  const std::string port = std::to_string(options.port);
  if (int rc = ::getaddrinfo(options.host.c_str(), port.c_str(), &hints, &found); rc != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "bulk transport: cannot resolve %s: %s", options.host, ::gai_strerror(rc)));
  }
  std::string error = "no address";
  int fd = -1;
  for (addrinfo* a = found; a != nullptr && fd < 0; a = a->ai_next) {
    fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) {
      error = Errno("socket");
      continue;
    }
    const int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (::bind(fd, a->ai_addr, a->ai_addrlen) != 0 || ::listen(fd, 128) != 0) {
      error = Errno("bind");
      Close(fd);
      fd = -1;
    }
  }
  ::freeaddrinfo(found);
  if (fd < 0) {
    return absl::UnavailableError(absl::StrFormat(
        "bulk transport: cannot listen on %s port %d (%s); set daemon.bulk_port to a free port",
        options.host, options.port, error));
  }
  sockaddr_storage bound{};
  socklen_t len = sizeof(bound);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &len);
  const uint32_t bound_port = ntohs(bound.ss_family == AF_INET6
                                        ? reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port
                                        : reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
  return std::unique_ptr<BulkServer>(new BulkServer(std::move(options), watchdog, fd, bound_port));
}

BulkServer::BulkServer(Options options, CallWatchdog* watchdog, int listen_fd, uint32_t port)
    : options_(std::move(options)), watchdog_(watchdog), listen_fd_(listen_fd), port_(port) {
  threads_.emplace_back([this] { AcceptLoop(); });
  for (int i = 0; i < std::max(1, options_.workers); ++i) {
    threads_.emplace_back([this] { WorkLoop(); });
  }
}

BulkServer::~BulkServer() { Stop(); }

void BulkServer::Stop() {
  std::vector<Ticket> dropped;
  {
    absl::MutexLock lock(&mu_);
    if (!stopping_) {
      stopping_ = true;
      ::shutdown(listen_fd_, SHUT_RDWR);
      for (int fd : serving_) ::shutdown(fd, SHUT_RDWR);
      for (int fd : pending_) Close(fd);
      pending_.clear();
      for (auto& [token, t] : tickets_) dropped.push_back(std::move(t));
      tickets_.clear();
      keys_.clear();
    }
  }
  dropped.clear();  // a push's sink aborts its fold
  for (std::thread& t : threads_) {
    if (t.joinable()) t.join();
  }
  absl::MutexLock lock(&mu_);
  if (!threads_.empty()) {
    threads_.clear();
    Close(listen_fd_);
  }
}

size_t BulkServer::tickets() const {
  absl::MutexLock lock(&mu_);
  return tickets_.size();
}

std::vector<BulkServer::Ticket> BulkServer::ExpireLocked(absl::Time now) {
  std::vector<Ticket> expired;
  for (auto it = tickets_.begin(); it != tickets_.end();) {
    if (it->second.expires <= now) {
      if (!it->second.key.empty()) keys_.erase(it->second.key);
      expired.push_back(std::move(it->second));
      it = tickets_.erase(it);
    } else {
      ++it;
    }
  }
  return expired;
}

absl::StatusOr<std::string> BulkServer::Issue(Ticket ticket) {
  std::string token(kTokenBytes, '\0');
  if (RAND_bytes(reinterpret_cast<unsigned char*>(token.data()), kTokenBytes) != 1) {
    return absl::InternalError("bulk transport: no randomness for a ticket");
  }
  ticket.expires = absl::Now() + options_.ticket_lifetime;
  std::vector<Ticket> expired;
  absl::MutexLock lock(&mu_);
  if (stopping_) return absl::UnavailableError("the daemon is stopping");
  expired = ExpireLocked(absl::Now());
  if (tickets_.size() >= options_.max_tickets) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "bulk transport: %d transfers are open on this holder already; try again",
        tickets_.size()));
  }
  if (!ticket.key.empty()) keys_[ticket.key] = token;
  tickets_.emplace(token, std::move(ticket));
  // `expired` goes out of scope after the lock (declared before it).
  return token;
}

void BulkServer::Revoke(const std::string& key) {
  Ticket dropped;  // destroyed after the lock: its sink aborts its fold
  absl::MutexLock lock(&mu_);
  auto it = keys_.find(key);
  if (it == keys_.end()) return;
  auto t = tickets_.find(it->second);
  if (t != tickets_.end()) {
    dropped = std::move(t->second);
    tickets_.erase(t);
  }
  keys_.erase(it);
}

absl::StatusOr<std::string> BulkServer::IssuePush(const std::string& key, uint64_t length,
                                                  std::unique_ptr<ChunkSink> sink) {
  Ticket t;
  t.key = key;
  t.length = length;
  t.sink = std::move(sink);
  return Issue(std::move(t));
}

absl::StatusOr<std::string> BulkServer::IssueRead(PinnedChunk chunk, uint64_t offset,
                                                  uint64_t length) {
  Ticket t;
  t.length = length;
  t.chunk = std::move(chunk);
  t.offset = offset;
  return Issue(std::move(t));
}

void BulkServer::AcceptLoop() {
  while (true) {
    pollfd p{listen_fd_, POLLIN, 0};
    const int ready = ::poll(&p, 1, 200);
    std::vector<Ticket> expired;  // destroyed after the lock: sinks abort folds
    {
      absl::MutexLock lock(&mu_);
      if (stopping_) return;
      expired = ExpireLocked(absl::Now());
    }
    expired.clear();
    if (ready <= 0) continue;
    const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
        absl::SleepFor(absl::Milliseconds(50));  // out of descriptors: back off
      }
      continue;
    }
    absl::MutexLock lock(&mu_);
    if (stopping_ || pending_.size() >= static_cast<size_t>(std::max(1, options_.workers))) {
      Close(fd);  // more than the holder serves at once: the caller retries
      continue;
    }
    pending_.push_back(fd);
  }
}

void BulkServer::WorkLoop() {
  while (true) {
    int fd = -1;
    {
      absl::MutexLock lock(&mu_);
      auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return stopping_ || !pending_.empty();
      };
      mu_.Await(absl::Condition(&ready));
      if (stopping_) return;
      fd = pending_.front();
      pending_.pop_front();
      serving_.insert(fd);
    }
    Serve(fd);
    absl::MutexLock lock(&mu_);
    serving_.erase(fd);
    Close(fd);
  }
}

void BulkServer::Serve(int fd) {
  auto watch = watchdog_->Start([fd] { ::shutdown(fd, SHUT_RDWR); });
  const int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  uint8_t hello[kHelloBytes];
  if (!RecvAllBefore(fd, absl::MakeSpan(hello), absl::Now() + kHelloDeadline) ||
      std::memcmp(hello, kMagic, sizeof(kMagic)) != 0) {
    return;
  }
  const std::string token(reinterpret_cast<const char*>(hello) + sizeof(kMagic), kTokenBytes);
  std::optional<Ticket> ticket = Take(token);
  if (!ticket.has_value()) return;
  if (ticket->sink != nullptr) {
    ServePush(fd, *ticket, watch.get());
  } else {
    ServeRead(fd, *ticket, watch.get());
  }
}

std::optional<BulkServer::Ticket> BulkServer::Take(const std::string& token) {
  absl::MutexLock lock(&mu_);
  auto it = tickets_.find(token);
  if (it == tickets_.end() || it->second.expires <= absl::Now()) {
    static std::atomic<int64_t> last_log{0};
    const int64_t now = absl::ToUnixSeconds(absl::Now());
    if (last_log.exchange(now) != now) {
      Log("bulk transport: a transfer presented an unknown, used or expired token; refused");
    }
    return std::nullopt;
  }
  Ticket ticket = std::move(it->second);
  tickets_.erase(it);
  if (!ticket.key.empty()) keys_.erase(ticket.key);
  return ticket;
}

absl::StatusOr<BulkServer::Claimed> BulkServer::Claim(const std::string& token) {
  std::optional<Ticket> ticket = Take(token);
  if (!ticket.has_value()) {
    return absl::NotFoundError("the bulk token is unknown, used or expired; open the transfer again");
  }
  Claimed c;
  c.length = ticket->length;
  c.sink = std::move(ticket->sink);
  c.chunk = std::move(ticket->chunk);
  c.offset = ticket->offset;
  return c;
}

void BulkServer::ServePush(int fd, Ticket& ticket, CallWatchdog::Watch* watch) {
  thread_local std::vector<uint8_t> buffer;
  buffer.resize(kReceiveBytes);
  uint64_t left = ticket.length;
  // Receives what is left of the push into `buffer`, a piece at a time, while
  // `each` takes the pieces; false when the connection ends first.
  auto receive = [&](const std::function<bool(absl::Span<const uint8_t>)>& each) {
    while (left > 0) {
      const ssize_t n = ::recv(fd, buffer.data(), std::min<uint64_t>(left, buffer.size()), 0);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return false;
      watch->Progress();
      left -= static_cast<uint64_t>(n);
      if (!each(absl::MakeConstSpan(buffer.data(), static_cast<size_t>(n)))) return true;
    }
    return true;
  };
  absl::Status st;
  if (!receive([&](absl::Span<const uint8_t> piece) {
        st = ticket.sink->Piece(piece);
        return st.ok();
      })) {
    ticket.sink->Abort();  // cut, or the sender went away
    return;
  }
  bool complete = false;
  if (st.ok()) {
    auto end = ticket.sink->End();
    st = end.status();
    complete = end.ok() && *end;
  }
  const std::string message(st.message().substr(0, kMaxMessage));
  std::vector<uint8_t> reply(12 + message.size());
  PutU32(reply.data(), static_cast<uint32_t>(st.code()));
  PutU32(reply.data() + 4, complete ? 1 : 0);
  PutU32(reply.data() + 8, static_cast<uint32_t>(message.size()));
  std::memcpy(reply.data() + 12, message.data(), message.size());
  if (!SendAll(fd, reply, watch) || left == 0) return;
  // Refused before its last byte: the sender is still sending and reads the
  // answer only after. Closing now would reset the connection and lose the
  // answer, so the rest is read and dropped (bounded by what the ticket
  // admitted, and by the watchdog).
  ::shutdown(fd, SHUT_WR);
  receive([](absl::Span<const uint8_t>) { return true; });
}

void BulkServer::ServeRead(int fd, Ticket& ticket, CallWatchdog::Watch* watch) {
  ticket.chunk.read(ticket.offset, ticket.length, [&](absl::Span<const uint8_t> piece) {
    return SendAll(fd, piece, watch);
  });
}

// ---------------------------------------------------------------------------
// TcpTransport.

TcpTransport::TcpTransport(std::vector<peer::Peer::Stub*> stubs,
                           std::vector<std::string> addresses, std::vector<uint32_t> slots,
                           CallWatchdog* watchdog)
    : stubs_(stubs),
      hosts_(HostsOf(addresses)),
      slots_(slots),
      watchdog_(watchdog),
      fallback_(std::move(stubs), std::move(slots), watchdog),
      tcp_until_(new std::atomic<int64_t>[stubs_.size()]),
      rdma_failures_(new std::atomic<int>[stubs_.size()]) {
  for (size_t i = 0; i < stubs_.size(); ++i) {
    tcp_until_[i] = 0;
    rdma_failures_[i] = 0;
  }
}

bool TcpTransport::RdmaTo(int holder) const {
  return rdma_ != nullptr && absl::ToUnixNanos(absl::Now()) >= tcp_until_[holder].load();
}

void TcpTransport::RdmaDone(int holder, const absl::Status& st, const RdmaEnd& end) {
  const int64_t now = absl::ToUnixNanos(absl::Now());
  if (end.fallback == RdmaFallback::kThisHolder) {
    if (tcp_until_[holder].exchange(now + absl::ToInt64Nanoseconds(kNoDeviceTcp)) <= now) {
      Log("slot %d takes no RDMA (%s): chunks go to and from it over TCP, RDMA tried again in "
          "%d min",
          slots_[holder], st.message(), absl::ToInt64Minutes(kNoDeviceTcp));
    }
    return;
  }
  // Only the data path failing counts (not the holder refusing, nor a busy
  // pool); a transfer that moved every byte starts the count again.
  if (!end.broke) {
    if (st.ok()) rdma_failures_[holder] = 0;
    return;
  }
  // Exactly one of the transfers that reach the count switches (and logs).
  if (++rdma_failures_[holder] != kRdmaFailuresBeforeTcp) return;
  rdma_failures_[holder] = 0;
  tcp_until_[holder] = now + absl::ToInt64Nanoseconds(kFailingRdmaTcp);
  Log("RDMA to slot %d failed %d times in a row (last: %s): TCP to it for %d s", slots_[holder],
      kRdmaFailuresBeforeTcp, st.message(), absl::ToInt64Seconds(kFailingRdmaTcp));
}

absl::StatusOr<int> TcpTransport::Dial(int holder, const peer::BulkTicket& ticket) {
  if (ticket.token().size() != kTokenBytes || ticket.port() == 0 || ticket.port() > 65535) {
    return absl::InternalError(absl::StrFormat("slot %d answered a malformed bulk ticket",
                                               slots_[holder]));
  }
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* found = nullptr;
  const std::string port = std::to_string(ticket.port());
  if (int rc = ::getaddrinfo(hosts_[holder].c_str(), port.c_str(), &hints, &found); rc != 0) {
    return absl::UnavailableError(
        absl::StrFormat("cannot resolve %s: %s", hosts_[holder], ::gai_strerror(rc)));
  }
  const int timeout_ms = static_cast<int>(absl::ToInt64Milliseconds(watchdog_->stall()));
  std::string error = "no address";
  int fd = -1;
  for (addrinfo* a = found; a != nullptr && fd < 0; a = a->ai_next) {
    fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, a->ai_protocol);
    if (fd < 0) {
      error = Errno("socket");
      continue;
    }
    int rc = ::connect(fd, a->ai_addr, a->ai_addrlen);
    if (rc != 0 && errno == EINPROGRESS) {
      pollfd p{fd, POLLOUT, 0};
      rc = ::poll(&p, 1, timeout_ms) == 1 ? 0 : -1;
      int so_error = rc == 0 ? 0 : ETIMEDOUT;
      socklen_t len = sizeof(so_error);
      if (rc == 0) ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &so_error, &len);
      if (so_error != 0) {
        errno = so_error;
        rc = -1;
      }
    }
    if (rc != 0) {
      error = Errno("connect");
      Close(fd);
      fd = -1;
    }
  }
  ::freeaddrinfo(found);
  if (fd < 0) {
    return absl::UnavailableError(absl::StrFormat("cannot reach the bulk port %s:%d: %s",
                                                  hosts_[holder], ticket.port(), error));
  }
  ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) & ~O_NONBLOCK);
  const int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  uint8_t hello[kHelloBytes];
  std::memcpy(hello, kMagic, sizeof(kMagic));
  std::memcpy(hello + sizeof(kMagic), ticket.token().data(), kTokenBytes);
  auto watch = watchdog_->Start([fd] { ::shutdown(fd, SHUT_RDWR); });
  if (!SendAll(fd, absl::MakeConstSpan(hello), watch.get())) {
    const bool cut = watch->cancelled();
    watch.reset();
    Close(fd);
    return TransferError(absl::UnavailableError("the bulk connection broke"), cut,
                         watchdog_->stall(), "hello");
  }
  return fd;
}

absl::StatusOr<bool> TcpTransport::Push(int holder, const peer::PushChunkHeader& header,
                                        const ChunkBytes& bytes) {
  const std::string what = PushName(header, slots_[holder]);
  peer::BulkTicket ticket;
  {
    grpc::ClientContext ctx;
    ctx.set_wait_for_ready(true);  // a peer still starting: wait, while the watchdog allows
    auto watch = watchdog_->Start(&ctx);
    absl::Status st = FromGrpc(stubs_[holder]->OpenPush(&ctx, header, &ticket));
    // A holder without a bulk port (BULK_GRPC, or an older daemon during a
    // rolling change) still takes the bytes inside the gRPC stream.
    if (st.code() == absl::StatusCode::kUnimplemented) return fallback_.Push(holder, header, bytes);
    if (!st.ok()) return TransferError(st, watch->cancelled(), watchdog_->stall(), what);
  }
  if (ticket.folded()) return false;
  if (RdmaTo(holder)) {
    RdmaEnd end;
    absl::StatusOr<bool> sent =
        rdma_->Push(stubs_[holder], ticket, header.length(), bytes, what, &end);
    RdmaDone(holder, sent.status(), end);
    if (end.fallback == RdmaFallback::kNone) return sent;
    // The ticket is untouched: it goes to the bulk port.
  }
  auto fd = Dial(holder, ticket);
  if (!fd.ok()) return TransferError(fd.status(), false, watchdog_->stall(), what);
  auto watch = watchdog_->Start([fd = *fd] { ::shutdown(fd, SHUT_RDWR); });
  bool ok = true;
  bytes([&](absl::Span<const uint8_t> piece) {
    ok = SendAll(*fd, piece, watch.get());
    return ok;
  });
  // The holder answers once every byte is folded; it may answer early (and
  // close) when a piece is refused, so its answer is read even after a
  // failed send.
  uint8_t head[12];
  absl::Status st;
  bool complete = false;
  if (RecvAll(*fd, absl::MakeSpan(head), watch.get())) {
    const uint32_t code = GetU32(head);
    complete = GetU32(head + 4) != 0;
    std::string message(std::min(GetU32(head + 8), kMaxMessage), '\0');
    RecvAll(*fd, absl::MakeSpan(reinterpret_cast<uint8_t*>(message.data()), message.size()),
            watch.get());
    st = code <= static_cast<uint32_t>(absl::StatusCode::kUnauthenticated)
             ? absl::Status(static_cast<absl::StatusCode>(code), message)
             : absl::InternalError("the holder answered a status code out of range");
    // The answer crossed an unauthenticated connection: whatever it says,
    // only the next OpenPush (on the authenticated channel) may give the
    // push up for good.
    if (st.code() == absl::StatusCode::kFailedPrecondition ||
        st.code() == absl::StatusCode::kNotFound) {
      st = absl::AbortedError(st.message());
    }
  } else {
    st = absl::UnavailableError(ok ? "the holder closed the bulk connection before its answer"
                                   : "the bulk connection broke during the push");
  }
  const bool cut = watch->cancelled();
  watch.reset();
  Close(*fd);
  if (st.ok()) return complete;
  return TransferError(st, cut, watchdog_->stall(), what);
}

namespace {

// One bulk connection's range, read in order.
class TcpChunkReader final : public ChunkReader {
 public:
  TcpChunkReader(int fd, uint64_t length, CallWatchdog* watchdog, std::string what)
      : fd_(fd), remaining_(length), watchdog_(watchdog), what_(std::move(what)) {}
  ~TcpChunkReader() override { Close(fd_); }

  absl::Status Read(absl::Span<uint8_t> into) override {
    if (into.size() > remaining_) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s: %d bytes asked, %d left in the range", what_, into.size(), remaining_));
    }
    const int fd = fd_;
    auto watch = watchdog_->Start([fd] { ::shutdown(fd, SHUT_RDWR); });
    if (!RecvAll(fd_, into, watch.get())) {
      remaining_ = 0;
      return TransferError(absl::DataLossError("short chunk: the bulk connection ended early"),
                           watch->cancelled(), watchdog_->stall(), what_);
    }
    remaining_ -= into.size();
    return absl::OkStatus();
  }

  uint64_t remaining() const override { return remaining_; }

 private:
  const int fd_;
  uint64_t remaining_;
  CallWatchdog* const watchdog_;
  const std::string what_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<ChunkReader>> TcpTransport::OpenRead(
    int holder, const peer::GetChunkRequest& request) {
  const std::string what = ReadName(request, slots_[holder]);
  peer::BulkTicket ticket;
  {
    grpc::ClientContext ctx;
    auto watch = watchdog_->Start(&ctx);
    absl::Status st = FromGrpc(stubs_[holder]->OpenRead(&ctx, request, &ticket));
    if (st.code() == absl::StatusCode::kUnimplemented) return fallback_.OpenRead(holder, request);
    if (!st.ok()) return TransferError(st, watch->cancelled(), watchdog_->stall(), what);
  }
  const uint64_t want =
      GetChunkRange(ticket.header().length(), request.offset(), request.length()).second;
  if (RdmaTo(holder)) {
    RdmaEnd end;
    // A read counts when it ends (every byte read, or broken), not when it
    // opens: its set-up crosses gRPC only.
    absl::StatusOr<std::unique_ptr<ChunkReader>> reader = rdma_->OpenRead(
        stubs_[holder], ticket, want, what, &end,
        [this, holder](const RdmaEnd& ended) {
          RdmaDone(holder, ended.broke ? absl::UnavailableError("the RDMA read broke")
                                       : absl::OkStatus(),
                   ended);
        });
    if (!reader.ok()) RdmaDone(holder, reader.status(), end);
    if (end.fallback == RdmaFallback::kNone) return reader;
  }
  auto fd = Dial(holder, ticket);
  if (!fd.ok()) return TransferError(fd.status(), false, watchdog_->stall(), what);
  return std::unique_ptr<ChunkReader>(
      std::make_unique<TcpChunkReader>(*fd, want, watchdog_, what));
}

}  // namespace ecsnap::daemon
