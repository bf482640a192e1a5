#include "ec/crc32c.h"

#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace ecsnap::ec {
namespace {

absl::Span<const uint8_t> Bytes(const std::string& s) {
  return absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(s.data()), s.size());
}

TEST(Crc32c, MatchesTheStandardCheckValue) {
  EXPECT_EQ(Crc32c(Bytes("123456789")), 0xE3069283u);
  EXPECT_EQ(Crc32c({}), 0u);
  // RFC 3720 B.4: 32 bytes of zeros.
  std::vector<uint8_t> zeros(32, 0);
  EXPECT_EQ(Crc32c(zeros), 0x8A9136AAu);
}

TEST(Crc32c, ChainedCallsEqualOneCall) {
  std::string text = "The quick brown fox jumps over the lazy dog, twice over.";
  const uint32_t whole = Crc32c(Bytes(text));
  for (size_t cut = 0; cut <= text.size(); ++cut) {
    const uint32_t first = Crc32c(Bytes(text.substr(0, cut)));
    EXPECT_EQ(Crc32c(Bytes(text.substr(cut)), first), whole) << "cut at " << cut;
  }
}

TEST(Crc32c, EverySingleBitFlipChangesTheChecksum) {
  std::vector<uint8_t> data(4096 + 17);
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<uint8_t>(i * 131 + 7);
  const uint32_t clean = Crc32c(data);
  for (size_t bit = 0; bit < data.size() * 8; bit += 97) {
    data[bit / 8] ^= static_cast<uint8_t>(1u << (bit % 8));
    EXPECT_NE(Crc32c(data), clean) << "bit " << bit;
    data[bit / 8] ^= static_cast<uint8_t>(1u << (bit % 8));
  }
  EXPECT_EQ(Crc32c(data), clean);
}

}  // namespace
}  // namespace ecsnap::ec
