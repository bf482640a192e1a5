// Reed-Solomon codec for one stripe of k data and m parity chunks, over ISA-L.
//
// Positions in a stripe: 0..k-1 are data chunks, k..k+m-1 are parity rows.
// The generator is a Cauchy matrix (gf_gen_cauchy1_matrix), so every k x k
// sub-matrix is invertible and any k surviving chunks decode the rest. For
// k = 1 every parity row is a plain copy of the data chunk (mirroring).
//
//   data:    [ d0 ........ ]          chunks may differ in length; a short
//            [ d1 .... ]              chunk counts as zero-padded, which adds
//            [ d2 ............ ]      nothing to parity
//   parity:  [ p0 ............ ]      each parity row >= the longest data chunk
//            [ p1 ............ ]
//
// Outputs never alias inputs. A Codec is immutable after Create except for
// its internal cache of decode tables, which is guarded: one Codec may be used
// from many threads at once. No call allocates more than a few KiB.
#ifndef ECSNAP_EC_CODEC_H_
#define ECSNAP_EC_CODEC_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"

namespace ecsnap::ec {

using ConstBytes = absl::Span<const uint8_t>;
using MutableBytes = absl::Span<uint8_t>;

class Codec {
 public:
  // 1 <= k, 0 <= m, k + m <= 32; INVALID_ARGUMENT otherwise.
  static absl::StatusOr<std::unique_ptr<Codec>> Create(int k, int m);

  Codec(const Codec&) = delete;
  Codec& operator=(const Codec&) = delete;

  int k() const { return k_; }
  int m() const { return m_; }

  // Writes parity row r of `data` into parity[r], over parity[r]'s whole
  // length. data.size() == k, parity.size() == m, and every parity span must
  // be at least as long as the longest data span (INVALID_ARGUMENT otherwise).
  absl::Status Encode(absl::Span<const ConstBytes> data,
                      absl::Span<const MutableBytes> parity) const;

  // Adds data chunk `position` (0..k-1) into the m parity rows, in any order
  // of positions: folding all k chunks into zeroed parity equals Encode. Each
  // parity span must be at least data.size() long; bytes past it are
  // untouched.
  absl::Status Fold(int position, ConstBytes data,
                    absl::Span<const MutableBytes> parity) const;

  // Adds data chunk `position` into parity row `row` (0..m-1) alone: the
  // fold of a slot that keeps one row of the stripe. Folding all k chunks into
  // a zeroed row equals row `row` of Encode.
  absl::Status FoldRow(int row, int position, ConstBytes data, MutableBytes parity) const;

  // Rebuilds the chunks at positions `targets` into `outputs` (same order and
  // count) from the chunks marked in `present` (bit q set: shards[q] holds
  // position q intact; shards.size() == k + m). Each output is computed over
  // its own length, so it may be exactly the lost chunk's true length.
  // DATA_LOSS naming `stripe` and the lost positions when fewer than k
  // survive; INVALID_ARGUMENT for malformed arguments.
  absl::Status Reconstruct(int stripe, absl::Span<const ConstBytes> shards,
                           uint32_t present, absl::Span<const int> targets,
                           absl::Span<const MutableBytes> outputs) const;

 private:
  Codec(int k, int m, std::vector<uint8_t> matrix, std::vector<uint8_t> tables);

  // dst[r] = sum_i coefficients(r, i) * src[i] for r < dst.size(), where
  // `tables` are ec_init_tables() tables of a dst.size() x src.size() matrix.
  // Sources are zero-extended; each destination is written over its length.
  static void Combine(const uint8_t* tables, absl::Span<const ConstBytes> src,
                      absl::Span<const MutableBytes> dst);

  // Decode tables for rebuilding `target_mask` from the k positions in
  // `survivor_mask`; built once per pattern, then shared.
  std::shared_ptr<const std::vector<uint8_t>> DecodeTables(
      uint32_t survivor_mask, uint32_t target_mask) const;

  const int k_;
  const int m_;
  const std::vector<uint8_t> matrix_;        // (k + m) x k generator
  const std::vector<uint8_t> parity_tables_; // ec_init_tables of its m parity rows

  mutable absl::Mutex mu_;
  mutable absl::flat_hash_map<uint64_t, std::shared_ptr<const std::vector<uint8_t>>>
      decode_cache_ ABSL_GUARDED_BY(mu_);
};

}  // namespace ecsnap::ec

#endif  // ECSNAP_EC_CODEC_H_
