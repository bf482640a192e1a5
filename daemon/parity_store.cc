#include "daemon/parity_store.h"

#include <cstring>
#include <set>

#include "absl/strings/str_format.h"
#include "ec/crc32c.h"

namespace ecsnap::daemon {

struct ParityStore::RowState {
  explicit RowState(Arena* a) : arena(a) {}
  ~RowState() {
    if (extent.bytes > 0) arena->Free(extent);
  }
  Arena* const arena;
  absl::Mutex mu;
  ArenaExtent extent;       // capacity
  uint64_t length = 0;      // the row's bytes so far: the longest chunk folded
  uint32_t done = 0;        // positions folded, CRC checked
  uint32_t active = 0;      // positions being folded
  bool poisoned = false;
  bool complete = false;
  uint32_t crc = 0;         // of the complete row
};

struct ParityStore::StepState {
  std::map<int, std::shared_ptr<RowState>> rows;  // by stripe
  std::map<int, peer::SlotStep> slots;
  std::map<std::pair<int, int>, peer::StripeProtected> heard;
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

absl::Status ParityStore::Grow(RowState& row, uint64_t length) {
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
  std::memset(arena_->base() + row.extent.offset + row.length, 0, length - row.length);
  row.length = length;
  return absl::OkStatus();
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
    auto& st = steps_[{job, step}];
    if (!st) st = std::make_unique<StepState>();
    auto& r = st->rows[stripe];
    if (!r) r = std::make_shared<RowState>(arena_);
    row = r;
  }
  absl::MutexLock lock(&row->mu);
  const uint32_t bit = 1u << position;
  if (row->done & bit) return std::shared_ptr<Fold>();  // already in: never fold twice
  if (row->active & bit) {
    return absl::AbortedError(absl::StrFormat(
        "job %s step %d stripe %d position %d is being pushed already", job, step, stripe,
        position));
  }
  if (row->poisoned) {
    return absl::AbortedError(absl::StrFormat(
        "job %s step %d stripe %d: its parity row was poisoned by a broken push", job, step,
        stripe));
  }
  if (absl::Status st = Grow(*row, length); !st.ok()) return st;
  row->active |= bit;
  auto fold = std::make_shared<Fold>();
  fold->job = job;
  fold->step = step;
  fold->stripe = stripe;
  fold->position = position;
  fold->length = length;
  fold->want_crc = crc;
  fold->row = row;
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
  if (row.poisoned) return absl::AbortedError("the parity row was poisoned");
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
  absl::MutexLock lock(&row.mu);
  fold.ended = true;
  const uint32_t bit = 1u << fold.position;
  row.active &= ~bit;
  if (fold.received != fold.length || fold.crc != fold.want_crc) {
    // The bytes are already folded in: the row can no longer be trusted.
    row.poisoned = true;
    return absl::DataLossError(absl::StrFormat(
        "push of job %s step %d stripe %d position %d: %d of %d bytes, crc32c 0x%08x where "
        "0x%08x was announced; the row is discarded",
        fold.job, fold.step, fold.stripe, fold.position, fold.received, fold.length, fold.crc,
        fold.want_crc));
  }
  row.done |= bit;
  const uint32_t all = (1u << layout_.k()) - 1;
  if (row.done != all || row.poisoned || row.complete) return std::optional<peer::StripeProtected>();
  row.complete = true;
  row.crc = ec::Crc32c(absl::Span<const uint8_t>(arena_->base() + row.extent.offset, row.length));
  peer::StripeProtected notice;
  notice.set_job_id(fold.job);
  notice.set_step(fold.step);
  notice.set_stripe(fold.stripe);
  notice.set_holder_slot(self_);
  notice.set_row(RowOf(fold.stripe));
  notice.set_parity_bytes(row.length);
  notice.set_parity_crc32c(row.crc);
  return std::optional<peer::StripeProtected>(notice);
}

void ParityStore::AbortFold(Fold& fold) {
  RowState& row = *fold.row;
  absl::MutexLock lock(&row.mu);
  if (fold.ended) return;
  fold.ended = true;
  row.active &= ~(1u << fold.position);
  if (fold.received > 0) row.poisoned = true;
}

void ParityStore::RecordSlot(const std::string& job, uint64_t step, const peer::SlotStep& slot) {
  absl::MutexLock lock(&mu_);
  auto& st = steps_[{job, step}];
  if (!st) st = std::make_unique<StepState>();
  st->slots[slot.slot()] = slot;
}

int ParityStore::RecordRow(const peer::StripeProtected& row) {
  absl::MutexLock lock(&mu_);
  auto& st = steps_[{row.job_id(), row.step()}];
  if (!st) st = std::make_unique<StepState>();
  st->heard[{static_cast<int>(row.stripe()), static_cast<int>(row.row())}] = row;
  return static_cast<int>(st->heard.size());
}

absl::StatusOr<ParityStore::PinnedRow> ParityStore::Row(const std::string& job, uint64_t step,
                                                        int stripe) {
  std::shared_ptr<RowState> row;
  {
    absl::MutexLock lock(&mu_);
    auto it = steps_.find({job, step});
    if (it != steps_.end()) {
      auto r = it->second->rows.find(stripe);
      if (r != it->second->rows.end()) row = r->second;
    }
  }
  if (row) {
    absl::MutexLock lock(&row->mu);
    if (row->complete && !row->poisoned) {
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

absl::StatusOr<absl::Span<uint8_t>> ParityStore::ReserveRow(const std::string& job, uint64_t step,
                                                            int stripe, uint64_t length) {
  auto row = std::make_shared<RowState>(arena_);
  absl::Span<uint8_t> bytes;
  {
    absl::MutexLock lock(&row->mu);
    if (absl::Status st = Grow(*row, length); !st.ok()) return st;
    bytes = absl::Span<uint8_t>(arena_->base() + row->extent.offset, length);
  }
  absl::MutexLock lock(&mu_);
  auto& st = steps_[{job, step}];
  if (!st) st = std::make_unique<StepState>();
  st->rows[stripe] = row;
  return bytes;
}

absl::Status ParityStore::CompleteRow(const std::string& job, uint64_t step, int stripe) {
  std::shared_ptr<RowState> row;
  {
    absl::MutexLock lock(&mu_);
    auto it = steps_.find({job, step});
    if (it != steps_.end() && it->second->rows.count(stripe)) row = it->second->rows.at(stripe);
  }
  if (!row) {
    return absl::NotFoundError(
        absl::StrFormat("no reserved parity row for job %s step %d stripe %d", job, step, stripe));
  }
  absl::MutexLock lock(&row->mu);
  row->done = (1u << layout_.k()) - 1;
  row->complete = true;
  row->crc = ec::Crc32c(absl::Span<const uint8_t>(arena_->base() + row->extent.offset, row->length));
  return absl::OkStatus();
}

absl::Status ParityStore::InstallRow(const std::string& job, uint64_t step, int stripe,
                                     absl::Span<const uint8_t> bytes) {
  auto row = ReserveRow(job, step, stripe, bytes.size());
  if (!row.ok()) return row.status();
  if (!bytes.empty()) std::memcpy(row->data(), bytes.data(), bytes.size());
  return CompleteRow(job, step, stripe);
}

std::map<std::pair<std::string, uint64_t>, ParityStore::StepKnowledge> ParityStore::Knowledge()
    const {
  std::map<std::pair<std::string, uint64_t>, StepKnowledge> out;
  absl::MutexLock lock(&mu_);
  for (const auto& [key, st] : steps_) {
    StepKnowledge& k = out[key];
    k.slots = st->slots;
    k.rows = st->heard;
    for (const auto& [stripe, row] : st->rows) {
      absl::MutexLock row_lock(&row->mu);
      if (row->complete && !row->poisoned) k.complete_stripes.push_back(stripe);
    }
  }
  return out;
}

void ParityStore::DropBelow(const std::string& job, uint64_t step) {
  std::vector<std::unique_ptr<StepState>> dropped;  // freed outside the lock
  absl::MutexLock lock(&mu_);
  for (auto it = steps_.begin(); it != steps_.end();) {
    if (it->first.first == job && it->first.second < step) {
      dropped.push_back(std::move(it->second));
      it = steps_.erase(it);
    } else {
      ++it;
    }
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
