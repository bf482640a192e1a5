#include "daemon/peer/rebuild_plan.h"

#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace ecsnap::daemon {
namespace {

// A group of RS(k, m) whose positions are cluster slots 10, 11, ...; this
// daemon is position `self`.
Group MakeGroup(const ec::Layout& layout, int self) {
  Group g;
  g.id = 7;
  g.self = self;
  for (int i = 0; i < layout.n(); ++i) g.slots.push_back(10 + i);
  return g;
}

// What group position `from` answers about (job, step) when every slot's
// payload is `payload` bytes: every slot's shape, the rows of `rows`
// (stripe, row) heard complete, and the chunks `from` holds.
peer::StepInventory Inventory(const ec::Layout& layout, int from, const std::string& job,
                              uint64_t step, const std::vector<uint64_t>& payload,
                              bool all_rows = true) {
  const int n = layout.n(), k = layout.k();
  peer::StepInventory inv;
  inv.set_job_id(job);
  inv.set_step(step);
  for (int i = 0; i < n; ++i) {
    peer::SlotStep* s = inv.add_slots();
    s->set_slot(i);
    s->set_payload_bytes(payload[i]);
  }
  for (int s = 0; s < n; ++s) {
    for (int r = 0; r < layout.m(); ++r) {
      if (!all_rows && s == 0 && r == 0) continue;
      peer::StripeProtected* row = inv.add_rows();
      row->set_job_id(job);
      row->set_step(step);
      row->set_stripe(s);
      row->set_row(r);
      row->set_holder_slot(layout.SlotOf(s, k + r));
    }
    inv.add_chunks(s * n + layout.PositionOf(s, from));
  }
  return inv;
}

class RebuildPlanTest : public ::testing::Test {
 protected:
  RebuildPlanTest() : layout_(*ec::Layout::Create(2, 1)), group_(MakeGroup(layout_, 0)) {}

  // Peers in `answering` answer with the steps in `steps`.
  GroupView View(const std::vector<int>& answering, const std::vector<uint64_t>& steps,
                 bool all_rows = true) {
    GroupView view(layout_);
    for (int from : answering) {
      peer::InventoryResponse resp;
      for (uint64_t step : steps) {
        *resp.add_steps() = Inventory(layout_, from, "job", step, payload_, all_rows);
      }
      EXPECT_EQ(view.Merge(from, resp), 0);
    }
    view.AddKnownEmptyChunks();
    return view;
  }

  const ec::Layout layout_;
  const Group group_;
  std::vector<uint64_t> payload_ = {1 << 20, 1 << 20, 1 << 20};
};

TEST_F(RebuildPlanTest, NewestProtectedStepDecodableFromTheSurvivors) {
  const std::vector<JobPlan> plans = PlanRebuild(layout_, group_, View({1, 2}, {4, 5}), {});
  ASSERT_EQ(plans.size(), 1u);
  EXPECT_EQ(plans[0].job, "job");
  ASSERT_EQ(plans[0].candidates.size(), 2u);
  EXPECT_EQ(plans[0].candidates[0].step, 5u);  // newest first
  EXPECT_TRUE(plans[0].candidates[0].decodable.ok()) << plans[0].candidates[0].decodable;
  EXPECT_EQ(plans[0].candidates[1].step, 4u);
}

TEST_F(RebuildPlanTest, NothingToRebuildWhenThisSlotHoldsTheNewestProtectedStep) {
  const std::vector<JobPlan> plans =
      PlanRebuild(layout_, group_, View({1, 2}, {4, 5}), {{"job", 5}});
  ASSERT_EQ(plans.size(), 1u);
  EXPECT_TRUE(plans[0].candidates.empty());
  // Only steps newer than what is held are candidates.
  const std::vector<JobPlan> older =
      PlanRebuild(layout_, group_, View({1, 2}, {4, 5}), {{"job", 4}});
  ASSERT_EQ(older[0].candidates.size(), 1u);
  EXPECT_EQ(older[0].candidates[0].step, 5u);
}

TEST_F(RebuildPlanTest, AStepWithARowMissingIsNoCandidate) {
  GroupView view = View({1, 2}, {5}, /*all_rows=*/false);
  EXPECT_TRUE(PlanRebuild(layout_, group_, view, {}).empty());
}

TEST_F(RebuildPlanTest, MoreThanMLostIsDataLossNamingGroupSlotsAndStripes) {
  // Position 0 (this one) and position 2 are gone: RS(2,1) loses two.
  const std::vector<JobPlan> plans = PlanRebuild(layout_, group_, View({1}, {5}), {});
  ASSERT_EQ(plans.size(), 1u);
  ASSERT_EQ(plans[0].candidates.size(), 1u);
  const absl::Status& st = plans[0].candidates[0].decodable;
  EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(st.message().find("job job step 5 cannot be rebuilt: group 7 (RS 2+1) has lost "
                              "slots {10, 12}"),
            std::string::npos)
      << st;
  EXPECT_NE(st.message().find("has 1 of the 2 intact chunks it needs"), std::string::npos) << st;
}

TEST_F(RebuildPlanTest, UnknownSlotShapeIsDataLoss) {
  GroupView view(layout_);
  peer::InventoryResponse resp;
  peer::StepInventory inv = Inventory(layout_, 1, "job", 5, payload_);
  inv.mutable_slots()->DeleteSubrange(2, 1);  // nobody knows position 2's payload
  *resp.add_steps() = inv;
  view.Merge(1, resp);
  *resp.mutable_steps(0) = Inventory(layout_, 2, "job", 5, payload_);
  resp.mutable_steps(0)->mutable_slots()->DeleteSubrange(2, 1);
  view.Merge(2, resp);
  view.AddKnownEmptyChunks();
  const std::vector<JobPlan> plans = PlanRebuild(layout_, group_, view, {});
  ASSERT_EQ(plans[0].candidates.size(), 1u);
  EXPECT_EQ(plans[0].candidates[0].decodable.code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(plans[0].candidates[0].decodable.message().find("shape of slots {12}"),
            std::string::npos);
}

TEST_F(RebuildPlanTest, OutOfRangeInventoryEntriesAreIgnoredAndCounted) {
  GroupView view(layout_);
  peer::InventoryResponse resp;
  peer::StepInventory* inv = resp.add_steps();
  inv->set_job_id("job");
  inv->set_step(5);
  inv->add_slots()->set_slot(3);  // RS(2,1) has positions 0..2
  inv->add_chunks(9);             // stripe 3
  peer::StripeProtected* row = inv->add_rows();
  row->set_job_id("job");
  row->set_step(5);
  row->set_stripe(1);
  row->set_row(1);  // m = 1: row 0 only
  peer::StripeProtected* other = inv->add_rows();
  other->set_job_id("another");  // a row of another job under this one
  other->set_step(5);
  EXPECT_EQ(view.Merge(1, resp), 4);
  const StepView& v = view.steps().at({"job", 5});
  EXPECT_TRUE(v.slots.empty());
  EXPECT_TRUE(v.rows.empty());
  EXPECT_TRUE(v.held.empty());
}

TEST_F(RebuildPlanTest, APeerVouchesOnlyForItsOwnChunks) {
  GroupView view(layout_);
  peer::InventoryResponse resp;
  peer::StepInventory* inv = resp.add_steps();
  inv->set_job_id("job");
  inv->set_step(5);
  const int n = layout_.n();
  for (int s = 0; s < n; ++s) {
    for (int q = 0; q < n; ++q) inv->add_chunks(s * n + q);  // every chunk of the step
  }
  // Position 1 holds one chunk per stripe; the other claims are ignored.
  EXPECT_EQ(view.Merge(1, resp), n * (n - 1));
  const StepView& v = view.steps().at({"job", 5});
  ASSERT_EQ(v.held.size(), static_cast<size_t>(n));
  for (const auto& [sq, holders] : v.held) {
    EXPECT_EQ(sq.second, layout_.PositionOf(sq.first, 1));
    EXPECT_EQ(holders, std::set<int>{1});
  }
}

TEST_F(RebuildPlanTest, EmptyChunksNeedNoHolder) {
  // Position 2 runs no rank: its data chunks are empty, and known to be.
  payload_ = {1 << 20, 1 << 20, 0};
  GroupView view = View({1}, {5});
  const StepView& v = view.steps().at({"job", 5});
  for (int s = 0; s < layout_.n(); ++s) {
    for (int q = 0; q < layout_.n(); ++q) {
      auto it = v.held.find({s, q});
      const bool known_empty = it != v.held.end() && it->second.count(kKnownEmpty) > 0;
      EXPECT_EQ(known_empty, layout_.ChunkLength(payload_, s, q) == 0) << s << "," << q;
    }
  }
  // With no shape known for every slot, nothing is assumed empty.
  GroupView partial(layout_);
  peer::InventoryResponse resp;
  *resp.add_steps() = Inventory(layout_, 1, "job", 5, payload_);
  resp.mutable_steps(0)->mutable_slots()->DeleteSubrange(0, 1);
  partial.Merge(1, resp);
  partial.AddKnownEmptyChunks();
  for (const auto& [pos, holders] : partial.steps().at({"job", 5}).held) {
    EXPECT_EQ(holders.count(kKnownEmpty), 0u);
  }
}

}  // namespace
}  // namespace ecsnap::daemon
