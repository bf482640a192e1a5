// ParityStore: the parity rows this slot keeps for its group, and what it
// knows of every group member's steps (DESIGN.md §3).
//
// For each (job, step) this slot holds parity row r of stripe s whenever
// (self - s) mod n = r < m. Data chunks stream in from the group (PushChunk)
// and are folded into the row piece by piece as they arrive, in any order of
// positions. A row is complete when all k data positions are in with
// matching CRC-32C. Each position is folded once: folding the same bytes twice
// would cancel them (GF(2^8) addition is XOR), so a repeated push is
// acknowledged without folding. A push that breaks off, or whose bytes fail
// their CRC after being folded, poisons the row: it stays incomplete and the
// step is protected by a later push of the next step.
//
// Rows live in arena extents; a row grows when a longer chunk arrives.
// Thread-safe; folds into one row are serialized, folds into different rows
// run in parallel.
#ifndef ECSNAP_DAEMON_PARITY_STORE_H_
#define ECSNAP_DAEMON_PARITY_STORE_H_

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "daemon/arena.h"
#include "ec/codec.h"
#include "ec/layout.h"
#include "proto/peer.pb.h"

namespace ecsnap::daemon {

class ParityStore {
 public:
  // `arena` and `codec` must outlive the store. `self` is this slot's group
  // position.
  ParityStore(Arena* arena, const ec::Layout& layout, const ec::Codec* codec, int self);
  ~ParityStore();

  ParityStore(const ParityStore&) = delete;
  ParityStore& operator=(const ParityStore&) = delete;

  // An in-progress fold of one pushed chunk.
  struct Fold;

  // Starts folding data `position` of `stripe` (a stripe whose parity this
  // slot keeps), `length` bytes with CRC-32C `crc`. Returns nullptr (and OK)
  // when that position is already folded in. INVALID_ARGUMENT for a stripe or
  // position this slot has no business with; ABORTED when the same position is
  // being pushed right now; RESOURCE_EXHAUSTED when the arena cannot hold the row.
  absl::StatusOr<std::shared_ptr<Fold>> BeginFold(const std::string& job, uint64_t step,
                                                  int stripe, int position, uint64_t length,
                                                  uint32_t crc);
  // Folds the next `data.size()` bytes (pieces arrive in order).
  absl::Status FoldPiece(Fold& fold, absl::Span<const uint8_t> data);
  // Checks length and CRC. On success returns the row's completion notice if
  // this fold completed it (row.parity_bytes > 0 or k chunks of length 0).
  absl::StatusOr<std::optional<peer::StripeProtected>> EndFold(Fold& fold);
  // A push that broke off: the row is poisoned.
  void AbortFold(Fold& fold);

  // Records a group member's shape of a step (from push headers).
  void RecordSlot(const std::string& job, uint64_t step, const peer::SlotStep& slot);
  // Records that a parity row of a step is complete; returns how many
  // distinct rows of the step are known complete (n * m: fully protected).
  int RecordRow(const peer::StripeProtected& row);

  // The complete parity row this slot keeps for `stripe`, pinned until
  // `release` is called. NOT_FOUND when absent or incomplete.
  struct PinnedRow {
    absl::Span<const uint8_t> bytes;
    uint32_t crc32c = 0;
    std::shared_ptr<void> pin;
  };
  absl::StatusOr<PinnedRow> Row(const std::string& job, uint64_t step, int stripe);

  // Installs a rebuilt parity row (already complete), copying `bytes`.
  absl::Status InstallRow(const std::string& job, uint64_t step, int stripe,
                          absl::Span<const uint8_t> bytes);
  // For a rebuild that decodes straight into the arena: reserves an
  // incomplete row of `length` bytes for `stripe` and returns its bytes to
  // fill; CompleteRow then publishes it.
  absl::StatusOr<absl::Span<uint8_t>> ReserveRow(const std::string& job, uint64_t step,
                                                 int stripe, uint64_t length);
  absl::Status CompleteRow(const std::string& job, uint64_t step, int stripe);

  // What this slot knows of a step: member shapes and complete rows.
  struct StepKnowledge {
    std::map<int, peer::SlotStep> slots;
    std::map<std::pair<int, int>, peer::StripeProtected> rows;  // (stripe, row)
    std::vector<int> complete_stripes;  // stripes whose row this slot holds complete
  };
  std::map<std::pair<std::string, uint64_t>, StepKnowledge> Knowledge() const;

  // Frees every row and record of `job` for steps below `step`.
  void DropBelow(const std::string& job, uint64_t step);

  uint64_t bytes() const;

 private:
  struct RowState;
  struct StepState;

  // The parity row this slot keeps for `stripe`, or -1.
  int RowOf(int stripe) const;
  absl::Status Grow(RowState& row, uint64_t length) ABSL_EXCLUSIVE_LOCKS_REQUIRED(row.mu);

  Arena* const arena_;
  const ec::Layout layout_;
  const ec::Codec* const codec_;
  const int self_;

  mutable absl::Mutex mu_;
  std::map<std::pair<std::string, uint64_t>, std::unique_ptr<StepState>> steps_ ABSL_GUARDED_BY(mu_);
};

}  // namespace ecsnap::daemon

#endif  // ECSNAP_DAEMON_PARITY_STORE_H_
