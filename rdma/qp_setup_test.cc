// The RC connection set-up without a device: endpoint wire form (hostile
// bytes included) and the RESET -> INIT -> RTR -> RTS attribute sets.
#include "rdma/qp_setup.h"

#include <cstring>
#include <random>
#include <string>

#include <gtest/gtest.h>

namespace ecsnap::rdma {
namespace {

Endpoint IbEndpoint(uint32_t qpn) {
  Endpoint e;
  e.qp_num = qpn;
  e.psn = 0xabcdef;
  e.lid = 7;
  e.port = 1;
  e.mtu = IBV_MTU_4096;
  return e;
}

Endpoint RoceEndpoint(uint32_t qpn) {
  Endpoint e = IbEndpoint(qpn);
  e.lid = 0;
  e.global = true;
  e.gid_index = 3;
  e.mtu = IBV_MTU_1024;
  for (int i = 0; i < 16; ++i) e.gid[i] = static_cast<uint8_t>(0xf0 + i);
  return e;
}

TEST(EndpointTest, RoundTripsThroughItsWireForm) {
  for (const Endpoint& e : {IbEndpoint(0x12), RoceEndpoint(0xffffff)}) {
    const std::string wire = Encode(e);
    EXPECT_EQ(wire.size(), 40u);
    absl::StatusOr<Endpoint> back = Decode(wire);
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_TRUE(*back == e);
  }
}

TEST(EndpointTest, RefusesEveryMalformedField) {
  const std::string good = Encode(IbEndpoint(5));
  auto mutate = [&](size_t at, uint8_t value) {
    std::string w = good;
    w[at] = static_cast<char>(value);
    return Decode(w).status();
  };
  EXPECT_EQ(Decode(good.substr(0, 39)).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Decode(good + "x").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Decode("").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(mutate(0, 'X').message().find("magic"), absl::string_view::npos);
  EXPECT_NE(mutate(4, 2).message().find("version 2"), absl::string_view::npos);
  EXPECT_NE(mutate(5, 2).message().find("reserved"), absl::string_view::npos);
  EXPECT_NE(mutate(19, 1).message().find("reserved"), absl::string_view::npos);
  EXPECT_NE(mutate(37, 1).message().find("reserved"), absl::string_view::npos);
  EXPECT_NE(mutate(6, 0).message().find("MTU"), absl::string_view::npos);
  EXPECT_NE(mutate(6, 6).message().find("MTU"), absl::string_view::npos);
  EXPECT_NE(mutate(7, 0).message().find("port 0"), absl::string_view::npos);
  EXPECT_NE(mutate(11, 1).message().find("QP number"), absl::string_view::npos);  // > 24 bits
  EXPECT_NE(mutate(15, 1).message().find("sequence"), absl::string_view::npos);
  std::string zero_qpn = good;
  for (int i = 8; i < 12; ++i) zero_qpn[i] = 0;
  EXPECT_NE(Decode(zero_qpn).status().message().find("QP number"), absl::string_view::npos);
  std::string no_lid = good;
  no_lid[16] = no_lid[17] = 0;
  EXPECT_NE(Decode(no_lid).status().message().find("LID is 0"), absl::string_view::npos);
  std::string global_no_gid = good;
  global_no_gid[5] = 1;
  EXPECT_NE(Decode(global_no_gid).status().message().find("GID is all zeros"),
            absl::string_view::npos);
}

TEST(EndpointTest, RandomBytesNeverDecodeIntoAnUnusableEndpoint) {
  const uint32_t seed = std::random_device{}();
  std::printf("seed %u\n", seed);
  std::mt19937 rng(seed);
  const std::string good = Encode(RoceEndpoint(9));
  for (int i = 0; i < 20000; ++i) {
    std::string w = good;
    const int flips = 1 + rng() % 4;
    for (int f = 0; f < flips; ++f) w[rng() % w.size()] = static_cast<char>(rng());
    absl::StatusOr<Endpoint> e = Decode(w);
    if (!e.ok()) continue;
    // Whatever decodes is something a QP may be connected toward.
    QpStateMachine m(e->global ? RoceEndpoint(1) : IbEndpoint(1), QpOptions{});
    ASSERT_TRUE(m.ToInit().ok());
    m.Applied();
    absl::StatusOr<QpTransition> rtr = m.ToReadyToReceive(*e);
    if (rtr.ok()) {
      EXPECT_GE(rtr->attr.path_mtu, IBV_MTU_256);
      EXPECT_LE(rtr->attr.path_mtu, IBV_MTU_4096);
      EXPECT_NE(rtr->attr.dest_qp_num, 0u);
      EXPECT_LT(rtr->attr.dest_qp_num, 1u << 24);
    }
  }
}

TEST(QpStateMachineTest, WalksResetInitRtrRtsWithTheAttributesVerbsNeed) {
  QpOptions options;
  options.timeout = 17;
  QpStateMachine m(IbEndpoint(0x100), options);
  ASSERT_EQ(m.state(), QpState::kReset);

  absl::StatusOr<QpTransition> init = m.ToInit();
  ASSERT_TRUE(init.ok()) << init.status();
  EXPECT_EQ(init->attr.qp_state, IBV_QPS_INIT);
  EXPECT_EQ(init->mask, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS);
  EXPECT_EQ(init->attr.port_num, 1);
  EXPECT_EQ(init->attr.qp_access_flags, static_cast<unsigned>(IBV_ACCESS_REMOTE_WRITE));
  m.Applied();
  EXPECT_EQ(m.state(), QpState::kInit);

  Endpoint remote = IbEndpoint(0x200);
  remote.mtu = IBV_MTU_2048;
  remote.psn = 42;
  remote.lid = 9;
  absl::StatusOr<QpTransition> rtr = m.ToReadyToReceive(remote);
  ASSERT_TRUE(rtr.ok()) << rtr.status();
  EXPECT_EQ(rtr->attr.qp_state, IBV_QPS_RTR);
  EXPECT_EQ(rtr->attr.path_mtu, IBV_MTU_2048);  // the smaller of 4096 and 2048
  EXPECT_EQ(rtr->attr.dest_qp_num, 0x200u);
  EXPECT_EQ(rtr->attr.rq_psn, 42u);
  EXPECT_EQ(rtr->attr.ah_attr.dlid, 9);
  EXPECT_EQ(rtr->attr.ah_attr.is_global, 0);
  EXPECT_EQ(rtr->mask & (IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN |
                         IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER),
            IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN |
                IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER);
  m.Applied();

  absl::StatusOr<QpTransition> rts = m.ToReadyToSend();
  ASSERT_TRUE(rts.ok()) << rts.status();
  EXPECT_EQ(rts->attr.qp_state, IBV_QPS_RTS);
  EXPECT_EQ(rts->attr.sq_psn, 0xabcdefu);  // our own PSN, the one the other side expects
  EXPECT_EQ(rts->attr.timeout, 17);
  EXPECT_EQ(rts->attr.retry_cnt, 7);
  EXPECT_TRUE(rts->mask & IBV_QP_SQ_PSN);
  m.Applied();
  EXPECT_EQ(m.state(), QpState::kReadyToSend);
}

TEST(QpStateMachineTest, RoceRoutesByTheRemoteGidFromTheLocalGidIndex) {
  QpStateMachine m(RoceEndpoint(1), QpOptions{});
  ASSERT_TRUE(m.ToInit().ok());
  m.Applied();
  const Endpoint remote = RoceEndpoint(2);
  absl::StatusOr<QpTransition> rtr = m.ToReadyToReceive(remote);
  ASSERT_TRUE(rtr.ok()) << rtr.status();
  EXPECT_EQ(rtr->attr.ah_attr.is_global, 1);
  EXPECT_EQ(rtr->attr.ah_attr.grh.sgid_index, 3);
  EXPECT_EQ(rtr->attr.ah_attr.grh.hop_limit, 64);
  EXPECT_EQ(0, std::memcmp(rtr->attr.ah_attr.grh.dgid.raw, remote.gid.data(), 16));
}

TEST(QpStateMachineTest, RefusesStepsOutOfOrderAndMixedLinkLayers) {
  QpStateMachine m(IbEndpoint(1), QpOptions{});
  EXPECT_EQ(m.ToReadyToSend().status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(m.ToReadyToReceive(IbEndpoint(2)).status().code(),
            absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE(m.ToInit().ok());
  // Not applied yet: the next step waits.
  EXPECT_NE(m.ToReadyToReceive(IbEndpoint(2)).status().message().find("not applied"),
            absl::string_view::npos);
  m.Applied();
  EXPECT_EQ(m.ToInit().status().code(), absl::StatusCode::kFailedPrecondition);
  // A RoCE peer cannot be reached from an InfiniBand port; the machine stays
  // in INIT and a good peer still connects.
  EXPECT_NE(m.ToReadyToReceive(RoceEndpoint(2)).status().message().find("link layers"),
            absl::string_view::npos);
  Endpoint bad = IbEndpoint(0);
  EXPECT_EQ(m.ToReadyToReceive(bad).status().code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(m.ToReadyToReceive(IbEndpoint(2)).ok());
  m.Applied();
  m.Fail();
  EXPECT_EQ(m.state(), QpState::kError);
  EXPECT_EQ(m.ToReadyToSend().status().code(), absl::StatusCode::kFailedPrecondition);
  m.Applied();  // a late Applied never revives an errored QP
  EXPECT_EQ(m.state(), QpState::kError);
}

}  // namespace
}  // namespace ecsnap::rdma
