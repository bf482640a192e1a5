#include "daemon/peer/group.h"

#include <set>

#include "gtest/gtest.h"

namespace ecsnap::daemon {
namespace {

config::Cluster Cluster(int slots, int k, int m, std::vector<std::string> domains = {}) {
  config::Cluster c;
  c.set_k(k);
  c.set_m(m);
  for (int i = 0; i < slots; ++i) {
    auto* s = c.add_slots();
    s->set_peer_address("10.0.0." + std::to_string(i) + ":7071");
    if (!domains.empty()) s->set_failure_domain(domains[i]);
  }
  return c;
}

TEST(Group, ConsecutiveSlotsWithoutDomains) {
  const auto c = Cluster(8, 2, 2);
  auto g = *FormGroup(c, 5);
  EXPECT_EQ(g.id, 1u);
  EXPECT_EQ(g.slots, (std::vector<uint32_t>{4, 5, 6, 7}));
  EXPECT_EQ(g.self, 1);
  EXPECT_EQ(g.addresses[2], "10.0.0.6:7071");
}

TEST(Group, OneSlotPerFailureDomain) {
  // Two racks of four: each group of 2 + 0 must span both racks.
  const auto c = Cluster(8, 1, 1, {"a", "a", "a", "a", "b", "b", "b", "b"});
  std::set<std::vector<uint32_t>> groups;
  for (uint32_t s = 0; s < 8; ++s) {
    auto g = *FormGroup(c, s);
    ASSERT_EQ(g.slots.size(), 2u);
    EXPECT_NE(c.slots(g.slots[0]).failure_domain(), c.slots(g.slots[1]).failure_domain());
    EXPECT_EQ(g.slots[g.self], s);
    groups.insert(g.slots);
  }
  EXPECT_EQ(groups.size(), 4u);  // a partition
}

TEST(Group, RefusesImpossibleLayouts) {
  EXPECT_EQ(FormGroup(Cluster(6, 2, 2), 0).status().code(), absl::StatusCode::kInvalidArgument);
  auto st = FormGroup(Cluster(4, 1, 1, {"a", "a", "a", "b"}), 0).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("two slots of failure domain 'a'"), std::string::npos) << st;
}

}  // namespace
}  // namespace ecsnap::daemon
