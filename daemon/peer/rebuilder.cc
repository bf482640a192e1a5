#include "daemon/peer/rebuilder.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <thread>

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/format.h"
#include "common/grpc_status.h"
#include "common/log.h"
#include "common/metrics.h"
#include "common/prefault.h"
#include "daemon/peer/payload_chunks.h"
#include "daemon/peer/rebuild_plan.h"
#include "daemon/peer/rebuild_state.h"
#include "daemon/store/store.pb.h"
#include "ec/crc32c.h"

namespace ecsnap::daemon {
namespace {

// Passes over the group's inventories when steps are retired under a rebuild.
constexpr int kMaxPasses = 3;
// Slice buffers of all stripes being rebuilt at once.
constexpr uint64_t kMaxInFlightBytes = uint64_t{512} << 20;

// Reads of a survivor that no other can stand in for: how many before it
// counts as lost, and the pause before the n-th try again (n times this).
constexpr int kTransientTries = 4;
constexpr absl::Duration kTransientPause = absl::Milliseconds(500);

// The peer a read of position `q` of stripe `s` goes to (the first that
// holds it), if any.
std::optional<int> HolderOf(const Holders& held, int s, int q) {
  auto it = held.find({s, q});
  if (it == held.end() || it->second.empty()) return std::nullopt;
  return *it->second.begin();
}

// A failure that says nothing about the survivor's bytes: a timeout, a
// broken or refused connection, a holder too busy to take the read.
bool IsTransient(const absl::Status& st) {
  return st.code() == absl::StatusCode::kUnavailable ||
         st.code() == absl::StatusCode::kDeadlineExceeded ||
         st.code() == absl::StatusCode::kResourceExhausted;
}

}  // namespace

Rebuilder::Rebuilder(Arena* arena, StepStore* store, ParityStore* parity, Protector* protector,
                     const ec::Codec* codec, Executor* fetches, Options options)
    : arena_(arena),
      store_(store),
      parity_(parity),
      protector_(protector),
      codec_(codec),
      fetches_(fetches),
      options_(options) {
  // Active until the first pass (run at start) ends: a restore that comes
  // first waits for it instead of finding nothing.
  absl::MutexLock lock(&mu_);
  status_.set_active(true);
}

admin::RebuildStatus Rebuilder::status() const {
  absl::MutexLock lock(&mu_);
  return status_;
}

void Rebuilder::WaitIdle(absl::Duration timeout) const {
  absl::MutexLock lock(&mu_);
  auto idle = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return !status_.active(); };
  mu_.AwaitWithTimeout(absl::Condition(&idle), timeout);
}

absl::Status Rebuilder::Run(const std::string& job_filter) {
  {
    absl::MutexLock lock(&mu_);
    if (running_) {
      // Two passes at once would decode the same step into two sets of
      // windows and race to install them: the second caller is told instead.
      std::string what = "looking at the group's inventories";
      if (current_ != nullptr) {
        const uint64_t total = status_.bytes_total();
        what = absl::StrFormat("job %s step %d, %d%% done", status_.job_id(), status_.step(),
                               total == 0 ? 0 : status_.bytes_done() * 100 / total);
      }
      return absl::FailedPreconditionError(absl::StrFormat(
          "a rebuild is already running (%s); see ecsnapctl status", what));
    }
    running_ = true;
    status_.set_active(true);
    status_.set_last_error("");
    throttle_start_ = absl::Now();
    throttled_bytes_ = 0;
  }
  absl::Status result;
  for (int pass = 1; pass <= kMaxPasses && !stopping_; ++pass) {
    bool again = false;
    result = Pass(job_filter, /*final_pass=*/pass == kMaxPasses, &again);
    if (!again) break;
    Log("rebuild: the group retired a step while it was being rebuilt; looking again (pass %d)",
        pass + 1);
  }
  absl::MutexLock lock(&mu_);
  running_ = false;
  status_.set_active(false);
  if (!result.ok()) status_.set_last_error(std::string(result.message()));
  return result;
}

absl::Status Rebuilder::Pass(const std::string& job_filter, bool final_pass, bool* again) {
  {
    absl::MutexLock lock(&mu_);
    unanswering_.clear();
  }
  const Group& group = protector_->group();
  const ec::Layout& layout = protector_->layout();
  const int n = layout.n(), k = layout.k(), m = layout.m(), self = group.self;
  // Inventories of every peer that answers.
  GroupView view(layout);
  for (int i = 0; i < n; ++i) {
    if (i == self) continue;
    grpc::ClientContext ctx;
    ctx.set_deadline(protector_->Deadline(0));
    ctx.set_wait_for_ready(true);
    auto watch = protector_->watchdog()->Start(&ctx);
    peer::InventoryRequest req;
    req.set_job_id(job_filter);
    peer::InventoryResponse resp;
    if (!protector_->Stub(i)->Inventory(&ctx, req, &resp).ok()) continue;
    if (const int bad = view.Merge(i, resp); bad > 0) {
      Log("rebuild: the inventory of group position %d (slot %d) has %d entries naming a slot, "
          "stripe, row or chunk outside RS %d+%d; ignored them",
          i, group.slots[i], bad, k, m);
    }
  }
  view.AddKnownEmptyChunks();
  // Rows announced while this daemon was away: steps it re-adopted may be
  // protected already. A row the group heard from this slot counts only if
  // this slot still holds it; one it lost (a restart before the row was
  // recorded, a row failing its checksum) is announced lost, so the group
  // knows the step is not protected until the row is pushed again.
  std::set<StepKey> have;
  for (const auto& s : store_->CompleteSteps()) have.insert(s);
  for (const auto& [key, v] : view.steps()) {
    const std::vector<int> missing = parity_->MissingRows(key.first, key.second);
    for (const auto& [slot, s] : v.slots) parity_->RecordSlot(key.first, key.second, s);
    for (const auto& [sr, row] : v.rows) {
      // Only for a step this slot holds the data of (restarted in place):
      // a replaced slot rebuilds its rows with the step.
      const bool mine = static_cast<int>(row.holder_slot()) == self && have.count(key);
      if (mine && std::find(missing.begin(), missing.end(), sr.first) != missing.end()) {
        peer::StripeProtected lost = row;
        lost.set_lost(true);
        Log("job %s step %d: parity row %d of stripe %d, which the group heard complete, is "
            "not here any more; announcing it lost",
            key.first, key.second, row.row(), row.stripe());
        protector_->Announce(lost);
      } else if (have.count(key)) {
        protector_->OnRowComplete(row);
      }
    }
  }
  // Re-adopted steps not protected yet: push them (holders acknowledge what
  // they folded already).
  for (const auto& [job, step] : have) protector_->OnLocal(job, step);
  // Whose each job is, as the group knows it (what the peers keep of this
  // slot's newest payload of the job), whether or not a step needs
  // rebuilding: a uid that attached first to a node that came back empty
  // does not keep the job by writing a newer step before this pass.
  std::map<std::string, uint32_t> group_owner;
  for (const auto& [key, v] : view.steps()) {  // oldest first: the newest step's owner stays
    auto mine = v.slots.find(self);
    if (mine == v.slots.end()) continue;
    SlotManifest sm;
    const std::string& bytes = mine->second.manifests();
    if (sm.ParseFromString(bytes) && sm.has_owner_uid() &&
        ec::Crc32c(absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(bytes.data()),
                                             bytes.size())) == mine->second.manifests_crc32c()) {
      group_owner[key.first] = sm.owner_uid();
    }
  }
  for (const auto& [job, uid] : group_owner) store_->SetOwnerFromGroup(job, uid);

  absl::Status first_error;
  for (const JobPlan& plan : PlanRebuild(layout, group, view, have)) {
    const std::string& job = plan.job;
    if (plan.candidates.empty()) {
      // Nothing newer to rebuild: the job is held here, so an old DATA_LOSS
      // no longer describes it.
      store_->ClearUnrecoverable(job);
      continue;
    }
    absl::Status outcome = absl::NotFoundError("no step");
    absl::Status newest_failure;  // of the newest candidate tried
    for (const RebuildCandidate& cand : plan.candidates) {
      if (!cand.decodable.ok()) {
        outcome = cand.decodable;
        continue;  // an older step may still decode
      }
      outcome = RebuildStep(job, cand.step, view.steps().at({job, cand.step}));
      if (outcome.ok()) break;
      Log("job %s step %d: rebuild failed: %s", job, cand.step, outcome.message());
      if (outcome.code() == absl::StatusCode::kAborted && !final_pass) {
        *again = true;  // a newer step is protected now: start over
        break;
      }
      if (outcome.code() == absl::StatusCode::kFailedPrecondition && !newest_failure.ok()) {
        // The store holds a newer step whole (every rank served on demand
        // before its rebuild failed): no older step is wanted. What is
        // reported is why the newer one's rebuild failed, as not data loss.
        outcome = absl::FailedPreconditionError(absl::StrFormat(
            "%s (its ranks are all restorable here; its parity rows are not rebuilt)",
            newest_failure.message()));
        break;
      }
      if (newest_failure.ok()) newest_failure = outcome;
    }
    if (*again) break;
    if (outcome.ok()) store_->ClearUnrecoverable(job);
    if (!outcome.ok()) {
      Log("%s", outcome.message());
      if (outcome.code() == absl::StatusCode::kDataLoss && !stopping_) {
        store_->SetUnrecoverable(job, outcome);
      }
      if (first_error.ok()) first_error = outcome;
    }
  }
  return first_error;
}

absl::Status Rebuilder::DecodeSlice(const Current& c, int s, int target,
                                    const std::vector<int>& use, uint64_t at, uint64_t read,
                                    absl::Span<uint8_t> out, std::vector<uint32_t>* crcs,
                                    int* failed, Scratch* scratch) {
  const ec::Layout& layout = protector_->layout();
  const int n = layout.n();
  // Buffers live across the slices of a stripe, each as large as its
  // survivor's slice (none for an empty one), populated once (MapScratch):
  // faulting fresh pages in one at a time costs more than the decode.
  std::vector<Mapping>& bufs = scratch->bufs;
  if (bufs.size() < use.size()) bufs.resize(use.size());
  for (size_t i = 0; i < use.size(); ++i) {
    const uint64_t len = layout.ChunkLength(c.lens, s, use[i]);
    const uint64_t want = std::min(len - std::min(at, len), read);
    if (want == 0 || bufs[i].size() >= want) continue;
    bufs[i] = MapScratch(want);
    if (bufs[i].data() == nullptr) {
      return absl::ResourceExhaustedError(absl::StrFormat(
          "no memory for a %s survivor buffer of stripe %d", FormatBytes(want), s));
    }
  }
  // Made here, not in the tasks: each task then touches its own entry.
  std::vector<Scratch::Stream*> streams;
  for (int q : use) streams.push_back(&scratch->streams[q]);
  std::vector<size_t> sizes(use.size(), 0);
  std::vector<absl::Status> got(use.size());
  std::vector<std::function<void()>> fetches;
  for (size_t i = 0; i < use.size(); ++i) {
    fetches.push_back([&, i] {
      const int q = use[i];
      const std::optional<int> found = HolderOf(c.view->held, s, q);
      if (!found) {
        got[i] = absl::DataLossError(absl::StrFormat("no peer holds position %d", q));
        return;
      }
      const int holder = *found;
      const uint64_t len = layout.ChunkLength(c.lens, s, q);
      const uint64_t from = std::min(at, len);
      const uint64_t want = std::min(len - from, read);
      if (want > 0 && holder == kKnownEmpty) {
        got[i] = absl::DataLossError(absl::StrFormat("position %d is not empty", q));
        return;
      }
      sizes[i] = want;
      if (want == 0) return;
      got[i] = ReadSurvivor(c, s, q, holder, from, absl::Span<uint8_t>(bufs[i].data(), want),
                            streams[i]);
      if (crcs != nullptr) {
        (*crcs)[q] =
            ec::Crc32c(absl::Span<const uint8_t>(bufs[i].data(), want), (*crcs)[q]);
      }
    });
  }
  fetches_->RunAll(std::move(fetches));
  for (size_t i = 0; i < use.size(); ++i) {
    if (!got[i].ok()) {
      // The peer retired the step (a newer one is protected): not a lost chunk.
      if (got[i].code() == absl::StatusCode::kNotFound) c.vanished = true;
      *failed = use[i];
      return got[i];
    }
  }
  std::vector<ec::ConstBytes> shards(n);
  uint32_t present = 0;
  for (size_t i = 0; i < use.size(); ++i) {
    shards[use[i]] = absl::Span<const uint8_t>(bufs[i].data(), sizes[i]);
    present |= 1u << use[i];
  }
  std::vector<ec::MutableBytes> outs = {out};
  std::vector<int> targets = {target};
  return codec_->Reconstruct(s, shards, present, targets, outs);
}

absl::Status Rebuilder::ReadSurvivor(const Current& c, int s, int q, int holder, uint64_t from,
                                     absl::Span<uint8_t> into, Scratch::Stream* stream) {
  if (stream->reader != nullptr &&
      (stream->at != from || stream->reader->remaining() < into.size())) {
    stream->reader.reset();
  }
  int fresh_tries = 0;
  while (true) {
    const bool fresh = stream->reader == nullptr;
    fresh_tries += fresh ? 1 : 0;
    if (fresh) {
      // The rest of the chunk from here: later slices read on from it.
      peer::GetChunkRequest req;
      req.mutable_id()->set_job_id(c.job);
      req.mutable_id()->set_step(c.step);
      req.mutable_id()->set_stripe(s);
      req.mutable_id()->set_position(q);
      req.set_offset(from);
      auto reader = protector_->transport()->OpenRead(holder, req);
      // A holder busy with other transfers (its bulk port's queue or
      // tickets full) is asked once more before the survivor counts as lost.
      if (!reader.ok() && fresh_tries < 2 &&
          (reader.status().code() == absl::StatusCode::kResourceExhausted ||
           reader.status().code() == absl::StatusCode::kUnavailable)) {
        absl::SleepFor(absl::Milliseconds(100));
        continue;
      }
      if (!reader.ok()) return reader.status();
      if ((*reader)->remaining() < into.size()) {
        return absl::DataLossError(absl::StrFormat(
            "job %s step %d stripe %d position %d: the holder has %d bytes from %d, not %d",
            c.job, c.step, s, q, (*reader)->remaining(), from, into.size()));
      }
      stream->reader = std::move(*reader);
      stream->at = from;
    }
    absl::Status st = stream->reader->Read(into);
    if (st.ok()) {
      stream->at += into.size();
      protector_->fetched_bytes(holder).Add(into.size());
      return st;
    }
    stream->reader.reset();
    // A stream left idle (a capped rebuild between slices) is cut by its
    // holder after the peer timeout: only a fresh stream's failure counts.
    if (fresh) return st;
  }
}

void Rebuilder::WritePayload(Current& c, uint64_t offset, const uint8_t* data, uint64_t bytes) {
  c.payload->ForEachPiece(offset, bytes, [&](size_t i, uint64_t at, uint64_t from, uint64_t len) {
    {
      absl::MutexLock lock(&mu_);
      c.mu.AssertHeld();
      // Served on demand from an extent of its own: this window is never
      // installed, so it need not be filled.
      if (c.installed[i]) return;
    }
    std::memcpy(arena_->base() + c.ranks[i].extent.offset + at, data + from, len);
  });
}

std::vector<int> Rebuilder::Survivors(const Current& c, int s, int target,
                                      const std::set<int>& bad) const {
  const ec::Layout& layout = protector_->layout();
  std::vector<int> use;  // the first k intact positions, data first
  for (int q = 0; q < layout.n() && static_cast<int>(use.size()) < layout.k(); ++q) {
    auto it = c.view->held.find({s, q});
    if (q == target || bad.count(q) || it == c.view->held.end() || it->second.empty()) continue;
    use.push_back(q);
  }
  return use;
}

absl::Status Rebuilder::RebuildStep(const std::string& job, uint64_t step, const StepView& v) {
  const Group& group = protector_->group();
  const ec::Layout& layout = protector_->layout();
  const int n = layout.n(), k = layout.k(), self = group.self;
  const auto t0 = std::chrono::steady_clock::now();

  auto mine = v.slots.find(self);
  if (mine == v.slots.end() || static_cast<int>(v.slots.size()) != n) {
    return absl::DataLossError(absl::StrFormat(
        "job %s step %d: the peers do not know every slot's shape", job, step));
  }
  const peer::SlotStep& me = mine->second;
  SlotManifest sm;
  if (!sm.ParseFromString(me.manifests()) ||
      ec::Crc32c(absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(me.manifests().data()),
                                           me.manifests().size())) != me.manifests_crc32c()) {
    return absl::DataLossError("this slot's manifests, as the peers keep them, are damaged");
  }
  // Whose job this is on this node, as the group knows it: before any rank is
  // served, so that a uid that attached first since the node came back empty
  // is refused its restore.
  if (sm.has_owner_uid()) store_->SetOwnerFromGroup(job, sm.owner_uid());
  Current c(mu_);
  c.job = job;
  c.step = step;
  c.view = &v;
  c.lens.resize(n);
  for (const auto& [pos, slot] : v.slots) c.lens[pos] = slot.payload_bytes();
  c.local_ranks.assign(sm.local_ranks().begin(), sm.local_ranks().end());
  uint64_t manifest_bytes = 0;
  for (const auto& r : sm.ranks()) manifest_bytes += r.bytes();
  if (manifest_bytes != c.lens[self]) {
    return absl::DataLossError(absl::StrFormat(
        "job %s step %d: this slot's manifests add up to %d bytes but its payload has %d", job,
        step, manifest_bytes, c.lens[self]));
  }
  // Fresh windows for the slot's ranks, laid end to end as the payload.
  //
  // Ownership: the rebuild owns every window in c.ranks from Allocate until
  // a successful InstallRebuilt hands it to the store (c.handed_off), and
  // finish() frees every window it still owns, once, on every path. A rank
  // served on demand lives in an extent ServeRank allocated (and frees if its
  // install fails); its window here is never handed off, so finish() frees it.
  std::vector<uint64_t> rank_bytes;
  for (const auto& r : sm.ranks()) {
    auto extent = arena_->AllocateWindow(r.bytes(), RebuiltWindowOwner(job, r.rank()));
    if (!extent.ok()) {
      for (const RebuiltRank& done : c.ranks) arena_->Free(done.extent);
      return absl::ResourceExhaustedError(
          absl::StrCat("rebuilding job ", job, " step ", step, ": ", extent.status().message()));
    }
    c.ranks.push_back({r.rank(), *extent, r.bytes(), r.manifest()});
    rank_bytes.push_back(r.bytes());
  }
  c.payload = std::make_unique<PayloadChunks>(layout, self, std::move(rank_bytes));
  c.handed_off.assign(c.ranks.size(), false);
  {
    absl::MutexLock lock(&mu_);
    c.mu.AssertHeld();
    c.installed.assign(c.ranks.size(), false);
    c.claimed.assign(c.ranks.size(), false);
  }

  uint64_t total = 0;
  for (int s = 0; s < n; ++s) total += layout.ChunkLength(c.lens, s, layout.PositionOf(s, self));
  {
    absl::MutexLock lock(&mu_);
    status_.set_job_id(job);
    status_.set_step(step);
    status_.set_bytes_done(0);
    status_.set_bytes_total(total);
    current_ = &c;  // from here on, ranks can be served on demand
  }
  auto finish = [&](absl::Status st) {
    absl::MutexLock lock(&mu_);
    auto idle = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return serving_ == 0; };
    mu_.Await(absl::Condition(&idle));
    current_ = nullptr;
    for (size_t i = 0; i < c.ranks.size(); ++i) {
      if (!c.handed_off[i]) arena_->Free(c.ranks[i].extent);
    }
    if (!st.ok()) {
      // Rows reserved for decoding and never completed: half-decoded bytes
      // that a later fold must not start from.
      for (int s = 0; s < n; ++s) {
        if (layout.PositionOf(s, self) >= k) parity_->DiscardIncompleteRow(job, step, s);
      }
    }
    return st;
  };

  // Stripes are rebuilt concurrently, as many as keep the slices in flight
  // under kMaxInFlightBytes.
  auto rebuild_stripe = [&](int s) -> absl::Status {
    const int target = layout.PositionOf(s, self);
    const uint64_t out_len = layout.ChunkLength(c.lens, s, target);
    // A lost parity row is decoded straight into its arena row; the
    // reservation holds the row's memory while it is decoded.
    ParityStore::ReservedRow reserved;
    if (target >= k) {
      // A row this slot still holds (re-adopted after a restart, or folded
      // since from the pushes of a step the peers had in flight when this
      // node was lost) is kept as it is: it was verified, and peers may be
      // reading it. A push folding into the row right now refuses the
      // reservation; the fold ends in moments, with the row complete or
      // free to reserve, so the row is asked for again (for 2 s at most).
      absl::StatusOr<ParityStore::ReservedRow> row;
      for (int tries = 0;; ++tries) {
        if (parity_->Row(job, step, s).ok()) return absl::OkStatus();
        row = parity_->ReserveRow(job, step, s, out_len);
        if (row.ok() || !absl::IsFailedPrecondition(row.status()) || tries >= 100 || stopping_) {
          break;
        }
        absl::SleepFor(absl::Milliseconds(20));
      }
      if (!row.ok()) return row.status();
      reserved = std::move(*row);
    }
    // Expected CRC of each position, from what was recorded; false when the
    // peers recorded none (the position is then treated as lost).
    auto expected_crc = [&](int q, uint32_t* crc) -> bool {
      if (q < k) {
        auto it = v.slots.find(layout.SlotOf(s, q));
        if (it == v.slots.end() || q >= it->second.chunk_crc32c_size()) return false;
        *crc = it->second.chunk_crc32c(q);
        return true;
      }
      auto it = v.rows.find({s, q - k});
      if (it == v.rows.end()) return false;
      *crc = it->second.parity_crc32c();
      return true;
    };
    uint64_t counted = 0;  // this stripe's share of bytes_done
    std::set<int> bad;
    // Failed reads, per position, of a survivor that could not be replaced.
    std::map<int, int> transient;
    absl::Duration pause;  // before the stripe is read again
    Scratch scratch;
    std::vector<uint8_t> out_buf;  // only for data slices that straddle rank windows
    while (true) {
      if (stopping_) return absl::CancelledError("the daemon is shutting down");
      const std::vector<int> use = Survivors(c, s, target, bad);
      if (static_cast<int>(use.size()) < k) {
        return absl::DataLossError(absl::StrFormat(
            "job %s step %d stripe %d: only %d intact chunks left, RS(%d,%d) needs %d", job, step,
            s, use.size(), k, layout.m(), k));
      }
      // Slices run to the longest chunk in play: every survivor is read
      // whole, so that its CRC can be checked.
      uint64_t span = out_len;
      for (int q : use) span = std::max(span, layout.ChunkLength(c.lens, s, q));
      std::vector<uint32_t> crcs(n, 0);
      bool all_good = true;
      for (uint64_t at = 0; at < std::max<uint64_t>(span, 1) && all_good; at += kSliceBytes) {
        const uint64_t slice = std::min(kSliceBytes, out_len - std::min(out_len, at));
        // A data slice that lies inside one rank's window is decoded straight
        // into it (the window is the rebuild's until installed, and a rank
        // served on demand meanwhile has an extent of its own, so writing it
        // is at worst wasted); one that straddles windows goes through
        // out_buf and is copied piece by piece.
        uint8_t* out = target < k ? nullptr : reserved.bytes.data() + at;
        if (target < k && slice > 0) {
          c.payload->ForEachPiece(c.payload->Chunk(target).offset + at, slice,
                                  [&](size_t i, uint64_t in_rank, uint64_t, uint64_t len) {
                                    if (len == slice) {
                                      out = arena_->base() + c.ranks[i].extent.offset + in_rank;
                                    }
                                  });
        }
        const bool in_window = out != nullptr && target < k;
        if (out == nullptr) {
          if (out_buf.size() < slice) out_buf.resize(std::min(kSliceBytes, out_len));
          out = out_buf.data();
        }
        // Paced before the fetch, so that the cap spreads the survivors'
        // traffic over time instead of sleeping after a burst.
        Throttle(slice);
        int failed = -1;
        absl::Status st = DecodeSlice(c, s, target, use, at, kSliceBytes,
                                      absl::MakeSpan(out, slice), &crcs, &failed, &scratch);
        if (!st.ok()) {
          if (failed < 0) return st;
          all_good = false;
          // A survivor that timed out or was busy may answer a moment later.
          // With no other survivor to read instead (k left exactly), it is
          // asked again a few times before the stripe, and the step, is
          // given up: a moment of load must not cost a rebuild.
          // A holder that used up its tries for one stripe is not waited for
          // again, by another stripe or step of this pass.
          std::set<int> without = bad;
          without.insert(failed);
          const bool spare = static_cast<int>(Survivors(c, s, target, without).size()) >= k;
          const std::optional<int> holder = HolderOf(c.view->held, s, failed);
          bool again = !spare && IsTransient(st) && !c.vanished && holder.has_value();
          if (again) {
            absl::MutexLock lock(&mu_);
            if (unanswering_.count(*holder) > 0 || ++transient[failed] >= kTransientTries) {
              unanswering_.insert(*holder);
              again = false;
            }
          }
          if (again) {
            pause = kTransientPause * transient[failed];
            Log("job %s step %d stripe %d: position %d unreadable (%s); no other survivor "
                "holds what it does, so it is asked again in %s (try %d of %d)",
                job, step, s, failed, st.message(), absl::FormatDuration(pause),
                transient[failed] + 1, kTransientTries);
            break;
          }
          Log("job %s step %d stripe %d: position %d unreadable (%s); using another", job, step,
              s, failed, st.message());
          bad.insert(failed);
          break;
        }
        if (target < k && !in_window) {
          WritePayload(c, c.payload->Chunk(target).offset + at, out, slice);
        }
        {
          // Holders that answered are waited for again after a later blip.
          absl::MutexLock lock(&mu_);
          for (int q : use) {
            if (unanswering_.empty()) break;
            if (const std::optional<int> h = HolderOf(c.view->held, s, q)) unanswering_.erase(*h);
          }
        }
        Progress(static_cast<int64_t>(slice));
        counted += slice;
      }
      // A failed try is decoded again from other survivors: take back its
      // progress then.
      auto retry = [&] {
        Progress(-static_cast<int64_t>(counted));
        counted = 0;
      };
      if (!all_good) {
        retry();
        // In small naps, so that a shutdown is not held up.
        for (absl::Time until = absl::Now() + pause; absl::Now() < until && !stopping_;) {
          absl::SleepFor(absl::Milliseconds(20));
        }
        pause = absl::ZeroDuration();
        continue;
      }
      // Whole chunks now read: check each against its recorded CRC.
      for (int q : use) {
        uint32_t want = 0;
        if (!expected_crc(q, &want) || crcs[q] != want) {
          Log("job %s step %d stripe %d: position %d fails its crc32c; treated as lost", job,
              step, s, q);
          bad.insert(q);
          all_good = false;
        }
      }
      if (all_good) break;
      retry();
    }
    if (target >= k) return parity_->CompleteRow(job, step, s, v.slots, &reserved);
    return absl::OkStatus();
  };
  const int workers = static_cast<int>(std::max<uint64_t>(
      1, std::min<uint64_t>(n, kMaxInFlightBytes / ((k + 1) * kSliceBytes))));
  std::atomic<int> next{0};
  std::vector<absl::Status> results(n);
  std::vector<std::thread> pool;
  for (int w = 0; w < workers; ++w) {
    pool.emplace_back([&] {
      for (int s = next++; s < n; s = next++) results[s] = rebuild_stripe(s);
    });
  }
  for (auto& t : pool) t.join();
  if (c.vanished) {
    return finish(absl::AbortedError(absl::StrFormat(
        "job %s step %d was retired by peers during the rebuild", job, step)));
  }
  for (const absl::Status& st : results) {
    if (!st.ok()) return finish(st);
  }
  for (const auto& [pos, slot] : v.slots) parity_->RecordSlot(job, step, slot);
  std::vector<RebuiltRank> rest;
  std::vector<size_t> rest_index;
  {
    absl::MutexLock lock(&mu_);
    auto idle = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return serving_ == 0; };
    mu_.Await(absl::Condition(&idle));
    c.mu.AssertHeld();
    for (size_t i = 0; i < c.ranks.size(); ++i) {
      if (c.installed[i]) continue;
      rest.push_back(c.ranks[i]);
      rest_index.push_back(i);
    }
    // Restores arriving from here on wait for the install below.
    c.finalizing = true;
  }
  // On failure the windows are still the rebuild's: finish() frees them.
  absl::Status st = store_->InstallRebuilt(job, step, c.local_ranks, rest);
  if (!st.ok()) return finish(st);
  for (size_t i : rest_index) c.handed_off[i] = true;
  for (const auto& [sr, row] : v.rows) parity_->RecordRow(row);
  protector_->OnInstalled(job, step);
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  Log("rebuilt job %s step %d from group %d: %s decoded in %.2f s, every checksum verified", job,
      step, group.id, FormatBytes(total), secs);
  static Histogram& rebuild_seconds = Metrics().GetHistogram(
      "ecsnap_rebuild_seconds", "Time to rebuild one step of a job on this node.");
  rebuild_seconds.Observe(secs);
  return finish(absl::OkStatus());
}

void Rebuilder::Progress(int64_t bytes) {
  static Counter& rebuilt = Metrics().GetCounter(
      "ecsnap_rebuild_bytes_total", "Bytes decoded by rebuilds and degraded restores.");
  if (bytes > 0) rebuilt.Add(static_cast<uint64_t>(bytes));
  absl::MutexLock lock(&mu_);
  status_.set_bytes_done(status_.bytes_done() + bytes);
}

void Rebuilder::Throttle(uint64_t bytes) {
  if (options_.bytes_per_second == 0) return;
  absl::MutexLock lock(&mu_);
  throttled_bytes_ += bytes;
  const absl::Time due = throttle_start_ + absl::Seconds(static_cast<double>(throttled_bytes_) /
                                                         options_.bytes_per_second);
  // Sleeps until due, or until Stop.
  auto stop = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stop_requested_; };
  mu_.AwaitWithDeadline(absl::Condition(&stop), due);
}

void Rebuilder::Stop() {
  stopping_ = true;
  absl::MutexLock lock(&mu_);
  stop_requested_ = true;
}

}  // namespace ecsnap::daemon
