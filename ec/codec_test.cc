#include "ec/codec.h"

#include <isa-l/erasure_code.h>

#include <algorithm>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "ec/crc32c.h"
#include "ec/layout.h"
#include "gtest/gtest.h"

namespace ecsnap::ec {
namespace {

std::vector<uint8_t> RandomBytes(std::mt19937_64& rng, size_t n) {
  std::vector<uint8_t> v(n);
  for (auto& b : v) b = static_cast<uint8_t>(rng());
  return v;
}

// One step of a whole group, encoded stripe by stripe as the daemons would.
struct Group {
  Group(int k, int m, std::vector<uint64_t> lens, uint64_t seed)
      : layout(*Layout::Create(k, m)), codec(*Codec::Create(k, m)), payload_lens(lens) {
    std::mt19937_64 rng(seed);
    for (uint64_t len : lens) payloads.push_back(RandomBytes(rng, len));
    parity.resize(layout.stripes());
    for (int s = 0; s < layout.stripes(); ++s) {
      for (int r = 0; r < m; ++r) {
        parity[s].emplace_back(layout.ChunkLength(payload_lens, s, k + r), 0xEE);
      }
    }
  }

  // Bytes at position q of stripe s, as the slot holding it stores them.
  ConstBytes Chunk(int s, int q) const {
    const ChunkPlace p = layout.Place(s, q);
    if (p.parity) return parity[s][p.chunk];
    const Extent e = layout.DataChunk(payload_lens[p.slot], p.chunk);
    return ConstBytes(payloads[p.slot].data() + e.offset, e.length);
  }

  void EncodeAll() {
    for (int s = 0; s < layout.stripes(); ++s) {
      std::vector<ConstBytes> data;
      std::vector<MutableBytes> out;
      for (int q = 0; q < layout.k(); ++q) data.push_back(Chunk(s, q));
      for (auto& p : parity[s]) out.push_back(absl::MakeSpan(p));
      ASSERT_TRUE(codec->Encode(data, out).ok());
    }
  }

  Layout layout;
  std::unique_ptr<Codec> codec;
  std::vector<uint64_t> payload_lens;
  std::vector<std::vector<uint8_t>> payloads;
  std::vector<std::vector<std::vector<uint8_t>>> parity;  // [stripe][row]
};

// Payload lengths that exercise the edges: empty, one byte, not a multiple of
// 64, exact multiples, and a few KiB.
std::vector<uint64_t> EdgeLengths(int n, uint64_t seed) {
  const uint64_t pool[] = {0, 1, 63, 64, 65, 1000, 4096, 4097, 777, 12345, 129, 8191};
  std::mt19937_64 rng(seed);
  std::vector<uint64_t> lens;
  for (int j = 0; j < n; ++j) lens.push_back(pool[(j + rng()) % (sizeof(pool) / 8)]);
  return lens;
}

// Loses the slots in `lost`, rebuilds every chunk they held from the others
// and compares byte for byte. Returns the first failure's status.
absl::Status LoseAndRebuild(const Group& g, uint32_t lost) {
  const Layout& l = g.layout;
  for (int s = 0; s < l.stripes(); ++s) {
    std::vector<ConstBytes> shards(l.n());
    uint32_t present = 0;
    std::vector<int> targets;
    for (int q = 0; q < l.n(); ++q) {
      if (lost & (1u << l.SlotOf(s, q))) {
        targets.push_back(q);
      } else {
        shards[q] = g.Chunk(s, q);
        present |= 1u << q;
      }
    }
    std::vector<std::vector<uint8_t>> rebuilt;
    std::vector<MutableBytes> outputs;
    for (int q : targets) rebuilt.emplace_back(l.ChunkLength(g.payload_lens, s, q), 0xA5);
    for (auto& r : rebuilt) outputs.push_back(absl::MakeSpan(r));
    absl::Status st = g.codec->Reconstruct(s, shards, present, targets, outputs);
    if (!st.ok()) return st;
    for (size_t i = 0; i < targets.size(); ++i) {
      const ConstBytes want = g.Chunk(s, targets[i]);
      if (want.size() != rebuilt[i].size() ||
          !std::equal(want.begin(), want.end(), rebuilt[i].begin())) {
        return absl::InternalError(absl::StrCat("stripe ", s, " position ", targets[i],
                                                " rebuilt wrong bytes"));
      }
    }
  }
  return absl::OkStatus();
}

struct Shape {
  int n;
  int m;
};

class EveryLossPattern : public ::testing::TestWithParam<Shape> {};

TEST_P(EveryLossPattern, RebuildsEveryLostChunkByteForByte) {
  const int n = GetParam().n, m = GetParam().m;
  for (uint64_t seed : {1u, 2u, 3u}) {
    Group g(n - m, m, EdgeLengths(n, seed), seed);
    g.EncodeAll();
    int patterns = 0;
    for (uint32_t lost = 0; lost < (1u << n); ++lost) {
      if (__builtin_popcount(lost) > m) continue;
      absl::Status st = LoseAndRebuild(g, lost);
      ASSERT_TRUE(st.ok()) << "RS(" << n - m << "," << m << ") lost mask " << lost << ": " << st;
      ++patterns;
    }
    // Every subset of at most m slots, the empty one included.
    int expected = 0;
    for (uint32_t lost = 0; lost < (1u << n); ++lost) expected += __builtin_popcount(lost) <= m;
    EXPECT_EQ(patterns, expected);
  }
}

TEST_P(EveryLossPattern, MorePlusOneLossesAreDataLossNamingTheStripe) {
  const int n = GetParam().n, m = GetParam().m;
  Group g(n - m, m, EdgeLengths(n, 9), 9);
  g.EncodeAll();
  int checked = 0;
  for (uint32_t lost = 0; lost < (1u << n) && checked < 64; ++lost) {
    if (__builtin_popcount(lost) != m + 1) continue;
    absl::Status st = LoseAndRebuild(g, lost);
    EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss) << st;
    EXPECT_NE(st.message().find("stripe 0 cannot be decoded"), std::string::npos) << st;
    ++checked;
  }
  EXPECT_GT(checked, 0);
}

INSTANTIATE_TEST_SUITE_P(Groups, EveryLossPattern,
                         ::testing::Values(Shape{2, 1}, Shape{3, 1}, Shape{4, 2}, Shape{5, 2},
                                           Shape{6, 2}, Shape{8, 3}, Shape{12, 4}),
                         [](const ::testing::TestParamInfo<Shape>& info) {
                           return absl::StrCat("n", info.param.n, "_m", info.param.m);
                         });

TEST(Codec, FoldInAnyOrderEqualsOneShotEncode) {
  std::mt19937_64 rng(42);
  for (auto [k, m] : std::vector<std::pair<int, int>>{{2, 1}, {4, 2}, {6, 2}, {8, 3}, {10, 4}}) {
    auto codec = *Codec::Create(k, m);
    for (int round = 0; round < 20; ++round) {
      std::vector<std::vector<uint8_t>> data;
      size_t longest = 0;
      for (int p = 0; p < k; ++p) {
        data.push_back(RandomBytes(rng, rng() % 3000));
        longest = std::max(longest, data.back().size());
      }
      std::vector<std::vector<uint8_t>> once(m, std::vector<uint8_t>(longest));
      std::vector<std::vector<uint8_t>> folded(m, std::vector<uint8_t>(longest, 0));
      std::vector<ConstBytes> in(data.begin(), data.end());
      std::vector<MutableBytes> out1, out2;
      for (auto& p : once) out1.push_back(absl::MakeSpan(p));
      for (auto& p : folded) out2.push_back(absl::MakeSpan(p));
      ASSERT_TRUE(codec->Encode(in, out1).ok());
      std::vector<int> order(k);
      for (int p = 0; p < k; ++p) order[p] = p;
      std::shuffle(order.begin(), order.end(), rng);
      for (int p : order) ASSERT_TRUE(codec->Fold(p, data[p], out2).ok());
      EXPECT_EQ(once, folded) << "RS(" << k << "," << m << ") round " << round;
    }
  }
}

TEST(Codec, FoldingOneRowEqualsThatRowOfEncode) {
  std::mt19937_64 rng(5);
  auto codec = *Codec::Create(4, 3);
  std::vector<std::vector<uint8_t>> data;
  for (int p = 0; p < 4; ++p) data.push_back(RandomBytes(rng, 100 + 700 * p));
  std::vector<std::vector<uint8_t>> parity(3, std::vector<uint8_t>(2200));
  std::vector<ConstBytes> in(data.begin(), data.end());
  std::vector<MutableBytes> out;
  for (auto& p : parity) out.push_back(absl::MakeSpan(p));
  ASSERT_TRUE(codec->Encode(in, out).ok());
  for (int row = 0; row < 3; ++row) {
    std::vector<uint8_t> folded(2200, 0);
    for (int p : {2, 0, 3, 1}) ASSERT_TRUE(codec->FoldRow(row, p, data[p], absl::MakeSpan(folded)).ok());
    EXPECT_EQ(folded, parity[row]) << "row " << row;
  }
  std::vector<uint8_t> small(10);
  EXPECT_EQ(codec->FoldRow(3, 0, data[0], absl::MakeSpan(small)).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(codec->FoldRow(0, 0, data[0], absl::MakeSpan(small)).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(Codec, MatchesAnIndependentCauchyReference) {
  // parity[r][i] = sum_p inv((k + r) ^ p) * data[p][i] in GF(2^8), computed
  // here byte by byte with ISA-L's scalar gf_mul / gf_inv.
  const int k = 5, m = 3;
  auto codec = *Codec::Create(k, m);
  std::mt19937_64 rng(7);
  std::vector<std::vector<uint8_t>> data;
  for (int p = 0; p < k; ++p) data.push_back(RandomBytes(rng, 300));
  std::vector<std::vector<uint8_t>> parity(m, std::vector<uint8_t>(300));
  std::vector<ConstBytes> in(data.begin(), data.end());
  std::vector<MutableBytes> out;
  for (auto& p : parity) out.push_back(absl::MakeSpan(p));
  ASSERT_TRUE(codec->Encode(in, out).ok());
  for (int r = 0; r < m; ++r) {
    for (int i = 0; i < 300; ++i) {
      uint8_t sum = 0;
      for (int p = 0; p < k; ++p) sum ^= gf_mul(gf_inv((k + r) ^ p), data[p][i]);
      ASSERT_EQ(parity[r][i], sum) << "row " << r << " byte " << i;
    }
  }
}

TEST(Codec, KnownAnswerParityIsPinned) {
  // A change of generator matrix or table layout changes these bytes, and
  // with them every snapshot already protected: it must be deliberate.
  auto codec = *Codec::Create(4, 2);
  std::vector<std::vector<uint8_t>> data(4, std::vector<uint8_t>(8));
  for (int p = 0; p < 4; ++p) {
    for (int i = 0; i < 8; ++i) data[p][i] = static_cast<uint8_t>(p * 16 + i + 1);
  }
  std::vector<std::vector<uint8_t>> parity(2, std::vector<uint8_t>(8));
  std::vector<ConstBytes> in(data.begin(), data.end());
  std::vector<MutableBytes> out = {absl::MakeSpan(parity[0]), absl::MakeSpan(parity[1])};
  ASSERT_TRUE(codec->Encode(in, out).ok());
  auto hex = [](const std::vector<uint8_t>& v) {
    std::string s;
    for (uint8_t b : v) absl::StrAppend(&s, absl::Hex(b, absl::kZeroPad2));
    return s;
  };
  EXPECT_EQ(hex(parity[0]), "c8a88868482808f5");
  EXPECT_EQ(hex(parity[1]), "f292b252721232cf");
}

TEST(Codec, KEqualsOneIsMirroring) {
  auto codec = *Codec::Create(1, 3);
  std::mt19937_64 rng(3);
  std::vector<uint8_t> data = RandomBytes(rng, 1000);
  std::vector<std::vector<uint8_t>> parity(3, std::vector<uint8_t>(1000));
  std::vector<ConstBytes> in = {data};
  std::vector<MutableBytes> out;
  for (auto& p : parity) out.push_back(absl::MakeSpan(p));
  ASSERT_TRUE(codec->Encode(in, out).ok());
  for (const auto& p : parity) EXPECT_EQ(p, data);
}

TEST(Codec, AFlippedBitIsCaughtByTheChunkCrcAndRebuilt) {
  Group g(4, 2, {5000, 4096, 1, 3000, 64, 0}, 11);
  g.EncodeAll();
  const int stripe = 2, victim = 0;  // chunk 0 of slot 4: 64 bytes
  ConstBytes chunk = g.Chunk(stripe, victim);
  ASSERT_EQ(chunk.size(), 64u);
  // Every chunk is stored with the crc taken when it was written.
  std::vector<uint32_t> stored_crc;
  for (int q = 0; q < 6; ++q) stored_crc.push_back(Crc32c(g.Chunk(stripe, q)));
  std::vector<uint8_t> damaged(chunk.begin(), chunk.end());
  damaged[damaged.size() / 2] ^= 0x10;

  // A reader checks every chunk; the damaged one fails and counts as lost.
  std::vector<ConstBytes> shards(6);
  uint32_t present = 0;
  for (int q = 0; q < 6; ++q) {
    shards[q] = q == victim ? ConstBytes(damaged) : g.Chunk(stripe, q);
    if (Crc32c(shards[q]) == stored_crc[q]) present |= 1u << q;
  }
  ASSERT_EQ(present, 0b111110u);
  std::vector<uint8_t> rebuilt(chunk.size());
  std::vector<int> targets = {victim};
  std::vector<MutableBytes> outputs = {absl::MakeSpan(rebuilt)};
  ASSERT_TRUE(g.codec->Reconstruct(stripe, shards, present, targets, outputs).ok());
  EXPECT_EQ(Crc32c(rebuilt), stored_crc[victim]);
  EXPECT_TRUE(std::equal(rebuilt.begin(), rebuilt.end(), chunk.begin()));
}

TEST(Codec, RejectsMalformedArgumentsWithoutCrashing) {
  auto codec = *Codec::Create(3, 2);
  EXPECT_EQ(Codec::Create(0, 1).status().code(), absl::StatusCode::kInvalidArgument);
  std::vector<uint8_t> a(100), b(50), p0(60), p1(100);
  std::vector<ConstBytes> in = {a, b, b};
  std::vector<MutableBytes> out = {absl::MakeSpan(p0), absl::MakeSpan(p1)};
  absl::Status st = codec->Encode(in, out);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("parity row 0 has 60 bytes"), std::string::npos) << st;
  EXPECT_EQ(codec->Encode({a}, out).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(codec->Fold(3, a, out).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(codec->Fold(0, a, out).code(), absl::StatusCode::kInvalidArgument);

  std::vector<ConstBytes> shards(5, ConstBytes(a));
  std::vector<uint8_t> r(100);
  std::vector<MutableBytes> one = {absl::MakeSpan(r)};
  EXPECT_EQ(codec->Reconstruct(0, shards, 0x1f, {7}, one).code(),
            absl::StatusCode::kInvalidArgument);
  std::vector<MutableBytes> two = {absl::MakeSpan(r), absl::MakeSpan(r)};
  EXPECT_EQ(codec->Reconstruct(0, shards, 0x1f, {1, 1}, two).code(),
            absl::StatusCode::kInvalidArgument);
  absl::Status loss = codec->Reconstruct(4, shards, 0b00011, {2}, one);
  EXPECT_EQ(loss.code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(loss.message(),
            "stripe 4 cannot be decoded: positions {2, 3, 4} are lost and only 2 of 5 chunks "
            "survive; RS(3,2) needs 3");
}

}  // namespace
}  // namespace ecsnap::ec
