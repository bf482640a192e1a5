// PayloadChunks: the one mapping of a slot's payload onto the chunks it feeds
// and onto its ranks' windows (DESIGN.md §3).
//
// A slot's payload for a step is its local ranks' windows laid end to end, in
// rank order. Data chunk p (0..k-1) of the payload is the extent
// Layout::DataChunk(payload bytes, p) and sits at position p of stripe
// Layout::StripeOfDataChunk(slot, p). Pushing a chunk, serving it, rebuilding
// it into fresh rank windows and decoding one rank on demand all go through
// this class, so they agree on every byte.
#ifndef ECSNAP_DAEMON_PEER_PAYLOAD_CHUNKS_H_
#define ECSNAP_DAEMON_PEER_PAYLOAD_CHUNKS_H_

#include <cstdint>
#include <utility>
#include <vector>

#include "daemon/store/rank_pieces.h"
#include "ec/layout.h"

namespace ecsnap::daemon {

class PayloadChunks {
 public:
  // The payload of group position `slot` whose ranks have `rank_bytes`.
  PayloadChunks(const ec::Layout& layout, int slot, std::vector<uint64_t> rank_bytes)
      : layout_(&layout), slot_(slot), rank_bytes_(std::move(rank_bytes)) {
    uint64_t at = 0;
    for (uint64_t b : rank_bytes_) {
      rank_offset_.push_back(at);
      at += b;
    }
    bytes_ = at;
  }

  uint64_t bytes() const { return bytes_; }
  size_t ranks() const { return rank_bytes_.size(); }
  // Where rank i's window starts in the payload, and its bytes.
  uint64_t RankOffset(size_t i) const { return rank_offset_[i]; }
  uint64_t RankBytes(size_t i) const { return rank_bytes_[i]; }

  // Data chunk p's extent in the payload (length 0 past the payload's end),
  // and the stripe it belongs to (at position p).
  ec::Extent Chunk(int p) const { return layout_->DataChunk(bytes_, p); }
  int StripeOf(int p) const { return layout_->StripeOfDataChunk(slot_, p); }

  // fn(i, offset_in_rank, offset_in_range, bytes) for each rank window piece
  // of payload bytes [offset, offset + length).
  template <typename Fn>
  void ForEachPiece(uint64_t offset, uint64_t length, Fn&& fn) const {
    ForEachRankPiece(rank_bytes_, offset, length, std::forward<Fn>(fn));
  }

 private:
  const ec::Layout* layout_;
  int slot_;
  std::vector<uint64_t> rank_bytes_;
  std::vector<uint64_t> rank_offset_;
  uint64_t bytes_ = 0;
};

}  // namespace ecsnap::daemon

#endif  // ECSNAP_DAEMON_PEER_PAYLOAD_CHUNKS_H_
