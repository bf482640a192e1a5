// Cross-node protection, end to end: real ecsnapd processes forming one
// group on 127.0.0.1, two trainer ranks per node, nodes killed and replaced.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <thread>

#include <grpcpp/grpcpp.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "client/ecsnap.h"
#include "gtest/gtest.h"
#include "tests/harness.h"

namespace ecsnap {
namespace {

using testing::Cluster;
using testing::DaemonProcess;
using testing::TempDir;

constexpr int kRanksPerNode = 2;

// A rank's state at a step: unequal sizes across slots and ranks.
struct State {
  std::vector<std::vector<uint8_t>> bytes;
  std::vector<Tensor> tensors;
};

State MakeState(int slot, int rank, uint64_t step) {
  std::mt19937_64 rng(step * 1000 + slot * 10 + rank);
  State s;
  const std::vector<uint64_t> sizes = {40000 + 1000u * slot + 7u * rank, 333, 0, 4096 + 1u * slot};
  for (uint64_t size : sizes) {
    s.bytes.emplace_back(size);
    for (auto& b : s.bytes.back()) b = static_cast<uint8_t>(rng());
  }
  for (size_t i = 0; i < sizes.size(); ++i) {
    Tensor t;
    t.name = absl::StrCat("t", i);
    t.dtype = DType::kUInt8;
    t.shape = {static_cast<int64_t>(sizes[i])};
    t.data = s.bytes[i].data();
    t.bytes = sizes[i];
    s.tensors.push_back(t);
  }
  return s;
}

class ClusterTest : public ::testing::Test {
 protected:
  void StartCluster(int k, int m, std::string cluster_fields = "") {
    DaemonProcess::Options o;
    o.arena_bytes = 32 << 20;
    o.cluster_fields = cluster_fields;
    auto c = Cluster::Start(dir_.path(), k, m, o);
    ASSERT_TRUE(c.ok()) << c.status();
    cluster_ = std::move(*c);
    clients_.resize(cluster_->n());
    for (int s = 0; s < cluster_->n(); ++s) Reconnect(s);
  }

  void Reconnect(int slot) {
    clients_[slot].clear();
    for (int r = 0; r < kRanksPerNode; ++r) {
      ClientOptions o;
      o.daemon_address = cluster_->daemon(slot).socket();
      o.job_id = "job";
      o.rank = slot * kRanksPerNode + r;
      for (int lr = 0; lr < kRanksPerNode; ++lr) o.local_ranks.push_back(slot * kRanksPerNode + lr);
      auto c = Client::Connect(o);
      ASSERT_TRUE(c.ok()) << c.status();
      clients_[slot].push_back(std::move(*c));
    }
  }

  // Every rank of `slots` (default: all) snapshots `step`; waits for the
  // copies, and for the commits when `commit`.
  void Snapshot(uint64_t step, std::vector<int> slots = {}, bool commit = true) {
    if (slots.empty()) {
      for (int s = 0; s < cluster_->n(); ++s) slots.push_back(s);
    }
    std::vector<State> states;
    std::vector<SnapshotHandle> handles;
    states.reserve(slots.size() * kRanksPerNode);
    for (int s : slots) {
      for (int r = 0; r < kRanksPerNode; ++r) {
        states.push_back(MakeState(s, r, step));
        auto h = clients_[s][r]->Snapshot(step, states.back().tensors);
        ASSERT_TRUE(h.ok()) << h.status();
        handles.push_back(*h);
      }
    }
    for (auto& h : handles) {
      ASSERT_TRUE(h.Wait().ok()) << h.Wait();
      if (commit) {
        ASSERT_TRUE(h.WaitCommitted().ok()) << h.WaitCommitted();
      }
    }
  }

  // The state of `step` of `slot` on its daemon, as admin ListSteps says.
  v1::StepState StateOf(int slot, uint64_t step) {
    auto stub = cluster_->daemon(slot).AdminStub();
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    admin::ListStepsRequest req;
    req.set_job_id("job");
    admin::ListStepsResponse resp;
    if (!stub->ListSteps(&ctx, req, &resp).ok()) return v1::STEP_STATE_UNSPECIFIED;
    for (const auto& s : resp.steps()) {
      if (s.step() == step) return s.state();
    }
    return v1::STEP_STATE_UNSPECIFIED;
  }

  bool WaitProtected(uint64_t step) {
    for (int i = 0; i < 400; ++i) {
      bool all = true;
      for (int s = 0; s < cluster_->n() && all; ++s) all = StateOf(s, step) == v1::PROTECTED;
      if (all) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(25));
    }
    return false;
  }

  // Every rank of `slot` restores its newest step; returns it (0 on error).
  uint64_t RestoreAndCheck(int slot) {
    uint64_t step = 0;
    for (int r = 0; r < kRanksPerNode; ++r) {
      auto got = clients_[slot][r]->Restore(kLatestStep);
      EXPECT_TRUE(got.ok()) << "slot " << slot << " rank " << r << ": " << got.status();
      if (!got.ok()) return 0;
      const State want = MakeState(slot, r, got->step);
      EXPECT_EQ(got->tensors.size(), want.tensors.size());
      for (size_t i = 0; i < want.tensors.size() && i < got->tensors.size(); ++i) {
        const auto& g = got->tensors[i].data;
        EXPECT_TRUE(g.size() == want.bytes[i].size() &&
                    std::equal(g.begin(), g.end(), want.bytes[i].begin()))
            << "slot " << slot << " rank " << r << " step " << got->step << " tensor " << i;
      }
      step = got->step;
    }
    return step;
  }

  TempDir dir_;
  std::unique_ptr<Cluster> cluster_;
  std::vector<std::vector<std::unique_ptr<Client>>> clients_;
};

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
      const uint64_t got = RestoreAndCheck(s);
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
  // Flip a byte of slot 1's first data chunk in its live arena (the file is
  // the daemon's memory): the start of rank 2's first tensor.
  const State victim = MakeState(1, 0, 1);
  const int fd = ::open(cluster_->daemon(1).arena_path().c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  struct stat st;
  ASSERT_EQ(::fstat(fd, &st), 0);
  auto* base = static_cast<uint8_t*>(
      ::mmap(nullptr, st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0));
  ASSERT_NE(base, MAP_FAILED);
  auto* at = static_cast<uint8_t*>(
      ::memmem(base, st.st_size, victim.bytes[0].data(), 64));
  ASSERT_NE(at, nullptr);
  at[32] ^= 0xFF;
  ::munmap(base, st.st_size);
  ::close(fd);

  clients_[0].clear();
  ASSERT_TRUE(cluster_->daemon(0).Replace().ok());
  Reconnect(0);
  EXPECT_EQ(RestoreAndCheck(0), 1u);
  EXPECT_NE(cluster_->daemon(0).Log().find("fails its crc32c; treated as lost"), std::string::npos)
      << cluster_->daemon(0).Log();
}

TEST_F(ClusterTest, ARestartedDaemonReadoptsItsStepAndRegainsProtection) {
  StartCluster(2, 1);
  Snapshot(1);
  ASSERT_TRUE(WaitProtected(1));
  clients_[0].clear();
  cluster_->daemon(0).Kill();  // a crash: the arena, in shared memory, survives
  ASSERT_TRUE(cluster_->daemon(0).Restart().ok());
  EXPECT_TRUE(WaitProtected(1)) << cluster_->daemon(0).Log();
  Reconnect(0);
  EXPECT_EQ(RestoreAndCheck(0), 1u);
  // And the group protects the next step as before.
  Snapshot(2);
  EXPECT_TRUE(WaitProtected(2)) << cluster_->daemon(0).Log();
}

TEST_F(ClusterTest, ARankIsServedFromARebuildBeforeTheRebuildEnds) {
  // Rebuilds capped at 50 KB/s: the full rebuild of a node takes seconds.
  StartCluster(2, 2, "rebuild_bytes_per_sec: 50000");
  Snapshot(1);
  ASSERT_TRUE(WaitProtected(1));
  clients_[0].clear();
  ASSERT_TRUE(cluster_->daemon(0).Replace().ok());
  Reconnect(0);
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
  admin::RebuildStatus RebuildStatusOf(int slot) {
    auto stub = cluster_->daemon(slot).AdminStub();
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    admin::StatusResponse resp;
    if (!stub->Status(&ctx, admin::StatusRequest(), &resp).ok()) return {};
    return resp.rebuild();
  }

  // Polls the rebuild status of `slot` until `pred` holds (at most 60 s).
  template <typename Pred>
  bool WaitRebuild(int slot, Pred pred) {
    for (int i = 0; i < 2400; ++i) {
      if (pred(RebuildStatusOf(slot))) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(25));
    }
    return false;
  }

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

  // Flips a byte in the first tensor of rank `r` of `slot`, in its live arena.
  void CorruptRank(int slot, int r, uint64_t step) {
    const State victim = MakeState(slot, r, step);
    const int fd = ::open(cluster_->daemon(slot).arena_path().c_str(), O_RDWR);
    ASSERT_GE(fd, 0);
    struct stat st;
    ASSERT_EQ(::fstat(fd, &st), 0);
    auto* base = static_cast<uint8_t*>(
        ::mmap(nullptr, st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0));
    ASSERT_NE(base, MAP_FAILED);
    auto* at = static_cast<uint8_t*>(::memmem(base, st.st_size, victim.bytes[0].data(), 64));
    ASSERT_NE(at, nullptr);
    at[32] ^= 0xFF;
    ::munmap(base, st.st_size);
    ::close(fd);
  }

  static int Count(const std::string& log, const std::string& what) {
    int n = 0;
    for (size_t at = log.find(what); at != std::string::npos; at = log.find(what, at + 1)) ++n;
    return n;
  }
};

TEST_F(RebuildFaultTest, ASurvivorKilledMidRebuildIsReadAroundAndEveryRankRestores) {
  // About 180 KB to rebuild at 20 KB/s: the kill lands between fetches.
  StartCluster(2, 2, "rebuild_bytes_per_sec: 20000");
  Snapshot(1);
  ASSERT_TRUE(WaitProtected(1));
  clients_[0].clear();
  ASSERT_TRUE(cluster_->daemon(0).Replace().ok());
  // Progress shows, and the rebuild is not over: kill a survivor now.
  ASSERT_TRUE(WaitRebuild(0, [](const admin::RebuildStatus& r) {
    return r.active() && r.bytes_done() > 0 && r.bytes_done() < r.bytes_total();
  })) << cluster_->daemon(0).Log();
  clients_[1].clear();
  cluster_->daemon(1).Kill();
  ASSERT_TRUE(WaitRebuild(0, [](const admin::RebuildStatus& r) { return !r.active(); }));
  const admin::RebuildStatus done = RebuildStatusOf(0);
  EXPECT_EQ(done.last_error(), "");
  EXPECT_EQ(done.bytes_done(), done.bytes_total());
  EXPECT_GT(done.bytes_total(), 0u);
  EXPECT_NE(cluster_->daemon(0).Log().find("unreadable"), std::string::npos)
      << "the kill did not land mid-rebuild\n" << cluster_->daemon(0).Log();
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

TEST_F(RebuildFaultTest, ARebuildThatFailsAfterADegradedServeIsRetriedWhole) {
  StartCluster(2, 1, "rebuild_bytes_per_sec: 20000");
  Snapshot(1);
  ASSERT_TRUE(WaitProtected(1));
  clients_[0].clear();
  ASSERT_TRUE(cluster_->daemon(0).Replace().ok());
  Reconnect(0);
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
  clients_[0].clear();
  ASSERT_TRUE(cluster_->daemon(0).Replace().ok());
  Reconnect(0);
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
  clients_[0].clear();
  ASSERT_TRUE(cluster_->daemon(0).Replace().ok());
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
  clients_[0].clear();
  ASSERT_TRUE(cluster_->daemon(0).Replace().ok());
  Reconnect(0);
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

}  // namespace
}  // namespace ecsnap
