#include "daemon/store/window_grants.h"

#include <fcntl.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <string>

#include "common/trainer_hello.h"
#include "gtest/gtest.h"

namespace ecsnap::daemon {
namespace {

constexpr uint64_t kMiB = 1 << 20;

class WindowGrantsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* tmp = std::getenv("TEST_TMPDIR");
    const std::string dir = std::string(tmp ? tmp : "/tmp") + "/grants_" +
                            ::testing::UnitTest::GetInstance()->current_test_info()->name();
    std::filesystem::remove_all(dir);
    Arena::Options o;
    o.dir = dir;
    o.bytes = 8 * kMiB;
    o.index_entries = 16;
    auto a = Arena::Open(o);
    ASSERT_TRUE(a.ok()) << a.status();
    arena_ = std::move(*a);
    grants_ = std::make_unique<WindowGrants>(arena_.get());
  }

  static int AccessMode(int fd) { return ::fcntl(fd, F_GETFL) & O_ACCMODE; }

  std::unique_ptr<Arena> arena_;
  std::unique_ptr<WindowGrants> grants_;
};

TEST_F(WindowGrantsTest, ATokenIsGoodOnceAndOnlyForItsUid) {
  auto w = arena_->AllocateWindow(64 << 10, WindowOwner("job", 0));
  ASSERT_TRUE(w.ok()) << w.status();
  auto g = grants_->Issue(*w, /*writable=*/true, 1000);
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ(g->token.size(), kWindowTokenBytes);
  EXPECT_EQ(g->file_id, *arena_->WindowFileId(*w));

  // Another user holding the token gets nothing, and does not use it up.
  EXPECT_EQ(grants_->Fetch(g->token, 1001).status().code(), absl::StatusCode::kPermissionDenied);
  auto file = grants_->Fetch(g->token, 1000);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(AccessMode(file->fd.get()), O_RDWR);
  EXPECT_EQ(file->bytes, w->bytes);
  EXPECT_EQ(grants_->Fetch(g->token, 1000).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(grants_->Fetch(std::string(kWindowTokenBytes, 'x'), 1000).status().code(),
            absl::StatusCode::kNotFound);

  auto ro = grants_->Issue(*w, /*writable=*/false, 1000);
  ASSERT_TRUE(ro.ok());
  EXPECT_NE(ro->token, g->token);
  auto ro_file = grants_->Fetch(ro->token, 1000);
  ASSERT_TRUE(ro_file.ok()) << ro_file.status();
  EXPECT_EQ(AccessMode(ro_file->fd.get()), O_RDONLY);
}

// A token not fetched within its lifetime is gone: the trainer that was too
// slow gets NOT_FOUND (and asks again), and the token no longer counts.
TEST_F(WindowGrantsTest, AnExpiredTokenIsRefused) {
  WindowGrants grants(arena_.get(), absl::Seconds(1));
  auto w = arena_->AllocateWindow(64 << 10, WindowOwner("job", 0));
  ASSERT_TRUE(w.ok()) << w.status();
  auto late = grants.Issue(*w, /*writable=*/true, 1000);
  ASSERT_TRUE(late.ok()) << late.status();
  absl::SleepFor(absl::Milliseconds(1500));
  auto fresh = grants.Issue(*w, /*writable=*/true, 1000);  // also sweeps the expired one
  ASSERT_TRUE(fresh.ok()) << fresh.status();
  EXPECT_EQ(grants.outstanding(), 1u);
  EXPECT_EQ(grants.Fetch(late->token, 1000).status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(grants.Fetch(fresh->token, 1000).ok());
}

TEST_F(WindowGrantsTest, AWindowRetiredSinceTheGrantIsNotHandedOut) {
  auto w = arena_->AllocateWindow(64 << 10, WindowOwner("job", 0));
  ASSERT_TRUE(w.ok());
  auto g = grants_->Issue(*w, true, 1000);
  ASSERT_TRUE(g.ok());
  arena_->Free(*w);  // a spare of job/0 now: not in use by anyone
  EXPECT_EQ(grants_->Fetch(g->token, 1000).status().code(), absl::StatusCode::kNotFound);

  // Its memory goes elsewhere (the spare is reclaimed for an extent that
  // only fits in its place): a token for the old file stays useless.
  auto g2 = grants_->Issue(*w, true, 1000);
  EXPECT_EQ(g2.status().code(), absl::StatusCode::kNotFound);  // not in use: no grant
  auto mine = arena_->AllocateWindow(64 << 10, WindowOwner("job", 0));
  ASSERT_TRUE(mine.ok());
  ASSERT_EQ(mine->offset, w->offset);  // the spare, reused by its owner
  auto g3 = grants_->Issue(*mine, true, 1000);
  ASSERT_TRUE(g3.ok());
  arena_->Free(*mine);
  auto big = arena_->Allocate(arena_->free_bytes());
  ASSERT_TRUE(big.ok()) << big.status();
  EXPECT_EQ(grants_->Fetch(g3->token, 1000).status().code(), absl::StatusCode::kNotFound);

  // Memory that is not a window is never granted.
  EXPECT_EQ(grants_->Issue(*big, true, 1000).status().code(), absl::StatusCode::kNotFound);
}

TEST_F(WindowGrantsTest, OutstandingTokensAreBounded) {
  auto w = arena_->AllocateWindow(4096, WindowOwner("job", 0));
  ASSERT_TRUE(w.ok());
  auto first = grants_->Issue(*w, true, 1000);
  ASSERT_TRUE(first.ok());
  for (size_t i = 0; i < kMaxOutstandingGrantsPerUid; ++i) {
    ASSERT_TRUE(grants_->Issue(*w, true, 1000).ok());
  }
  EXPECT_EQ(grants_->outstanding(), kMaxOutstandingGrantsPerUid);
  // The uid's oldest was forgotten to make room for its newest.
  EXPECT_EQ(grants_->Fetch(first->token, 1000).status().code(), absl::StatusCode::kNotFound);
  // Another uid's token survives any churn of the first.
  auto theirs = grants_->Issue(*w, true, 2000);
  ASSERT_TRUE(theirs.ok());
  for (size_t i = 0; i < 2 * kMaxOutstandingGrants; ++i) {
    ASSERT_TRUE(grants_->Issue(*w, true, 1000 + i % 8).ok());
  }
  EXPECT_LE(grants_->outstanding(), kMaxOutstandingGrants);
  EXPECT_TRUE(grants_->Fetch(theirs->token, 2000).ok());
}

TEST_F(WindowGrantsTest, APreparedSpareIsGrantedOnlyAsASpare) {
  auto ready = arena_->PrepareWindow(64 << 10, WindowOwner("job", 0), 2);
  ASSERT_TRUE(ready.ok()) << ready.status();
  EXPECT_EQ(grants_->Issue(*ready, true, 1000).status().code(), absl::StatusCode::kNotFound);
  auto g = grants_->Issue(*ready, true, 1000, /*spare=*/true);
  ASSERT_TRUE(g.ok()) << g.status();
  // The owner's next window is that file, and the descriptor fetched ahead
  // of it reaches the same bytes.
  auto file = grants_->Fetch(g->token, 1000);
  ASSERT_TRUE(file.ok()) << file.status();
  auto w = arena_->AllocateWindow(64 << 10, WindowOwner("job", 0));
  ASSERT_TRUE(w.ok());
  EXPECT_EQ(w->offset, ready->offset);
  EXPECT_EQ(*arena_->WindowFileId(*w), g->file_id);
  arena_->Bytes(*w)[5] = 42;
  uint8_t got = 0;
  ASSERT_EQ(::pread(file->fd.get(), &got, 1, 5), 1);
  EXPECT_EQ(got, 42);
  // A second owner's prepare makes its own file, and a third window of the
  // first owner is refused: it holds the two it may.
  auto other = arena_->PrepareWindow(64 << 10, WindowOwner("job", 1), 2);
  ASSERT_TRUE(other.ok());
  EXPECT_NE(other->offset, ready->offset);
  ASSERT_TRUE(arena_->PrepareWindow(64 << 10, WindowOwner("job", 0), 2).ok());
  EXPECT_EQ(arena_->PrepareWindow(64 << 10, WindowOwner("job", 0), 2).status().code(),
            absl::StatusCode::kOk);  // the spare made just now is the answer again
  EXPECT_TRUE(arena_->AllocateWindow(64 << 10, WindowOwner("job", 0)).ok());
  EXPECT_EQ(arena_->PrepareWindow(64 << 10, WindowOwner("job", 0), 2).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(arena_->CheckConsistency().ok()) << arena_->CheckConsistency();
}

}  // namespace
}  // namespace ecsnap::daemon
