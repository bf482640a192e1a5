// Work-request batching, completion accounting and slot credits, without a
// device: what a connection's poller relies on.
#include "rdma/write_plan.h"

#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include <gtest/gtest.h>

namespace ecsnap::rdma {
namespace {

// Replays a plan as the device would: every byte of every request's scatter
// list, in order, to its remote address.
void Apply(const std::vector<WriteRequest>& plan, uint64_t remote_base, std::vector<uint8_t>* dst) {
  for (const WriteRequest& r : plan) {
    uint64_t at = r.remote_addr - remote_base;
    uint64_t bytes = 0;
    for (const ibv_sge& s : r.sges) {
      std::memcpy(dst->data() + at, reinterpret_cast<const void*>(s.addr), s.length);
      at += s.length;
      bytes += s.length;
    }
    ASSERT_EQ(bytes, r.length);
  }
}

TEST(PlanWritesTest, MovesEveryByteInOrderWithinTheLimits) {
  const uint32_t seed = std::random_device{}();
  std::printf("seed %u\n", seed);
  std::mt19937 rng(seed);
  for (int round = 0; round < 300; ++round) {
    WriteLimits limits;
    limits.max_request_bytes = 1 + rng() % 5000;
    limits.max_sge = 1 + rng() % 5;
    limits.max_outstanding = 1 + rng() % 64;
    limits.signal_every = 1 + rng() % limits.max_outstanding;
    std::vector<std::vector<uint8_t>> pieces_bytes(1 + rng() % 6);
    std::vector<LocalRange> pieces;
    std::vector<uint8_t> expected;
    for (auto& p : pieces_bytes) {
      p.resize(1 + rng() % 20000);
      for (auto& b : p) b = static_cast<uint8_t>(rng());
      pieces.push_back(LocalRange{reinterpret_cast<uint64_t>(p.data()), p.size(), 0x77});
      expected.insert(expected.end(), p.begin(), p.end());
    }
    const uint64_t offset = rng() % 100;
    std::vector<uint8_t> dst(offset + expected.size() + rng() % 50, 0);
    const RemoteWindow remote{0x10000, dst.size(), 0x99};
    const uint32_t imm = rng();
    absl::StatusOr<std::vector<WriteRequest>> plan =
        PlanWrites(pieces, remote, offset, limits, 1000, &imm);
    ASSERT_TRUE(plan.ok()) << plan.status();
    Apply(*plan, remote.addr, &dst);
    ASSERT_TRUE(std::equal(expected.begin(), expected.end(), dst.begin() + offset))
        << "round " << round;
    int since_signal = 0;
    for (size_t i = 0; i < plan->size(); ++i) {
      const WriteRequest& r = (*plan)[i];
      EXPECT_EQ(r.wr_id, 1000 + i);
      EXPECT_EQ(r.rkey, 0x99u);
      EXPECT_LE(r.length, limits.max_request_bytes);
      EXPECT_LE(static_cast<int>(r.sges.size()), limits.max_sge);
      for (const ibv_sge& s : r.sges) EXPECT_EQ(s.lkey, 0x77u);
      EXPECT_EQ(r.with_imm, i + 1 == plan->size());
      since_signal = r.signaled ? 0 : since_signal + 1;
      ASSERT_LT(since_signal, limits.signal_every);
    }
    EXPECT_TRUE(plan->back().signaled);
    EXPECT_EQ(plan->back().imm, imm);
  }
}

TEST(PlanWritesTest, RefusesWhatDoesNotFitTheRemoteWindow) {
  std::vector<uint8_t> src(100);
  const LocalRange piece{reinterpret_cast<uint64_t>(src.data()), src.size(), 1};
  const WriteLimits limits;
  EXPECT_TRUE(PlanWrites({piece}, RemoteWindow{0, 100, 1}, 0, limits, 0).ok());
  EXPECT_EQ(PlanWrites({piece}, RemoteWindow{0, 100, 1}, 1, limits, 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  // An offset near 2^64 must not wrap into the window.
  EXPECT_EQ(PlanWrites({piece}, RemoteWindow{0, 100, 1}, ~uint64_t{0} - 10, limits, 0)
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(PlanWrites({LocalRange{0x1000, 0, 1}}, RemoteWindow{0, 100, 1}, 0, limits, 0)
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(PlanWrites({LocalRange{~uint64_t{0} - 5, 10, 1}}, RemoteWindow{0, 100, 1}, 0,
                       limits, 0)
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  // Pieces whose lengths sum past 2^64 (a wrap to a small total that would
  // fit the window).
  const LocalRange huge{0x1000, uint64_t{1} << 63, 1};
  EXPECT_EQ(PlanWrites({huge, huge, piece}, RemoteWindow{0, 100, 1}, 0, limits, 0)
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  // A window whose end wraps the address space (a hostile holder).
  EXPECT_EQ(PlanWrites({piece}, RemoteWindow{~uint64_t{0} - 50, 100, 1}, 0, limits, 0)
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(PlanWrites({}, RemoteWindow{0, 100, 1}, 0, limits, 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  WriteLimits bad;
  bad.signal_every = bad.max_outstanding + 1;  // the queue could fill unsignalled
  EXPECT_EQ(PlanWrites({piece}, RemoteWindow{0, 100, 1}, 0, bad, 0).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(SendLedgerTest, ASignalledCompletionRetiresEverythingPostedBeforeIt) {
  SendLedger ledger(4);
  ASSERT_TRUE(ledger.Posted(1, false).ok());
  ASSERT_TRUE(ledger.Posted(2, false).ok());
  ASSERT_TRUE(ledger.Posted(3, true).ok());
  ASSERT_TRUE(ledger.Posted(4, false).ok());
  EXPECT_EQ(ledger.room(), 0);
  EXPECT_EQ(ledger.Posted(5, true).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_FALSE(ledger.Retired(1));
  EXPECT_FALSE(ledger.Retired(3));
  ASSERT_TRUE(ledger.Complete(3, IBV_WC_SUCCESS).ok());
  EXPECT_EQ(ledger.outstanding(), 1);
  EXPECT_EQ(ledger.room(), 3);
  // Retired with it: the memory of requests 1-3 may be written again; 4's
  // may not.
  EXPECT_TRUE(ledger.Retired(1));
  EXPECT_TRUE(ledger.Retired(3));
  EXPECT_FALSE(ledger.Retired(4));
  // Completions the ledger cannot explain are errors, not silently absorbed.
  EXPECT_EQ(ledger.Complete(3, IBV_WC_SUCCESS).code(), absl::StatusCode::kInternal);
  EXPECT_EQ(ledger.Complete(4, IBV_WC_SUCCESS).code(), absl::StatusCode::kInternal);
  ASSERT_TRUE(ledger.Posted(6, true).ok());
  ASSERT_TRUE(ledger.Complete(6, IBV_WC_SUCCESS).ok());
  EXPECT_EQ(ledger.outstanding(), 0);
  EXPECT_TRUE(ledger.Retired(6));
  EXPECT_TRUE(ledger.status().ok());
}

TEST(SendLedgerTest, AnErrorIsReportedOnceAndTheFlushedRestDrains) {
  SendLedger ledger(8);
  for (uint64_t id = 1; id <= 5; ++id) ASSERT_TRUE(ledger.Posted(id, id % 2 == 0).ok());
  ASSERT_TRUE(ledger.Complete(2, IBV_WC_SUCCESS).ok());
  ASSERT_TRUE(ledger.Complete(3, IBV_WC_REM_ACCESS_ERR, 0x88).ok());
  EXPECT_TRUE(ledger.failed());
  EXPECT_EQ(ledger.room(), 0);
  EXPECT_NE(ledger.status().message().find("remote access error"), absl::string_view::npos)
      << ledger.status();
  EXPECT_NE(ledger.status().message().find("0x88"), absl::string_view::npos);
  // After the error, unsignalled requests complete too (flushed); the first
  // error stays the one reported.
  ASSERT_TRUE(ledger.Complete(4, IBV_WC_WR_FLUSH_ERR).ok());
  ASSERT_TRUE(ledger.Complete(5, IBV_WC_WR_FLUSH_ERR).ok());
  EXPECT_EQ(ledger.outstanding(), 0);
  EXPECT_NE(ledger.status().message().find("remote access error"), absl::string_view::npos);
  EXPECT_EQ(ledger.Posted(9, true).code(), absl::StatusCode::kFailedPrecondition);
}

TEST(SlotRingTest, LendsEachSlotOnceUntilTheHolderReleasesIt) {
  SlotRing ring(3);
  SlotRing::Lease a, b, c, d;
  ASSERT_TRUE(ring.Acquire(&a));
  ASSERT_TRUE(ring.Acquire(&b));
  ASSERT_TRUE(ring.Acquire(&c));
  EXPECT_FALSE(ring.Acquire(&d));
  EXPECT_EQ(a.slot, 0u);
  EXPECT_EQ(c.slot, 2u);
  EXPECT_EQ(ring.Release(4).code(), absl::StatusCode::kInvalidArgument);  // past what was written
  ASSERT_TRUE(ring.Release(1).ok());
  ASSERT_TRUE(ring.Acquire(&d));
  EXPECT_EQ(d.seq, 3u);
  EXPECT_EQ(d.slot, 0u);
  EXPECT_EQ(ring.Release(0).code(), absl::StatusCode::kInvalidArgument);  // goes back
  ASSERT_TRUE(ring.Release(4).ok());
  EXPECT_EQ(ring.in_use(), 0u);
}

TEST(SlotRingTest, SenderAndHolderAgreeOnSlotsAcrossTheSequenceWrap) {
  // 5 slots do not divide 2^32: slots are counted apart from sequence
  // numbers, so the two sides stay in step where the sequence wraps.
  const uint32_t first = 0xfffffff0u;
  SlotRing ring(5, first);
  ReceiveOrder order(5, first);
  std::vector<SlotRing::Lease> in_flight;
  for (int i = 0; i < 64; ++i) {
    SlotRing::Lease lease;
    while (ring.Acquire(&lease)) in_flight.push_back(lease);
    ASSERT_EQ(in_flight.size(), 5u);
    for (const SlotRing::Lease& l : in_flight) {
      absl::StatusOr<uint32_t> slot = order.Accept(l.seq);
      ASSERT_TRUE(slot.ok()) << slot.status();
      ASSERT_EQ(*slot, l.slot) << "sequence " << l.seq;
    }
    ASSERT_TRUE(ring.Release(in_flight.back().seq + 1).ok());
    in_flight.clear();
  }
  EXPECT_EQ(order.next(), first + 64 * 5);  // wrapped past zero
}

TEST(ReceiveOrderTest, RefusesAWriteOutOfTurn) {
  ReceiveOrder order(4);
  ASSERT_TRUE(order.Accept(0).ok());
  EXPECT_EQ(order.Accept(2).status().code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(order.Accept(0).status().code(), absl::StatusCode::kDataLoss);  // a replay
  absl::StatusOr<uint32_t> slot = order.Accept(1);
  ASSERT_TRUE(slot.ok());
  EXPECT_EQ(*slot, 1u);
}

}  // namespace
}  // namespace ecsnap::rdma
