// How a slot's payload lays its ranks' windows end to end: the one walk over
// a byte range of it, shared by the step store (which pins the windows) and
// the peer plane's chunk mapping (daemon/peer/payload_chunks.h).
#ifndef ECSNAP_DAEMON_STORE_RANK_PIECES_H_
#define ECSNAP_DAEMON_STORE_RANK_PIECES_H_

#include <algorithm>
#include <cstdint>
#include <vector>

namespace ecsnap::daemon {

// Calls fn(i, offset_in_rank, offset_in_range, bytes) for each piece of
// [offset, offset + length) of windows of `rank_bytes[i]` bytes laid end to
// end, in order. Pieces of zero bytes are skipped.
template <typename Fn>
void ForEachRankPiece(const std::vector<uint64_t>& rank_bytes, uint64_t offset, uint64_t length,
                      Fn&& fn) {
  uint64_t base = 0;
  for (size_t i = 0; i < rank_bytes.size() && length > 0; ++i) {
    const uint64_t end = base + rank_bytes[i];
    if (end > base && offset < end && offset + length > base) {
      const uint64_t lo = std::max(offset, base), hi = std::min(offset + length, end);
      fn(i, lo - base, lo - offset, hi - lo);
    }
    base = end;
  }
}

}  // namespace ecsnap::daemon

#endif  // ECSNAP_DAEMON_STORE_RANK_PIECES_H_
