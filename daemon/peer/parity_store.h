// ParityStore: the parity rows this slot keeps for its group, and what it
// knows of every group member's steps (DESIGN.md §2, §3).
//
// For each (job, step) this slot holds parity row r of stripe s whenever
// (self - s) mod n = r < m. Data chunks stream in from the group (PushChunk)
// and are folded into the row piece by piece as they arrive, in any order of
// positions. A row is complete when all k data positions are in with
// matching CRC-32C. Each position is folded once: folding the same bytes twice
// would cancel them (GF(2^8) addition is XOR), so a repeated push of the same
// bytes is acknowledged without folding.
//
// A push that breaks off, or whose bytes fail their CRC after being folded,
// leaves bytes in the row that nobody can take out again. The row is then
// discarded (reset to empty, never poisoned for good): the broken push is
// retried by its sender, and the row-lost listener tells the group, so that
// the data slots whose positions were already folded push them again. The
// same happens when a position arrives with other bytes than the ones folded
// under its name (a step written again after a rewind).
//
// Complete rows are recorded in the arena index (RecordKind::kParityRow), so
// a restarted daemon re-adopts every row whose bytes still match their CRC.
//
// A step can be abandoned here: once abandoned, this slot never completes a
// row of it, so it can never become PROTECTED anywhere (TryAbandon).
//
// Rows live in arena extents; a row grows when a longer chunk arrives.
// Thread-safe; folds into one row are serialized, folds into different rows
// run in parallel. Lock order: the store's mutex, then a row's.
#ifndef ECSNAP_DAEMON_PEER_PARITY_STORE_H_
#define ECSNAP_DAEMON_PEER_PARITY_STORE_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "daemon/store/arena.h"
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

  struct AdoptReport {
    uint32_t rows_adopted = 0;
    uint32_t rows_dropped = 0;
    std::vector<std::string> notes;  // one line per dropped row
  };
  // Re-adopts the complete rows a previous daemon recorded in the arena;
  // a row whose bytes fail its CRC (or whose record does not fit the layout)
  // is dropped. Call once, before serving.
  AdoptReport Adopt();

  // Called, outside every lock, with a notice (lost = true) each time a row
  // this slot keeps is discarded after some positions were folded in. Set
  // before serving.
  void SetRowLostListener(std::function<void(const peer::StripeProtected&)> listener);

  // An in-progress fold of one pushed chunk.
  struct Fold;

  // Starts folding data `position` of `stripe` (a stripe whose parity this
  // slot keeps), `length` bytes with CRC-32C `crc`. Returns nullptr (and OK)
  // when those bytes are already folded in. INVALID_ARGUMENT for a stripe or
  // position this slot has no business with; ABORTED when the same position is
  // being pushed right now; FAILED_PRECONDITION for a step retired, rewound
  // or abandoned here; RESOURCE_EXHAUSTED when the arena cannot hold the row.
  absl::StatusOr<std::shared_ptr<Fold>> BeginFold(const std::string& job, uint64_t step,
                                                  int stripe, int position, uint64_t length,
                                                  uint32_t crc);
  // Folds the next `data.size()` bytes (pieces arrive in order). ABORTED when
  // the row was discarded meanwhile (the sender pushes again).
  absl::Status FoldPiece(Fold& fold, absl::Span<const uint8_t> data);
  // Checks length and CRC. On success returns the row's completion notice if
  // this fold completed it (row.parity_bytes > 0 or k chunks of length 0).
  // DATA_LOSS when the bytes do not match: the row is discarded.
  absl::StatusOr<std::optional<peer::StripeProtected>> EndFold(Fold& fold);
  // A push that broke off: if bytes were folded, the row is discarded.
  void AbortFold(Fold& fold);

  // Records a group member's shape of a step (from push headers).
  void RecordSlot(const std::string& job, uint64_t step, const peer::SlotStep& slot);
  // Records that a parity row of a step is complete (or, with row.lost, that
  // it is not any more); returns how many distinct rows of the step are known
  // complete (n * m: fully protected). A row this slot keeps counts only
  // while this slot holds it complete.
  int RecordRow(const peer::StripeProtected& row);

  // The complete parity row this slot keeps for `stripe`, pinned until
  // `pin` is dropped. NOT_FOUND when absent or incomplete.
  struct PinnedRow {
    absl::Span<const uint8_t> bytes;
    uint32_t crc32c = 0;
    std::shared_ptr<void> pin;
  };
  absl::StatusOr<PinnedRow> Row(const std::string& job, uint64_t step, int stripe);

  // Installs a rebuilt parity row (already complete), copying `bytes`.
  absl::Status InstallRow(const std::string& job, uint64_t step, int stripe,
                          absl::Span<const uint8_t> bytes,
                          const std::map<int, peer::SlotStep>& slots = {});
  // For a rebuild that decodes straight into the arena: reserves an
  // incomplete row of `length` bytes for `stripe` and returns its bytes to
  // fill (not zeroed: the decode writes every byte, and a first pass over
  // fresh arena pages costs as much as the decode's); CompleteRow then
  // publishes (and records) it. FAILED_PRECONDITION
  // when the slot holds the row complete, or a push is folding into it.
  //
  // The reservation holds the row's memory for as long as it lives: when
  // retention, a rewind or an abandoned step drops the row meanwhile, the
  // rebuild still writes into memory that is its own (freed when the
  // reservation goes), and CompleteRow refuses it.
  struct ReservedRow {
    absl::Span<uint8_t> bytes;
    std::shared_ptr<const void> hold;
  };
  absl::StatusOr<ReservedRow> ReserveRow(const std::string& job, uint64_t step, int stripe,
                                         uint64_t length);
  // `slots` (the group's shapes of the step, by position) give the CRC of
  // each data position folded in, so that a later push of the same bytes is
  // acknowledged and one of other bytes resets the row.
  // Drops the row this slot keeps for `stripe` if it is not complete (a
  // rebuild that failed after ReserveRow).
  void DiscardIncompleteRow(const std::string& job, uint64_t step, int stripe);
  // With `reserved`, ABORTED when the row it holds is no longer the one
  // kept for (job, step, stripe): it was dropped while being decoded.
  absl::Status CompleteRow(const std::string& job, uint64_t step, int stripe,
                           const std::map<int, peer::SlotStep>& slots,
                           const ReservedRow* reserved = nullptr);

  // What this slot knows of a step: member shapes and complete rows.
  struct StepKnowledge {
    std::map<int, peer::SlotStep> slots;
    std::map<std::pair<int, int>, peer::StripeProtected> rows;  // (stripe, row)
    std::vector<int> complete_stripes;  // stripes whose row this slot holds complete
    bool abandoned = false;
  };
  std::map<std::pair<std::string, uint64_t>, StepKnowledge> Knowledge() const;

  // The completion notice of the row this slot keeps for `stripe`, when it
  // holds it complete (to announce it again: a notice may have died with a
  // restart).
  std::optional<peer::StripeProtected> CompleteNotice(const std::string& job, uint64_t step,
                                                      int stripe);

  // True when some step of `job` is known in which group position `slot`
  // had a payload (it runs ranks of the job).
  bool KnowsPayloadOf(const std::string& job, int slot) const;

  // Stripes whose row this slot keeps for (job, step) but does not hold
  // complete.
  std::vector<int> MissingRows(const std::string& job, uint64_t step) const;

  // Makes sure `step` of `job` can never become PROTECTED anywhere: when
  // some row this slot keeps for it is not complete, seals every row of the
  // step (no fold completes it any more), frees them and returns true. Returns
  // false, changing nothing, when every row this slot keeps is complete.
  bool TryAbandon(const std::string& job, uint64_t step);
  // A peer abandoned the step: drop what this slot has of it.
  void MarkAbandoned(const std::string& job, uint64_t step);
  bool Abandoned(const std::string& job, uint64_t step) const;

  // Frees every row and record of `job` for steps below `step`; later pushes
  // of such steps are refused.
  void DropBelow(const std::string& job, uint64_t step);
  // Frees every row and record of `job` for steps above `step` (a rewind).
  void DropAbove(const std::string& job, uint64_t step);

  uint64_t bytes() const;

 private:
  struct RowState;
  struct StepState;

  // The parity row this slot keeps for `stripe`, or -1.
  int RowOf(int stripe) const;
  // A notice about the row this slot keeps for `stripe`, with no state yet.
  peer::StripeProtected Notice(const std::string& job, uint64_t step, int stripe) const;
  StepState& StepLocked(const std::string& job, uint64_t step) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool RetiredLocked(const std::string& job, uint64_t step) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Makes the row `length` bytes long; the new tail is zeroed (parity of
  // zero-padding, folded into) unless `zero_tail` is false.
  absl::Status Grow(RowState& row, uint64_t length, bool zero_tail = true);
  // Marks the row complete and records it in the arena index.
  void Publish(RowState& row, const std::string& job, uint64_t step, int stripe);
  // Empties a row whose bytes can no longer be trusted; returns the lost
  // notice to send when positions of other pushes were folded in it.
  std::optional<peer::StripeProtected> Reset(RowState& row, const std::string& job, uint64_t step,
                                             int stripe, uint32_t keep_bit);
  // Gives an incomplete row's space back when nothing can touch it: no fold
  // active, never complete (no reader), not reserved by a rebuild.
  void ReleaseIfIdle(RowState& row);
  void NotifyLost(const std::optional<peer::StripeProtected>& notice);
  // The row this slot keeps for `stripe` of (job, step), if any.
  std::shared_ptr<RowState> FindRow(const std::string& job, uint64_t step, int stripe) const
      ABSL_LOCKS_EXCLUDED(mu_);
  // Marks the step abandoned, seals its rows and hands them out (to be
  // freed outside the lock).
  std::map<int, std::shared_ptr<RowState>> AbandonLocked(StepState& st)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  Arena* const arena_;
  const ec::Layout layout_;
  const ec::Codec* const codec_;
  const int self_;
  std::function<void(const peer::StripeProtected&)> lost_listener_;

  mutable absl::Mutex mu_;
  std::map<std::pair<std::string, uint64_t>, std::unique_ptr<StepState>> steps_ ABSL_GUARDED_BY(mu_);
  // Per job: steps below this were retired; pushes of them are refused.
  std::map<std::string, uint64_t> retired_below_ ABSL_GUARDED_BY(mu_);
};

}  // namespace ecsnap::daemon

#endif  // ECSNAP_DAEMON_PEER_PARITY_STORE_H_
