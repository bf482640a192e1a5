#include "daemon/config.h"

#include <gtest/gtest.h>

namespace ecsnap::daemon {
namespace {

TEST(SlotOfNodeTest, FindsTheSlotOfANodeAndSaysWhichNodesItKnows) {
  auto config = ParseConfig(R"pb(
    cluster {
      slots { peer_address: "10.0.0.1:7071" node: "gpu-a" }
      slots { peer_address: "10.0.0.2:7071" node: "gpu-b" }
      slots { peer_address: "10.0.0.3:7071" }
    }
  )pb", "test");
  ASSERT_TRUE(config.ok()) << config.status();
  auto b = SlotOfNode(*config, "gpu-b");
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(*b, 1u);
  auto none = SlotOfNode(*config, "gpu-z");
  EXPECT_EQ(none.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(none.status().message().find("gpu-a, gpu-b"), absl::string_view::npos)
      << none.status();
  config->mutable_cluster()->mutable_slots(2)->set_node("gpu-a");
  EXPECT_EQ(SlotOfNode(*config, "gpu-a").status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace ecsnap::daemon
