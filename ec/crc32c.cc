#include "ec/crc32c.h"

#include <isa-l/crc.h>

#include <algorithm>
#include <limits>

namespace ecsnap::ec {

uint32_t Crc32c(absl::Span<const uint8_t> bytes, uint32_t crc) {
  // crc32_iscsi neither pre- nor post-inverts and takes an int length.
  constexpr size_t kMaxPiece = size_t{1} << 30;
  uint32_t state = ~crc;
  const uint8_t* p = bytes.data();
  size_t left = bytes.size();
  while (left > 0) {
    const size_t piece = std::min(left, kMaxPiece);
    state = crc32_iscsi(const_cast<uint8_t*>(p), static_cast<int>(piece), state);
    p += piece;
    left -= piece;
  }
  return ~state;
}

}  // namespace ecsnap::ec
