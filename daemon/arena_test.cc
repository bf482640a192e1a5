#include "daemon/arena.h"

#include <filesystem>
#include <cstdlib>
#include <cstring>
#include <string>

#include "gtest/gtest.h"

namespace ecsnap::daemon {
namespace {

constexpr uint64_t kMiB = 1 << 20;

class ArenaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* tmp = std::getenv("TEST_TMPDIR");
    dir_ = std::string(tmp ? tmp : "/tmp") + "/arena_" +
           ::testing::UnitTest::GetInstance()->current_test_info()->name();
    std::filesystem::remove_all(dir_);
  }
  Arena::Options Opts(uint64_t bytes = 8 * kMiB) {
    Arena::Options o;
    o.dir = dir_;
    o.bytes = bytes;
    o.index_entries = 64;
    return o;
  }
  std::string dir_;
};

TEST_F(ArenaTest, AllocatesFreesAndCoalesces) {
  auto arena = *Arena::Open(Opts());
  const uint64_t all = arena->free_bytes();
  EXPECT_EQ(all, arena->data_bytes());
  auto a = *arena->Allocate(1);
  auto b = *arena->Allocate(kMiB + 1);
  auto c = *arena->Allocate(4096);
  EXPECT_EQ(a.bytes, 4096u);
  EXPECT_EQ(b.bytes, kMiB + 4096);
  EXPECT_EQ(arena->free_bytes(), all - a.bytes - b.bytes - c.bytes);
  arena->Free(b);
  arena->Free(a);
  arena->Free(c);
  EXPECT_EQ(arena->free_bytes(), all);
  // Coalesced back into one piece: the whole data region fits again.
  auto whole = arena->Allocate(all);
  ASSERT_TRUE(whole.ok()) << whole.status();
}

TEST_F(ArenaTest, RefusesWhatDoesNotFitNamingTheBytes) {
  auto arena = *Arena::Open(Opts());
  auto st = arena->Allocate(64 * kMiB).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(st.message().find("needs 64.00 MiB"), std::string::npos) << st;
  EXPECT_NE(st.message().find("free"), std::string::npos) << st;
}

TEST_F(ArenaTest, RecordsSurviveAReopenAndRemovedOnesDoNot) {
  uint32_t kept, removed;
  ArenaExtent window;
  {
    auto arena = *Arena::Open(Opts());
    EXPECT_FALSE(arena->adopted());
    window = *arena->Allocate(10000);
    std::memset(arena->Bytes(window).data(), 0x5a, 10000);
    kept = *arena->AddRecord(RecordKind::kRank, {reinterpret_cast<const uint8_t*>("kept record"), 11});
    removed = *arena->AddRecord(RecordKind::kRank, {reinterpret_cast<const uint8_t*>("gone"), 4});
    arena->RemoveRecord(removed);
  }
  auto arena = *Arena::Open(Opts());
  EXPECT_TRUE(arena->adopted());
  auto records = arena->TakeAdoptedRecords(RecordKind::kRank);
  ASSERT_EQ(records.size(), 1u);
  EXPECT_EQ(records[0].id, kept);
  EXPECT_EQ(std::string(records[0].bytes.begin(), records[0].bytes.end()), "kept record");
  // The window's bytes are still there; reserving it again works once.
  ASSERT_TRUE(arena->Reserve(window).ok());
  EXPECT_EQ(arena->Bytes(window)[9999], 0x5a);
  EXPECT_EQ(arena->Reserve(window).code(), absl::StatusCode::kFailedPrecondition);
}

TEST_F(ArenaTest, ACorruptRecordIsDroppedAtReopen) {
  {
    auto arena = *Arena::Open(Opts());
    auto id = *arena->AddRecord(RecordKind::kRank, {reinterpret_cast<const uint8_t*>("record"), 6});
    (void)id;
    // Corrupt the record bytes behind the index's back.
    auto records_extent = *arena->Allocate(1);  // the record sits just before this
    arena->base()[records_extent.offset - 4096] ^= 1;
  }
  auto arena = *Arena::Open(Opts());
  EXPECT_TRUE(arena->TakeAdoptedRecords(RecordKind::kRank).empty());
}

TEST_F(ArenaTest, OneDaemonPerArenaAndTheSizeMustMatch) {
  auto first = *Arena::Open(Opts());
  auto second = Arena::Open(Opts());
  EXPECT_EQ(second.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(second.status().message().find("in use by another ecsnapd"), std::string::npos);
  first.reset();
  auto resized = Arena::Open(Opts(16 * kMiB));
  EXPECT_EQ(resized.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(resized.status().message().find("--arena_bytes"), std::string::npos);
}

TEST_F(ArenaTest, TheIndexBoundsTheRecordsHeld) {
  auto arena = *Arena::Open(Opts());
  for (int i = 0; i < 64; ++i) ASSERT_TRUE(arena->AddRecord(RecordKind::kRank, {}).ok()) << i;
  auto st = arena->AddRecord(RecordKind::kRank, {}).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(st.message().find("index is full"), std::string::npos);
}

}  // namespace
}  // namespace ecsnap::daemon
