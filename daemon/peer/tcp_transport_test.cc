// The TCP bulk transport's holder half against real sockets on 127.0.0.1:
// tokens admit one connection once, a forged, used or expired token gets no
// byte in or out, and a stream that is cut or stalls aborts its fold.
#include "daemon/peer/tcp_transport.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <random>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "daemon/peer/testing_sink.h"
#include "gtest/gtest.h"

namespace ecsnap::daemon {
namespace {

using testing::Record;
using testing::RecordingSink;
using testing::RandomBytes;

int Connect(uint32_t port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  EXPECT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  timeval tv{10, 0};  // no test waits on a socket for longer
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  return fd;
}

void SendAll(int fd, const std::string& s) {
  size_t at = 0;
  while (at < s.size()) {
    const ssize_t n = ::send(fd, s.data() + at, s.size() - at, MSG_NOSIGNAL);
    ASSERT_GT(n, 0) << std::strerror(errno);
    at += static_cast<size_t>(n);
  }
}

// Everything until the holder closes.
std::string ReadToEnd(int fd) {
  std::string out;
  char buf[65536];
  while (true) {
    const ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
    if (n <= 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  return out;
}

std::string Hello(const std::string& token) { return "ECSNAPB1" + token; }

template <typename Pred>
bool WaitFor(Pred pred) {
  for (int i = 0; i < 500; ++i) {
    if (pred()) return true;
    absl::SleepFor(absl::Milliseconds(10));
  }
  return pred();
}

class BulkServerTest : public ::testing::Test {
 protected:
  explicit BulkServerTest(absl::Duration stall = absl::Milliseconds(500))
      : watchdog_(stall) {
    BulkServer::Options o;
    o.workers = 4;
    o.max_tickets = 8;
    o.ticket_lifetime = absl::Seconds(2);
    auto s = BulkServer::Listen(o, &watchdog_);
    EXPECT_TRUE(s.ok()) << s.status();
    server_ = std::move(*s);
  }

  CallWatchdog watchdog_;
  std::unique_ptr<BulkServer> server_;
};

TEST_F(BulkServerTest, APushWithItsTokenIsFedInOrderAndAnswered) {
  const uint64_t seed = std::random_device()();
  std::printf("seed %llu\n", static_cast<unsigned long long>(seed));
  const std::string data = RandomBytes((3 << 20) + 17, seed);
  Record r;
  auto token = server_->IssuePush("k", data.size(), std::make_unique<RecordingSink>(&r));
  ASSERT_TRUE(token.ok()) << token.status();
  const int fd = Connect(server_->port());
  SendAll(fd, Hello(*token) + data);
  const std::string reply = ReadToEnd(fd);
  ::close(fd);
  ASSERT_EQ(reply.size(), 12u);
  EXPECT_EQ(reply[0], 0);  // OK
  EXPECT_EQ(reply[4], 1);  // stripe complete
  EXPECT_EQ(r.bytes(), data);
  EXPECT_EQ(r.ended, 1);
  EXPECT_EQ(r.aborted, 0);
  EXPECT_EQ(server_->tickets(), 0u);
}

TEST_F(BulkServerTest, AForgedOrUsedTokenGetsNoByteInOrOut) {
  Record r;
  const std::string data = RandomBytes(4096, 7);
  auto token = server_->IssuePush("k", data.size(), std::make_unique<RecordingSink>(&r));
  ASSERT_TRUE(token.ok());
  std::string forged = *token;
  forged[3] ^= 1;
  int fd = Connect(server_->port());
  SendAll(fd, Hello(forged) + data);
  EXPECT_EQ(ReadToEnd(fd), "");  // closed, nothing answered
  ::close(fd);
  // Junk in place of the hello, and a short hello, likewise.
  fd = Connect(server_->port());
  SendAll(fd, std::string(24, 'x'));
  EXPECT_EQ(ReadToEnd(fd), "");
  ::close(fd);
  EXPECT_TRUE(r.bytes().empty());
  EXPECT_EQ(server_->tickets(), 1u);  // the real ticket is still good

  fd = Connect(server_->port());
  SendAll(fd, Hello(*token) + data);
  EXPECT_EQ(ReadToEnd(fd).size(), 12u);
  ::close(fd);
  EXPECT_EQ(r.bytes(), data);
  // Used once: the same token again is refused.
  fd = Connect(server_->port());
  SendAll(fd, Hello(*token) + data);
  EXPECT_EQ(ReadToEnd(fd), "");
  ::close(fd);
  EXPECT_EQ(r.bytes(), data);
  EXPECT_EQ(r.ended, 1);
}

TEST_F(BulkServerTest, AStreamCutHalfwayAbortsTheFold) {
  Record r;
  const std::string data = RandomBytes(1 << 20, 11);
  auto token = server_->IssuePush("k", data.size(), std::make_unique<RecordingSink>(&r));
  ASSERT_TRUE(token.ok());
  const int fd = Connect(server_->port());
  SendAll(fd, Hello(*token) + data.substr(0, data.size() / 2));
  ::close(fd);
  ASSERT_TRUE(WaitFor([&] { return r.aborted.load() == 1; }));
  EXPECT_EQ(r.ended, 0);
}

TEST_F(BulkServerTest, ASenderThatStallsIsCutAndItsFoldAborted) {
  Record r;
  const std::string data = RandomBytes(1 << 20, 13);
  auto token = server_->IssuePush("k", data.size(), std::make_unique<RecordingSink>(&r));
  ASSERT_TRUE(token.ok());
  const int fd = Connect(server_->port());
  SendAll(fd, Hello(*token) + data.substr(0, 1000));
  // Keeps the connection open without sending: cut after the 500 ms stall.
  const auto t0 = absl::Now();
  EXPECT_EQ(ReadToEnd(fd), "");
  EXPECT_LT(absl::Now() - t0, absl::Seconds(5));
  ::close(fd);
  ASSERT_TRUE(WaitFor([&] { return r.aborted.load() == 1; }));
}

TEST_F(BulkServerTest, ARefusedPieceIsAnsweredWithTheHoldersStatus) {
  Record r;
  r.refuse_at_piece = absl::AbortedError("the parity row was discarded during the push");
  const std::string data = RandomBytes(1 << 20, 17);
  auto token = server_->IssuePush("k", data.size(), std::make_unique<RecordingSink>(&r));
  ASSERT_TRUE(token.ok());
  const int fd = Connect(server_->port());
  std::string hello = Hello(*token);
  SendAll(fd, hello + data.substr(0, 1000));
  absl::SleepFor(absl::Milliseconds(50));  // a first piece, then the rest
  ::send(fd, data.data() + 1000, data.size() - 1000, MSG_NOSIGNAL);
  const std::string reply = ReadToEnd(fd);
  ::close(fd);
  ASSERT_GE(reply.size(), 12u);
  EXPECT_EQ(reply[0], static_cast<char>(absl::StatusCode::kAborted));
  EXPECT_NE(reply.find("discarded"), std::string::npos);
  EXPECT_EQ(r.aborted, 1);
  EXPECT_EQ(r.ended, 0);
}

TEST_F(BulkServerTest, AnUnusedTicketExpiresAndAbortsItsFold) {
  Record r;
  auto token = server_->IssuePush("k", 100, std::make_unique<RecordingSink>(&r));
  ASSERT_TRUE(token.ok());
  ASSERT_TRUE(WaitFor([&] { return r.aborted.load() == 1; }));  // lifetime 2 s
  EXPECT_EQ(server_->tickets(), 0u);
  const int fd = Connect(server_->port());
  SendAll(fd, Hello(*token) + std::string(100, 'a'));
  EXPECT_EQ(ReadToEnd(fd), "");
  ::close(fd);
}

TEST_F(BulkServerTest, TicketsAreBounded) {
  std::vector<Record> records(9);
  for (int i = 0; i < 8; ++i) {
    ASSERT_TRUE(server_->IssuePush(absl::StrCat("k", i), 1, std::make_unique<RecordingSink>(&records[i])).ok());
  }
  auto ninth = server_->IssuePush("k8", 1, std::make_unique<RecordingSink>(&records[8]));
  EXPECT_EQ(ninth.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(records[8].aborted, 1);  // refused: its sink is dropped at once
  server_->Stop();  // the others' sinks point at `records`
}

TEST_F(BulkServerTest, AReadSendsExactlyItsRange) {
  const std::string data = RandomBytes(5 << 20, 19);
  PinnedChunk chunk;
  chunk.length = data.size();
  chunk.read = [&data](uint64_t off, uint64_t len,
                       const std::function<bool(absl::Span<const uint8_t>)>& piece) {
    // In two pieces, as a payload over two rank windows comes.
    const uint64_t half = len / 2;
    const auto* p = reinterpret_cast<const uint8_t*>(data.data()) + off;
    if (piece(absl::MakeConstSpan(p, half))) piece(absl::MakeConstSpan(p + half, len - half));
  };
  auto token = server_->IssueRead(chunk, 12345, 3 << 20);
  ASSERT_TRUE(token.ok());
  const int fd = Connect(server_->port());
  SendAll(fd, Hello(*token));
  EXPECT_EQ(ReadToEnd(fd), data.substr(12345, 3 << 20));
  ::close(fd);
}

TEST_F(BulkServerTest, StopCutsAConnectionInFlightAndAbortsEveryTicket) {
  Record r1, r2;
  auto t1 = server_->IssuePush("k1", 1 << 20, std::make_unique<RecordingSink>(&r1));
  auto t2 = server_->IssuePush("k2", 1 << 20, std::make_unique<RecordingSink>(&r2));
  ASSERT_TRUE(t1.ok() && t2.ok());
  const int fd = Connect(server_->port());
  SendAll(fd, Hello(*t1) + std::string(1000, 'z'));
  ASSERT_TRUE(WaitFor([&] { return r1.bytes().size() == 1000; }));
  const auto t0 = absl::Now();
  server_->Stop();
  EXPECT_LT(absl::Now() - t0, absl::Seconds(2));
  EXPECT_EQ(r1.aborted, 1);
  EXPECT_EQ(r2.aborted, 1);
  ::close(fd);
  EXPECT_EQ(server_->IssuePush("k3", 1, std::make_unique<RecordingSink>(&r2)).status().code(),
            absl::StatusCode::kUnavailable);
}

TEST_F(BulkServerTest, AHelloTrickledByteByByteIsCutAtItsDeadline) {
  Record r;
  auto token = server_->IssuePush("k", 10, std::make_unique<RecordingSink>(&r));
  ASSERT_TRUE(token.ok());
  const int fd = Connect(server_->port());
  const std::string hello = Hello(*token);
  // A byte every 100 ms: each one is progress, but the hello's 1 s deadline
  // is not moved by it.
  const auto t0 = absl::Now();
  size_t sent = 0;
  for (; sent < hello.size() && absl::Now() - t0 < absl::Seconds(4); ++sent) {
    if (::send(fd, hello.data() + sent, 1, MSG_NOSIGNAL) != 1) break;
    absl::SleepFor(absl::Milliseconds(100));
  }
  EXPECT_EQ(ReadToEnd(fd), "");
  EXPECT_LT(absl::Now() - t0, absl::Seconds(4));
  ::close(fd);
  EXPECT_EQ(server_->tickets(), 1u);  // the ticket was never reached
  EXPECT_TRUE(r.bytes().empty());
  server_->Stop();  // its sink points at `r`
}

TEST_F(BulkServerTest, ARevokedTicketAbortsItsFoldAndAdmitsNoOne) {
  Record r, again;
  auto token = server_->IssuePush("job/1/0/0", 10, std::make_unique<RecordingSink>(&r));
  ASSERT_TRUE(token.ok());
  server_->Revoke("job/1/0/0");
  EXPECT_EQ(r.aborted, 1);
  EXPECT_EQ(server_->tickets(), 0u);
  server_->Revoke("job/1/0/0");  // twice: nothing more
  const int fd = Connect(server_->port());
  SendAll(fd, Hello(*token) + std::string(10, 'q'));
  EXPECT_EQ(ReadToEnd(fd), "");
  ::close(fd);
  EXPECT_TRUE(r.bytes().empty());
  // The same key is issued again and served.
  auto next = server_->IssuePush("job/1/0/0", 10, std::make_unique<RecordingSink>(&again));
  ASSERT_TRUE(next.ok());
  const int fd2 = Connect(server_->port());
  SendAll(fd2, Hello(*next) + std::string(10, 'q'));
  EXPECT_EQ(ReadToEnd(fd2).size(), 12u);
  ::close(fd2);
  EXPECT_EQ(again.bytes(), std::string(10, 'q'));
}


}  // namespace
}  // namespace ecsnap::daemon
