// Cross-node protection, end to end: real ecsnapd processes forming one
// group on 127.0.0.1, two trainer ranks per node, nodes killed and replaced.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <random>
#include <thread>

#include <grpcpp/grpcpp.h>

#include "absl/cleanup/cleanup.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "client/ecsnap.h"
#include "gtest/gtest.h"
#include "rdma/verbs.h"
#include "tests/cluster_fixture.h"
#include "tests/harness.h"

namespace ecsnap {
namespace {

struct Shape {
  int k;
  int m;
  int max_cases;  // subsets tried (all of them when there are fewer)
};

class EveryLoss : public ClusterTest, public ::testing::WithParamInterface<Shape> {};

TEST_P(EveryLoss, ReplacedNodesRestoreTheNewestProtectedStepByteForByte) {
  const int k = GetParam().k, m = GetParam().m, n = k + m;
  StartCluster(k, m);
  // Every subset of 1..m slots, in a seeded order.
  std::vector<uint32_t> subsets;
  for (uint32_t mask = 1; mask < (1u << n); ++mask) {
    if (__builtin_popcount(mask) <= m) subsets.push_back(mask);
  }
  std::shuffle(subsets.begin(), subsets.end(), std::mt19937(42));
  if (static_cast<int>(subsets.size()) > GetParam().max_cases) subsets.resize(GetParam().max_cases);

  uint64_t step = 0;
  int run = 0, recovered = 0;
  for (size_t i = 0; i < subsets.size(); ++i) {
    Snapshot(++step);
    ASSERT_TRUE(WaitProtected(step)) << "step " << step << " never became PROTECTED\n"
                                     << cluster_->daemon(0).Log();
    const uint64_t protected_step = step;
    // Every other case dies in the middle of the next step's push and fold.
    const bool mid_push = i % 2 == 1;
    if (mid_push) Snapshot(++step, {}, /*commit=*/false);
    std::vector<int> lost;
    for (int s = 0; s < n; ++s) {
      if (subsets[i] & (1u << s)) lost.push_back(s);
    }
    for (int s : lost) clients_[s].clear();
    for (int s : lost) cluster_->daemon(s).Kill();
    for (int s : lost) ASSERT_TRUE(cluster_->daemon(s).Replace().ok());
    ++run;
    bool ok = true;
    for (int s : lost) {
      Reconnect(s);
      uint64_t got = RestoreAndCheck(s);
      // A rank served a step whose rebuild then failed is told so at its
      // next snapshot; asked again, every rank answers the same step (the
      // one the node fell back to), as a job that agrees on its step would.
      const uint64_t again = RestoreAndCheck(s);
      EXPECT_EQ(again, got) << "lost {" << absl::StrJoin(lost, ",") << "}\n"
                            << cluster_->daemon(s).Log();
      got = again;
      // The newest step the group had protected, or the one in flight if it
      // made it before the kill.
      ok &= got == protected_step || (mid_push && got == step);
      EXPECT_TRUE(got == protected_step || (mid_push && got == step))
          << "lost {" << absl::StrJoin(lost, ",") << "}: restored step " << got << ", protected "
          << protected_step << "\n"
          << cluster_->daemon(s).Log();
    }
    recovered += ok && !::testing::Test::HasFailure();
    if (::testing::Test::HasFailure()) break;
  }
  std::printf("failure matrix RS(%d,%d): %d cases run, %d recovered\n", k, m, run, recovered);
  EXPECT_EQ(run, recovered);
}

INSTANTIATE_TEST_SUITE_P(Codes, EveryLoss,
                         ::testing::Values(Shape{2, 1, 100}, Shape{4, 2, 100}, Shape{6, 2, 12},
                                           Shape{1, 2, 100}),
                         [](const ::testing::TestParamInfo<Shape>& info) {
                           return absl::StrCat("RS", info.param.k, "_", info.param.m);
                         });

TEST_F(ClusterTest, MoreThanMLostSlotsAnswerDataLossNamingThem) {
  StartCluster(2, 1);
  Snapshot(1);
  ASSERT_TRUE(WaitProtected(1));
  for (int s : {0, 2}) {
    clients_[s].clear();
    cluster_->daemon(s).Kill();
  }
  for (int s : {0, 2}) ASSERT_TRUE(cluster_->daemon(s).Replace().ok());
  Reconnect(0);
  auto got = clients_[0][0]->Restore(kLatestStep);
  ASSERT_EQ(got.status().code(), absl::StatusCode::kDataLoss) << got.status();
  EXPECT_NE(got.status().message().find("job job step 1 cannot be rebuilt: group 0 (RS 2+1) has "
                                        "lost slots {"),
            std::string::npos)
      << got.status();
  EXPECT_TRUE(cluster_->daemon(0).alive());
}

TEST_F(ClusterTest, AHungPeerDoesNotBlockSnapshotsAndTheStepStaysLocal) {
  StartCluster(2, 1);
  Snapshot(1);
  ASSERT_TRUE(WaitProtected(1));
  cluster_->daemon(2).Pause();
  // Commits while the peer is stopped: nothing waits on it.
  Snapshot(2, {0, 1});
  EXPECT_EQ(StateOf(0, 2), v1::LOCAL);
  // Past the peer timeout (2 s), the step is still LOCAL, not stuck or lost.
  std::this_thread::sleep_for(std::chrono::milliseconds(2500));
  EXPECT_EQ(StateOf(0, 2), v1::LOCAL);
  EXPECT_EQ(StateOf(1, 2), v1::LOCAL);
  EXPECT_EQ(StateOf(0, 1), v1::PROTECTED);  // still kept: step 2 is not protected
  cluster_->daemon(2).Resume();
  Snapshot(3);
  EXPECT_TRUE(WaitProtected(3));
}

TEST_F(ClusterTest, ACorruptStoredChunkIsCaughtAndRebuiltAround) {
  StartCluster(2, 2);
  Snapshot(1);
  ASSERT_TRUE(WaitProtected(1));
  // Flip a byte of slot 1's first data chunk in its live memory (the files
  // are the daemon's memory): the start of rank 2's first tensor.
  const State victim = MakeState(1, 0, 1);
  ASSERT_TRUE(cluster_->daemon(1).FlipByteAfter(victim.bytes[0].data(), 64, 32));

  ASSERT_NO_FATAL_FAILURE(ReplaceNode(0));
  EXPECT_EQ(RestoreAndCheck(0), 1u);
  EXPECT_NE(cluster_->daemon(0).Log().find("fails its crc32c; treated as lost"), std::string::npos)
      << cluster_->daemon(0).Log();
}

// cluster.bulk_transport BULK_RDMA on hosts without an RDMA device (these):
// each daemon says at start that it has none, and the group protects and
// rebuilds over TCP as BULK_TCP would, byte for byte.
TEST_F(ClusterTest, BulkRdmaWithoutADeviceSaysSoAndMovesChunksOverTcp) {
  if (!rdma::DeviceNames().empty()) GTEST_SKIP() << "this host has an RDMA device";
  StartCluster(2, 1, "  bulk_transport: BULK_RDMA\n");
  Snapshot(1);
  ASSERT_TRUE(WaitProtected(1)) << cluster_->daemon(0).Log();
  for (int s = 0; s < cluster_->n(); ++s) {
    EXPECT_NE(cluster_->daemon(s).Log().find("BULK_RDMA, but"), std::string::npos)
        << cluster_->daemon(s).Log();
  }
  ASSERT_NO_FATAL_FAILURE(ReplaceNode(1));
  EXPECT_EQ(RestoreAndCheck(1), 1u);
  EXPECT_NE(cluster_->daemon(1).Log().find("every checksum verified"), std::string::npos)
      << cluster_->daemon(1).Log();
  Snapshot(2);
  EXPECT_TRUE(WaitProtected(2)) << cluster_->daemon(1).Log();
}

TEST_F(ClusterTest, ARestartedDaemonReadoptsItsStepAndRegainsProtection) {
  StartCluster(2, 1);
  Snapshot(1);
  ASSERT_TRUE(WaitProtected(1));
  CrashAndRestartInPlace(0, 1);
  // And the group protects the next step as before.
  Snapshot(2);
  EXPECT_TRUE(WaitProtected(2)) << cluster_->daemon(0).Log();
}

// A mount namespace of this binary's own, made while it has one thread
// (static initialisation), so that every thread sees the tmpfs the
// huge-page test mounts (the trainers' gRPC threads reach the daemons'
// sockets in it).
const std::string kPrivateMounts = testing::PrivateMountNamespace();

// Every arena on a tmpfs mounted huge=within_size, as
// deploy/dev-shm-ecsnap.mount sets up a node: the daemons say which pages
// they got, and windows in huge pages (placed and sized on their
// boundaries) keep every byte through protection, a restart in place (the
// windows re-adopted from the tmpfs) and a node replaced empty (rebuilt
// into fresh huge-page windows).
TEST_F(ClusterTest, OnHugePageArenasStepsSurviveARestartInPlaceAndALostNode) {
  const std::string why = testing::MountHugeTmpfs(dir_.path());
  if (!why.empty()) GTEST_SKIP() << why;
  // The daemons go before the mount, and the mount before the directory.
  absl::Cleanup unmount = [this] {
    clients_.clear();
    cluster_.reset();
    ::umount2(dir_.path().c_str(), MNT_DETACH);
  };
  StartCluster(2, 1);
  for (int s = 0; s < cluster_->n(); ++s) {
    auto stub = cluster_->daemon(s).AdminStub();
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    admin::StatusResponse resp;
    ASSERT_TRUE(stub->Status(&ctx, admin::StatusRequest(), &resp).ok());
    if (resp.arena_page_bytes() <= 4096) GTEST_SKIP() << resp.arena_pages();
    EXPECT_GE(resp.arena_page_bytes(), 2u << 20) << resp.arena_pages();
    EXPECT_NE(resp.arena_pages().find("huge=within_size"), std::string::npos)
        << resp.arena_pages();
  }
  Snapshot(1);
  ASSERT_TRUE(WaitProtected(1)) << cluster_->daemon(0).Log();
  CrashAndRestartInPlace(0, 1);
  Snapshot(2);
  ASSERT_TRUE(WaitProtected(2)) << cluster_->daemon(0).Log();
  ReplaceNode(1);
  EXPECT_EQ(RestoreAndCheck(1), 2u) << cluster_->daemon(1).Log();
  EXPECT_EQ(RestoreAndCheck(0), 2u);
  EXPECT_NE(cluster_->daemon(1).Log().find("every checksum verified"), std::string::npos)
      << cluster_->daemon(1).Log();
}

TEST_F(ClusterTest, ARankIsServedFromARebuildBeforeTheRebuildEnds) {
  // Rebuilds capped at 50 KB/s: the full rebuild of a node takes seconds.
  StartCluster(2, 2, "rebuild_bytes_per_sec: 50000");
  Snapshot(1);
  ASSERT_TRUE(WaitProtected(1));
  ASSERT_NO_FATAL_FAILURE(ReplaceNode(0));
  auto steps = clients_[0][0]->ListRestorable();
  ASSERT_TRUE(steps.ok()) << steps.status();
  ASSERT_EQ(steps->size(), 1u);
  EXPECT_EQ((*steps)[0].step, 1u);
  EXPECT_EQ((*steps)[0].state, StepState::kRebuilding) << "served only after the whole rebuild";
  EXPECT_EQ(RestoreAndCheck(0), 1u);
  // Served from the REBUILDING step: the rebuild was still going on.
  EXPECT_NE(StateOf(0, 1), v1::PROTECTED);
  // The rebuild goes on and completes the step.
  bool protected_again = false;
  for (int i = 0; i < 600 && !protected_again; ++i) {
    protected_again = StateOf(0, 1) == v1::PROTECTED;
    if (!protected_again) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_TRUE(protected_again) << cluster_->daemon(0).Log();
  EXPECT_NE(cluster_->daemon(0).Log().find("served degraded"), std::string::npos);
  // Both ranks restore from the finished step too.
  Reconnect(0);
  EXPECT_EQ(RestoreAndCheck(0), 1u);
}

// Rebuild faults: survivors lost or stopped mid-rebuild, corrupt chunks, two
// rebuilds asked for at once, a newer step committed under a rebuild. After
// each, every rank restores bit-exact and every arena's bookkeeping is
// consistent (admin Verify).
class RebuildFaultTest : public ClusterTest {
 protected:
  grpc::Status AdminRebuild(int slot, admin::RebuildResponse* resp) {
    auto stub = cluster_->daemon(slot).AdminStub();
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
    return stub->Rebuild(&ctx, admin::RebuildRequest(), resp);
  }

  void ExpectArenaConsistent(int slot) {
    auto stub = cluster_->daemon(slot).AdminStub();
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    admin::VerifyResponse resp;
    grpc::Status st = stub->Verify(&ctx, admin::VerifyRequest(), &resp);
    ASSERT_TRUE(st.ok()) << "slot " << slot << ": " << st.error_message();
    EXPECT_TRUE(resp.arena_consistent()) << "slot " << slot << ": " << resp.arena_error();
    EXPECT_TRUE(resp.errors().empty()) << "slot " << slot << ": " << resp.errors(0);
  }

  // Rank `r` of `slot` restores `step` (its newest) and gets its bytes back.
  void RestoreRankAndCheck(int slot, int r, uint64_t step) {
    auto got = clients_[slot][r]->Restore(kLatestStep);
    ASSERT_TRUE(got.ok()) << "slot " << slot << " rank " << r << ": " << got.status();
    ASSERT_EQ(got->step, step);
    const State want = MakeState(slot, r, step);
    ASSERT_EQ(got->tensors.size(), want.tensors.size());
    for (size_t i = 0; i < want.tensors.size(); ++i) {
      EXPECT_EQ(got->tensors[i].data, want.bytes[i]) << "slot " << slot << " rank " << r
                                                     << " tensor " << i;
    }
  }

  // Flips a byte in the first tensor of rank `r` of `slot`, in its live memory.
  void CorruptRank(int slot, int r, uint64_t step) {
    const State victim = MakeState(slot, r, step);
    ASSERT_TRUE(cluster_->daemon(slot).FlipByteAfter(victim.bytes[0].data(), 64, 32));
  }

  // RS 2+m, one step protected, slot 0 lost and replaced empty; its rebuild
  // (about 180 KB with m = 2, capped at 20 KB/s) has decoded some but not
  // all of it when this returns, so a fault made next lands between fetches.
  void ReplaceSlot0AndWaitMidRebuild(int m = 2) {
    StartCluster(2, m, "rebuild_bytes_per_sec: 20000");
    Snapshot(1);
    ASSERT_TRUE(WaitProtected(1));
    ASSERT_NO_FATAL_FAILURE(ReplaceNode(0, /*reconnect=*/false));
    ASSERT_TRUE(WaitRebuild(0, [](const admin::RebuildStatus& r) {
      return r.active() && r.bytes_done() > 0 && r.bytes_done() < r.bytes_total();
    })) << cluster_->daemon(0).Log();
  }

  // RS 2+1, so each stripe of a lost slot has exactly k survivors and one
  // bad chunk fails it; steps 1 and 2 protected and kept everywhere; the
  // first tensor of rank 0 of `corrupt_slot`'s step 2 damaged; then slot 0
  // replaced empty (rebuild capped at 20 KB/s) and its trainers attached.
  void ProtectTwoStepsCorruptOneAndReplaceSlot0(int corrupt_slot) {
    StartCluster(2, 1, "rebuild_bytes_per_sec: 20000", {"--retain=2"});
    Snapshot(1);
    ASSERT_TRUE(WaitProtected(1));
    Snapshot(2);
    ASSERT_TRUE(WaitProtected(2));
    CorruptRank(corrupt_slot, 0, 2);
    ASSERT_NO_FATAL_FAILURE(ReplaceNode(0));
  }

  // Slot 0's rebuild ends whole and without error, having read around a
  // survivor that `fault` made unreadable.
  void ExpectRebuiltAround(const std::string& fault) {
    ASSERT_TRUE(WaitRebuild(0, [](const admin::RebuildStatus& r) { return !r.active(); }));
    const admin::RebuildStatus done = RebuildStatusOf(0);
    EXPECT_EQ(done.last_error(), "") << cluster_->daemon(0).Log();
    EXPECT_EQ(done.bytes_done(), done.bytes_total());
    EXPECT_GT(done.bytes_total(), 0u);
    EXPECT_NE(cluster_->daemon(0).Log().find("unreadable"), std::string::npos)
        << fault << " did not land mid-rebuild\n" << cluster_->daemon(0).Log();
  }

  static int Count(const std::string& log, const std::string& what) {
    int n = 0;
    for (size_t at = log.find(what); at != std::string::npos; at = log.find(what, at + 1)) ++n;
    return n;
  }
};

TEST_F(RebuildFaultTest, ASurvivorKilledMidRebuildIsReadAroundAndEveryRankRestores) {
  ASSERT_NO_FATAL_FAILURE(ReplaceSlot0AndWaitMidRebuild());
  clients_[1].clear();
  cluster_->daemon(1).Kill();
  ASSERT_NO_FATAL_FAILURE(ExpectRebuiltAround("the kill"));
  // Asked again, the rebuild finds the step held.
  admin::RebuildResponse resp;
  EXPECT_TRUE(AdminRebuild(0, &resp).ok());
  EXPECT_EQ(StateOf(0, 1), v1::PROTECTED);
  // The killed survivor is replaced and rebuilt from a group that includes
  // the node rebuilt a moment ago.
  ASSERT_TRUE(cluster_->daemon(1).Replace().ok());
  for (int i = 0; i < 2400 && StateOf(1, 1) != v1::PROTECTED; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(25));
  }
  ASSERT_EQ(StateOf(1, 1), v1::PROTECTED) << cluster_->daemon(1).Log();
  Reconnect(0);
  Reconnect(1);
  for (int s = 0; s < cluster_->n(); ++s) EXPECT_EQ(RestoreAndCheck(s), 1u) << "slot " << s;
  for (int s = 0; s < cluster_->n(); ++s) ExpectArenaConsistent(s);
}

TEST_F(RebuildFaultTest, ASurvivorStoppedMidStreamIsReadAroundAndEveryRankRestores) {
  // The rebuild reads each survivor over one stream kept across its slices.
  // A survivor SIGSTOPped while its streams are open stops moving bytes: the
  // stream is cut after the peer timeout, opening it again gets no answer
  // either, and with RS 2+2 the rebuild reads around that survivor.
  ASSERT_NO_FATAL_FAILURE(ReplaceSlot0AndWaitMidRebuild());
  cluster_->daemon(1).Pause();
  ASSERT_NO_FATAL_FAILURE(ExpectRebuiltAround("the stop"));
  EXPECT_EQ(StateOf(0, 1), v1::PROTECTED);
  cluster_->daemon(1).Resume();
  // Slot 1's trainer found its daemon silent past its keepalive: it
  // connects again, as a trainer does.
  Reconnect(0);
  Reconnect(1);
  for (int s = 0; s < cluster_->n(); ++s) EXPECT_EQ(RestoreAndCheck(s), 1u) << "slot " << s;
  for (int s = 0; s < cluster_->n(); ++s) ExpectArenaConsistent(s);
}

TEST_F(RebuildFaultTest, ARebuildThatFailsAfterADegradedServeIsRetriedWhole) {
  StartCluster(2, 1, "rebuild_bytes_per_sec: 20000");
  Snapshot(1);
  ASSERT_TRUE(WaitProtected(1));
  ASSERT_NO_FATAL_FAILURE(ReplaceNode(0));
  // Rank 0 is served degraded: the step is REBUILDING with that rank only.
  RestoreRankAndCheck(0, 0, 1);
  ASSERT_TRUE(WaitRebuild(0, [](const admin::RebuildStatus& r) {
    return r.active() && r.bytes_done() > 0 && r.bytes_done() < r.bytes_total();
  })) << cluster_->daemon(0).Log();
  // A survivor stops answering mid-rebuild: with RS 2+1 and slot 0 lost,
  // the stripes it is needed for cannot be decoded and the rebuild fails.
  cluster_->daemon(1).Pause();
  ASSERT_TRUE(WaitRebuild(0, [](const admin::RebuildStatus& r) { return !r.active(); }));
  EXPECT_NE(RebuildStatusOf(0).last_error(), "") << cluster_->daemon(0).Log();
  EXPECT_EQ(StateOf(0, 1), v1::REBUILDING);
  ExpectArenaConsistent(0);
  cluster_->daemon(1).Resume();
  // A REBUILDING step is not held: asked again, the rebuild does it whole.
  admin::RebuildResponse resp;
  grpc::Status st = AdminRebuild(0, &resp);
  ASSERT_TRUE(st.ok()) << st.error_message() << "\n" << cluster_->daemon(0).Log();
  EXPECT_EQ(StateOf(0, 1), v1::PROTECTED);
  Reconnect(0);
  EXPECT_EQ(RestoreAndCheck(0), 1u);
  for (int s = 0; s < cluster_->n(); ++s) ExpectArenaConsistent(s);
  EXPECT_TRUE(cluster_->daemon(0).alive());
}

TEST_F(RebuildFaultTest, ASurvivorNoOtherCanStandInForIsAskedAgainAfterItStalls) {
  // RS 2+1 with slot 0 lost: every stripe needs both survivors.
  ASSERT_NO_FATAL_FAILURE(ReplaceSlot0AndWaitMidRebuild(/*m=*/1));
  // Slot 1 stops past the peer timeout (2 s): its read fails, and instead
  // of giving the step up the rebuild asks it again; it is back by then.
  cluster_->daemon(1).Pause();
  bool asked_again = false;
  for (int i = 0; i < 30 * 40 && !asked_again; ++i) {  // 30 s
    asked_again = cluster_->daemon(0).Log().find("so it is asked again") != std::string::npos;
    if (!asked_again) std::this_thread::sleep_for(std::chrono::milliseconds(25));
  }
  cluster_->daemon(1).Resume();
  ASSERT_TRUE(asked_again) << cluster_->daemon(0).Log();
  ASSERT_TRUE(WaitRebuild(0, [](const admin::RebuildStatus& r) { return !r.active(); }));
  EXPECT_EQ(RebuildStatusOf(0).last_error(), "") << cluster_->daemon(0).Log();
  EXPECT_EQ(StateOf(0, 1), v1::PROTECTED);
  Reconnect(0);
  EXPECT_EQ(RestoreAndCheck(0), 1u);
  for (int s = 0; s < cluster_->n(); ++s) ExpectArenaConsistent(s);
}

TEST_F(RebuildFaultTest, ANewerStepThatFailsAfterServingARankGivesWayToAnOlderOneWhole) {
  // Slot 2's first data chunk of step 2 is damaged. It shares stripe 1 with
  // slot 0's second chunk (rank 1's bytes), not stripe 2, from which slot
  // 0's rank 0 is decoded on demand.
  ASSERT_NO_FATAL_FAILURE(ProtectTwoStepsCorruptOneAndReplaceSlot0(/*corrupt_slot=*/2));
  RestoreRankAndCheck(0, 0, 2);
  // Step 2's rebuild fails its checksum; the pass falls back to step 1,
  // which replaces what step 2 had served: both ranks answer step 1.
  ASSERT_TRUE(WaitRebuild(0, [](const admin::RebuildStatus& r) { return !r.active(); }));
  const std::string log = cluster_->daemon(0).Log();
  EXPECT_NE(log.find("job job step 2: rebuild failed"), std::string::npos) << log;
  EXPECT_NE(log.find("job job step 2: the ranks served from it on demand are withdrawn"),
            std::string::npos)
      << log;
  EXPECT_EQ(RebuildStatusOf(0).last_error(), "") << log;
  EXPECT_EQ(StateOf(0, 1), v1::PROTECTED);
  EXPECT_EQ(StateOf(0, 2), v1::STEP_STATE_UNSPECIFIED);
  EXPECT_EQ(RestoreAndCheck(0), 1u);
  ExpectArenaConsistent(0);
  EXPECT_TRUE(cluster_->daemon(0).alive());
}

TEST_F(RebuildFaultTest, AStepWhoseRanksWereAllServedStaysWhenItsParityCannotBeRebuilt) {
  // Slot 1's first data chunk of step 2 is damaged: slot 0's parity row of
  // stripe 0 is made from it, none of slot 0's ranks is.
  ASSERT_NO_FATAL_FAILURE(ProtectTwoStepsCorruptOneAndReplaceSlot0(/*corrupt_slot=*/1));
  RestoreRankAndCheck(0, 0, 2);
  RestoreRankAndCheck(0, 1, 2);
  // Step 2's parity row cannot be rebuilt; step 1 is not taken over a step
  // whose every rank is here, and the error says why step 2 failed.
  ASSERT_TRUE(WaitRebuild(0, [](const admin::RebuildStatus& r) { return !r.active(); }));
  const std::string log = cluster_->daemon(0).Log();
  const std::string error = RebuildStatusOf(0).last_error();
  EXPECT_NE(error.find("its ranks are all restorable here"), std::string::npos) << error;
  EXPECT_NE(error.find("step 2"), std::string::npos) << error;
  EXPECT_EQ(log.find("rebuilt job job step 1"), std::string::npos) << log;
  EXPECT_EQ(StateOf(0, 2), v1::REBUILDING);
  Reconnect(0);
  EXPECT_EQ(RestoreAndCheck(0), 2u);
  ExpectArenaConsistent(0);
  EXPECT_TRUE(cluster_->daemon(0).alive());
}

TEST_F(RebuildFaultTest, CorruptSurvivorChunksAreReadAroundAndTheArenaStaysConsistent) {
  StartCluster(2, 2, "rebuild_bytes_per_sec: 50000");
  Snapshot(1);
  ASSERT_TRUE(WaitProtected(1));
  // Both of slot 1's data chunks are damaged; slot 1 itself says so.
  CorruptRank(1, 0, 1);
  CorruptRank(1, 1, 1);
  {
    auto stub = cluster_->daemon(1).AdminStub();
    grpc::ClientContext ctx;
    admin::VerifyResponse resp;
    ASSERT_TRUE(stub->Verify(&ctx, admin::VerifyRequest(), &resp).ok());
    ASSERT_EQ(resp.errors_size(), 2) << resp.DebugString();
  }
  ASSERT_NO_FATAL_FAILURE(ReplaceNode(0));
  // Served (degraded, checked by the tensor checksums) while the rebuild
  // goes on; then from the finished step.
  EXPECT_EQ(RestoreAndCheck(0), 1u);
  ASSERT_TRUE(WaitRebuild(0, [](const admin::RebuildStatus& r) { return !r.active(); }));
  const std::string log = cluster_->daemon(0).Log();
  EXPECT_NE(log.find("fails its crc32c; treated as lost"), std::string::npos) << log;
  EXPECT_EQ(RebuildStatusOf(0).last_error(), "") << log;
  EXPECT_EQ(StateOf(0, 1), v1::PROTECTED);
  Reconnect(0);
  EXPECT_EQ(RestoreAndCheck(0), 1u);
  ExpectArenaConsistent(0);
  EXPECT_TRUE(cluster_->daemon(0).alive());
}

TEST_F(RebuildFaultTest, AnAdminRebuildDuringTheStartUpOneIsRefusedAndOneRuns) {
  StartCluster(2, 2, "rebuild_bytes_per_sec: 30000");
  Snapshot(1);
  ASSERT_TRUE(WaitProtected(1));
  ASSERT_NO_FATAL_FAILURE(ReplaceNode(0, /*reconnect=*/false));
  ASSERT_TRUE(WaitRebuild(0, [](const admin::RebuildStatus& r) {
    return r.active() && r.job_id() == "job" && r.step() == 1;
  })) << cluster_->daemon(0).Log();
  admin::RebuildResponse resp;
  grpc::Status st = AdminRebuild(0, &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << st.error_message();
  EXPECT_NE(st.error_message().find("a rebuild is already running (job job step 1, "),
            std::string::npos)
      << st.error_message();
  EXPECT_NE(st.error_message().find("% done); see ecsnapctl status"), std::string::npos)
      << st.error_message();
  ASSERT_TRUE(WaitRebuild(0, [](const admin::RebuildStatus& r) { return !r.active(); }));
  EXPECT_EQ(Count(cluster_->daemon(0).Log(), "rebuilt job job step 1 "), 1)
      << cluster_->daemon(0).Log();
  Reconnect(0);
  for (int s = 0; s < cluster_->n(); ++s) EXPECT_EQ(RestoreAndCheck(s), 1u) << "slot " << s;
  for (int s = 0; s < cluster_->n(); ++s) ExpectArenaConsistent(s);
}

TEST_F(RebuildFaultTest, ANewerStepCommittedUnderARebuildFreesItsWindowsOnce) {
  StartCluster(2, 1, "rebuild_bytes_per_sec: 20000");
  Snapshot(1);
  ASSERT_TRUE(WaitProtected(1));
  ASSERT_NO_FATAL_FAILURE(ReplaceNode(0));
  ASSERT_TRUE(WaitRebuild(0, [](const admin::RebuildStatus& r) {
    return r.active() && r.job_id() == "job";
  }));
  // The trainers of slot 0 go on from their own copy: step 2 is committed
  // before the rebuild of step 1 can install it.
  Snapshot(2, {0});
  ASSERT_TRUE(WaitRebuild(0, [](const admin::RebuildStatus& r) { return !r.active(); }));
  EXPECT_TRUE(cluster_->daemon(0).alive()) << cluster_->daemon(0).Log();
  EXPECT_NE(RebuildStatusOf(0).last_error().find("not older than the rebuilt step 1"),
            std::string::npos)
      << cluster_->daemon(0).Log();
  ExpectArenaConsistent(0);
  Snapshot(2, {1, 2});
  ASSERT_TRUE(WaitProtected(2)) << cluster_->daemon(0).Log();
  for (int s = 0; s < cluster_->n(); ++s) EXPECT_EQ(RestoreAndCheck(s), 2u) << "slot " << s;
  for (int s = 0; s < cluster_->n(); ++s) ExpectArenaConsistent(s);
}

// ---------------------------------------------------------------------------
// Fault injection (issue 8): restarts followed by losses, slow and hung
// peers, shutdown under load, and a job that rewinds. Each test states the
// promise it checks; on failure it prints the daemons' logs.

// A rank's state of `step`, attempt `salt` (a rewound step is snapshotted
// again with other bytes), with one extra tensor of `big_bytes` (0: none).
State MakeFaultState(int slot, int rank, uint64_t step, uint64_t salt, uint64_t big_bytes) {
  State s = MakeState(slot, rank, step);
  std::mt19937_64 rng((step * 1000 + slot * 10 + rank) ^ (salt * 0x9E3779B97F4A7C15ull));
  // Salted bytes in every tensor, so that two attempts of a step differ.
  if (salt != 0) {
    for (auto& b : s.bytes) {
      for (auto& x : b) x = static_cast<uint8_t>(rng());
    }
  }
  if (big_bytes > 0) {
    s.bytes.emplace_back(big_bytes);
    auto& big = s.bytes.back();
    for (uint64_t i = 0; i < big_bytes; i += 8) {
      const uint64_t v = rng();
      std::memcpy(big.data() + i, &v, std::min<uint64_t>(8, big_bytes - i));
    }
  }
  // The vectors may have moved: point the tensors at them again.
  s.tensors.clear();
  for (size_t i = 0; i < s.bytes.size(); ++i) {
    Tensor t;
    t.name = absl::StrCat("t", i);
    t.dtype = DType::kUInt8;
    t.shape = {static_cast<int64_t>(s.bytes[i].size())};
    t.data = s.bytes[i].data();
    t.bytes = s.bytes[i].size();
    s.tensors.push_back(t);
  }
  return s;
}

// Each line of `log` (timestamp stripped) that appears more than `max`
// times, with its count.
std::map<std::string, int> RepeatedLines(const std::string& log, int max) {
  std::map<std::string, int> count;
  for (absl::string_view line : absl::StrSplit(log, '\n')) {
    const size_t space = line.find(' ');
    if (space == absl::string_view::npos) continue;
    ++count[std::string(line.substr(space + 1))];
  }
  for (auto it = count.begin(); it != count.end();) {
    it = it->second > max ? std::next(it) : count.erase(it);
  }
  return count;
}

class FaultTest : public ClusterTest {
 protected:
  // How each rank's bytes are made: attempt `salt`, `big_bytes` extra.
  struct Workload {
    uint64_t salt = 0;
    uint64_t big_bytes = 0;
  };

  // A group of k + m daemons in `subdir` of the test's directory (empty:
  // the directory itself), each slot's ranks connected.
  void StartFaultCluster(int k, int m, std::string cluster_fields = "",
                         uint64_t arena_bytes = 32 << 20, const std::string& subdir = "") {
    DaemonProcess::Options o;
    o.arena_bytes = arena_bytes;
    o.cluster_fields = std::move(cluster_fields);
    std::string dir = dir_.path();
    if (!subdir.empty()) {
      dir = absl::StrCat(dir, "/", subdir);
      ASSERT_EQ(::mkdir(dir.c_str(), 0755), 0) << dir;
    }
    auto c = Cluster::Start(dir, k, m, o);
    ASSERT_TRUE(c.ok()) << c.status();
    cluster_ = std::move(*c);
    clients_.resize(cluster_->n());
    for (int s = 0; s < cluster_->n(); ++s) Reconnect(s);
  }

  std::vector<int> AllSlots() const {
    std::vector<int> all;
    for (int s = 0; s < cluster_->n(); ++s) all.push_back(s);
    return all;
  }

  // Every rank of `slots` snapshots `step` made by `w`; waits for the copies
  // and the commits. Returns the first error.
  absl::Status SnapshotWith(uint64_t step, const std::vector<int>& slots, Workload w) {
    std::vector<State> states;
    std::vector<SnapshotHandle> handles;
    states.reserve(slots.size() * kRanksPerNode);
    for (int s : slots) {
      for (int r = 0; r < kRanksPerNode; ++r) {
        states.push_back(MakeFaultState(s, r, step, w.salt, w.big_bytes));
        auto h = clients_[s][r]->Snapshot(step, states.back().tensors);
        if (!h.ok()) {
          return absl::Status(h.status().code(), absl::StrCat("slot ", s, " rank ", r, " step ",
                                                              step, ": ", h.status().message()));
        }
        handles.push_back(*h);
      }
    }
    absl::Status first;
    for (auto& h : handles) {
      absl::Status st = h.WaitCommitted();
      if (first.ok() && !st.ok()) {
        first = absl::Status(st.code(), absl::StrCat("step ", step, ": ", st.message()));
      }
    }
    return first;
  }

  // True once every daemon reports `step` PROTECTED, within `bound`.
  bool WaitAllProtected(uint64_t step, absl::Duration bound) {
    const absl::Time end = absl::Now() + bound;
    while (absl::Now() < end) {
      bool all = true;
      for (int s = 0; s < cluster_->n() && all; ++s) all = StateOf(s, step) == v1::PROTECTED;
      if (all) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(25));
    }
    return false;
  }

  std::string States(uint64_t step) {
    std::string out = absl::StrCat("step ", step, " by slot:");
    for (int s = 0; s < cluster_->n(); ++s) {
      absl::StrAppend(&out, " ", s, "=", v1::StepState_Name(StateOf(s, step)));
    }
    return out;
  }

  // The last `lines` lines of every daemon's log.
  std::string Logs(int lines = 60) {
    std::string out;
    for (int s = 0; s < cluster_->n(); ++s) {
      const std::string log = cluster_->daemon(s).Log();
      std::vector<absl::string_view> all = absl::StrSplit(log, '\n');
      const size_t from = all.size() > static_cast<size_t>(lines) ? all.size() - lines : 0;
      absl::StrAppend(&out, "---- slot ", s, " (last ", lines, " lines) ----\n");
      for (size_t i = from; i < all.size(); ++i) absl::StrAppend(&out, all[i], "\n");
    }
    return out;
  }

  // Every rank of `slot` restores `request` (or the newest); the step must be
  // `want_step` and the bytes those `w` made. Returns false (after reporting)
  // otherwise.
  bool RestoreExactly(int slot, uint64_t request, uint64_t want_step, Workload w) {
    bool ok = true;
    for (int r = 0; r < kRanksPerNode; ++r) {
      auto got = clients_[slot][r]->Restore(request);
      if (!got.ok()) {
        ADD_FAILURE() << "slot " << slot << " rank " << r << " restoring step "
                      << (request == kLatestStep ? std::string("latest") : absl::StrCat(request))
                      << " (want " << want_step << "): " << got.status();
        ok = false;
        continue;
      }
      if (got->step != want_step) {
        ADD_FAILURE() << "slot " << slot << " rank " << r << " restored step " << got->step
                      << ", want " << want_step;
        ok = false;
        continue;
      }
      const State want = MakeFaultState(slot, r, want_step, w.salt, w.big_bytes);
      if (got->tensors.size() != want.bytes.size()) {
        ADD_FAILURE() << "slot " << slot << " rank " << r << " step " << want_step << ": "
                      << got->tensors.size() << " tensors, want " << want.bytes.size();
        ok = false;
        continue;
      }
      for (size_t i = 0; i < want.bytes.size(); ++i) {
        const auto& g = got->tensors[i].data;
        if (g.size() != want.bytes[i].size() ||
            !std::equal(g.begin(), g.end(), want.bytes[i].begin())) {
          ADD_FAILURE() << "slot " << slot << " rank " << r << " step " << want_step << " tensor "
                        << i << ": bytes differ from the snapshot";
          ok = false;
        }
      }
    }
    return ok;
  }

  // No daemon's log repeats a line more than `max` times.
  void ExpectNoLogStorm(int max) {
    for (int s = 0; s < cluster_->n(); ++s) {
      for (const auto& [line, count] : RepeatedLines(cluster_->daemon(s).Log(), max)) {
        ADD_FAILURE() << "slot " << s << " logged " << count << " times (bound " << max
                      << "): " << line;
      }
    }
  }

  admin::StatusResponse AdminStatus(int slot) {
    auto stub = cluster_->daemon(slot).AdminStub();
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
    admin::StatusResponse r;
    stub->Status(&ctx, {}, &r);
    return r;
  }
};

// A seed from ECSNAP_TEST_SEED, else from the clock; printed by the caller.
uint64_t TestSeed() {
  if (const char* env = std::getenv("ECSNAP_TEST_SEED"); env != nullptr && *env != '\0') {
    return std::strtoull(env, nullptr, 10);
  }
  return static_cast<uint64_t>(absl::ToUnixNanos(absl::Now()));
}

// What DaemonProcess::Terminate() measured, in words.
std::string ExitTime(absl::Duration took) {
  if (took == absl::InfiniteDuration()) return "did not exit within the bound; SIGKILLed";
  return absl::StrCat("exited in ", absl::FormatDuration(took));
}

std::string SlotSet(const std::vector<int>& slots) {
  return absl::StrCat("{", absl::StrJoin(slots, ","), "}");
}

class RestartThenLoss : public FaultTest, public ::testing::WithParamInterface<Shape> {};

// DESIGN.md §2: PROTECTED holds only while every parity row exists. A daemon
// restarted in place must get its rows back (re-adopted or pushed again)
// before the group says PROTECTED; after that, any <= m other nodes lost
// (or the restarted ones among them) restore byte for byte.
TEST_P(RestartThenLoss, AnyMLossesAfterInPlaceRestartsRestoreTheProtectedStep) {
  const int k = GetParam().k, m = GetParam().m, n = k + m;
  const uint64_t seed = TestSeed();
  std::printf("restart-then-loss RS(%d,%d): seed %llu (replay: ECSNAP_TEST_SEED=%llu)\n", k, m,
              static_cast<unsigned long long>(seed), static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  const ::testing::TestResult& result =
      *::testing::UnitTest::GetInstance()->current_test_info()->result();
  int run = 0, recovered = 0;
  for (int c = 0; c < GetParam().max_cases; ++c) {
    std::vector<int> order(n);
    for (int s = 0; s < n; ++s) order[s] = s;
    std::shuffle(order.begin(), order.end(), rng);
    const int restarted_count = 1 + static_cast<int>(rng() % m);
    std::vector<int> restarted(order.begin(), order.begin() + restarted_count);
    // Even cases lose other nodes; odd cases lose the restarted ones (and
    // maybe others, up to m).
    const bool lose_restarted = c % 2 == 1;
    std::vector<int> lost;
    if (lose_restarted) {
      lost = restarted;
      const int extra = static_cast<int>(rng() % (m - restarted_count + 1));
      lost.insert(lost.end(), order.begin() + restarted_count,
                  order.begin() + restarted_count + extra);
    } else {
      const int others = std::min(m, n - restarted_count);
      const int count = 1 + static_cast<int>(rng() % others);
      lost.assign(order.begin() + restarted_count, order.begin() + restarted_count + count);
    }
    std::sort(restarted.begin(), restarted.end());
    std::sort(lost.begin(), lost.end());
    const uint64_t step = c + 1;
    std::printf("  case %d: step %llu, restart %s in place, then replace %s empty\n", c,
                static_cast<unsigned long long>(step), SlotSet(restarted).c_str(),
                SlotSet(lost).c_str());
    std::fflush(stdout);

    // Each case on a fresh group, so that one case's damage does not leak
    // into the next.
    const int failures_before = result.total_part_count();
    [&] {
      clients_.clear();
      cluster_.reset();
      StartFaultCluster(k, m, "", 32 << 20, absl::StrCat("case", c));
      ASSERT_TRUE(SnapshotWith(step, AllSlots(), {}).ok());
      ASSERT_TRUE(WaitAllProtected(step, absl::Seconds(20))) << States(step) << "\n" << Logs(30);

      for (int s : restarted) clients_[s].clear();
      for (int s : restarted) cluster_->daemon(s).Kill();
      for (int s : restarted) {
        absl::Status st = cluster_->daemon(s).Restart();
        ASSERT_TRUE(st.ok()) << st;
      }
      for (int s : restarted) Reconnect(s);
      ASSERT_TRUE(WaitAllProtected(step, absl::Seconds(30)))
          << "after restarting " << SlotSet(restarted) << ": " << States(step) << "\n"
          << Logs(30);

      for (int s : lost) clients_[s].clear();
      for (int s : lost) cluster_->daemon(s).Kill();
      for (int s : lost) {
        absl::Status st = cluster_->daemon(s).Replace();
        ASSERT_TRUE(st.ok()) << st;
      }
      for (int s : lost) {
        Reconnect(s);
        RestoreExactly(s, kLatestStep, step, {});
      }
    }();
    ++run;
    if (result.total_part_count() == failures_before) {
      ++recovered;
    } else {
      ADD_FAILURE() << "case " << c << " (seed " << seed << "): restarted " << SlotSet(restarted)
                    << ", then lost " << SlotSet(lost) << "\n"
                    << Logs(30);
    }
  }
  std::printf("restart-then-loss RS(%d,%d): seed %llu, %d cases run, %d recovered\n", k, m,
              static_cast<unsigned long long>(seed), run, recovered);
  EXPECT_EQ(run, recovered);
}

INSTANTIATE_TEST_SUITE_P(Codes, RestartThenLoss,
                         ::testing::Values(Shape{2, 1, 4}, Shape{2, 2, 4}, Shape{4, 2, 4}),
                         [](const ::testing::TestParamInfo<Shape>& info) {
                           return absl::StrCat("RS", info.param.k, "_", info.param.m);
                         });

// DESIGN.md §2: a failed push never poisons anything for good. A holder
// stopped in the middle of a push, past the peer timeout, then resumed: the
// step and the next one reach PROTECTED everywhere, and no log repeats an
// error without bound.
TEST_F(FaultTest, AHolderStoppedMidPushPastTheTimeoutCatchesUp) {
  constexpr uint64_t kBig = 6 << 20;  // per rank: pushes take a while
  StartFaultCluster(2, 1, "peer_timeout_ms: 1000", 160 << 20);
  ASSERT_TRUE(SnapshotWith(1, AllSlots(), {0, kBig}).ok());
  ASSERT_TRUE(WaitAllProtected(1, absl::Seconds(30))) << States(1) << "\n" << Logs();

  absl::Status st = SnapshotWith(2, AllSlots(), {0, kBig});
  cluster_->daemon(2).Pause();  // right after the commits: pushes to it in flight
  ASSERT_TRUE(st.ok()) << st;
  std::this_thread::sleep_for(std::chrono::seconds(3));
  cluster_->daemon(2).Resume();
  const absl::Time resumed = absl::Now();
  const bool caught_up = WaitAllProtected(2, absl::Seconds(30));
  EXPECT_TRUE(caught_up) << "30 s after SIGCONT: " << States(2) << "\n" << Logs();
  if (caught_up) {
    std::printf("step 2 protected everywhere %s after SIGCONT\n",
                absl::FormatDuration(absl::Now() - resumed).c_str());
  }

  st = SnapshotWith(3, AllSlots(), {0, kBig});
  ASSERT_TRUE(st.ok()) << st;
  EXPECT_TRUE(WaitAllProtected(3, absl::Seconds(30))) << States(3) << "\n" << Logs();
  ExpectNoLogStorm(20);
  for (int s = 0; s < cluster_->n(); ++s) EXPECT_TRUE(cluster_->daemon(s).alive()) << s;
}

// A holder stopped before the others push to it, resumed once their pushes
// and announcements have timed out: every daemon, the stopped one included,
// ends up showing the step PROTECTED (announcements are sent again).
TEST_F(FaultTest, AHolderStoppedBeforeThePushEndsUpProtectedLikeTheOthers) {
  StartFaultCluster(2, 1, "peer_timeout_ms: 1000");
  ASSERT_TRUE(SnapshotWith(1, {2}, {}).ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  cluster_->daemon(2).Pause();
  absl::Status st = SnapshotWith(1, {0, 1}, {});
  if (!st.ok()) cluster_->daemon(2).Resume();
  ASSERT_TRUE(st.ok()) << st;
  std::this_thread::sleep_for(std::chrono::seconds(3));
  cluster_->daemon(2).Resume();
  EXPECT_TRUE(WaitAllProtected(1, absl::Seconds(30))) << "30 s after SIGCONT: " << States(1) << "\n"
                                                      << Logs();
  ExpectNoLogStorm(20);
}

// SIGTERM exits within 2 s whatever the peers do: here a push to a stopped
// peer is in flight (its deadline is many seconds away).
TEST_F(FaultTest, SigtermExitsWithinTwoSecondsWhileAPushToAStoppedPeerIsInFlight) {
  StartFaultCluster(2, 1, "", 128 << 20);
  ASSERT_TRUE(SnapshotWith(1, AllSlots(), {}).ok());
  ASSERT_TRUE(WaitAllProtected(1, absl::Seconds(20))) << States(1) << "\n" << Logs();
  cluster_->daemon(2).Pause();
  absl::Status st = SnapshotWith(2, {0, 1}, {0, 6 << 20});
  ASSERT_TRUE(st.ok()) << st;
  clients_[0].clear();
  int status = 0;
  const absl::Duration took = cluster_->daemon(0).Terminate(absl::Seconds(10), &status);
  cluster_->daemon(2).Resume();
  std::printf("SIGTERM with a push to a stopped peer in flight: %s\n", ExitTime(took).c_str());
  EXPECT_LT(took, absl::Milliseconds(2500)) << Logs();
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "wait status " << status;
}

// SIGTERM exits within 2 s while a rebuild capped at 2 MB/s has seconds to go.
TEST_F(FaultTest, SigtermExitsWithinTwoSecondsDuringACappedRebuild) {
  StartFaultCluster(2, 2, "rebuild_bytes_per_sec: 2000000", 128 << 20);
  ASSERT_TRUE(SnapshotWith(1, AllSlots(), {0, 4 << 20}).ok());
  ASSERT_TRUE(WaitAllProtected(1, absl::Seconds(30))) << States(1) << "\n" << Logs();
  ASSERT_NO_FATAL_FAILURE(ReplaceNode(0, /*reconnect=*/false));
  bool rebuilding = false;
  for (int i = 0; i < 200 && !rebuilding; ++i) {
    rebuilding = AdminStatus(0).rebuild().active();
    if (!rebuilding) std::this_thread::sleep_for(std::chrono::milliseconds(25));
  }
  ASSERT_TRUE(rebuilding) << "the replacement never started its rebuild\n" << Logs();
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  const admin::RebuildStatus progress = AdminStatus(0).rebuild();
  int status = 0;
  const absl::Duration took = cluster_->daemon(0).Terminate(absl::Seconds(30), &status);
  std::printf("SIGTERM during a capped rebuild (active %d, %llu of %llu bytes): %s\n",
              progress.active(), static_cast<unsigned long long>(progress.bytes_done()),
              static_cast<unsigned long long>(progress.bytes_total()), ExitTime(took).c_str());
  EXPECT_LT(took, absl::Milliseconds(2500)) << Logs();
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "wait status " << status;
}

// Issue 8 item 6: some ranks committed s+1 before the job died; the job
// agrees on s and restores it. Restoring s rewinds the job: s+1 is
// snapshotted again (other bytes) without an error, and what the group
// protects from then on is the new attempt, never a mix with the old one.
TEST_F(FaultTest, RestoringAnOlderStepRewindsTheJobAndTheNextStepsAreProtectedAnew) {
  StartFaultCluster(2, 1);
  constexpr uint64_t s = 5;
  ASSERT_TRUE(SnapshotWith(s, AllSlots(), {}).ok());
  ASSERT_TRUE(WaitAllProtected(s, absl::Seconds(20))) << States(s) << "\n" << Logs();
  // Slot 0's ranks commit s+1 (attempt 1); the ranks of slots 1 and 2 die
  // before they commit it.
  ASSERT_TRUE(SnapshotWith(s + 1, {0}, {1, 0}).ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // slot 0 pushes s+1
  for (int slot = 0; slot < cluster_->n(); ++slot) clients_[slot].clear();

  // The job restarts: every rank agrees on s and restores it.
  for (int slot = 0; slot < cluster_->n(); ++slot) {
    Reconnect(slot);
    ASSERT_TRUE(RestoreExactly(slot, s, s, {})) << Logs();
  }
  // Training continues from s+1 with other bytes (attempt 2).
  absl::Status st = SnapshotWith(s + 1, AllSlots(), {2, 0});
  ASSERT_TRUE(st.ok()) << st << "\n" << Logs();
  ASSERT_TRUE(WaitAllProtected(s + 1, absl::Seconds(20))) << States(s + 1) << "\n" << Logs();
  // Slot 1's chunks of s+1 are decoded with parity that slot 0's data went
  // into: stale parity from attempt 1 would show here.
  ASSERT_NO_FATAL_FAILURE(ReplaceNode(1));
  EXPECT_TRUE(RestoreExactly(1, kLatestStep, s + 1, {2, 0})) << Logs();

  st = SnapshotWith(s + 2, AllSlots(), {});
  ASSERT_TRUE(st.ok()) << st << "\n" << Logs();
  ASSERT_TRUE(WaitAllProtected(s + 2, absl::Seconds(20))) << States(s + 2) << "\n" << Logs();
  ASSERT_NO_FATAL_FAILURE(ReplaceNode(0));
  EXPECT_TRUE(RestoreExactly(0, kLatestStep, s + 2, {})) << Logs();
}

// Issue 8 item 7: a job whose ranks run on 2 of the 4 nodes of an RS(2,2)
// group. The two nodes without ranks take part with empty payloads, so the
// job's steps become PROTECTED everywhere; and the empty chunks are known
// without anyone holding them, so the job survives one of those nodes
// restarting (its empty steps gone) and then m other nodes lost.
TEST_F(FaultTest, NodesWithoutRanksTakePartWithEmptyPayloadsAndTheJobSurvivesLosses) {
  StartFaultCluster(2, 2);
  auto connect = [&](int slot, int r) -> std::unique_ptr<Client> {
    auto c = ConnectRank(slot, r, "sparse");
    EXPECT_TRUE(c.ok()) << c.status();
    return c.ok() ? std::move(*c) : nullptr;
  };
  std::vector<std::vector<std::unique_ptr<Client>>> ranks(2);
  for (int slot : {0, 1}) {
    for (int r = 0; r < kRanksPerNode; ++r) ranks[slot].push_back(connect(slot, r));
  }
  auto snapshot = [&](uint64_t step) {
    std::vector<State> states;
    states.reserve(2 * kRanksPerNode);
    std::vector<SnapshotHandle> handles;
    for (int slot : {0, 1}) {
      for (int r = 0; r < kRanksPerNode; ++r) {
        states.push_back(MakeState(slot, r, step));
        auto h = ranks[slot][r]->Snapshot(step, states.back().tensors);
        ASSERT_TRUE(h.ok()) << h.status();
        handles.push_back(*h);
      }
    }
    for (auto& h : handles) ASSERT_TRUE(h.WaitCommitted().ok());
  };
  auto all_protected = [&](uint64_t step) {
    for (int i = 0; i < 800; ++i) {
      bool all = true;
      for (int slot = 0; slot < 4 && all; ++slot) all = StateOf(slot, step, "sparse") == v1::PROTECTED;
      if (all) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(25));
    }
    return false;
  };
  snapshot(1);
  ASSERT_TRUE(all_protected(1)) << cluster_->daemon(2).Log();
  snapshot(2);
  ASSERT_TRUE(all_protected(2)) << cluster_->daemon(3).Log();
  EXPECT_NE(cluster_->daemon(3).Log().find("no rank of the job runs on this node"),
            std::string::npos);
  // Slot 3 restarts in place: its empty steps had no record and are gone.
  cluster_->daemon(3).Kill();
  ASSERT_TRUE(cluster_->daemon(3).Restart().ok());
  // Then slots 0 and 2 are lost: step 2 still decodes, since the chunks of
  // slots 2 and 3 are empty and need no holder.
  ranks[0].clear();
  cluster_->daemon(0).Kill();
  cluster_->daemon(2).Kill();
  ASSERT_TRUE(cluster_->daemon(0).Replace().ok());
  ASSERT_TRUE(cluster_->daemon(2).Replace().ok());
  for (int r = 0; r < kRanksPerNode; ++r) {
    auto c = connect(0, r);
    ASSERT_NE(c, nullptr);
    auto got = c->Restore(kLatestStep);
    ASSERT_TRUE(got.ok()) << got.status() << "\n" << cluster_->daemon(0).Log() << "\n---- slot 3\n"
                          << cluster_->daemon(3).Log();
    EXPECT_EQ(got->step, 2u);
    const State want = MakeState(0, r, 2);
    ASSERT_EQ(got->tensors.size(), want.tensors.size());
    for (size_t i = 0; i < want.tensors.size(); ++i) {
      EXPECT_TRUE(std::equal(got->tensors[i].data.begin(), got->tensors[i].data.end(),
                             want.bytes[i].begin(), want.bytes[i].end()))
          << "rank " << r << " tensor " << i;
    }
  }
}

}  // namespace
}  // namespace ecsnap
