#include "ec/layout.h"

#include <algorithm>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"

namespace ecsnap::ec {

absl::StatusOr<Layout> Layout::Create(int k, int m) {
  if (k < 1 || m < 0 || k + m > kMaxGroupSlots) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "erasure code k=%d m=%d is not supported: need k >= 1, m >= 0 and "
        "k + m <= %d",
        k, m, kMaxGroupSlots));
  }
  return Layout(k, m);
}

int Layout::SlotOf(int stripe, int position) const {
  return position < k_ ? Mod(stripe + m_ + position) : Mod(stripe + position - k_);
}

int Layout::PositionOf(int stripe, int slot) const {
  const int d = Mod(slot - stripe);
  return d < m_ ? k_ + d : d - m_;
}

ChunkPlace Layout::Place(int stripe, int position) const {
  ChunkPlace place;
  place.slot = SlotOf(stripe, position);
  place.parity = position >= k_;
  place.chunk = place.parity ? position - k_ : position;
  return place;
}

int Layout::StripeOfDataChunk(int slot, int chunk) const {
  return Mod(slot - m_ - chunk);
}

int Layout::StripeOfParity(int slot, int row) const { return Mod(slot - row); }

uint64_t Layout::ChunkBytes(uint64_t payload_bytes) const {
  const uint64_t per_chunk = (payload_bytes + k_ - 1) / k_;
  return (per_chunk + kChunkAlignBytes - 1) / kChunkAlignBytes * kChunkAlignBytes;
}

Extent Layout::DataChunk(uint64_t payload_bytes, int chunk) const {
  const uint64_t size = ChunkBytes(payload_bytes);
  Extent e;
  e.offset = std::min(payload_bytes, size * static_cast<uint64_t>(chunk));
  e.length = std::min(size, payload_bytes - e.offset);
  return e;
}

uint64_t Layout::ChunkLength(absl::Span<const uint64_t> payload_bytes, int stripe,
                             int position) const {
  if (position < k_) {
    return DataChunk(payload_bytes[SlotOf(stripe, position)], position).length;
  }
  uint64_t longest = 0;
  for (int q = 0; q < k_; ++q) {
    longest = std::max(longest, ChunkLength(payload_bytes, stripe, q));
  }
  return longest;
}

}  // namespace ecsnap::ec
