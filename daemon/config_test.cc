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

TEST(PeerListenHostTest, BuildsTheListenAddressAndRefusesWhatIsNotAHost) {
  EXPECT_EQ(PeerListenAddress("0.0.0.0", "node-3.example:7071"), "0.0.0.0:7071");
  EXPECT_EQ(PeerListenAddress("::", "node-3:7071"), "[::]:7071");
  EXPECT_EQ(PeerListenAddress("[::]", "dns:///node-3:7071"), "[::]:7071");
  EXPECT_EQ(PeerListenAddress("::", "ipv6:[fd00::3]:7071"), "[::]:7071");
  auto config = ParseConfig(R"pb(
    cluster { k: 1 m: 1 slots { peer_address: "10.0.0.1:7071" } slots { peer_address: "10.0.0.2:7071" } }
  )pb", "test");
  ASSERT_TRUE(config.ok()) << config.status();
  for (const char* good : {"0.0.0.0", "::", "[::]", "node-1"}) {
    config->mutable_daemon()->set_peer_listen_host(good);
    EXPECT_TRUE(ValidateConfig(*config, 0).ok()) << good;
  }
  for (const char* bad : {"0.0.0.0:7071", "[0.0.0.0]:1", "[]"}) {
    config->mutable_daemon()->set_peer_listen_host(bad);
    EXPECT_EQ(ValidateConfig(*config, 0).code(), absl::StatusCode::kInvalidArgument) << bad;
  }
  config->mutable_daemon()->set_peer_listen_host("0.0.0.0");
  config->mutable_cluster()->mutable_slots(0)->set_peer_address("dns:///node-1");
  EXPECT_NE(ValidateConfig(*config, 0).message().find("no TCP port"), std::string::npos);
}

TEST(TrainerKeepaliveTest, DefaultsToThirtySecondsAndRefusesWhatNoPingCanKeep) {
  auto config = ParseConfig("", "test");
  ASSERT_TRUE(config.ok()) << config.status();
  ApplyDefaults(&*config);
  EXPECT_EQ(config->daemon().trainer_keepalive_ms(), 30000u);
  for (uint32_t good : {1000u, 30000u, 24u * 3600 * 1000}) {
    config->mutable_daemon()->set_trainer_keepalive_ms(good);
    EXPECT_TRUE(ValidateConfig(*config, 0).ok()) << good;
  }
  // Below what the daemon accepts of a trainer's pings, or past a day.
  for (uint32_t bad : {1u, 999u, 24u * 3600 * 1000 + 1}) {
    config->mutable_daemon()->set_trainer_keepalive_ms(bad);
    const absl::Status st = ValidateConfig(*config, 0);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_NE(st.message().find("daemon.trainer_keepalive_ms is"), std::string::npos) << st;
  }
}

TEST(BulkRdmaConfigTest, TheTransportParsesAndAGidIndexPastTheTableIsRefused) {
  auto config = ParseConfig(
      "cluster { bulk_transport: BULK_RDMA }\n"
      "daemon { rdma_device: \"mlx5_0\" rdma_gid_index: 3 }\n",
      "test");
  ASSERT_TRUE(config.ok()) << config.status();
  ApplyDefaults(&*config);
  EXPECT_EQ(config->cluster().bulk_transport(), config::Cluster::BULK_RDMA);
  EXPECT_TRUE(ValidateConfig(*config, 0).ok());
  config->mutable_daemon()->set_rdma_gid_index(256);
  const absl::Status st = ValidateConfig(*config, 0);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("daemon.rdma_gid_index is 256"), std::string::npos) << st;
}

}  // namespace
}  // namespace ecsnap::daemon
