#include "common/prefault.h"

#include <cstdint>
#include <cstring>

#include "gtest/gtest.h"

namespace ecsnap {
namespace {

constexpr size_t kHuge = size_t{2} << 20;

// From 1 MiB up: whole 2 MiB pieces on a 2 MiB boundary, every byte
// writable and zero at first; below it, whole 4 KiB pages.
TEST(MapScratchTest, LargeScratchIsWholeAlignedHugePiecesSmallIsWholePages) {
  for (size_t bytes : {kHuge / 2, kHuge, kHuge + 1, 3 * kHuge + 4096}) {
    Mapping m = MapScratch(bytes);
    ASSERT_NE(m.data(), nullptr) << bytes;
    EXPECT_EQ(reinterpret_cast<uintptr_t>(m.data()) % kHuge, 0u) << bytes;
    EXPECT_EQ(m.size() % kHuge, 0u) << bytes;
    EXPECT_GE(m.size(), bytes);
    EXPECT_LT(m.size(), bytes + kHuge);
    EXPECT_EQ(m.data()[0], 0);
    EXPECT_EQ(m.data()[m.size() - 1], 0);
    std::memset(m.data(), 0xa5, m.size());
    EXPECT_EQ(m.data()[m.size() - 1], 0xa5);
  }
  for (size_t bytes : {size_t{0}, size_t{1}, size_t{4096}, size_t{4097}, kHuge / 2 - 1}) {
    Mapping m = MapScratch(bytes);
    ASSERT_NE(m.data(), nullptr) << bytes;
    EXPECT_EQ(m.size() % 4096, 0u) << bytes;
    EXPECT_GE(m.size(), std::max<size_t>(bytes, 1));
    EXPECT_LT(m.size(), bytes + 4096 + 1);
    std::memset(m.data(), 0x5a, m.size());
  }
}

// Moved, it is unmapped once, by its last owner.
TEST(MapScratchTest, AMovedScratchIsUnmappedOnceByItsLastOwner) {
  Mapping a = MapScratch(kHuge);
  uint8_t* p = a.data();
  Mapping b = std::move(a);
  EXPECT_EQ(a.data(), nullptr);
  EXPECT_EQ(b.data(), p);
  b.data()[0] = 1;
  b.Reset();
  EXPECT_EQ(b.data(), nullptr);
}

}  // namespace
}  // namespace ecsnap
