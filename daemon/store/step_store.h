// StepStore: the life of every (job, step, rank) on one daemon (DESIGN.md §2).
//
//   RECEIVING --all local ranks committed--> LOCAL --protected--> PROTECTED
//       |                                                           |
//       +-- rank aborts / session ends --> discarded   newer step complete --> retired
//
// A trainer rank attaches (a session), asks for a window of the arena per step
// (BeginRank), fills it (through its own mapping of the arena, or through
// Write), and commits it with a manifest that the store checks: names,
// dtypes, shapes, offsets inside the window and every tensor's CRC-32C. Only
// then is the rank's data visible; a step is LOCAL when every local rank of
// the job has committed it. Per job, steps only grow. A session that ends
// (the trainer died) discards its uncommitted data and releases its restore
// leases. A step is "complete" when it reaches the store's final state
// (LOCAL with no peers, PROTECTED with peers); completing a step retires
// complete steps beyond the newest `retain`, and every older unfinished one.
//
// Each committed rank is recorded in the arena's index, so a restarted daemon
// re-adopts (Adopt) every step whose ranks all verify, and drops the rest.
//
// Thread-safe. Checksums and copies run outside the lock: the window they
// touch is pinned until they finish, so a concurrent abort or drop cannot
// free it underneath them.
#ifndef ECSNAP_DAEMON_STORE_STEP_STORE_H_
#define ECSNAP_DAEMON_STORE_STEP_STORE_H_

#include <cstdint>
#include <algorithm>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "daemon/store/arena.h"
#include "daemon/store/manifest_check.h"
#include "daemon/store/rank_pieces.h"
#include "proto/snapshot.pb.h"

namespace ecsnap::daemon {

// Bounds on what a client may ask for, checked before anything is allocated.
struct StoreLimits {
  // Default: 128.
  size_t max_job_id_bytes = 128;
  // Default: 1024.
  size_t max_local_ranks = 1024;
  // Default: 1 << 20.
  size_t max_tensors_per_rank = size_t{1} << 20;
  // Default: 4096.
  size_t max_tensor_name_bytes = 4096;
  // Default: 16.
  size_t max_tensor_dims = 16;
  // Default: 4096.
  size_t max_sessions = 4096;
  // Default: 64.
  size_t max_leases_per_session = 64;
};

// What the protection layer says about retention (DESIGN.md §2: retention
// is a group decision). Called with the store's lock held: implementations
// must not call back into the store.
class RetentionGate {
 public:
  virtual ~RetentionGate() = default;
  // Steps of `job` from this one on are never retired: every node of the
  // group holds one of them PROTECTED, and it must stay decodable.
  virtual uint64_t GroupFloor(const std::string& job) = 0;
  // `step` of `job` is LOCAL, above the group floor, and a newer step
  // superseded it. True when it may be dropped: it can never become
  // PROTECTED anywhere (the gate made sure of that).
  virtual bool MayDropUnprotected(const std::string& job, uint64_t step) = 0;
};

struct StoreOptions {
  // Newest complete steps kept per job. Default: 1.
  uint32_t retain = 1;
  // The state that makes a step complete: LOCAL without peers (m = 0),
  // PROTECTED with them. Default: LOCAL.
  v1::StepState final_state = v1::LOCAL;
  // Threads checking a commit's checksums. It is on the trainer's critical
  // path (Wait() returns after it). Default: 2.
  int verify_threads = 2;
  StoreLimits limits;
};

// A window granted to a rank for one step.
struct Window {
  uint64_t offset = 0;  // in the arena
  uint64_t bytes = 0;   // the rank's bytes (the extent may be larger)
  ArenaExtent extent;   // the window file's extent (Arena::OpenWindow)
};

struct RestoreLease {
  uint64_t lease_id = 0;
  uint64_t step = 0;
  Window window;
  v1::Manifest manifest;
};

struct StepSummary {
  std::string job_id;
  uint64_t step = 0;
  v1::StepState state = v1::STEP_STATE_UNSPECIFIED;
  uint64_t bytes = 0;
  uint32_t ranks_committed = 0;
  uint32_t ranks_expected = 0;
};

struct AdoptReport {
  uint32_t steps_adopted = 0;
  uint32_t ranks_adopted = 0;
  uint32_t ranks_dropped = 0;
  std::vector<std::string> notes;  // one line per dropped rank or step, for the log
};

// A slot's payload for one step: every local rank's window, in rank order,
// pinned (not freed, not retired) while the Payload lives.
struct Payload {
  struct Rank {
    uint32_t rank = 0;
    absl::Span<const uint8_t> bytes;
    // The rank's manifest, valid (and unchanging) while the Payload lives:
    // the pin keeps the committed rank, whose manifest is never modified.
    const v1::Manifest* manifest = nullptr;
  };
  std::vector<uint32_t> local_ranks;
  std::vector<Rank> ranks;
  uint64_t bytes = 0;
  v1::StepState state = v1::STEP_STATE_UNSPECIFIED;
  std::optional<uint32_t> owner_uid;  // the job's owner on this node, when known
  std::shared_ptr<void> pin;

  // The bytes of each rank's window, in order: the payload's shape (the peer
  // plane maps it onto chunks).
  std::vector<uint64_t> RankBytes() const {
    std::vector<uint64_t> out;
    for (const Rank& r : ranks) out.push_back(r.bytes.size());
    return out;
  }

  // Calls `fn` with the pieces of [offset, offset + length) of the ranks'
  // windows laid end to end.
  template <typename Fn>
  void ForEachPiece(uint64_t offset, uint64_t length, Fn&& fn) const {
    ForEachRankPiece(RankBytes(), offset, length,
                     [&](size_t i, uint64_t at, uint64_t, uint64_t len) {
                       fn(ranks[i].bytes.subspan(at, len));
                     });
  }
};

// A rank rebuilt from peers, to install with InstallRebuilt.
struct RebuiltRank {
  uint32_t rank = 0;
  ArenaExtent extent;  // allocated by the caller, filled, and checked
  uint64_t bytes = 0;
  v1::Manifest manifest;
};

class StepStore {
 public:
  // `arena` must outlive the store.
  StepStore(Arena* arena, StoreOptions options);
  ~StepStore();

  StepStore(const StepStore&) = delete;
  StepStore& operator=(const StepStore&) = delete;

  // Re-adopts the committed ranks a previous daemon left in the arena. Call
  // once, before serving.
  AdoptReport Adopt();

  // Opens a session for `rank` of `job_id`. `local_ranks` are every rank of
  // the job on this node; all sessions of a job must name the same set. A
  // second session of the same rank replaces the first (a restarted trainer
  // whose old connection has not been noticed yet).
  absl::StatusOr<uint64_t> Attach(const std::string& job_id, uint32_t rank,
                                  std::vector<uint32_t> local_ranks);
  // Ends a session: its uncommitted step is discarded, its leases released.
  void Detach(uint64_t session);

  // Grants a window of `bytes` for the session's rank at `step`. If the
  // rank restored step s and `step` is not newer than the job's steps, the
  // job is rewound to s first: every step newer than s is discarded.
  // `streamed`: the daemon writes the bytes (WriteRank), so a fresh window
  // is populated through its mapping first.
  absl::StatusOr<Window> BeginRank(uint64_t session, uint64_t step, uint64_t bytes,
                                   bool streamed = true);
  // A spare window for the session's rank, of the size `bytes` of state
  // need, made ahead of the rank's next steps so that its trainer can map
  // it first (Arena::PrepareWindow). The steps of a rank need up to
  // retain + 2 windows of one size (the retained ones, the one being
  // written, one more while protection lags); no more are made.
  // FAILED_PRECONDITION when the rank holds that many already;
  // RESOURCE_EXHAUSTED when memory is short (a snapshot can still take the
  // memory later, by reclaiming spares).
  // `spares`: the rank's spares of that size wanted (Arena::PrepareWindow),
  // at most windows_ahead_of_first_step(); an existing one answers when it
  // has that many.
  absl::StatusOr<ArenaExtent> PrepareRank(uint64_t session, uint64_t bytes, int spares = 1);
  // The windows a rank's steps ever take at once (retain + 2: the retained
  // steps, the one being written, one more while protection lags): what a
  // trainer that prepares ahead (Client::Prepare) gets made for it, so that
  // none is made beside its first steps' copies, where it took a core from
  // them (1.7-2.3x steady for the third step after Prepare with retain + 1).
  int windows_ahead_of_first_step() const { return static_cast<int>(options_.retain) + 2; }
  // Copies `pieces`, one after the other, into the open window from
  // `offset` on (the path for clients that cannot map the arena).
  absl::Status Write(uint64_t session, uint64_t step, uint64_t offset,
                     absl::Span<const absl::Span<const uint8_t>> pieces);
  absl::Status Write(uint64_t session, uint64_t step, uint64_t offset,
                     absl::Span<const uint8_t> data) {
    return Write(session, step, offset, absl::MakeConstSpan(&data, 1));
  }
  // Checks `manifest` against the window and publishes the rank's data.
  // Returns the step's state afterwards.
  absl::StatusOr<v1::StepState> CommitRank(uint64_t session, uint64_t step,
                                           const v1::Manifest& manifest);
  absl::Status AbortRank(uint64_t session, uint64_t step);

  // Steps this session's rank can restore, newest first.
  absl::StatusOr<std::vector<v1::RestorableStep>> ListRestorable(uint64_t session);
  // Pins the rank's data of `step` (0: the newest restorable) until Release.
  absl::StatusOr<RestoreLease> Restore(uint64_t session, uint64_t step);
  absl::Status Release(uint64_t session, uint64_t lease_id);
  // The bytes [offset, offset + length) of a leased window, pinned: they
  // stay put while `pin` lives, even when the lease is released meanwhile
  // (a trainer that releases a restore while its bytes are being sent). A
  // session holds at most max_leases_per_session pins at once
  // (RESOURCE_EXHAUSTED past that). A pin may outlive the store (it then
  // does nothing) but must not be dropped under the store's lock.
  struct PinnedBytes {
    absl::Span<const uint8_t> bytes;
    std::shared_ptr<void> pin;
  };
  absl::StatusOr<PinnedBytes> Read(uint64_t session, uint64_t lease_id, uint64_t offset,
                                   uint64_t length) ABSL_LOCKS_EXCLUDED(mu_);

  // Admin.
  std::vector<StepSummary> ListSteps(const std::string& job_id);
  // Drops `step` of `job_id` (0: every step, and the job). NOT_FOUND if none.
  absl::StatusOr<std::pair<uint32_t, uint64_t>> Drop(const std::string& job_id, uint64_t step);

  // Job ownership on the trainer socket (DESIGN.md §9): the first uid to
  // claim a job owns it; `uid` or `exempt_uid` (the daemon's own) may claim
  // it again, any other uid gets PERMISSION_DENIED naming the owner. The
  // owner is written into every rank record of the job, so a restarted daemon
  // that re-adopts the job's steps keeps it; it is forgotten with the job.
  // RESOURCE_EXHAUSTED past 65536 owned jobs (but for `exempt_uid`).
  absl::Status ClaimJob(const std::string& job_id, uint32_t uid, uint32_t exempt_uid);
  // The owner the group recorded for `job_id` (the SlotManifest this slot's
  // peers keep of its payload). It wins over a claim made here since the
  // node came back empty, but not over an owner this node's own records
  // name: the job's data decides whose it is. A displaced uid is refused from
  // then on (ClaimJob is asked again at every call of an attached session),
  // its open and committed steps of the job are dropped and the job's spare
  // windows (which it may still map) removed.
  void SetOwnerFromGroup(const std::string& job_id, uint32_t uid);
  // Recomputes every committed tensor checksum of `job_id` (empty: all jobs)
  // at `step` (0: all steps).
  absl::StatusOr<VerifyReport> Verify(const std::string& job_id, uint64_t step);
  // Marks a LOCAL step PROTECTED (the protection layer calls this).
  absl::Status MarkProtected(const std::string& job_id, uint64_t step);
  // Moves a PROTECTED step back to LOCAL: a parity row of it was lost.
  // FAILED_PRECONDITION when it is not PROTECTED.
  absl::Status Demote(const std::string& job_id, uint64_t step);
  // A group member pushed `step` of `job_id`, a job no rank of which runs on
  // this node: this node's part of the step is an empty payload, LOCAL at
  // once, so that the group can protect the step (DESIGN.md §2). Returns
  // true when it added the step; false when the job has ranks here, or the
  // step is not newer than the job's steps.
  bool AddEmptyStep(const std::string& job_id, uint64_t step);
  // Applies retention to `job_id` again (the group floor moved, or a step
  // was abandoned).
  void ApplyRetention(const std::string& job_id);
  // Discards every step of `job_id` newer than `step` (DESIGN.md §5,
  // rewind, as a peer reported it), except steps still RECEIVING: a trainer
  // here may be writing one already.
  // Returns how many steps were discarded.
  uint32_t RewindTo(const std::string& job_id, uint64_t step);
  // Asks `gate` before retiring steps (with peers). Set before serving;
  // `gate` must outlive the store.
  void SetRetentionGate(RetentionGate* gate);
  // Called (outside the store's lock) when a rank's first snapshot after it
  // restored an older step rewound the job. Set before serving.
  void SetRewindListener(std::function<void(const std::string& job, uint64_t step)> listener);

  // Called (outside the store's lock) each time a step becomes LOCAL. Set
  // before serving.
  void SetLocalListener(std::function<void(const std::string& job, uint64_t step)> listener);

  // Pins the committed payload of `step` of `job_id` (LOCAL or later).
  absl::StatusOr<Payload> PinPayload(const std::string& job_id, uint64_t step);

  // Installs a step rebuilt from peers as PROTECTED: every rank's extent
  // becomes its window and is recorded in the arena's index. DATA_LOSS if a
  // tensor checksum fails (the caller still owns the extents then);
  // FAILED_PRECONDITION if the job already holds this step or a newer one
  // that is not REBUILDING. Newer REBUILDING steps (ranks a failed rebuild
  // served on demand) are withdrawn, here and in InstallRebuiltRank, so
  // that every rank restores the step being rebuilt.
  absl::Status InstallRebuilt(const std::string& job_id, uint64_t step,
                              std::vector<uint32_t> local_ranks,
                              std::vector<RebuiltRank> ranks);
  // Installs one rank of a step that is still being rebuilt (degraded
  // restore): the step appears as REBUILDING and this rank can restore from
  // it at once. Same checks as InstallRebuilt; a later InstallRebuilt of the
  // step adds the other ranks and makes it PROTECTED.
  absl::Status InstallRebuiltRank(const std::string& job_id, uint64_t step,
                                  std::vector<uint32_t> local_ranks, RebuiltRank rank);
  // The job and rank of a session.
  absl::StatusOr<std::pair<std::string, uint32_t>> SessionRank(uint64_t session);

  // Makes Restore of a job with nothing restorable answer `why` (DATA_LOSS
  // naming what was lost) instead of NOT_FOUND, until a step is installed or
  // ClearUnrecoverable is called.
  void SetUnrecoverable(const std::string& job_id, absl::Status why);
  // Forgets the status SetUnrecoverable stored (a later rebuild pass found
  // the job recoverable): Restore answers from what is held again.
  void ClearUnrecoverable(const std::string& job_id);
  // Every (job, step) held whole: LOCAL or PROTECTED. A REBUILDING step is
  // not held (it has only the ranks served so far): a rebuild that failed is
  // tried again.
  std::vector<std::pair<std::string, uint64_t>> CompleteSteps();

  uint32_t sessions() const;
  uint32_t jobs() const;

 private:
  struct RankData;
  struct Step;
  struct Job;
  struct Session;
  struct PinOwner;
  class ReadPin;

  void DropReadPin(uint64_t session, const std::shared_ptr<RankData>& rd)
      ABSL_LOCKS_EXCLUDED(mu_);

  absl::StatusOr<Session*> FindSession(uint64_t id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Step `step` of the session's job, with the session's rank open on it.
  absl::StatusOr<RankData*> OpenRank(Session* s, uint64_t step) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The session's open rank at `step`, still taking writes.
  absl::StatusOr<std::shared_ptr<RankData>> WritableRank(uint64_t session, uint64_t step)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<Window> BeginRankImpl(uint64_t session, uint64_t step, uint64_t bytes,
                                       bool streamed, std::string* rewound_job,
                                       uint64_t* rewound_to)
      ABSL_LOCKS_EXCLUDED(mu_);
  std::optional<uint32_t> OwnerLocked(const std::string& job_id) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // OK when `step` is newer than every step `job` holds for `rank`.
  absl::Status CheckNewerLocked(Job& job, uint32_t rank, uint64_t step, const std::string& label)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<std::shared_ptr<RankData>> FindLease(uint64_t session, uint64_t lease_id)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void DiscardOpenRank(Session* s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Drops a rank's data: its record now, its window once nobody pins it.
  void Kill(std::shared_ptr<RankData> rank) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Unpin(const std::shared_ptr<RankData>& rank) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void EraseStep(Job& job, uint64_t step) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Discards the steps of `job` newer than `step` opened up to
  // `created_until` in the step sequence.
  uint32_t RewindLocked(Job& job, uint64_t step, bool keep_receiving = false,
                        uint64_t created_until = UINT64_MAX) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Updates a step's state after a commit and applies retention.
  v1::StepState Settle(Job& job, Step& step) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Retire(Job& job) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status CheckRebuilt(const std::string& job_id, uint64_t step, const RebuiltRank& r) const;
  // Adds rebuilt ranks to `step` (REBUILDING or new), recording each.
  absl::Status AddRebuilt(const std::string& job_id, uint64_t step,
                          const std::vector<uint32_t>& local_ranks, std::vector<RebuiltRank> ranks,
                          v1::StepState state) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  Arena* const arena_;
  const StoreOptions options_;
  std::function<void(const std::string&, uint64_t)> local_listener_;
  std::function<void(const std::string&, uint64_t)> rewind_listener_;
  RetentionGate* gate_ = nullptr;

  mutable absl::Mutex mu_;
  std::shared_ptr<PinOwner> pin_owner_;
  std::map<std::string, std::unique_ptr<Job>> jobs_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, uint32_t> owners_ ABSL_GUARDED_BY(mu_);  // job -> owner uid
  // Jobs whose owner came from data (this node's records, or the group): a
  // later word from the group does not override those.
  std::set<std::string> owner_from_data_ ABSL_GUARDED_BY(mu_);
  std::map<uint64_t, std::unique_ptr<Session>> sessions_ ABSL_GUARDED_BY(mu_);
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  uint64_t step_seq_ ABSL_GUARDED_BY(mu_) = 0;  // steps opened by trainers so far
  // Discarded ranks whose windows are still pinned (a copy or a read in
  // flight): their memory comes back when the last pin goes.
  uint64_t DyingFreed() ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    return dying_freed_;
  }
  int dying_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t dying_freed_ ABSL_GUARDED_BY(mu_) = 0;  // of those, freed so far
  std::map<std::string, absl::Status> unrecoverable_ ABSL_GUARDED_BY(mu_);
};

}  // namespace ecsnap::daemon

#endif  // ECSNAP_DAEMON_STORE_STEP_STORE_H_
