#include "daemon/peer/parity_store.h"

#include <cstring>
#include <set>

#include "absl/strings/str_format.h"
#include "daemon/store/store.pb.h"
#include "ec/crc32c.h"

namespace ecsnap::daemon {

struct ParityStore::RowState {
  explicit RowState(Arena* a) : arena(a) {}
  ~RowState() {
    if (record_id >= 0) arena->RemoveRecord(static_cast<uint32_t>(record_id));
    if (extent.bytes > 0) arena->Free(extent);
  }
  Arena* const arena;
  absl::Mutex mu;
  ArenaExtent extent ABSL_GUARDED_BY(mu);   // capacity
  uint64_t length ABSL_GUARDED_BY(mu) = 0;  // the row's bytes so far: the longest chunk folded
  uint32_t done ABSL_GUARDED_BY(mu) = 0;    // positions folded, CRC checked
  uint32_t active ABSL_GUARDED_BY(mu) = 0;  // positions being folded
  // Bumped by every reset: folds begun under an older generation are void.
  uint64_t generation ABSL_GUARDED_BY(mu) = 0;
  bool complete ABSL_GUARDED_BY(mu) = false;
  bool sealed ABSL_GUARDED_BY(mu) = false;  // the step was abandoned: never completes
  // Reserved by a rebuild, which decodes into the extent without the lock
  // until CompleteRow: no push folds into it, and its space stays.
  bool decoding ABSL_GUARDED_BY(mu) = false;
  // Was complete once: readers may still hold its bytes (PinnedRow pins the
  // row, not a copy), so its extent is never given back before the row dies.
  bool ever_complete ABSL_GUARDED_BY(mu) = false;
  uint32_t crc ABSL_GUARDED_BY(mu) = 0;     // of the complete row
  // What each folded position carried.
  std::vector<uint32_t> pos_crc ABSL_GUARDED_BY(mu);
  std::vector<uint64_t> pos_length ABSL_GUARDED_BY(mu);
  int64_t record_id ABSL_GUARDED_BY(mu) = -1;  // arena index entry once complete
};

struct ParityStore::StepState {
  std::map<int, std::shared_ptr<RowState>> rows;  // by stripe
  std::map<int, peer::SlotStep> slots;
  std::map<std::pair<int, int>, peer::StripeProtected> heard;
  bool abandoned = false;
};

struct ParityStore::Fold {
  std::string job;
  uint64_t step = 0;
  int stripe = 0;
  int position = 0;
  uint64_t length = 0;
  uint32_t want_crc = 0;
  uint64_t received = 0;
  uint32_t crc = 0;
  uint64_t generation = 0;
  bool ended = false;
  std::shared_ptr<RowState> row;
};

ParityStore::ParityStore(Arena* arena, const ec::Layout& layout, const ec::Codec* codec, int self)
    : arena_(arena), layout_(layout), codec_(codec), self_(self) {}

ParityStore::~ParityStore() = default;

int ParityStore::RowOf(int stripe) const {
  const int q = layout_.PositionOf(stripe, self_);
  return q >= layout_.k() ? q - layout_.k() : -1;
}

peer::StripeProtected ParityStore::Notice(const std::string& job, uint64_t step,
                                          int stripe) const {
  peer::StripeProtected notice;
  notice.set_job_id(job);
  notice.set_step(step);
  notice.set_stripe(stripe);
  notice.set_holder_slot(self_);
  notice.set_row(RowOf(stripe));
  return notice;
}

ParityStore::StepState& ParityStore::StepLocked(const std::string& job, uint64_t step) {
  auto& st = steps_[{job, step}];
  if (!st) st = std::make_unique<StepState>();
  return *st;
}

void ParityStore::SetRowLostListener(std::function<void(const peer::StripeProtected&)> listener) {
  absl::MutexLock lock(&mu_);
  lost_listener_ = std::move(listener);
}

void ParityStore::NotifyLost(const std::optional<peer::StripeProtected>& notice) {
  if (!notice.has_value()) return;
  std::function<void(const peer::StripeProtected&)> listener;
  {
    absl::MutexLock lock(&mu_);
    listener = lost_listener_;
  }
  if (listener) listener(*notice);
}

ParityStore::AdoptReport ParityStore::Adopt() {
  AdoptReport report;
  for (const ArenaRecord& rec : arena_->TakeAdoptedRecords(RecordKind::kParityRow)) {
    ParityRecord r;
    auto drop = [&](const std::string& why) {
      arena_->RemoveRecord(rec.id);
      ++report.rows_dropped;
      report.notes.push_back(why);
    };
    if (!r.ParseFromArray(rec.bytes.data(), static_cast<int>(rec.bytes.size()))) {
      drop(absl::StrFormat("index entry %d: unreadable parity record, dropped", rec.id));
      continue;
    }
    const std::string label = absl::StrFormat("job %s step %d stripe %d parity row %d",
                                              r.job_id(), r.step(), r.stripe(), r.row());
    if (r.stripe() >= static_cast<uint32_t>(layout_.stripes()) ||
        RowOf(static_cast<int>(r.stripe())) != static_cast<int>(r.row()) ||
        r.position_crc32c_size() != layout_.k() || r.position_length_size() != layout_.k()) {
      drop(label + ": not a row this slot keeps in RS(" + std::to_string(layout_.k()) + "," +
           std::to_string(layout_.m()) + "), dropped");
      continue;
    }
    const ArenaExtent extent{r.offset(), r.extent_bytes()};
    if (r.length() > extent.bytes || !arena_->Reserve(extent).ok()) {
      drop(label + ": extent outside the arena or overlapping another, dropped");
      continue;
    }
    if (ec::Crc32c(arena_->Bytes(extent).first(r.length())) != r.crc32c()) {
      arena_->Free(extent);
      drop(label + ": its bytes fail their crc32c, dropped");
      continue;
    }
    auto row = std::make_shared<RowState>(arena_);
    {
      absl::MutexLock lock(&row->mu);
      row->extent = extent;
      row->length = r.length();
      row->done = (1u << layout_.k()) - 1;
      row->complete = true;
      row->ever_complete = true;
      row->crc = r.crc32c();
      row->pos_crc.assign(r.position_crc32c().begin(), r.position_crc32c().end());
      row->pos_length.assign(r.position_length().begin(), r.position_length().end());
      row->record_id = rec.id;
    }
    absl::MutexLock lock(&mu_);
    StepLocked(r.job_id(), r.step()).rows[static_cast<int>(r.stripe())] = std::move(row);
    ++report.rows_adopted;
  }
  return report;
}

absl::Status ParityStore::Grow(RowState& row, uint64_t length, bool zero_tail)
    ABSL_NO_THREAD_SAFETY_ANALYSIS {
  // Called with row.mu held.
  if (length <= row.length) return absl::OkStatus();
  if (length > row.extent.bytes || row.extent.bytes == 0) {
    auto extent = arena_->Allocate(length);
    if (!extent.ok()) {
      return absl::ResourceExhaustedError(
          absl::StrCat("parity row: ", extent.status().message()));
    }
    uint8_t* to = arena_->base() + extent->offset;
    if (row.length > 0) std::memcpy(to, arena_->base() + row.extent.offset, row.length);
    if (row.extent.bytes > 0) arena_->Free(row.extent);
    row.extent = *extent;
  }
  // Parity of zero-padding is zero: the new tail starts zeroed.
  if (zero_tail) std::memset(arena_->base() + row.extent.offset + row.length, 0, length - row.length);
  row.length = length;
  return absl::OkStatus();
}

void ParityStore::Publish(RowState& row, const std::string& job, uint64_t step, int stripe)
    ABSL_NO_THREAD_SAFETY_ANALYSIS {
  // Called with row.mu held.
  row.complete = true;
  row.ever_complete = true;
  row.decoding = false;
  row.crc = ec::Crc32c(absl::Span<const uint8_t>(arena_->base() + row.extent.offset, row.length));
  ParityRecord r;
  r.set_job_id(job);
  r.set_step(step);
  r.set_stripe(stripe);
  r.set_row(RowOf(stripe));
  r.set_offset(row.extent.offset);
  r.set_extent_bytes(row.extent.bytes);
  r.set_length(row.length);
  r.set_crc32c(row.crc);
  for (uint32_t c : row.pos_crc) r.add_position_crc32c(c);
  for (uint64_t l : row.pos_length) r.add_position_length(l);
  const std::string bytes = r.SerializeAsString();
  auto id = arena_->AddRecord(RecordKind::kParityRow,
                              absl::Span<const uint8_t>(
                                  reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()));
  // Without a record the row is only lost at a restart, which the group
  // then learns from this slot's lost-row notices.
  if (id.ok()) row.record_id = *id;
}

void ParityStore::ReleaseIfIdle(RowState& row) ABSL_NO_THREAD_SAFETY_ANALYSIS {
  // Called with row.mu held. Nothing folds into it now, no reader can hold
  // it (it was never served) and no rebuild decodes into it: its space goes
  // back to the arena, so that broken pushes cannot pile up reservations.
  // The next fold allocates again (Grow starts from length 0).
  if (row.ever_complete || row.decoding || row.active != 0 || row.extent.bytes == 0) return;
  arena_->Free(row.extent);
  row.extent = ArenaExtent{};
  row.length = 0;
}

std::optional<peer::StripeProtected> ParityStore::Reset(RowState& row, const std::string& job,
                                                        uint64_t step, int stripe,
                                                        uint32_t keep_bit)
    ABSL_NO_THREAD_SAFETY_ANALYSIS {
  // Called with row.mu held.
  const bool others_folded = (row.done & ~keep_bit) != 0 || row.complete;
  if (row.record_id >= 0) arena_->RemoveRecord(static_cast<uint32_t>(row.record_id));
  row.record_id = -1;
  row.length = 0;  // Grow zeroes what is folded next
  row.done = 0;
  row.complete = false;
  row.crc = 0;
  row.pos_crc.assign(layout_.k(), 0);
  row.pos_length.assign(layout_.k(), 0);
  ++row.generation;
  ReleaseIfIdle(row);
  if (!others_folded) return std::nullopt;
  peer::StripeProtected notice = Notice(job, step, stripe);
  notice.set_lost(true);
  return notice;
}

absl::StatusOr<std::shared_ptr<ParityStore::Fold>> ParityStore::BeginFold(
    const std::string& job, uint64_t step, int stripe, int position, uint64_t length,
    uint32_t crc) {
  if (stripe < 0 || stripe >= layout_.stripes() || position < 0 || position >= layout_.k() ||
      RowOf(stripe) < 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "slot %d keeps no parity for stripe %d position %d of RS(%d,%d)", self_, stripe, position,
        layout_.k(), layout_.m()));
  }
  std::shared_ptr<RowState> row;
  {
    absl::MutexLock lock(&mu_);
    auto retired = retired_below_.find(job);
    if (retired != retired_below_.end() && step < retired->second) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "job %s step %d is retired on slot %d (it keeps steps from %d on)", job, step, self_,
          retired->second));
    }
    StepState& st = StepLocked(job, step);
    if (st.abandoned) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "job %s step %d was abandoned by the group (a newer step superseded it before it was "
          "protected); it is not pushed any more",
          job, step));
    }
    auto& r = st.rows[stripe];
    if (!r) r = std::make_shared<RowState>(arena_);
    row = r;
  }
  std::optional<peer::StripeProtected> lost;
  std::shared_ptr<Fold> fold;
  absl::Status grow_failed;
  {
    absl::MutexLock lock(&row->mu);
    if (row->pos_crc.empty()) {
      row->pos_crc.assign(layout_.k(), 0);
      row->pos_length.assign(layout_.k(), 0);
    }
    const uint32_t bit = 1u << position;
    if (row->sealed) {
      return absl::FailedPreconditionError(
          absl::StrFormat("job %s step %d was abandoned on slot %d", job, step, self_));
    }
    if (row->decoding) {
      return absl::AbortedError(absl::StrFormat(
          "job %s step %d stripe %d: slot %d is rebuilding that parity row; push again later",
          job, step, stripe, self_));
    }
    if (row->active & bit) {
      return absl::AbortedError(absl::StrFormat(
          "job %s step %d stripe %d position %d is being pushed already", job, step, stripe,
          position));
    }
    if (row->done & bit) {
      if (row->pos_crc[position] == crc && row->pos_length[position] == length) {
        // Already in: never fold twice.
        return std::shared_ptr<Fold>();
      }
      // Other bytes under the same name: the row holds a step that was
      // rewound and written again. Nothing of it can be kept.
      lost = Reset(*row, job, step, stripe, bit);
    }
    if (absl::Status st = Grow(*row, length); !st.ok()) {
      grow_failed = st;
    } else {
      row->active |= bit;
      fold = std::make_shared<Fold>();
      fold->job = job;
      fold->step = step;
      fold->stripe = stripe;
      fold->position = position;
      fold->length = length;
      fold->want_crc = crc;
      fold->generation = row->generation;
      fold->row = row;
    }
  }
  NotifyLost(lost);  // a reset row is announced lost even when it cannot grow
  if (!grow_failed.ok()) return grow_failed;
  return fold;
}

absl::Status ParityStore::FoldPiece(Fold& fold, absl::Span<const uint8_t> data) {
  if (data.size() > fold.length - fold.received) {
    AbortFold(fold);
    return absl::InvalidArgumentError(absl::StrFormat(
        "push of stripe %d position %d sent more than its %d bytes", fold.stripe, fold.position,
        fold.length));
  }
  RowState& row = *fold.row;
  absl::MutexLock lock(&row.mu);
  if (row.generation != fold.generation || row.sealed) {
    return absl::AbortedError(absl::StrFormat(
        "job %s step %d stripe %d: the parity row was discarded during the push; push again",
        fold.job, fold.step, fold.stripe));
  }
  absl::Status st = codec_->FoldRow(
      RowOf(fold.stripe), fold.position, data,
      absl::Span<uint8_t>(arena_->base() + row.extent.offset + fold.received, data.size()));
  if (!st.ok()) return st;
  fold.crc = ec::Crc32c(data, fold.crc);
  fold.received += data.size();
  return absl::OkStatus();
}

absl::StatusOr<std::optional<peer::StripeProtected>> ParityStore::EndFold(Fold& fold) {
  RowState& row = *fold.row;
  std::optional<peer::StripeProtected> lost;
  absl::Status failed;
  {
    absl::MutexLock lock(&row.mu);
    fold.ended = true;
    const uint32_t bit = 1u << fold.position;
    row.active &= ~bit;
    if (row.generation != fold.generation || row.sealed) {
      return absl::AbortedError(absl::StrFormat(
          "job %s step %d stripe %d: the parity row was discarded during the push; push again",
          fold.job, fold.step, fold.stripe));
    }
    if (fold.received != fold.length || fold.crc != fold.want_crc) {
      // The bytes are already folded in: the row can no longer be trusted.
      lost = Reset(row, fold.job, fold.step, fold.stripe, bit);
      failed = absl::DataLossError(absl::StrFormat(
          "push of job %s step %d stripe %d position %d: %d of %d bytes, crc32c 0x%08x where "
          "0x%08x was announced; the row is discarded and the chunk must be pushed again",
          fold.job, fold.step, fold.stripe, fold.position, fold.received, fold.length, fold.crc,
          fold.want_crc));
    } else {
      row.done |= bit;
      row.pos_crc[fold.position] = fold.want_crc;
      row.pos_length[fold.position] = fold.length;
      const uint32_t all = (1u << layout_.k()) - 1;
      if (row.done != all || row.complete) return std::optional<peer::StripeProtected>();
      Publish(row, fold.job, fold.step, fold.stripe);
      peer::StripeProtected notice = Notice(fold.job, fold.step, fold.stripe);
      notice.set_parity_bytes(row.length);
      notice.set_parity_crc32c(row.crc);
      return std::optional<peer::StripeProtected>(notice);
    }
  }
  NotifyLost(lost);
  return failed;
}

void ParityStore::AbortFold(Fold& fold) {
  RowState& row = *fold.row;
  std::optional<peer::StripeProtected> lost;
  {
    absl::MutexLock lock(&row.mu);
    if (fold.ended) return;
    fold.ended = true;
    const uint32_t bit = 1u << fold.position;
    row.active &= ~bit;
    if (fold.received > 0 && row.generation == fold.generation && !row.sealed) {
      lost = Reset(row, fold.job, fold.step, fold.stripe, bit);
    } else if (row.generation == fold.generation && row.done == 0) {
      // A push that ended before its first byte: release what it reserved.
      ReleaseIfIdle(row);
    }
  }
  NotifyLost(lost);
}

bool ParityStore::RetiredLocked(const std::string& job, uint64_t step) const {
  auto it = retired_below_.find(job);
  return it != retired_below_.end() && step < it->second;
}

void ParityStore::RecordSlot(const std::string& job, uint64_t step, const peer::SlotStep& slot) {
  if (slot.slot() >= static_cast<uint32_t>(layout_.n())) return;
  absl::MutexLock lock(&mu_);
  if (RetiredLocked(job, step)) return;
  StepLocked(job, step).slots[static_cast<int>(slot.slot())] = slot;
}

int ParityStore::RecordRow(const peer::StripeProtected& row) {
  absl::MutexLock lock(&mu_);
  if (RetiredLocked(row.job_id(), row.step())) return 0;
  StepState& st = StepLocked(row.job_id(), row.step());
  const std::pair<int, int> key{static_cast<int>(row.stripe()), static_cast<int>(row.row())};
  if (row.lost()) {
    st.heard.erase(key);
  } else {
    st.heard[key] = row;
  }
  int count = 0;
  for (const auto& [sr, heard] : st.heard) {
    if (static_cast<int>(heard.holder_slot()) == self_) {
      // This slot's own row counts only while it holds it complete.
      auto r = st.rows.find(sr.first);
      if (r == st.rows.end()) continue;
      absl::MutexLock row_lock(&r->second->mu);
      if (!r->second->complete) continue;
    }
    ++count;
  }
  return count;
}

std::shared_ptr<ParityStore::RowState> ParityStore::FindRow(const std::string& job,
                                                             uint64_t step, int stripe) const {
  absl::MutexLock lock(&mu_);
  auto it = steps_.find({job, step});
  if (it == steps_.end()) return nullptr;
  auto r = it->second->rows.find(stripe);
  return r == it->second->rows.end() ? nullptr : r->second;
}

absl::StatusOr<ParityStore::PinnedRow> ParityStore::Row(const std::string& job, uint64_t step,
                                                        int stripe) {
  std::shared_ptr<RowState> row = FindRow(job, step, stripe);
  if (row) {
    absl::MutexLock lock(&row->mu);
    if (row->complete) {
      PinnedRow p;
      p.bytes = absl::Span<const uint8_t>(arena_->base() + row->extent.offset, row->length);
      p.crc32c = row->crc;
      p.pin = row;
      return p;
    }
  }
  return absl::NotFoundError(absl::StrFormat(
      "slot %d holds no complete parity for job %s step %d stripe %d", self_, job, step, stripe));
}

absl::StatusOr<ParityStore::ReservedRow> ParityStore::ReserveRow(const std::string& job,
                                                                 uint64_t step, int stripe,
                                                                 uint64_t length) {
  if (stripe < 0 || stripe >= layout_.stripes() || RowOf(stripe) < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("slot %d keeps no parity row of stripe %d", self_, stripe));
  }
  auto row = std::make_shared<RowState>(arena_);
  absl::Span<uint8_t> bytes;
  {
    absl::MutexLock lock(&row->mu);
    if (absl::Status st = Grow(*row, length, /*zero_tail=*/false); !st.ok()) return st;
    row->decoding = true;
    bytes = absl::Span<uint8_t>(arena_->base() + row->extent.offset, length);
  }
  absl::MutexLock lock(&mu_);
  auto& slot_row = StepLocked(job, step).rows[stripe];
  if (slot_row) {
    absl::MutexLock row_lock(&slot_row->mu);
    if (slot_row->complete || slot_row->active != 0) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "job %s step %d stripe %d: this slot holds (or is folding) that parity row already",
          job, step, stripe));
    }
  }
  slot_row = row;
  return ReservedRow{bytes, row};
}

absl::Status ParityStore::CompleteRow(const std::string& job, uint64_t step, int stripe,
                                      const std::map<int, peer::SlotStep>& slots,
                                      const ReservedRow* reserved) {
  std::shared_ptr<RowState> row = FindRow(job, step, stripe);
  if (!row) {
    return absl::NotFoundError(
        absl::StrFormat("no reserved parity row for job %s step %d stripe %d", job, step, stripe));
  }
  if (reserved != nullptr && reserved->hold.get() != static_cast<const void*>(row.get())) {
    return absl::AbortedError(absl::StrFormat(
        "job %s step %d stripe %d: the parity row was dropped (the step retired, rewound or "
        "abandoned) while it was decoded",
        job, step, stripe));
  }
  absl::MutexLock lock(&row->mu);
  row->done = (1u << layout_.k()) - 1;
  row->pos_crc.assign(layout_.k(), 0);
  row->pos_length.assign(layout_.k(), 0);
  for (int q = 0; q < layout_.k(); ++q) {
    auto it = slots.find(layout_.SlotOf(stripe, q));
    if (it == slots.end() || it->second.chunk_crc32c_size() != layout_.k()) continue;
    row->pos_crc[q] = it->second.chunk_crc32c(q);
    row->pos_length[q] = layout_.DataChunk(it->second.payload_bytes(), q).length;
  }
  Publish(*row, job, step, stripe);
  return absl::OkStatus();
}

void ParityStore::DiscardIncompleteRow(const std::string& job, uint64_t step, int stripe) {
  std::shared_ptr<RowState> dropped;  // freed outside the lock
  absl::MutexLock lock(&mu_);
  auto it = steps_.find({job, step});
  if (it == steps_.end()) return;
  auto r = it->second->rows.find(stripe);
  if (r == it->second->rows.end()) return;
  {
    absl::MutexLock row_lock(&r->second->mu);
    if (r->second->complete || r->second->active != 0 || r->second->done != 0) return;
  }
  dropped = std::move(r->second);
  it->second->rows.erase(r);
}

absl::Status ParityStore::InstallRow(const std::string& job, uint64_t step, int stripe,
                                     absl::Span<const uint8_t> bytes,
                                     const std::map<int, peer::SlotStep>& slots) {
  auto row = ReserveRow(job, step, stripe, bytes.size());
  if (!row.ok()) return row.status();
  if (!bytes.empty()) std::memcpy(row->bytes.data(), bytes.data(), bytes.size());
  return CompleteRow(job, step, stripe, slots, &*row);
}

std::map<std::pair<std::string, uint64_t>, ParityStore::StepKnowledge> ParityStore::Knowledge()
    const {
  std::map<std::pair<std::string, uint64_t>, StepKnowledge> out;
  absl::MutexLock lock(&mu_);
  for (const auto& [key, st] : steps_) {
    StepKnowledge& k = out[key];
    k.slots = st->slots;
    k.rows = st->heard;
    k.abandoned = st->abandoned;
    for (const auto& [stripe, row] : st->rows) {
      absl::MutexLock row_lock(&row->mu);
      if (row->complete) k.complete_stripes.push_back(stripe);
    }
  }
  return out;
}

std::optional<peer::StripeProtected> ParityStore::CompleteNotice(const std::string& job,
                                                                uint64_t step, int stripe) {
  auto row = Row(job, step, stripe);
  if (!row.ok()) return std::nullopt;
  peer::StripeProtected notice = Notice(job, step, stripe);
  notice.set_parity_bytes(row->bytes.size());
  notice.set_parity_crc32c(row->crc32c);
  return notice;
}

bool ParityStore::KnowsPayloadOf(const std::string& job, int slot) const {
  absl::MutexLock lock(&mu_);
  for (auto it = steps_.lower_bound({job, 0}); it != steps_.end() && it->first.first == job; ++it) {
    auto s = it->second->slots.find(slot);
    if (s != it->second->slots.end() && s->second.payload_bytes() > 0) return true;
  }
  return false;
}

std::vector<int> ParityStore::MissingRows(const std::string& job, uint64_t step) const {
  std::vector<int> missing;
  absl::MutexLock lock(&mu_);
  auto it = steps_.find({job, step});
  for (int s = 0; s < layout_.stripes(); ++s) {
    if (RowOf(s) < 0) continue;
    bool complete = false;
    if (it != steps_.end()) {
      auto r = it->second->rows.find(s);
      if (r != it->second->rows.end()) {
        absl::MutexLock row_lock(&r->second->mu);
        complete = r->second->complete;
      }
    }
    if (!complete) missing.push_back(s);
  }
  return missing;
}

bool ParityStore::TryAbandon(const std::string& job, uint64_t step) {
  std::map<int, std::shared_ptr<RowState>> dropped;  // freed outside the lock
  absl::MutexLock lock(&mu_);
  StepState& st = StepLocked(job, step);
  if (st.abandoned) return true;
  // Seal the first incomplete row this slot keeps: from then on no fold can
  // complete it, so the step can never be protected, whatever happens next.
  bool sealed = false;
  for (int s = 0; s < layout_.stripes() && !sealed; ++s) {
    if (RowOf(s) < 0) continue;
    auto& r = st.rows[s];
    if (!r) r = std::make_shared<RowState>(arena_);
    absl::MutexLock row_lock(&r->mu);
    if (!r->complete) r->sealed = sealed = true;
  }
  if (!sealed) return false;
  dropped = AbandonLocked(st);
  return true;
}

void ParityStore::MarkAbandoned(const std::string& job, uint64_t step) {
  std::map<int, std::shared_ptr<RowState>> dropped;  // freed outside the lock
  absl::MutexLock lock(&mu_);
  dropped = AbandonLocked(StepLocked(job, step));
}

std::map<int, std::shared_ptr<ParityStore::RowState>> ParityStore::AbandonLocked(StepState& st) {
  st.abandoned = true;
  st.heard.clear();
  st.slots.clear();
  for (auto& [s, r] : st.rows) {
    absl::MutexLock row_lock(&r->mu);
    r->sealed = true;
  }
  std::map<int, std::shared_ptr<RowState>> out;
  out.swap(st.rows);
  return out;
}

bool ParityStore::Abandoned(const std::string& job, uint64_t step) const {
  absl::MutexLock lock(&mu_);
  auto it = steps_.find({job, step});
  return it != steps_.end() && it->second->abandoned;
}

void ParityStore::DropBelow(const std::string& job, uint64_t step) {
  std::vector<std::unique_ptr<StepState>> dropped;  // freed outside the lock
  absl::MutexLock lock(&mu_);
  uint64_t& below = retired_below_[job];
  below = std::max(below, step);
  for (auto it = steps_.lower_bound({job, 0}); it != steps_.end() && it->first.first == job &&
                                               it->first.second < step;) {
    dropped.push_back(std::move(it->second));
    it = steps_.erase(it);
  }
}

void ParityStore::DropAbove(const std::string& job, uint64_t step) {
  std::vector<std::unique_ptr<StepState>> dropped;
  absl::MutexLock lock(&mu_);
  for (auto it = steps_.upper_bound({job, step});
       it != steps_.end() && it->first.first == job;) {
    // A fold still in flight on a dropped row must not complete (and
    // announce) it: the row belongs to a step the job no longer has.
    for (auto& [s, r] : it->second->rows) {
      absl::MutexLock row_lock(&r->mu);
      r->sealed = true;
    }
    dropped.push_back(std::move(it->second));
    it = steps_.erase(it);
  }
}

uint64_t ParityStore::bytes() const {
  uint64_t total = 0;
  absl::MutexLock lock(&mu_);
  for (const auto& [key, st] : steps_) {
    for (const auto& [stripe, row] : st->rows) {
      absl::MutexLock row_lock(&row->mu);
      total += row->extent.bytes;
    }
  }
  return total;
}

}  // namespace ecsnap::daemon
