// A test fixture of real ecsnapd processes forming one group on 127.0.0.1
// (mutual TLS on the peer plane), two trainer ranks per node, with helpers
// to snapshot, wait for PROTECTED and restore-and-check byte for byte.
#ifndef ECSNAP_TESTS_CLUSTER_FIXTURE_H_
#define ECSNAP_TESTS_CLUSTER_FIXTURE_H_

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "client/ecsnap.h"
#include "gtest/gtest.h"
#include "proto/admin.grpc.pb.h"
#include "tests/harness.h"

namespace ecsnap {

using testing::Cluster;
using testing::DaemonProcess;
using testing::TempDir;

constexpr int kRanksPerNode = 2;

// A rank's state at a step: unequal sizes across slots and ranks.
struct State {
  std::vector<std::vector<uint8_t>> bytes;
  std::vector<Tensor> tensors;
};

inline State MakeState(int slot, int rank, uint64_t step) {
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
  void StartCluster(int k, int m, std::string cluster_fields = "",
                    std::vector<std::string> extra_flags = {}) {
    DaemonProcess::Options o;
    o.arena_bytes = 32 << 20;
    o.cluster_fields = cluster_fields;
    o.extra_flags = std::move(extra_flags);
    auto c = Cluster::Start(dir_.path(), k, m, o);
    ASSERT_TRUE(c.ok()) << c.status();
    cluster_ = std::move(*c);
    clients_.resize(cluster_->n());
    for (int s = 0; s < cluster_->n(); ++s) Reconnect(s);
  }

  // Rank `r` of node `slot` attached to its daemon for `job`.
  absl::StatusOr<std::unique_ptr<Client>> ConnectRank(int slot, int r,
                                                      const std::string& job = "job") {
    ClientOptions o;
    o.daemon_address = cluster_->daemon(slot).socket();
    o.job_id = job;
    o.rank = slot * kRanksPerNode + r;
    for (int lr = 0; lr < kRanksPerNode; ++lr) o.local_ranks.push_back(slot * kRanksPerNode + lr);
    return Client::Connect(o);
  }

  void Reconnect(int slot) {
    clients_[slot].clear();
    for (int r = 0; r < kRanksPerNode; ++r) {
      auto c = ConnectRank(slot, r);
      ASSERT_TRUE(c.ok()) << c.status();
      clients_[slot].push_back(std::move(*c));
    }
  }

  // A lost node: its ranks gone, SIGKILLed, its arena deleted and an empty
  // daemon started in its slot; its ranks attach again when `reconnect`.
  void ReplaceNode(int slot, bool reconnect = true) {
    clients_[slot].clear();
    const absl::Status st = cluster_->daemon(slot).Replace();
    ASSERT_TRUE(st.ok()) << st;
    if (reconnect) Reconnect(slot);
  }

  // Node `slot` crashes (SIGKILL: its arena, in shared memory, survives)
  // and is restarted in place: it re-adopts `step`, which is PROTECTED
  // again, and its ranks restore it byte for byte.
  void CrashAndRestartInPlace(int slot, uint64_t step) {
    clients_[slot].clear();
    cluster_->daemon(slot).Kill();
    ASSERT_TRUE(cluster_->daemon(slot).Restart().ok());
    EXPECT_TRUE(WaitProtected(step)) << cluster_->daemon(slot).Log();
    Reconnect(slot);
    EXPECT_EQ(RestoreAndCheck(slot), step);
  }

  // Every rank of `slots` (default: all) snapshots `step`; waits for the
  // copies, and for the commits when `commit`.
  void Snapshot(uint64_t step, std::vector<int> slots = {}, bool commit = true) {
    // A StartCluster that failed ends only itself; stop here, not in a crash.
    ASSERT_NE(cluster_, nullptr) << "the cluster did not start";
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
  v1::StepState StateOf(int slot, uint64_t step, const std::string& job = "job") {
    auto stub = cluster_->daemon(slot).AdminStub();
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    admin::ListStepsRequest req;
    req.set_job_id(job);
    admin::ListStepsResponse resp;
    if (!stub->ListSteps(&ctx, req, &resp).ok()) return v1::STEP_STATE_UNSPECIFIED;
    for (const auto& s : resp.steps()) {
      if (s.step() == step) return s.state();
    }
    return v1::STEP_STATE_UNSPECIFIED;
  }

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

}  // namespace ecsnap

#endif  // ECSNAP_TESTS_CLUSTER_FIXTURE_H_
