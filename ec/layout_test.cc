#include "ec/layout.h"

#include <set>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace ecsnap::ec {
namespace {

std::vector<Layout> AllLayouts() {
  std::vector<Layout> all;
  for (int n = 1; n <= kMaxGroupSlots; ++n) {
    for (int m = 0; m < n; ++m) all.push_back(*Layout::Create(n - m, m));
  }
  return all;
}

TEST(Layout, RejectsUnsupportedCodes) {
  EXPECT_EQ(Layout::Create(0, 2).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Layout::Create(2, -1).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Layout::Create(30, 3).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Layout::Create(28, 4).ok());
  EXPECT_TRUE(Layout::Create(1, 0).ok());
}

TEST(Layout, EveryStripeHasExactlyOneChunkOnEverySlot) {
  for (const Layout& l : AllLayouts()) {
    for (int s = 0; s < l.stripes(); ++s) {
      std::set<int> slots;
      for (int q = 0; q < l.n(); ++q) {
        slots.insert(l.SlotOf(s, q));
        EXPECT_EQ(l.PositionOf(s, l.SlotOf(s, q)), q);
      }
      // Hence any m lost slots cost each stripe at most m chunks.
      EXPECT_EQ(static_cast<int>(slots.size()), l.n()) << "k=" << l.k() << " m=" << l.m();
    }
  }
}

TEST(Layout, FollowsTheDesignFormulas) {
  for (const Layout& l : AllLayouts()) {
    const int n = l.n(), k = l.k(), m = l.m();
    for (int s = 0; s < n; ++s) {
      for (int r = 0; r < m; ++r) {
        EXPECT_EQ(l.SlotOf(s, k + r), (s + r) % n);
        EXPECT_EQ(l.StripeOfParity((s + r) % n, r), s);
        const ChunkPlace p = l.Place(s, k + r);
        EXPECT_TRUE(p.parity);
        EXPECT_EQ(p.chunk, r);
      }
      for (int p = 0; p < k; ++p) {
        const int slot = (s + m + p) % n;
        EXPECT_EQ(l.SlotOf(s, p), slot);
        EXPECT_EQ(l.StripeOfDataChunk(slot, p), s);
        EXPECT_FALSE(l.Place(s, p).parity);
        EXPECT_EQ(l.Place(s, p).chunk, p);
      }
    }
    // Every slot sends each of its k chunks to a distinct stripe.
    for (int j = 0; j < n; ++j) {
      std::set<int> stripes;
      for (int p = 0; p < k; ++p) stripes.insert(l.StripeOfDataChunk(j, p));
      for (int r = 0; r < m; ++r) stripes.insert(l.StripeOfParity(j, r));
      EXPECT_EQ(static_cast<int>(stripes.size()), n);
    }
  }
}

TEST(Layout, PinsTheRs22Rotation) {
  // The table drawn in layout.h. A change to the rotation breaks every
  // snapshot already encoded, so it must be deliberate.
  const Layout l = *Layout::Create(2, 2);
  const char* expected[4][4] = {{"P0", "P1", "c0", "c1"},
                                {"c1", "P0", "P1", "c0"},
                                {"c0", "c1", "P0", "P1"},
                                {"P1", "c0", "c1", "P0"}};
  for (int s = 0; s < 4; ++s) {
    for (int slot = 0; slot < 4; ++slot) {
      const ChunkPlace p = l.Place(s, l.PositionOf(s, slot));
      EXPECT_EQ(std::string(p.parity ? "P" : "c") + std::to_string(p.chunk),
                expected[s][slot])
          << "stripe " << s << " slot " << slot;
    }
  }
}

TEST(Layout, CutsPayloadsIntoAlignedChunks) {
  const Layout l = *Layout::Create(3, 1);
  EXPECT_EQ(l.ChunkBytes(0), 0u);
  EXPECT_EQ(l.ChunkBytes(1), 64u);
  EXPECT_EQ(l.ChunkBytes(192), 64u);
  EXPECT_EQ(l.ChunkBytes(193), 128u);
  EXPECT_EQ(l.ChunkBytes(1000), 384u);  // ceil(1000 / 3) = 334 -> 384

  EXPECT_EQ(l.DataChunk(1000, 0).offset, 0u);
  EXPECT_EQ(l.DataChunk(1000, 0).length, 384u);
  EXPECT_EQ(l.DataChunk(1000, 1).offset, 384u);
  EXPECT_EQ(l.DataChunk(1000, 2).offset, 768u);
  EXPECT_EQ(l.DataChunk(1000, 2).length, 232u);

  EXPECT_EQ(l.DataChunk(1, 0).length, 1u);
  EXPECT_EQ(l.DataChunk(1, 1).offset, 1u);
  EXPECT_EQ(l.DataChunk(1, 1).length, 0u);
  EXPECT_EQ(l.DataChunk(0, 2).length, 0u);
}

TEST(Layout, ChunksTileEveryPayloadExactly) {
  for (int k : {1, 2, 3, 5, 8, 12}) {
    const Layout l = *Layout::Create(k, 1);
    for (uint64_t len : {0ull, 1ull, 63ull, 64ull, 65ull, 1000ull, 4097ull, 65536ull + 3}) {
      uint64_t next = 0;
      for (int p = 0; p < k; ++p) {
        const Extent e = l.DataChunk(len, p);
        EXPECT_EQ(e.offset, next) << "k=" << k << " len=" << len << " chunk " << p;
        if (e.length > 0 && p + 1 < k && l.DataChunk(len, p + 1).length > 0) {
          EXPECT_EQ(e.length % kChunkAlignBytes, 0u);
        }
        next += e.length;
      }
      EXPECT_EQ(next, len) << "k=" << k << " len=" << len;
    }
  }
}

TEST(Layout, ParityIsAsLongAsTheLongestDataChunkOfItsStripe) {
  const Layout l = *Layout::Create(2, 2);
  const std::vector<uint64_t> lens = {1000, 0, 130, 5};
  for (int s = 0; s < 4; ++s) {
    uint64_t longest = 0;
    for (int p = 0; p < 2; ++p) longest = std::max(longest, l.ChunkLength(lens, s, p));
    EXPECT_EQ(l.ChunkLength(lens, s, 2), longest);
    EXPECT_EQ(l.ChunkLength(lens, s, 3), longest);
  }
  // Stripe 0 takes chunk 0 of slot 2 (130 bytes -> 128) and chunk 1 of slot 3.
  EXPECT_EQ(l.ChunkLength(lens, 0, 0), 128u);
  EXPECT_EQ(l.ChunkLength(lens, 0, 1), 0u);
  EXPECT_EQ(l.ChunkLength(lens, 0, 2), 128u);
}

}  // namespace
}  // namespace ecsnap::ec
