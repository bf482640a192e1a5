// Rotated Reed-Solomon layout of one group (DESIGN.md §3).
//
// A group has n = k + m slots, numbered 0..n-1 inside the group. For a step,
// slot j cuts its payload into k chunks of ChunkBytes(len_j, k) bytes (the last
// ones shorter or empty). There are n stripes, one per slot. Every stripe has
// one chunk on every slot:
//
//   stripe s, position q:   q = 0..k-1  data chunk q  of slot (s + m + q) mod n
//                           q = k..n-1  parity row q-k, kept on slot (s + q - k) mod n
//
//   n = 4, k = 2, m = 2     slot 0   slot 1   slot 2   slot 3
//   stripe 0                P0       P1       c0       c1
//   stripe 1                c1       P0       P1       c0
//   stripe 2                c0       c1       P0       P1
//   stripe 3                P1       c0       c1       P0
//
//   cp: data chunk p of that slot's payload (stripe position p)
//   Pr: parity row r, kept by that slot (stripe position k + r)
//
// so any m lost slots lose at most m chunks of any stripe. Chunks of a stripe
// may differ in length; shorter ones count as zero-padded, and the parity of a
// stripe is as long as its longest data chunk.
//
// Layout is a small value type: copy it freely. It does no I/O and no coding.
#ifndef ECSNAP_EC_LAYOUT_H_
#define ECSNAP_EC_LAYOUT_H_

#include <cstdint>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace ecsnap::ec {

// Chunks are cut at multiples of this many bytes, so that every chunk but the
// last of a payload starts and ends on a cache line and an AVX-512 vector.
inline constexpr uint64_t kChunkAlignBytes = 64;

// Largest group: n = k + m slots.
inline constexpr int kMaxGroupSlots = 32;

// A byte range inside a slot's payload.
struct Extent {
  uint64_t offset = 0;
  uint64_t length = 0;
};

// Where a chunk of a stripe lives.
struct ChunkPlace {
  int slot = 0;      // group slot holding it
  int chunk = 0;     // data: the chunk index in that slot's payload; parity: row
  bool parity = false;
};

class Layout {
 public:
  // 1 <= k, 0 <= m, k + m <= kMaxGroupSlots; INVALID_ARGUMENT otherwise.
  static absl::StatusOr<Layout> Create(int k, int m);

  int k() const { return k_; }
  int m() const { return m_; }
  int n() const { return k_ + m_; }
  int stripes() const { return k_ + m_; }

  // Group slot that holds position `q` (0..n-1) of stripe `s`.
  int SlotOf(int stripe, int position) const;
  // Position (0..n-1) that group slot `slot` holds in stripe `s`.
  int PositionOf(int stripe, int slot) const;

  // Where position `q` of stripe `s` lives.
  ChunkPlace Place(int stripe, int position) const;
  // The stripe that data chunk `chunk` (0..k-1) of slot `slot` belongs to; its
  // position there is `chunk`.
  int StripeOfDataChunk(int slot, int chunk) const;
  // The stripe whose parity row `row` (0..m-1) slot `slot` keeps.
  int StripeOfParity(int slot, int row) const;

  // Bytes of every full chunk of a payload of `payload_bytes`:
  // ceil(payload_bytes / k) rounded up to kChunkAlignBytes.
  uint64_t ChunkBytes(uint64_t payload_bytes) const;
  // Extent of data chunk `chunk` inside a payload of `payload_bytes`. Chunks
  // past the payload's end have length 0 (offset clamped to the end).
  Extent DataChunk(uint64_t payload_bytes, int chunk) const;
  // Length of position `q` of stripe `s`, given every group slot's payload
  // length (`payload_bytes.size() == n`). Parity rows are as long as the
  // stripe's longest data chunk.
  uint64_t ChunkLength(absl::Span<const uint64_t> payload_bytes, int stripe,
                       int position) const;

 private:
  Layout(int k, int m) : k_(k), m_(m) {}
  int Mod(int x) const { return ((x % n()) + n()) % n(); }

  int k_;
  int m_;
};

}  // namespace ecsnap::ec

#endif  // ECSNAP_EC_LAYOUT_H_
