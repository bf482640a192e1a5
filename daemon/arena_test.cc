#include "daemon/arena.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

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

TEST_F(ArenaTest, EachOwnerTakesItsOwnKindAndUnclaimedRecordsAreFreed) {
  {
    auto arena = *Arena::Open(Opts());
    ASSERT_TRUE(arena->AddRecord(RecordKind::kRank, {reinterpret_cast<const uint8_t*>("r"), 1}).ok());
    ASSERT_TRUE(
        arena->AddRecord(RecordKind::kParityRow, {reinterpret_cast<const uint8_t*>("p"), 1}).ok());
  }
  auto arena = *Arena::Open(Opts());
  const uint64_t free_at_open = arena->free_bytes();
  auto ranks = arena->TakeAdoptedRecords(RecordKind::kRank);
  ASSERT_EQ(ranks.size(), 1u);
  EXPECT_EQ(ranks[0].bytes[0], 'r');
  // A daemon restarted without peers keeps no parity: the row record goes.
  arena->DropUnclaimedRecords();
  EXPECT_EQ(arena->free_bytes(), free_at_open + kArenaAlignBytes);
  EXPECT_TRUE(arena->TakeAdoptedRecords(RecordKind::kParityRow).empty());
  EXPECT_TRUE(arena->CheckConsistency().ok());
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

TEST_F(ArenaTest, ADoubleFreeAbortsNamingTheExtent) {
  ::testing::FLAGS_gtest_death_test_style = "threadsafe";
  auto arena = *Arena::Open(Opts());
  auto a = *arena->Allocate(3 * 4096);
  auto b = *arena->Allocate(4096);
  arena->Free(a);
  EXPECT_DEATH(arena->Free(a), "Free of extent \\[[0-9]+, \\+12288\\) that is not an extent in use");
  // The process that did not die still has a consistent arena.
  EXPECT_TRUE(arena->CheckConsistency().ok()) << arena->CheckConsistency();
  arena->Free(b);
  EXPECT_EQ(arena->free_bytes(), arena->data_bytes());
}

TEST_F(ArenaTest, APartialOrOverlappingFreeAborts) {
  ::testing::FLAGS_gtest_death_test_style = "threadsafe";
  auto arena = *Arena::Open(Opts());
  auto a = *arena->Allocate(2 * 4096);
  auto b = *arena->Allocate(2 * 4096);
  // A part of an extent, the tail of one, two extents at once, the free space.
  EXPECT_DEATH(arena->Free({a.offset, 4096}), "has 8192 bytes");
  EXPECT_DEATH(arena->Free({a.offset + 4096, 4096}), "no extent in use starts there");
  EXPECT_DEATH(arena->Free({a.offset, a.bytes + b.bytes}), "not an extent in use");
  EXPECT_DEATH(arena->Free({b.offset + b.bytes, 4096}), "not an extent in use");
  // A reserved extent is freed whole too, and only once.
  auto c = *arena->Allocate(4096);
  arena->Free(c);
  ASSERT_TRUE(arena->Reserve(c).ok());
  EXPECT_DEATH(arena->Free({c.offset, 2 * 4096}), "not an extent in use");
  EXPECT_TRUE(arena->CheckConsistency().ok()) << arena->CheckConsistency();
}

TEST_F(ArenaTest, ReserveRefusesEmptyAndUnalignedExtents) {
  auto arena = *Arena::Open(Opts());
  auto a = *arena->Allocate(4096);
  arena->Free(a);
  EXPECT_FALSE(arena->Reserve({a.offset, 0}).ok());
  EXPECT_FALSE(arena->Reserve({a.offset, 100}).ok());
  EXPECT_FALSE(arena->Reserve({a.offset + 1, 4096}).ok());
  EXPECT_TRUE(arena->CheckConsistency().ok()) << arena->CheckConsistency();
  EXPECT_EQ(arena->free_bytes(), arena->data_bytes());
}

// Random allocations, reservations, records and frees, checked against a
// model: the bookkeeping stays consistent after every operation, and no byte
// of an extent in use is ever handed to anyone else (each extent carries its
// own tag, checked when it is freed).
TEST_F(ArenaTest, RandomAllocFreeKeepsTheArenaConsistent) {
  uint64_t seed = std::random_device{}();
  if (const char* s = std::getenv("ARENA_TEST_SEED")) seed = std::strtoull(s, nullptr, 10);
  std::printf("ArenaTest.RandomAllocFreeKeepsTheArenaConsistent seed %lu (ARENA_TEST_SEED=%lu "
              "replays it)\n",
              static_cast<unsigned long>(seed), static_cast<unsigned long>(seed));
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  std::vector<ArenaExtent> held;
  std::vector<uint8_t> tags;
  std::vector<uint32_t> records;
  auto arena = *Arena::Open(Opts());
  auto fill = [&](const ArenaExtent& e, uint8_t tag) {
    std::memset(arena->Bytes(e).data(), tag, e.bytes);
  };
  auto intact = [&](const ArenaExtent& e, uint8_t tag) {
    for (uint8_t b : arena->Bytes(e)) {
      if (b != tag) return false;
    }
    return true;
  };
  for (int op = 0; op < 3000; ++op) {
    const int what = static_cast<int>(rng() % 10);
    if (what < 4) {
      const uint64_t want = 1 + rng() % (what == 0 ? 2 * kMiB : 6 * 4096);
      auto e = arena->Allocate(want);
      if (e.ok()) {
        ASSERT_GE(e->bytes, want);
        const uint8_t tag = static_cast<uint8_t>(rng());
        fill(*e, tag);
        held.push_back(*e);
        tags.push_back(tag);
      } else {
        ASSERT_EQ(e.status().code(), absl::StatusCode::kResourceExhausted);
      }
    } else if (what < 8 && !held.empty()) {
      const size_t i = rng() % held.size();
      ASSERT_TRUE(intact(held[i], tags[i])) << "extent [" << held[i].offset << ", +"
                                            << held[i].bytes << ") was written by another owner";
      arena->Free(held[i]);
      held[i] = held.back();
      tags[i] = tags.back();
      held.pop_back();
      tags.pop_back();
    } else if (what == 8) {
      // Reserve a random page: succeeds only when it is free.
      const uint64_t pages = arena->data_bytes() / 4096;
      const ArenaExtent e{arena->size() - arena->data_bytes() + (rng() % pages) * 4096, 4096};
      bool overlaps = false;
      for (const ArenaExtent& h : held) {
        overlaps |= e.offset < h.offset + h.bytes && h.offset < e.offset + e.bytes;
      }
      const absl::Status st = arena->Reserve(e);
      if (overlaps) {
        ASSERT_FALSE(st.ok()) << "reserved a page in use at " << e.offset;
      } else if (st.ok()) {
        const uint8_t tag = static_cast<uint8_t>(rng());
        fill(e, tag);
        held.push_back(e);
        tags.push_back(tag);
      }
    } else if (rng() % 2 == 0 || records.empty()) {
      const std::string rec(1 + rng() % 6000, 'r');
      auto id = arena->AddRecord(RecordKind::kRank, {reinterpret_cast<const uint8_t*>(rec.data()), rec.size()});
      if (id.ok()) records.push_back(*id);
    } else {
      const size_t i = rng() % records.size();
      arena->RemoveRecord(records[i]);
      records[i] = records.back();
      records.pop_back();
    }
    const absl::Status consistent = arena->CheckConsistency();
    ASSERT_TRUE(consistent.ok()) << "after operation " << op << ": " << consistent;
  }
  for (size_t i = 0; i < held.size(); ++i) {
    ASSERT_TRUE(intact(held[i], tags[i]));
    arena->Free(held[i]);
  }
  for (uint32_t id : records) arena->RemoveRecord(id);
  EXPECT_TRUE(arena->CheckConsistency().ok()) << arena->CheckConsistency();
  EXPECT_EQ(arena->free_bytes(), arena->data_bytes());
}

TEST_F(ArenaTest, AReopenedArenaIsConsistentWithItsRecordsAndWindows) {
  ArenaExtent window;
  {
    auto arena = *Arena::Open(Opts());
    window = *arena->Allocate(5 * 4096);
    for (int i = 0; i < 5; ++i) ASSERT_TRUE(arena->AddRecord(RecordKind::kRank, {}).ok());
    EXPECT_TRUE(arena->CheckConsistency().ok()) << arena->CheckConsistency();
  }
  auto arena = *Arena::Open(Opts());
  auto records = arena->TakeAdoptedRecords(RecordKind::kRank);
  EXPECT_EQ(records.size(), 5u);
  ASSERT_TRUE(arena->Reserve(window).ok());
  EXPECT_TRUE(arena->CheckConsistency().ok()) << arena->CheckConsistency();
  for (const ArenaRecord& r : records) arena->RemoveRecord(r.id);
  arena->Free(window);
  EXPECT_TRUE(arena->CheckConsistency().ok()) << arena->CheckConsistency();
  EXPECT_EQ(arena->free_bytes(), arena->data_bytes());
}

}  // namespace
}  // namespace ecsnap::daemon
