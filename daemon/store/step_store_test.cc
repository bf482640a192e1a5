#include "daemon/store/step_store.h"

#include <filesystem>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"

#include "ec/crc32c.h"
#include "gtest/gtest.h"

namespace ecsnap::daemon {
namespace {

constexpr uint64_t kMiB = 1 << 20;

// A rank's state as a trainer would send it: tensors laid out back to back.
struct RankState {
  std::vector<uint8_t> bytes;
  v1::Manifest manifest;
};

RankState MakeState(uint32_t seed, std::vector<uint64_t> lengths) {
  RankState s;
  uint64_t offset = 0;
  for (size_t i = 0; i < lengths.size(); ++i) {
    v1::TensorEntry* t = s.manifest.add_tensors();
    t->set_name("t" + std::to_string(i));
    t->set_kind(v1::PARAM);
    t->set_dtype(v1::UINT8);
    t->add_shape(lengths[i]);
    t->set_offset(offset);
    t->set_length(lengths[i]);
    for (uint64_t b = 0; b < lengths[i]; ++b) s.bytes.push_back(uint8_t(seed * 31 + i * 7 + b));
    t->set_crc32c(ec::Crc32c(absl::MakeConstSpan(s.bytes).subspan(offset, lengths[i])));
    offset += lengths[i];
  }
  return s;
}

class StepStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* tmp = std::getenv("TEST_TMPDIR");
    dir_ = std::string(tmp ? tmp : "/tmp") + "/store_" +
           ::testing::UnitTest::GetInstance()->current_test_info()->name();
    std::filesystem::remove_all(dir_);
    Open();
  }
  void Open(StoreOptions options = {},
            std::function<void(const std::string&)> before_window_made = nullptr) {
    store_.reset();
    arena_.reset();
    Arena::Options o;
    o.before_window_made = std::move(before_window_made);
    o.dir = dir_;
    o.bytes = 16 * kMiB;
    o.index_entries = 256;
    arena_ = *Arena::Open(o);
    store_ = std::make_unique<StepStore>(arena_.get(), options);
  }
  // BeginRank + write through the arena (the shared-memory path) + commit.
  absl::StatusOr<v1::StepState> Put(uint64_t session, uint64_t step, const RankState& s) {
    auto w = store_->BeginRank(session, step, s.bytes.size());
    if (!w.ok()) return w.status();
    std::memcpy(arena_->base() + w->offset, s.bytes.data(), s.bytes.size());
    return store_->CommitRank(session, step, s.manifest);
  }
  std::vector<uint8_t> Get(uint64_t session, uint64_t step, uint64_t* got_step = nullptr) {
    auto lease = store_->Restore(session, step);
    EXPECT_TRUE(lease.ok()) << lease.status();
    if (!lease.ok()) return {};
    if (got_step) *got_step = lease->step;
    auto bytes = store_->Read(session, lease->lease_id, 0, lease->window.bytes)->bytes;
    std::vector<uint8_t> out(bytes.begin(), bytes.end());
    EXPECT_TRUE(store_->Release(session, lease->lease_id).ok());
    return out;
  }

  std::string dir_;
  std::unique_ptr<Arena> arena_;
  std::unique_ptr<StepStore> store_;
};

TEST_F(StepStoreTest, AStepIsLocalOnceEveryLocalRankCommitted) {
  auto r0 = *store_->Attach("job", 0, {0, 1});
  auto r1 = *store_->Attach("job", 1, {1, 0});
  RankState s0 = MakeState(0, {0, 1, 100, 4097});
  RankState s1 = MakeState(1, {7, 65536});
  EXPECT_EQ(*Put(r0, 1, s0), v1::RECEIVING);
  // Not visible until the step is complete.
  EXPECT_TRUE(store_->ListRestorable(r0)->empty());
  EXPECT_EQ(*Put(r1, 1, s1), v1::LOCAL);
  EXPECT_EQ(Get(r0, 0), s0.bytes);
  EXPECT_EQ(Get(r1, 1), s1.bytes);
}

TEST_F(StepStoreTest, TheStreamingPathWritesTheSameBytes) {
  auto r = *store_->Attach("job", 0, {0});
  RankState s = MakeState(3, {10, 5000, 3});
  auto w = *store_->BeginRank(r, 4, s.bytes.size());
  EXPECT_EQ(w.bytes, s.bytes.size());
  // Out of order pieces.
  ASSERT_TRUE(store_->Write(r, 4, 4000, absl::MakeConstSpan(s.bytes).subspan(4000)).ok());
  ASSERT_TRUE(store_->Write(r, 4, 0, absl::MakeConstSpan(s.bytes).first(4000)).ok());
  EXPECT_EQ(*store_->CommitRank(r, 4, s.manifest), v1::LOCAL);
  EXPECT_EQ(Get(r, 4), s.bytes);
  // Writes past the window are refused.
  auto w2 = *store_->BeginRank(r, 5, 10);
  (void)w2;
  auto st = store_->Write(r, 5, 8, absl::MakeConstSpan(s.bytes).first(3));
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("passes the end of the 10-byte window"), std::string::npos) << st;
}

TEST_F(StepStoreTest, StepsOnlyGrow) {
  auto r = *store_->Attach("job", 0, {0});
  ASSERT_TRUE(Put(r, 5, MakeState(1, {10})).ok());
  for (uint64_t step : {5u, 4u}) {
    auto st = store_->BeginRank(r, step, 10).status();
    EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_NE(st.message().find("steps only grow"), std::string::npos) << st;
  }
  EXPECT_EQ(store_->BeginRank(r, 0, 10).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Put(r, 6, MakeState(2, {10})).ok());
}

TEST_F(StepStoreTest, ABadManifestIsRefusedAndNothingBecomesVisible) {
  auto r = *store_->Attach("job", 0, {0});
  ASSERT_TRUE(Put(r, 1, MakeState(1, {64})).ok());
  RankState good = MakeState(2, {64, 64});
  auto w = *store_->BeginRank(r, 2, good.bytes.size());
  std::memcpy(arena_->base() + w.offset, good.bytes.data(), good.bytes.size());

  struct Case {
    std::string what;
    std::function<void(v1::Manifest&)> breakit;
    std::string message;
  };
  std::vector<Case> cases = {
      {"crc", [](v1::Manifest& m) { m.mutable_tensors(1)->set_crc32c(12345); },
       "has crc32c 0x00003039 in the manifest"},
      {"offset", [](v1::Manifest& m) { m.mutable_tensors(1)->set_offset(100); },
       "lies outside the rank's 128-byte window"},
      {"overflow",
       [](v1::Manifest& m) { m.mutable_tensors(1)->set_offset(~uint64_t{0} - 10); },
       "lies outside"},
      {"name", [](v1::Manifest& m) { m.mutable_tensors(0)->set_name(std::string(5000, 'x')); },
       "names must have 1 to 4096 bytes"},
      {"dup", [](v1::Manifest& m) { m.mutable_tensors(1)->set_name("t0"); }, "appears twice"},
      {"dtype", [](v1::Manifest& m) { m.mutable_tensors(0)->set_dtype(v1::DType(99)); },
       "unknown dtype 99"},
      {"shape", [](v1::Manifest& m) { m.mutable_tensors(0)->set_dtype(v1::FLOAT32); },
       "has 64 elements of 4 bytes but claims 64 bytes"},
  };
  for (const Case& c : cases) {
    v1::Manifest m = good.manifest;
    c.breakit(m);
    auto st = store_->CommitRank(r, 2, m).status();
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << c.what << ": " << st;
    EXPECT_NE(st.message().find(c.message), std::string::npos) << c.what << ": " << st;
    EXPECT_NE(st.message().find("job job step 2 rank 0"), std::string::npos) << st;
  }
  uint64_t got = 0;
  Get(r, 0, &got);
  EXPECT_EQ(got, 1u);  // step 2 never became visible
  // The window stays open: the fixed manifest commits.
  EXPECT_EQ(*store_->CommitRank(r, 2, good.manifest), v1::LOCAL);
  EXPECT_EQ(Get(r, 0), good.bytes);
}

TEST_F(StepStoreTest, TooManyTensorsAreRefusedBeforeAnyWork) {
  StoreOptions o;
  o.limits.max_tensors_per_rank = 2;
  Open(o);
  auto r = *store_->Attach("job", 0, {0});
  auto st = Put(r, 1, MakeState(1, {1, 1, 1})).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("at most 2 are allowed"), std::string::npos) << st;
}

TEST_F(StepStoreTest, AttachChecksItsArguments) {
  EXPECT_EQ(store_->Attach("", 0, {0}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store_->Attach("a b", 0, {0}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store_->Attach(std::string(200, 'j'), 0, {0}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store_->Attach("job", 2, {0, 1}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store_->Attach("job", 0, {0, 0}).status().code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(store_->Attach("job", 0, {0, 1}).ok());
  auto st = store_->Attach("job", 1, {1, 2}).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(st.message().find("every rank must name the same set"), std::string::npos) << st;
  EXPECT_EQ(store_->BeginRank(999, 1, 1).status().code(), absl::StatusCode::kNotFound);
}

TEST_F(StepStoreTest, ASessionThatEndsMidStepLeavesNothingBehind) {
  auto r = *store_->Attach("job", 0, {0});
  RankState s1 = MakeState(1, {1000});
  ASSERT_TRUE(Put(r, 1, s1).ok());
  const uint64_t free_before = arena_->free_bytes();
  auto w = *store_->BeginRank(r, 2, 3 * kMiB);
  std::memset(arena_->base() + w.offset, 0xab, kMiB);  // half written
  store_->Detach(r);
  EXPECT_EQ(arena_->free_bytes(), free_before);
  auto again = *store_->Attach("job", 0, {0});
  auto listed = *store_->ListRestorable(again);
  ASSERT_EQ(listed.size(), 1u);
  EXPECT_EQ(listed[0].step(), 1u);
  EXPECT_EQ(Get(again, 0), s1.bytes);
  // The restarted rank may write step 2 again.
  EXPECT_TRUE(Put(again, 2, MakeState(2, {10})).ok());
}

// A rank whose window is still being made holds up no other rank, and what
// changed meanwhile is checked again: a second BeginRank of the same rank is
// refused, and a session that ended meanwhile gets its error and leaves no
// window behind.
TEST_F(StepStoreTest, AWindowBeingMadeHoldsUpOnlyItsOwnRank) {
  absl::Notification making, go_on;
  Open({}, [&](const std::string& owner) {
    if (owner != WindowOwner("job", 0) || making.HasBeenNotified()) return;
    making.Notify();
    go_on.WaitForNotification();
  });
  auto r0 = *store_->Attach("job", 0, {0, 1});
  auto r1 = *store_->Attach("job", 1, {0, 1});
  auto other = *store_->Attach("other", 0, {0});
  absl::StatusOr<Window> slow;
  std::thread begin([&] { slow = store_->BeginRank(r0, 1, 2 * kMiB); });
  making.WaitForNotification();

  // Before this change these waited on the store's lock for the whole making.
  RankState o1 = MakeState(7, {4096});
  EXPECT_EQ(*Put(other, 1, o1), v1::LOCAL);
  EXPECT_TRUE(Put(r1, 1, MakeState(8, {512})).ok());
  auto twice = store_->BeginRank(r0, 1, 2 * kMiB);
  EXPECT_EQ(twice.status().code(), absl::StatusCode::kFailedPrecondition) << twice.status();
  EXPECT_NE(twice.status().message().find("still getting its window"), std::string::npos)
      << twice.status();

  store_->Detach(r0);
  go_on.Notify();
  begin.join();
  EXPECT_EQ(slow.status().code(), absl::StatusCode::kNotFound) << slow.status();
  EXPECT_TRUE(arena_->CheckConsistency().ok()) << arena_->CheckConsistency();

  // The rank attaches again and completes the step; nothing leaked.
  auto again = *store_->Attach("job", 0, {0, 1});
  RankState s0 = MakeState(9, {2 * kMiB});
  EXPECT_EQ(*Put(again, 1, s0), v1::LOCAL);
  EXPECT_EQ(Get(again, 1), s0.bytes);
  EXPECT_EQ(Get(other, 1), o1.bytes);
  EXPECT_TRUE(arena_->CheckConsistency().ok()) << arena_->CheckConsistency();
}

TEST_F(StepStoreTest, ANewSessionOfTheSameRankReplacesTheOld) {
  auto old = *store_->Attach("job", 0, {0});
  ASSERT_TRUE(store_->BeginRank(old, 1, 100).ok());
  auto fresh = *store_->Attach("job", 0, {0});
  EXPECT_EQ(store_->CommitRank(old, 1, {}).status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(Put(fresh, 1, MakeState(1, {100})).ok());
  EXPECT_EQ(store_->sessions(), 1u);
}

TEST_F(StepStoreTest, RetentionFreesOlderStepsOnlyOnceANewerOneIsComplete) {
  auto r0 = *store_->Attach("job", 0, {0, 1});
  auto r1 = *store_->Attach("job", 1, {0, 1});
  ASSERT_TRUE(Put(r0, 1, MakeState(1, {kMiB})).ok());
  ASSERT_TRUE(Put(r1, 1, MakeState(2, {kMiB})).ok());
  ASSERT_TRUE(Put(r0, 2, MakeState(3, {kMiB})).ok());
  // Step 2 is not complete: step 1 stays.
  auto steps = store_->ListSteps("job");
  ASSERT_EQ(steps.size(), 2u);
  EXPECT_EQ(steps[0].state, v1::LOCAL);
  EXPECT_EQ(steps[1].state, v1::RECEIVING);
  ASSERT_TRUE(Put(r1, 2, MakeState(4, {kMiB})).ok());
  steps = store_->ListSteps("job");
  ASSERT_EQ(steps.size(), 1u);
  EXPECT_EQ(steps[0].step, 2u);
  EXPECT_EQ(arena_->free_bytes(), arena_->data_bytes() - 2 * kMiB - 2 * 4096);  // + 2 records
}

TEST_F(StepStoreTest, BytesBeingReadOutliveTheirLease) {
  auto r = *store_->Attach("job", 0, {0});
  RankState s1 = MakeState(1, {kMiB});
  ASSERT_TRUE(Put(r, 1, s1).ok());
  auto lease = *store_->Restore(r, 1);
  ASSERT_TRUE(Put(r, 2, MakeState(2, {kMiB})).ok());  // retires step 1
  auto read = *store_->Read(r, lease.lease_id, 0, kMiB);
  const uint64_t before = arena_->free_bytes();
  // The trainer releases its restore while the bytes are still being sent.
  ASSERT_TRUE(store_->Release(r, lease.lease_id).ok());
  EXPECT_EQ(arena_->free_bytes(), before);
  // Step 3 comes (step 2 goes): it may not take the read window.
  ASSERT_TRUE(Put(r, 3, MakeState(3, {kMiB})).ok());
  EXPECT_EQ(arena_->free_bytes(), before);
  EXPECT_TRUE(std::equal(read.bytes.begin(), read.bytes.end(), s1.bytes.begin()));
  EXPECT_EQ(store_->Read(r, lease.lease_id, 0, kMiB).status().code(),
            absl::StatusCode::kNotFound);
  read.pin.reset();
  EXPECT_EQ(arena_->free_bytes(), before + kMiB);
  EXPECT_TRUE(arena_->CheckConsistency().ok()) << arena_->CheckConsistency();
}

TEST_F(StepStoreTest, ASessionHoldsFewReadsAtOnceAndAPinMayOutliveItsStore) {
  StoreOptions options;
  options.limits.max_leases_per_session = 2;
  Open(options);
  auto r = *store_->Attach("job", 0, {0});
  ASSERT_TRUE(Put(r, 1, MakeState(1, {kMiB})).ok());
  auto lease = *store_->Restore(r, 1);
  auto a = store_->Read(r, lease.lease_id, 0, kMiB);
  auto b = store_->Read(r, lease.lease_id, 0, kMiB);
  ASSERT_TRUE(a.ok() && b.ok());
  auto c = store_->Read(r, lease.lease_id, 0, kMiB);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kResourceExhausted) << c.status();
  EXPECT_NE(c.status().message().find("2 reads in flight"), std::string::npos) << c.status();
  a->pin.reset();
  auto d = store_->Read(r, lease.lease_id, 0, kMiB);
  ASSERT_TRUE(d.ok()) << d.status();
  // The server may let go of a window's last slice after the store is gone.
  store_.reset();
  b->pin.reset();
  d->pin.reset();
}

TEST_F(StepStoreTest, ALeasedStepKeepsItsBytesUntilReleased) {
  auto r = *store_->Attach("job", 0, {0});
  RankState s1 = MakeState(1, {kMiB});
  ASSERT_TRUE(Put(r, 1, s1).ok());
  auto lease = *store_->Restore(r, 1);
  ASSERT_TRUE(Put(r, 2, MakeState(2, {kMiB})).ok());  // retires step 1
  EXPECT_EQ(store_->ListRestorable(r)->size(), 1u);
  auto bytes = store_->Read(r, lease.lease_id, 0, kMiB)->bytes;
  EXPECT_TRUE(std::equal(bytes.begin(), bytes.end(), s1.bytes.begin()));
  const uint64_t before = arena_->free_bytes();
  ASSERT_TRUE(store_->Release(r, lease.lease_id).ok());
  EXPECT_EQ(arena_->free_bytes(), before + kMiB);
}

TEST_F(StepStoreTest, AStepLargerThanTheArenaIsRefused) {
  auto r = *store_->Attach("job", 0, {0});
  auto st = store_->BeginRank(r, 1, 64 * kMiB).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(st.message().find("needs 64.00 MiB but the whole arena holds"), std::string::npos)
      << st;
  // Two windows that fit alone but not together.
  auto r2 = *store_->Attach("other", 0, {0});
  ASSERT_TRUE(store_->BeginRank(r, 1, 10 * kMiB).ok());
  st = store_->BeginRank(r2, 1, 10 * kMiB).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(st.message().find("job other step 1 rank 0 needs 10.00 MiB"), std::string::npos)
      << st;
}

TEST_F(StepStoreTest, ARestartedDaemonReadoptsCommittedStepsAndDropsTheRest) {
  RankState a0 = MakeState(1, {5000, 3}), a1 = MakeState(2, {70000});
  {
    auto r0 = *store_->Attach("job", 0, {0, 1});
    auto r1 = *store_->Attach("job", 1, {0, 1});
    ASSERT_TRUE(Put(r0, 3, a0).ok());
    ASSERT_TRUE(Put(r1, 3, a1).ok());
    ASSERT_TRUE(Put(r0, 4, MakeState(3, {100})).ok());  // step 4 half committed
    ASSERT_TRUE(store_->BeginRank(r1, 4, 100).ok());    // and half in flight
  }
  Open();  // the daemon "restarts": nothing is detached, the arena adopted
  AdoptReport report = store_->Adopt();
  EXPECT_EQ(report.steps_adopted, 1u);
  EXPECT_EQ(report.ranks_adopted, 2u);
  EXPECT_EQ(report.ranks_dropped, 1u);
  auto r0 = *store_->Attach("job", 0, {0, 1});
  auto r1 = *store_->Attach("job", 1, {0, 1});
  auto listed = *store_->ListRestorable(r0);
  ASSERT_EQ(listed.size(), 1u);
  EXPECT_EQ(listed[0].step(), 3u);
  EXPECT_EQ(Get(r0, 3), a0.bytes);
  EXPECT_EQ(Get(r1, 3), a1.bytes);
  // Everything not adopted is free again, once the daemon drops what no
  // record claimed (the window of the rank that was writing step 4). The
  // dropped half of step 4 stays as rank 0's spare, counted as free.
  EXPECT_EQ(arena_->window_files(), 4u);
  arena_->DropUnclaimedRecords();
  EXPECT_EQ(arena_->window_files(), 3u);
  EXPECT_TRUE(arena_->CheckConsistency().ok()) << arena_->CheckConsistency();
  EXPECT_EQ(arena_->free_bytes(), arena_->data_bytes() - (8192 + 73728) - 2 * 4096);
  EXPECT_TRUE(Put(r0, 4, MakeState(5, {10})).ok());
}

// A job's owner on the trainer socket survives a restart through the rank
// records: before this, the first uid to attach after a restart owned the
// job again and could restore another uid's weights.
TEST_F(StepStoreTest, AJobsOwnerSurvivesARestartAndGoesWithTheJob) {
  constexpr uint32_t kOwner = 1000, kOther = 1001, kDaemon = 0;
  ASSERT_TRUE(store_->ClaimJob("job", kOwner, kDaemon).ok());
  ASSERT_TRUE(store_->ClaimJob("job", kOwner, kDaemon).ok());
  EXPECT_EQ(store_->ClaimJob("job", kOther, kDaemon).code(), absl::StatusCode::kPermissionDenied);
  EXPECT_TRUE(store_->ClaimJob("job", kDaemon, kDaemon).ok());  // the daemon's own uid
  {
    auto r = *store_->Attach("job", 0, {0});
    ASSERT_TRUE(Put(r, 1, MakeState(1, {4096})).ok());
  }
  Open();  // restart: the arena and its records adopted
  store_->Adopt();
  absl::Status refused = store_->ClaimJob("job", kOther, kDaemon);
  EXPECT_EQ(refused.code(), absl::StatusCode::kPermissionDenied) << refused;
  EXPECT_EQ(refused.message(), "job job belongs to uid 1000; uid 1001 may not attach to it");
  EXPECT_TRUE(store_->ClaimJob("job", kOwner, kDaemon).ok());
  // A job that committed nothing before the restart had nothing to keep.
  EXPECT_TRUE(store_->ClaimJob("fresh", kOther, kDaemon).ok());
  // Dropped whole, the job and its owner are gone: the name is free again.
  ASSERT_TRUE(store_->Drop("job", 0).ok());
  EXPECT_TRUE(store_->ClaimJob("job", kOther, kDaemon).ok());
  // So is a name claimed by a trainer that never committed anything.
  ASSERT_TRUE(store_->Drop("fresh", 0).ok());
  EXPECT_TRUE(store_->ClaimJob("fresh", kOwner, kDaemon).ok());
  // Names that could never be jobs are not claimed.
  EXPECT_EQ(store_->ClaimJob(std::string(10000, 'x'), kOther, kDaemon).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store_->ClaimJob("a/b", kOther, kDaemon).code(), absl::StatusCode::kInvalidArgument);
}

// A node that came back empty learns a job's owner from its group (the
// owner travels in the payload the peers keep). The group's word wins over a
// uid that claimed the job here first, and the owner goes into the rebuilt
// ranks' records.
TEST_F(StepStoreTest, TheGroupsOwnerWinsOverAClaimMadeSinceTheNodeCameBack) {
  constexpr uint32_t kOwner = 1000, kSquatter = 1001, kDaemon = 0;
  {
    ASSERT_TRUE(store_->ClaimJob("job", kOwner, kDaemon).ok());
    auto r = *store_->Attach("job", 0, {0});
    ASSERT_TRUE(Put(r, 1, MakeState(1, {4096})).ok());
    auto payload = store_->PinPayload("job", 1);
    ASSERT_TRUE(payload.ok()) << payload.status();
    ASSERT_TRUE(payload->owner_uid.has_value());
    EXPECT_EQ(*payload->owner_uid, kOwner);  // what the peers are told
  }
  // The node comes back empty; a squatter attaches first, commits a step
  // newer than the group's, leaves its old windows as spares it may still
  // map, and opens another step.
  std::filesystem::remove_all(dir_);
  Open();
  store_->Adopt();
  ASSERT_TRUE(store_->ClaimJob("job", kSquatter, kDaemon).ok());
  auto squat = *store_->Attach("job", 0, {0});
  ASSERT_TRUE(Put(squat, 5, MakeState(5, {4096})).ok());
  ASSERT_TRUE(Put(squat, 6, MakeState(6, {4096})).ok());
  ASSERT_TRUE(store_->BeginRank(squat, 7, 4096).ok());
  ASSERT_GT(arena_->window_files(), 0u);
  store_->SetOwnerFromGroup("job", kOwner);  // the group's word
  absl::Status refused = store_->ClaimJob("job", kSquatter, kDaemon);
  EXPECT_EQ(refused.code(), absl::StatusCode::kPermissionDenied) << refused;
  EXPECT_TRUE(store_->ClaimJob("job", kOwner, kDaemon).ok());
  // What the squatter wrote is gone, open or committed, and so are the
  // job's spare windows: nothing it maps is ever the job's again.
  EXPECT_TRUE(store_->ListSteps("job").empty());
  EXPECT_FALSE(store_->CommitRank(squat, 7, MakeState(7, {4096}).manifest).ok());
  EXPECT_EQ(arena_->window_files(), 0u);
  EXPECT_TRUE(arena_->CheckConsistency().ok()) << arena_->CheckConsistency();
  // What is rebuilt now is recorded as the owner's: a restart keeps it.
  RankState s = MakeState(2, {8192});
  auto extent = *arena_->AllocateWindow(s.bytes.size(), WindowOwner("job", 0));
  std::memcpy(arena_->base() + extent.offset, s.bytes.data(), s.bytes.size());
  std::vector<RebuiltRank> ranks = {{0, extent, s.bytes.size(), s.manifest}};
  ASSERT_TRUE(store_->InstallRebuilt("job", 1, {0}, ranks).ok());
  Open();
  store_->Adopt();
  EXPECT_EQ(store_->ClaimJob("job", kSquatter, kDaemon).code(),
            absl::StatusCode::kPermissionDenied);
  // Once this node's own records name the owner, a peer's older word does
  // not override it (a job dropped and made again keeps its new owner).
  store_->SetOwnerFromGroup("job", kSquatter);
  EXPECT_TRUE(store_->ClaimJob("job", kOwner, kDaemon).ok());
  EXPECT_EQ(store_->ClaimJob("job", kSquatter, kDaemon).code(),
            absl::StatusCode::kPermissionDenied);
}

// One uid cannot use up the owners a daemon tracks: its claims are bounded,
// the daemon's own uid and other uids still claim.
TEST_F(StepStoreTest, OneUidsJobClaimsAreBounded) {
  int claimed = 0;
  absl::Status st;
  for (; claimed < 5000 && st.ok(); ++claimed) {
    st = store_->ClaimJob(absl::StrCat("squat-", claimed), 1001, 0);
  }
  EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted) << st;
  EXPECT_EQ(claimed, 4097);
  EXPECT_NE(st.message().find("uid 1001"), std::string::npos) << st;
  EXPECT_TRUE(store_->ClaimJob("real", 1000, 0).ok());
  EXPECT_TRUE(store_->ClaimJob("daemons-own", 0, 0).ok());
}

TEST_F(StepStoreTest, AdoptionDropsARankWhoseBytesNoLongerMatch) {
  {
    auto r = *store_->Attach("job", 0, {0});
    RankState s = MakeState(1, {4096});
    auto w = *store_->BeginRank(r, 1, s.bytes.size());
    std::memcpy(arena_->base() + w.offset, s.bytes.data(), s.bytes.size());
    ASSERT_TRUE(store_->CommitRank(r, 1, s.manifest).ok());
    arena_->base()[w.offset + 100] ^= 0x01;  // memory went bad while stopped
  }
  Open();
  AdoptReport report = store_->Adopt();
  EXPECT_EQ(report.steps_adopted, 0u);
  EXPECT_EQ(report.ranks_dropped, 1u);
  ASSERT_EQ(report.notes.size(), 1u);
  EXPECT_NE(report.notes[0].find("tensor 't0' has crc32c"), std::string::npos) << report.notes[0];
  EXPECT_EQ(arena_->free_bytes(), arena_->data_bytes());
}

TEST_F(StepStoreTest, VerifyAndDropForOperators) {
  auto r = *store_->Attach("job", 0, {0});
  ASSERT_TRUE(Put(r, 1, MakeState(1, {100, 200})).ok());
  auto report = *store_->Verify("", 0);
  EXPECT_EQ(report.tensors_checked, 2u);
  EXPECT_EQ(report.bytes_checked, 300u);
  EXPECT_TRUE(report.errors.empty());
  EXPECT_EQ(store_->Drop("nope", 0).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store_->Drop("job", 7).status().code(), absl::StatusCode::kNotFound);
  auto dropped = *store_->Drop("job", 1);
  EXPECT_EQ(dropped.first, 1u);
  EXPECT_EQ(dropped.second, 300u);
  EXPECT_TRUE(store_->ListSteps("job").empty());
  EXPECT_EQ(arena_->free_bytes(), arena_->data_bytes());
}

// A rank decoded into a fresh extent, as the rebuilder hands it over.
RebuiltRank Rebuilt(Arena& arena, uint32_t rank, const RankState& s) {
  RebuiltRank r;
  r.rank = rank;
  r.extent = *arena.Allocate(s.bytes.size());
  std::memcpy(arena.Bytes(r.extent).data(), s.bytes.data(), s.bytes.size());
  r.bytes = s.bytes.size();
  r.manifest = s.manifest;
  return r;
}

TEST_F(StepStoreTest, ARankRebuiltAgainReplacesTheOldOneWithoutALeak) {
  const uint64_t free_at_start = arena_->free_bytes();
  const RankState s0 = MakeState(3, {5000, 123});
  const RankState s1 = MakeState(4, {7000});
  // Served early, then served again (a rebuild that failed and was retried),
  // then installed whole.
  ASSERT_TRUE(store_->InstallRebuiltRank("job", 3, {0, 1}, Rebuilt(*arena_, 0, s0)).ok());
  auto r = *store_->Attach("job", 0, {0, 1});
  auto lease = *store_->Restore(r, 3);  // pins the first copy
  ASSERT_TRUE(store_->InstallRebuiltRank("job", 3, {0, 1}, Rebuilt(*arena_, 0, s0)).ok());
  std::vector<RebuiltRank> whole;
  whole.push_back(Rebuilt(*arena_, 0, s0));
  whole.push_back(Rebuilt(*arena_, 1, s1));
  ASSERT_TRUE(store_->InstallRebuilt("job", 3, {0, 1}, std::move(whole)).ok());
  // The pinned copy is intact until released; the restorable one too.
  auto pinned = store_->Read(r, lease.lease_id, 0, s0.bytes.size())->bytes;
  EXPECT_TRUE(std::equal(pinned.begin(), pinned.end(), s0.bytes.begin()));
  ASSERT_TRUE(store_->Release(r, lease.lease_id).ok());
  EXPECT_EQ(Get(r, 3), s0.bytes);
  ASSERT_TRUE(arena_->CheckConsistency().ok()) << arena_->CheckConsistency();
  // Everything the replaced copies held is back once the job goes.
  store_->Detach(r);
  ASSERT_TRUE(store_->Drop("job", 0).ok());
  EXPECT_EQ(arena_->free_bytes(), free_at_start);
  EXPECT_TRUE(arena_->CheckConsistency().ok()) << arena_->CheckConsistency();
}

TEST_F(StepStoreTest, ARebuildingStepIsNotCompleteSoAFailedRebuildIsRetried) {
  const RankState s0 = MakeState(5, {3000});
  ASSERT_TRUE(store_->InstallRebuiltRank("job", 2, {0, 1}, Rebuilt(*arena_, 0, s0)).ok());
  EXPECT_TRUE(store_->CompleteSteps().empty());
  std::vector<RebuiltRank> whole;
  whole.push_back(Rebuilt(*arena_, 0, s0));
  whole.push_back(Rebuilt(*arena_, 1, MakeState(6, {100})));
  ASSERT_TRUE(store_->InstallRebuilt("job", 2, {0, 1}, std::move(whole)).ok());
  const auto complete = store_->CompleteSteps();
  ASSERT_EQ(complete.size(), 1u);
  EXPECT_EQ(complete[0], std::make_pair(std::string("job"), uint64_t{2}));
}

TEST_F(StepStoreTest, AnOlderStepRebuiltAfterANewerOneFailedReplacesWhatThatOneServed) {
  const uint64_t free_at_start = arena_->free_bytes();
  // Step 5's rebuild served rank 0 on demand, then failed; its rank 0 stays
  // restorable (and pinned by a lease) while the pass falls back to step 4.
  const RankState newer = MakeState(7, {3000});
  ASSERT_TRUE(store_->InstallRebuiltRank("job", 5, {0, 1}, Rebuilt(*arena_, 0, newer)).ok());
  auto r0 = *store_->Attach("job", 0, {0, 1});
  auto r1 = *store_->Attach("job", 1, {0, 1});
  auto lease = *store_->Restore(r0, 0);
  EXPECT_EQ(lease.step, 5u);
  EXPECT_EQ(store_->Restore(r1, 0).status().code(), absl::StatusCode::kNotFound);
  // Step 4's first rank served on demand withdraws step 5: rank 0 waits for
  // step 4 instead of restoring a step its neighbour cannot.
  const RankState s0 = MakeState(8, {2000}), s1 = MakeState(9, {100, 7});
  ASSERT_TRUE(store_->InstallRebuiltRank("job", 4, {0, 1}, Rebuilt(*arena_, 1, s1)).ok());
  EXPECT_EQ(Get(r1, 0), s1.bytes);
  // Rank 0 restored the withdrawn step: it may not go on from it before it
  // asks again (and then finds nothing yet, or step 4).
  const auto refused = Put(r0, 5, MakeState(12, {64}));
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kAborted) << refused.status();
  EXPECT_NE(refused.status().message().find("restore again"), std::string::npos);
  EXPECT_EQ(store_->Restore(r0, 0).status().code(), absl::StatusCode::kNotFound);
  std::vector<RebuiltRank> whole;
  whole.push_back(Rebuilt(*arena_, 0, s0));
  whole.push_back(Rebuilt(*arena_, 1, s1));
  ASSERT_TRUE(store_->InstallRebuilt("job", 4, {0, 1}, std::move(whole)).ok());
  // Every rank's newest step is now 4; step 5's bytes stay readable through
  // the lease until it is released.
  ASSERT_EQ(store_->ListSteps("job").size(), 1u);
  EXPECT_EQ(store_->ListSteps("job")[0].step, 4u);
  EXPECT_EQ(Get(r0, 0), s0.bytes);
  EXPECT_EQ(Get(r1, 0), s1.bytes);
  auto pinned = store_->Read(r0, lease.lease_id, 0, newer.bytes.size())->bytes;
  EXPECT_TRUE(std::equal(pinned.begin(), pinned.end(), newer.bytes.begin()));
  ASSERT_TRUE(store_->Release(r0, lease.lease_id).ok());
  EXPECT_TRUE(arena_->CheckConsistency().ok()) << arena_->CheckConsistency();
  // Training goes on from step 4: step 5 is new again, for both ranks.
  const RankState n0 = MakeState(10, {64}), n1 = MakeState(11, {65});
  EXPECT_EQ(*Put(r0, 5, n0), v1::RECEIVING);
  EXPECT_EQ(*Put(r1, 5, n1), v1::LOCAL);
  EXPECT_EQ(Get(r0, 5), n0.bytes);
  EXPECT_EQ(Get(r1, 5), n1.bytes);
  // A step that is whole still refuses an older one.
  std::vector<RebuiltRank> older;
  older.push_back(Rebuilt(*arena_, 0, s0));
  const ArenaExtent kept = older[0].extent;
  EXPECT_EQ(store_->InstallRebuilt("job", 3, {0, 1}, std::move(older)).code(),
            absl::StatusCode::kFailedPrecondition);
  arena_->Free(kept);
  store_->Detach(r0);
  store_->Detach(r1);
  ASSERT_TRUE(store_->Drop("job", 0).ok());
  EXPECT_EQ(arena_->free_bytes(), free_at_start);
}

TEST_F(StepStoreTest, AWithdrawalWhileARankOpensItsNextStepIsCaughtWhenTheWindowArrives) {
  // The withdrawal lands while BeginRank gets its window, off the lock.
  std::function<void()> during;
  Open({}, [&](const std::string&) {
    if (during) std::exchange(during, nullptr)();
  });
  const RankState served = MakeState(17, {300});
  ASSERT_TRUE(store_->InstallRebuiltRank("job", 5, {0, 1}, Rebuilt(*arena_, 0, served)).ok());
  auto r0 = *store_->Attach("job", 0, {0, 1});
  uint64_t got = 0;
  EXPECT_EQ(Get(r0, 0, &got), served.bytes);
  EXPECT_EQ(got, 5u);
  during = [&] {
    ASSERT_TRUE(
        store_->InstallRebuiltRank("job", 4, {0, 1}, Rebuilt(*arena_, 1, MakeState(18, {9})))
            .ok());
  };
  const auto refused = Put(r0, 6, MakeState(19, {64}));
  EXPECT_EQ(during, nullptr) << "the withdrawal did not land during BeginRank";
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kAborted) << refused.status();
  EXPECT_TRUE(arena_->CheckConsistency().ok()) << arena_->CheckConsistency();
  store_->Detach(r0);
}

TEST_F(StepStoreTest, ANewerStepEveryRankWasServedFromStaysOverAnOlderRebuild) {
  const RankState a = MakeState(13, {300}), b = MakeState(14, {500});
  ASSERT_TRUE(store_->InstallRebuiltRank("job", 7, {0, 1}, Rebuilt(*arena_, 0, a)).ok());
  ASSERT_TRUE(store_->InstallRebuiltRank("job", 7, {0, 1}, Rebuilt(*arena_, 1, b)).ok());
  // Step 7's rebuild failed past its ranks (a parity row); step 6 is not
  // taken over it: the node holds step 7 whole.
  std::vector<RebuiltRank> older;
  older.push_back(Rebuilt(*arena_, 0, MakeState(15, {300})));
  older.push_back(Rebuilt(*arena_, 1, MakeState(16, {500})));
  std::vector<ArenaExtent> extents = {older[0].extent, older[1].extent};
  EXPECT_EQ(store_->InstallRebuilt("job", 6, {0, 1}, std::move(older)).code(),
            absl::StatusCode::kFailedPrecondition);
  for (const ArenaExtent& e : extents) arena_->Free(e);
  auto r0 = *store_->Attach("job", 0, {0, 1});
  auto r1 = *store_->Attach("job", 1, {0, 1});
  uint64_t got = 0;
  EXPECT_EQ(Get(r0, 0, &got), a.bytes);
  EXPECT_EQ(got, 7u);
  EXPECT_EQ(Get(r1, 0, &got), b.bytes);
  EXPECT_EQ(got, 7u);
  EXPECT_TRUE(arena_->CheckConsistency().ok()) << arena_->CheckConsistency();
}

TEST_F(StepStoreTest, AnUnrecoverableJobAnswersDataLossUntilCleared) {
  auto r = *store_->Attach("job", 0, {0});
  store_->SetUnrecoverable("job", absl::DataLossError("job job step 4 cannot be rebuilt"));
  EXPECT_EQ(store_->Restore(r, 0).status().code(), absl::StatusCode::kDataLoss);
  store_->ClearUnrecoverable("job");
  EXPECT_EQ(store_->Restore(r, 0).status().code(), absl::StatusCode::kNotFound);
}

// A gate that keeps everything from `floor` on and may drop what `drop`
// allows, recording what it was asked.
class TestGate : public RetentionGate {
 public:
  uint64_t GroupFloor(const std::string&) override { return floor; }
  bool MayDropUnprotected(const std::string&, uint64_t step) override {
    asked.push_back(step);
    return drop;
  }
  uint64_t floor = 0;
  bool drop = false;
  std::vector<uint64_t> asked;
};

TEST_F(StepStoreTest, WithPeersNothingAtOrAboveTheGroupFloorIsRetired) {
  StoreOptions o;
  o.final_state = v1::PROTECTED;
  Open(o);
  TestGate gate;
  store_->SetRetentionGate(&gate);
  const uint64_t s = *store_->Attach("job", 0, {0});
  for (uint64_t step = 1; step <= 3; ++step) {
    ASSERT_TRUE(Put(s, step, MakeState(step, {100})).ok());
    ASSERT_TRUE(store_->MarkProtected("job", step).ok());
  }
  // retain = 1, but the group floor is step 2: some node holds nothing
  // newer PROTECTED, so 2 and 3 stay; 1 goes.
  gate.floor = 2;
  store_->ApplyRetention("job");
  std::vector<uint64_t> held;
  for (const StepSummary& st : store_->ListSteps("job")) held.push_back(st.step);
  EXPECT_EQ(held, (std::vector<uint64_t>{2, 3}));
  // A superseded LOCAL step above the floor goes only when the gate sealed it.
  ASSERT_TRUE(Put(s, 4, MakeState(4, {100})).ok());
  ASSERT_TRUE(Put(s, 5, MakeState(5, {100})).ok());
  EXPECT_EQ(gate.asked.back(), 4u);
  EXPECT_EQ(store_->ListSteps("job").size(), 4u);  // 2, 3, 4, 5
  gate.drop = true;
  store_->ApplyRetention("job");
  held.clear();
  for (const StepSummary& st : store_->ListSteps("job")) held.push_back(st.step);
  EXPECT_EQ(held, (std::vector<uint64_t>{2, 3, 5}));
}

TEST_F(StepStoreTest, ADaemonWithPeersRetiresNothingBeforeItsGateIsSet) {
  StoreOptions o;
  o.final_state = v1::PROTECTED;
  Open(o);
  {
    const uint64_t s = *store_->Attach("job", 0, {0});
    for (uint64_t step = 1; step <= 3; ++step) ASSERT_TRUE(Put(s, step, MakeState(step, {64})).ok());
  }
  // A restart: re-adopted steps are all LOCAL; the group may need any of
  // them (the floor), which only the gate knows.
  Open(o);
  AdoptReport r = store_->Adopt();
  EXPECT_EQ(r.steps_adopted, 3u);
  EXPECT_EQ(store_->ListSteps("job").size(), 3u);
}

TEST_F(StepStoreTest, TheFirstSnapshotAfterRestoringAnOlderStepRewindsTheJobOnce) {
  const uint64_t a = *store_->Attach("job", 0, {0, 1});
  const uint64_t b = *store_->Attach("job", 1, {0, 1});
  ASSERT_TRUE(Put(a, 1, MakeState(1, {64})).ok());
  ASSERT_TRUE(Put(b, 1, MakeState(2, {64})).ok());
  // Rank 0 committed step 2 before the job died; rank 1 never did.
  ASSERT_TRUE(Put(a, 2, MakeState(3, {64})).ok());
  Get(a, 1);
  Get(b, 1);
  // Rank 1 snapshots step 2 first: the job rewinds to 1, dropping rank 0's
  // old step 2 ...
  auto wb = store_->BeginRank(b, 2, 64);
  ASSERT_TRUE(wb.ok()) << wb.status();
  // ... and rank 0's snapshot of step 2 must not discard rank 1's open window.
  const RankState a2 = MakeState(4, {64}), b2 = MakeState(5, {64});
  ASSERT_TRUE(Put(a, 2, a2).ok());
  std::memcpy(arena_->base() + wb->offset, b2.bytes.data(), b2.bytes.size());
  auto st = store_->CommitRank(b, 2, b2.manifest);
  ASSERT_TRUE(st.ok()) << st.status();
  EXPECT_EQ(*st, v1::LOCAL);
  EXPECT_EQ(Get(a, 2), a2.bytes);
  EXPECT_EQ(Get(b, 2), b2.bytes);
}

TEST_F(StepStoreTest, RestoringTheNewestStepRewindsNothingOpenedSince) {
  const uint64_t a = *store_->Attach("job", 0, {0, 1});
  const uint64_t b = *store_->Attach("job", 1, {0, 1});
  ASSERT_TRUE(Put(a, 1, MakeState(1, {64})).ok());
  ASSERT_TRUE(Put(b, 1, MakeState(2, {64})).ok());
  Get(a, 0);
  Get(b, 0);
  // Rank 0 opens step 2 first; rank 1's snapshot of step 2 joins it.
  auto wa = store_->BeginRank(a, 2, 64);
  ASSERT_TRUE(wa.ok());
  const RankState a2 = MakeState(3, {64}), b2 = MakeState(4, {64});
  ASSERT_TRUE(Put(b, 2, b2).ok());
  std::memcpy(arena_->base() + wa->offset, a2.bytes.data(), a2.bytes.size());
  auto st = store_->CommitRank(a, 2, a2.manifest);
  ASSERT_TRUE(st.ok()) << st.status();
  EXPECT_EQ(*st, v1::LOCAL);
}

}  // namespace
}  // namespace ecsnap::daemon
