// The verbs wrappers on a real device: two RC queue pairs on one port
// connected to each other, RDMA writes (and a write with immediate) between
// registered buffers, checked byte for byte. Skips, saying why, on a host
// without an RDMA device; what needs no device (the answer such a host gets)
// is checked everywhere.
#include "rdma/verbs.h"

#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

namespace ecsnap::rdma {
namespace {

TEST(DeviceTest, AHostWithoutADeviceIsToldSoInASentence) {
  if (!DeviceNames().empty()) GTEST_SKIP() << "this host has an RDMA device";
  absl::StatusOr<std::unique_ptr<Device>> device = Device::Open(DeviceOptions{});
  ASSERT_FALSE(device.ok());
  EXPECT_EQ(device.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(device.status().message().find("no RDMA device"), absl::string_view::npos)
      << device.status();
  DeviceOptions named;
  named.name = "mlx5_9";
  EXPECT_EQ(Device::Open(named).status().code(), absl::StatusCode::kNotFound);
}

class LoopbackTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<std::unique_ptr<Device>> device = Device::Open(DeviceOptions{});
    if (!device.ok()) GTEST_SKIP() << "needs an RDMA device: " << device.status().message();
    device_ = *std::move(device);
    absl::StatusOr<std::unique_ptr<ProtectionDomain>> pd = device_->AllocateProtectionDomain();
    ASSERT_TRUE(pd.ok()) << pd.status();
    pd_ = *std::move(pd);
  }

  std::unique_ptr<Device> device_;
  std::unique_ptr<ProtectionDomain> pd_;
};

// Polls `qp`'s send queue until the ledger is empty or 10 s pass.
void DrainSend(QueuePair* qp, SendLedger* ledger) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (ledger->outstanding() > 0 && std::chrono::steady_clock::now() < deadline) {
    absl::StatusOr<int> n = qp->PollSend(ledger);
    ASSERT_TRUE(n.ok()) << n.status();
    if (*n == 0) std::this_thread::yield();
  }
  ASSERT_EQ(ledger->outstanding(), 0) << "send completions did not arrive within 10 s";
}

TEST_F(LoopbackTest, WritesLandByteForByteAndTheImmediateSaysWhen) {
  const uint32_t seed = std::random_device{}();
  std::printf("seed %u, device %s\n", seed, device_->name().c_str());
  std::mt19937 rng(seed);
  std::vector<uint8_t> src(3 << 20), dst(4 << 20, 0);
  for (auto& b : src) b = static_cast<uint8_t>(rng());
  auto src_mr = pd_->Register(absl::MakeSpan(src), 0);
  auto dst_mr = pd_->Register(absl::MakeSpan(dst), IBV_ACCESS_REMOTE_WRITE);
  ASSERT_TRUE(src_mr.ok()) << src_mr.status();
  ASSERT_TRUE(dst_mr.ok()) << dst_mr.status();

  auto a = pd_->CreateQueuePair(64, 4, 4, QpOptions{});
  auto b = pd_->CreateQueuePair(64, 4, 4, QpOptions{});
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  // Endpoints cross as they would over the control plane: encoded, decoded.
  absl::StatusOr<Endpoint> a_seen = Decode(Encode((*a)->endpoint()));
  absl::StatusOr<Endpoint> b_seen = Decode(Encode((*b)->endpoint()));
  ASSERT_TRUE(a_seen.ok() && b_seen.ok());
  // A QP takes receives from INIT on: connected first, then the receive.
  ASSERT_TRUE((*a)->Connect(*b_seen).ok());
  ASSERT_TRUE((*b)->Connect(*a_seen).ok());
  ASSERT_TRUE((*b)->PostReceives(1).ok());

  // Three pieces of the source, out of order, to offset 4096 of the target.
  std::vector<LocalRange> pieces = {*(*src_mr)->Local(2 << 20, 1 << 20),
                                    *(*src_mr)->Local(0, 12345),
                                    *(*src_mr)->Local(12345, (2 << 20) - 12345)};
  WriteLimits limits;
  limits.max_request_bytes = 256 << 10;
  limits.max_outstanding = 8;
  limits.signal_every = 4;
  const uint32_t imm = 0x5eed0001;
  auto plan = PlanWrites(pieces, (*dst_mr)->Remote(), 4096, limits, 1, &imm);
  ASSERT_TRUE(plan.ok()) << plan.status();
  SendLedger ledger(limits.max_outstanding);
  size_t next = 0;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (next < plan->size() && std::chrono::steady_clock::now() < deadline) {
    auto posted = (*a)->PostWrites(absl::MakeConstSpan(*plan).subspan(next), &ledger);
    ASSERT_TRUE(posted.ok()) << posted.status();
    next += *posted;
    ASSERT_TRUE((*a)->PollSend(&ledger).ok());
  }
  DrainSend(a->get(), &ledger);
  ASSERT_TRUE(ledger.status().ok()) << ledger.status();

  uint32_t seen_imm = 0;
  for (int i = 0; i < 100000 && seen_imm == 0; ++i) {
    auto n = (*b)->PollReceive([&](uint32_t v, uint32_t) {
      seen_imm = v;
      return absl::OkStatus();
    });
    ASSERT_TRUE(n.ok()) << n.status();
  }
  EXPECT_EQ(seen_imm, imm);
  EXPECT_EQ(0, std::memcmp(dst.data() + 4096, src.data() + (2 << 20), 1 << 20));
  EXPECT_EQ(0, std::memcmp(dst.data() + 4096 + (1 << 20), src.data(), 2 << 20));
  EXPECT_EQ(dst[4095], 0);
}

TEST_F(LoopbackTest, AWriteOutsideTheRemoteRegionFailsTheQueuePairNotTheProcess) {
  std::vector<uint8_t> src(8192, 1), dst(4096, 0);
  auto src_mr = pd_->Register(absl::MakeSpan(src), 0);
  auto dst_mr = pd_->Register(absl::MakeSpan(dst), IBV_ACCESS_REMOTE_WRITE);
  ASSERT_TRUE(src_mr.ok() && dst_mr.ok());
  auto a = pd_->CreateQueuePair(8, 1, 1, QpOptions{});
  auto b = pd_->CreateQueuePair(8, 1, 1, QpOptions{});
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_TRUE((*a)->Connect((*b)->endpoint()).ok());
  ASSERT_TRUE((*b)->Connect((*a)->endpoint()).ok());
  // A window claiming more than was registered (a lying peer): the device
  // refuses the write with a remote access error.
  RemoteWindow lie = (*dst_mr)->Remote();
  lie.length = 8192;
  auto plan = PlanWrites({*(*src_mr)->Local(0, 8192)}, lie, 0, WriteLimits{}, 1);
  ASSERT_TRUE(plan.ok());
  SendLedger ledger(8);
  ASSERT_TRUE((*a)->PostWrites(*plan, &ledger).ok());
  DrainSend(a->get(), &ledger);
  EXPECT_TRUE(ledger.failed());
  EXPECT_EQ(ledger.status().code(), absl::StatusCode::kUnavailable) << ledger.status();
}

}  // namespace
}  // namespace ecsnap::rdma
