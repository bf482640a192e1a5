// CRC-32C (Castagnoli, the iSCSI polynomial) over ISA-L's crc32_iscsi.
//
// Crc32c("123456789") == 0xE3069283, the standard check value. Chained calls
// equal one call over the concatenation:
//   Crc32c(ab) == Crc32c(b, Crc32c(a)).
#ifndef ECSNAP_EC_CRC32C_H_
#define ECSNAP_EC_CRC32C_H_

#include <cstdint>

#include "absl/types/span.h"

namespace ecsnap::ec {

// Returns the CRC-32C of `bytes`, continuing from `crc` (the CRC of whatever
// preceded them; 0 for none). Any length, including sizes past 2 GiB.
uint32_t Crc32c(absl::Span<const uint8_t> bytes, uint32_t crc = 0);

}  // namespace ecsnap::ec

#endif  // ECSNAP_EC_CRC32C_H_
