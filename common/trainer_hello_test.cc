#include "common/trainer_hello.h"

#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>

#include "gtest/gtest.h"

namespace ecsnap {
namespace {

struct Pair {
  Pair() {
    int fds[2];
    EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds), 0);
    daemon = UniqueFd(fds[0]);
    trainer = UniqueFd(fds[1]);
  }
  UniqueFd daemon, trainer;
};

UniqueFd MemFile(const std::string& bytes) {
  UniqueFd fd(::memfd_create("hello-test", MFD_CLOEXEC));
  EXPECT_TRUE(fd.valid());
  EXPECT_EQ(::write(fd.get(), bytes.data(), bytes.size()), static_cast<ssize_t>(bytes.size()));
  return fd;
}

TEST(TrainerHelloTest, AnAdmittedTrainerGetsTheArenaAndNotOneByteMore) {
  Pair p;
  UniqueFd arena = MemFile("arena bytes");
  TrainerHello hello;
  hello.admitted = true;
  hello.fd_bytes = 11;
  ASSERT_TRUE(SendTrainerHello(p.daemon.get(), hello, arena.get(), absl::Seconds(5)).ok());
  ASSERT_EQ(::write(p.daemon.get(), "PRI *", 5), 5);  // what gRPC sends next

  auto got = ReceiveTrainerHello(p.trainer.get(), absl::Seconds(5));
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_TRUE(got->admitted);
  EXPECT_EQ(got->fd_bytes, 11u);
  ASSERT_TRUE(got->fd.valid());
  char buf[16] = {};
  EXPECT_EQ(::pread(got->fd.get(), buf, 11, 0), 11);
  EXPECT_STREQ(buf, "arena bytes");
  // The bytes after the hello are left for the next reader.
  char tail[6] = {};
  EXPECT_EQ(::read(p.trainer.get(), tail, 5), 5);
  EXPECT_STREQ(tail, "PRI *");
}

// The flags travel apart: a daemon of an earlier release sends neither
// pings nor windows, and its trainers must read both as false.
TEST(TrainerHelloTest, EachFlagArrivesAsSent) {
  for (int flags = 0; flags < 4; ++flags) {
    Pair p;
    TrainerHello hello;
    hello.admitted = true;
    hello.windows = (flags & 1) != 0;
    hello.pings = (flags & 2) != 0;
    ASSERT_TRUE(SendTrainerHello(p.daemon.get(), hello, -1, absl::Seconds(5)).ok());
    auto got = ReceiveTrainerHello(p.trainer.get(), absl::Seconds(5));
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->windows, hello.windows) << flags;
    EXPECT_EQ(got->pings, hello.pings) << flags;
  }
}

TEST(TrainerHelloTest, ARefusedTrainerGetsTheReasonAndNoDescriptor) {
  Pair p;
  UniqueFd arena = MemFile("secret");
  TrainerHello hello;
  hello.admitted = false;
  hello.message = "uid 1234 is not allowed";
  ASSERT_TRUE(SendTrainerHello(p.daemon.get(), hello, arena.get(), absl::Seconds(5)).ok());
  auto got = ReceiveTrainerHello(p.trainer.get(), absl::Seconds(5));
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_FALSE(got->admitted);
  EXPECT_EQ(got->message, "uid 1234 is not allowed");
  EXPECT_FALSE(got->fd.valid());
}

TEST(TrainerHelloTest, SomethingElseOnTheSocketIsNotTakenForAHello) {
  {
    Pair p;
    const char junk[] = "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n";
    ASSERT_EQ(::write(p.daemon.get(), junk, sizeof(junk)), static_cast<ssize_t>(sizeof(junk)));
    auto got = ReceiveTrainerHello(p.trainer.get(), absl::Seconds(5));
    EXPECT_EQ(got.status().code(), absl::StatusCode::kDataLoss) << got.status();
  }
  {
    Pair p;
    p.daemon.Reset();
    auto got = ReceiveTrainerHello(p.trainer.get(), absl::Seconds(5));
    EXPECT_EQ(got.status().code(), absl::StatusCode::kUnavailable) << got.status();
  }
  {
    Pair p;  // a daemon that never answers
    auto got = ReceiveTrainerHello(p.trainer.get(), absl::Milliseconds(100));
    EXPECT_EQ(got.status().code(), absl::StatusCode::kDeadlineExceeded) << got.status();
  }
}

TEST(TrainerHelloTest, AHelloWithAHugeMessageOrTwoDescriptorsIsRefused) {
  {
    Pair p;
    char wire[32] = {'E', 'C', 'S', 'N', 'H', 'L', 'O', '2'};
    const uint32_t admitted = 0, len = 1 << 30;
    std::memcpy(wire + 8, &admitted, 4);
    std::memcpy(wire + 12, &len, 4);
    ASSERT_EQ(::write(p.daemon.get(), wire, sizeof(wire)), 32);
    auto got = ReceiveTrainerHello(p.trainer.get(), absl::Seconds(5));
    EXPECT_EQ(got.status().code(), absl::StatusCode::kDataLoss) << got.status();
  }
  {
    Pair p;
    UniqueFd a = MemFile("a"), b = MemFile("b");
    char wire[32] = {'E', 'C', 'S', 'N', 'H', 'L', 'O', '2'};
    const uint32_t admitted = 1;
    std::memcpy(wire + 8, &admitted, 4);
    iovec iov{wire, sizeof(wire)};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    alignas(cmsghdr) char control[CMSG_SPACE(2 * sizeof(int))] = {};
    msg.msg_control = control;
    msg.msg_controllen = sizeof(control);
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(2 * sizeof(int));
    const int two[2] = {a.get(), b.get()};
    std::memcpy(CMSG_DATA(c), two, sizeof(two));
    ASSERT_EQ(::sendmsg(p.daemon.get(), &msg, 0), 32);
    auto got = ReceiveTrainerHello(p.trainer.get(), absl::Seconds(5));
    EXPECT_EQ(got.status().code(), absl::StatusCode::kDataLoss) << got.status();
  }
}

TEST(TrainerHelloTest, ARoleRoundTripsAndJunkIsNotARole) {
  Pair p;
  TrainerRole window;
  window.kind = TrainerRole::Kind::kWindow;
  window.token = std::string("0123456789abcdef");
  ASSERT_TRUE(SendTrainerRole(p.trainer.get(), window, absl::Seconds(5)).ok());
  char bytes[kTrainerRoleBytes];
  ASSERT_EQ(::read(p.daemon.get(), bytes, sizeof(bytes)), static_cast<ssize_t>(sizeof(bytes)));
  auto got = ParseTrainerRole(bytes);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->kind, TrainerRole::Kind::kWindow);
  EXPECT_EQ(got->token, window.token);

  // gRPC's own first bytes are not a role: an old client is told so.
  char preface[kTrainerRoleBytes] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
  EXPECT_EQ(ParseTrainerRole(preface).status().code(), absl::StatusCode::kDataLoss);
  char unknown[kTrainerRoleBytes] = {'E', 'C', 'S', 'N', 'R', 'O', 'L', '1', 9};
  EXPECT_EQ(ParseTrainerRole(unknown).status().code(), absl::StatusCode::kDataLoss);
  TrainerRole short_token;
  short_token.kind = TrainerRole::Kind::kWindow;
  short_token.token = "short";
  EXPECT_EQ(SendTrainerRole(p.trainer.get(), short_token, absl::Seconds(1)).code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace ecsnap
