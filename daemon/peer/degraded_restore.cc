// Degraded restore (DESIGN.md §5): a rank of a step being rebuilt, decoded
// on demand from k survivors ahead of the rebuild, so that its trainer need
// not wait for the whole step. Part of Rebuilder; shares its step state
// (rebuild_state.h).
#include <algorithm>
#include <chrono>

#include "absl/strings/str_format.h"
#include "common/format.h"
#include "common/log.h"
#include "daemon/peer/rebuild_state.h"
#include "daemon/peer/rebuilder.h"

namespace ecsnap::daemon {

void Rebuilder::ServeRank(const std::string& job, uint32_t rank, absl::Duration timeout) {
  Current* c = nullptr;
  size_t i = 0;
  {
    absl::MutexLock lock(&mu_);
    auto ready = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return !status_.active() || (current_ != nullptr && current_->job == job);
    };
    if (!mu_.AwaitWithTimeout(absl::Condition(&ready), timeout)) return;
    if (current_ == nullptr || current_->job != job) return;  // nothing being rebuilt for it
    c = current_;
    c->mu.AssertHeld();
    if (c->finalizing) {
      auto gone = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return current_ != c; };
      mu_.AwaitWithTimeout(absl::Condition(&gone), timeout);
      return;
    }
    for (i = 0; i < c->ranks.size() && c->ranks[i].rank != rank; ++i) {
    }
    if (i == c->ranks.size() || c->installed[i]) return;
    if (c->claimed[i]) {
      // Another restore of the same rank is decoding it: wait for that.
      auto done = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        if (current_ != c) return true;  // the rebuild ended: c is gone
        c->mu.AssertHeld();
        return c->installed[i] || !c->claimed[i];
      };
      mu_.AwaitWithTimeout(absl::Condition(&done), timeout);
      return;
    }
    c->claimed[i] = true;
    ++serving_;
  }
  // Decode this rank's bytes alone: its range of the payload, chunk by chunk,
  // from the same ranges of k survivors. No chunk is read whole here, so the
  // rank's tensor checksums are what vouch for the result.
  //
  // The bytes go to an extent of this call's own, not to the rebuild's window
  // for the rank, which the full rebuild keeps writing: once installed, the
  // served rank belongs to the store and nothing else writes it. If the
  // install fails, the extent is freed here; the rebuild's window is freed by
  // the rebuild, at its end.
  const ec::Layout& layout = protector_->layout();
  const Group& group = protector_->group();
  RebuiltRank r = c->ranks[i];
  const PayloadChunks& payload = *c->payload;
  const uint64_t a = payload.RankOffset(i), b = a + r.bytes;
  const auto t0 = std::chrono::steady_clock::now();
  absl::Status st;
  absl::StatusOr<ArenaExtent> own = arena_->AllocateWindow(r.bytes, RebuiltWindowOwner(c->job, r.rank));
  if (own.ok()) {
    r.extent = *own;
  } else {
    st = own.status();
  }
  for (int p = 0; p < layout.k() && st.ok(); ++p) {
    const ec::Extent e = payload.Chunk(p);
    const uint64_t lo = std::max(a, e.offset), hi = std::min(b, e.offset + e.length);
    if (lo >= hi) continue;
    const int s = payload.StripeOf(p);
    const std::vector<int> use = Survivors(*c, s, p, {});
    if (static_cast<int>(use.size()) < layout.k()) {
      st = absl::DataLossError(absl::StrFormat(
          "job %s step %d rank %d cannot be decoded on demand: in group %d (RS %d+%d), %s",
          c->job, c->step, rank, group.id, layout.k(), layout.m(),
          StripeLoss(layout, group, c->view->held, s)));
      break;
    }
    Scratch scratch;
    for (uint64_t at = lo; at < hi && st.ok(); at += kSliceBytes) {
      const uint64_t len = std::min(kSliceBytes, hi - at);
      int failed = -1;
      st = DecodeSlice(*c, s, p, use, at - e.offset, len,
                       arena_->Bytes(r.extent).subspan(at - a, len), nullptr, &failed, &scratch);
    }
  }
  if (st.ok()) st = store_->InstallRebuiltRank(c->job, c->step, c->local_ranks, r);
  if (!st.ok() && own.ok()) arena_->Free(*own);  // not installed: still this call's
  absl::MutexLock lock(&mu_);
  c->mu.AssertHeld();  // alive: the rebuild waits for serving_ to reach 0 before it ends
  if (st.ok()) {
    c->installed[i] = true;
    Log("job %s step %d rank %d served degraded: %s decoded on demand in %.2f s, before the "
        "rebuild ends",
        c->job, c->step, rank, FormatBytes(r.bytes),
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  } else {
    // The full rebuild checks every chunk; the rank waits for it instead.
    Log("job %s step %d rank %d: on-demand decode failed (%s); waiting for the rebuild", c->job,
        c->step, rank, st.message());
  }
  c->claimed[i] = false;
  --serving_;
  if (!st.ok()) {
    auto idle = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return !status_.active(); };
    mu_.AwaitWithTimeout(absl::Condition(&idle), timeout);
  }
}

}  // namespace ecsnap::daemon
