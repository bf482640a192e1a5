#include "client/restore_plan.h"

#include <gtest/gtest.h>

namespace ecsnap::client_internal {
namespace {

v1::Manifest ThreeTensors() {
  v1::Manifest m;
  for (auto [name, bytes] : {std::pair<const char*, uint64_t>{"a", 10}, {"b", 100}, {"c", 1}}) {
    v1::TensorEntry* t = m.add_tensors();
    t->set_name(name);
    t->set_length(bytes);
  }
  return m;
}

TEST(RestorePlanTest, NamedTensorsGoToTheirDestinationsTheRestAlignedIntoOneBuffer) {
  char b[100];
  const std::vector<TensorDestination> into = {{"b", b, 100}};
  auto plan = PlanRestore(ThreeTensors(), 7, into, /*take_rest=*/true);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->dests[0], nullptr);
  EXPECT_EQ(plan->dests[1], &into[0]);
  EXPECT_EQ(plan->dests[2], nullptr);
  EXPECT_EQ(plan->rest_offset[0], 0u);
  EXPECT_EQ(plan->rest_offset[1], RestorePlan::kNone);
  EXPECT_EQ(plan->rest_offset[2], 64u);  // after "a", 64-byte aligned
  EXPECT_EQ(plan->rest_bytes, 65u);
}

TEST(RestorePlanTest, RefusesEveryMismatchNamingTheTensor) {
  char buf[128];
  auto code = [&](std::vector<TensorDestination> into, bool rest) {
    auto p = PlanRestore(ThreeTensors(), 7, into, rest);
    return p.ok() ? std::string("OK") : std::string(p.status().message());
  };
  EXPECT_NE(code({{"b", buf, 100}}, false).find("holds tensor 'a' but no destination"),
            std::string::npos);
  EXPECT_NE(code({{"b", buf, 99}}, true).find("'b' of step 7 has 100 bytes but its destination "
                                              "has 99"),
            std::string::npos);
  EXPECT_NE(code({{"z", buf, 1}}, true).find("'z' is not a tensor of step 7"), std::string::npos);
  EXPECT_NE(code({{"c", buf, 1}, {"c", buf, 1}}, true).find("given twice"), std::string::npos);
  TensorDestination bad{"c", buf, 1};
  bad.device = -5;
  EXPECT_NE(code({bad}, true).find("neither -1 (host) nor a CUDA device"), std::string::npos);
  EXPECT_EQ(code({{"a", buf, 10}, {"b", buf, 100}, {"c", buf, 1}}, false), "OK");
}

}  // namespace
}  // namespace ecsnap::client_internal
