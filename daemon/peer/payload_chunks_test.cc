#include "daemon/peer/payload_chunks.h"

#include <cstdint>
#include <algorithm>
#include <random>
#include <tuple>
#include <vector>

#include "gtest/gtest.h"

namespace ecsnap::daemon {
namespace {

using Piece = std::tuple<size_t, uint64_t, uint64_t, uint64_t>;

std::vector<Piece> Pieces(const PayloadChunks& p, uint64_t offset, uint64_t length) {
  std::vector<Piece> out;
  p.ForEachPiece(offset, length, [&](size_t i, uint64_t at, uint64_t from, uint64_t len) {
    out.emplace_back(i, at, from, len);
  });
  return out;
}

TEST(PayloadChunksTest, RanksAreLaidEndToEndInOrder) {
  const ec::Layout layout = *ec::Layout::Create(2, 1);
  const PayloadChunks p(layout, 0, {100, 0, 50});
  EXPECT_EQ(p.bytes(), 150u);
  EXPECT_EQ(p.RankOffset(0), 0u);
  EXPECT_EQ(p.RankOffset(1), 100u);
  EXPECT_EQ(p.RankOffset(2), 100u);
  // A range across the empty rank touches only the ranks with bytes in it.
  EXPECT_EQ(Pieces(p, 90, 20), (std::vector<Piece>{{0, 90, 0, 10}, {2, 0, 10, 10}}));
  EXPECT_TRUE(Pieces(p, 150, 10).empty());
  EXPECT_TRUE(Pieces(p, 10, 0).empty());
  // A range past the end is cut at the end.
  EXPECT_EQ(Pieces(p, 140, 100), (std::vector<Piece>{{2, 40, 0, 10}}));
}

TEST(PayloadChunksTest, DataChunksCoverThePayloadOnceAndMatchTheLayout) {
  std::mt19937_64 rng(20261123);
  for (auto [k, m] : {std::pair{2, 1}, {2, 2}, {4, 2}}) {
    const ec::Layout layout = *ec::Layout::Create(k, m);
    for (int trial = 0; trial < 50; ++trial) {
      std::vector<uint64_t> ranks(rng() % 4);
      for (uint64_t& r : ranks) r = rng() % 40000;
      const int slot = static_cast<int>(rng() % layout.n());
      const PayloadChunks p(layout, slot, ranks);
      // Every payload byte lies in exactly one data chunk, and in exactly one
      // rank window through the chunks' pieces.
      std::vector<int> seen(p.bytes(), 0);
      for (int c = 0; c < k; ++c) {
        const ec::Extent e = p.Chunk(c);
        EXPECT_EQ(p.StripeOf(c), layout.StripeOfDataChunk(slot, c));
        EXPECT_EQ(layout.SlotOf(p.StripeOf(c), c), slot);
        uint64_t covered = 0;
        p.ForEachPiece(e.offset, e.length, [&](size_t i, uint64_t at, uint64_t from, uint64_t len) {
          EXPECT_LE(at + len, ranks[i]);
          EXPECT_EQ(p.RankOffset(i) + at, e.offset + from);
          for (uint64_t b = 0; b < len; ++b) ++seen[e.offset + from + b];
          covered += len;
        });
        EXPECT_EQ(covered, std::min(e.length, p.bytes() - std::min(p.bytes(), e.offset)));
      }
      EXPECT_TRUE(std::all_of(seen.begin(), seen.end(), [](int s) { return s == 1; }))
          << "k=" << k << " m=" << m << " trial " << trial;
    }
  }
}

}  // namespace
}  // namespace ecsnap::daemon
