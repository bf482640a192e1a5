#include "daemon/store/step_store.h"

#include <algorithm>
#include <chrono>
#include <set>

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/format.h"
#include "common/log.h"
#include "common/metrics.h"
#include "common/status_macros.h"
#include "daemon/store/manifest_check.h"
#include "daemon/store/rank_record.h"
#include "daemon/store/store.pb.h"
#include "ec/crc32c.h"

namespace ecsnap::daemon {

struct StepStore::RankData {
  std::string job_id;
  uint64_t step = 0;
  uint32_t rank = 0;
  ArenaExtent extent;
  uint64_t bytes = 0;
  enum class Phase { kWriting, kCommitting, kCommitted } phase = Phase::kWriting;
  bool dead = false;
  int pins = 0;             // copies, checks and leases in progress
  int64_t record_id = -1;   // index entry once committed
  v1::Manifest manifest;
};

struct StepStore::Step {
  v1::StepState state = v1::RECEIVING;
  // When a trainer opened it, in the store's step sequence (0: adopted,
  // rebuilt or empty).
  uint64_t created = 0;
  std::map<uint32_t, std::shared_ptr<RankData>> ranks;
};

struct StepStore::Job {
  std::string id;
  std::vector<uint32_t> local_ranks;
  std::map<uint64_t, Step> steps;
  std::map<uint32_t, uint64_t> last_committed;  // rank -> newest step it committed
  std::map<uint32_t, uint64_t> sessions;        // rank -> live session
};

struct StepStore::Session {
  uint64_t id = 0;
  std::string job_id;
  uint32_t rank = 0;
  std::shared_ptr<RankData> open;  // the step being written, if any
  std::map<uint64_t, std::shared_ptr<RankData>> leases;
  uint64_t restored = 0;  // the step this rank restored last, until it snapshots
  uint64_t restored_at = 0;  // the store's step sequence when it restored
  // A step this rank restored that was withdrawn since (a failed rebuild's
  // rank served on demand): its next snapshot is refused until it restores
  // again, so that it does not go on from a step the others cannot.
  uint64_t withdrawn = 0;
  // The step this rank restored last, until a snapshot of it is open (where
  // `restored` goes at the start of BeginRank): what a withdrawal looks for.
  uint64_t restored_until_open = 0;
  bool opening = false;  // a BeginRank is getting its window, off the lock
  uint64_t reads = 0;    // PinnedBytes handed out and not yet dropped
};

// Who a read pin goes back to: the store while it lives. gRPC may drop the
// last slice of a window after the server, and the store, are gone (a
// connection torn down late); such a pin then does nothing.
struct StepStore::PinOwner {
  absl::Mutex mu;
  StepStore* store ABSL_GUARDED_BY(mu);
};

// A read's pin on its window (PinnedBytes::pin).
class StepStore::ReadPin {
 public:
  explicit ReadPin(std::shared_ptr<PinOwner> owner) : owner_(std::move(owner)) {}
  ~ReadPin() {
    if (rank_ == nullptr) return;  // never armed
    absl::MutexLock lock(&owner_->mu);
    if (owner_->store != nullptr) owner_->store->DropReadPin(session_, rank_);
  }
  void Arm(uint64_t session, std::shared_ptr<RankData> rank) {
    session_ = session;
    rank_ = std::move(rank);
  }

 private:
  std::shared_ptr<PinOwner> owner_;
  uint64_t session_ = 0;
  std::shared_ptr<RankData> rank_;
};

namespace {

std::string RankLabel(const std::string& job, uint64_t step, uint32_t rank) {
  return absl::StrFormat("job %s step %d rank %d", job, step, rank);
}

ManifestLimits ManifestLimitsOf(const StoreLimits& lim) {
  ManifestLimits m;
  m.max_tensors = lim.max_tensors_per_rank;
  m.max_name_bytes = lim.max_tensor_name_bytes;
  m.max_dims = lim.max_tensor_dims;
  return m;
}

}  // namespace

StepStore::StepStore(Arena* arena, StoreOptions options)
    : arena_(arena), options_(std::move(options)), pin_owner_(std::make_shared<PinOwner>()) {
  absl::MutexLock lock(&pin_owner_->mu);
  pin_owner_->store = this;
}

StepStore::~StepStore() {
  absl::MutexLock lock(&pin_owner_->mu);
  pin_owner_->store = nullptr;
}

AdoptReport StepStore::Adopt() {
  AdoptReport report;
  absl::MutexLock lock(&mu_);
  // (job, step) -> the ranks whose records verify.
  std::map<std::pair<std::string, uint64_t>, std::vector<std::shared_ptr<RankData>>> found;
  std::map<std::string, std::vector<uint32_t>> job_ranks;
  std::map<std::string, uint64_t> owner_step;  // job -> step whose record gave the owner
  std::vector<std::shared_ptr<RankData>> all;
  for (const ArenaRecord& rec : arena_->TakeAdoptedRecords(RecordKind::kRank)) {
    auto drop = [&](const std::string& why) {
      arena_->RemoveRecord(rec.id);
      ++report.ranks_dropped;
      report.notes.push_back(why);
    };
    auto decoded = DecodeRankRecord(rec.bytes);
    if (!decoded.ok()) {
      drop(absl::StrFormat("index entry %d: %s, dropped", rec.id, decoded.status().message()));
      continue;
    }
    const RankRecord& r = *decoded;
    const std::string label = RankLabel(r.job_id(), r.step(), r.rank());
    const ArenaExtent extent = WindowOf(r);
    if (absl::Status reserved = arena_->Reserve(extent, WindowOwner(r.job_id(), r.rank()));
        !reserved.ok()) {
      drop(label + ": window not adopted (" + std::string(reserved.message()) + "), dropped");
      continue;
    }
    absl::Status st = CheckManifest(r.manifest(), r.window_bytes(), ManifestLimitsOf(options_.limits));
    if (st.ok()) st = CheckCrcs(r.manifest(), arena_->Bytes(extent).first(r.window_bytes()),
                                options_.verify_threads, nullptr);
    if (!st.ok()) {
      arena_->Free(extent);
      drop(label + ": " + std::string(st.message()) + ", dropped");
      continue;
    }
    auto rd = std::make_shared<RankData>();
    rd->job_id = r.job_id();
    rd->step = r.step();
    rd->rank = r.rank();
    rd->extent = extent;
    rd->bytes = r.window_bytes();
    rd->phase = RankData::Phase::kCommitted;
    rd->record_id = rec.id;
    rd->manifest = r.manifest();
    found[{r.job_id(), r.step()}].push_back(rd);
    job_ranks[r.job_id()].assign(r.local_ranks().begin(), r.local_ranks().end());
    // The owner of the job's newest step decides (records of older steps may
    // name an owner the job had before it was dropped and made again).
    if (r.has_owner_uid() && r.step() >= owner_step[r.job_id()]) {
      owners_[r.job_id()] = r.owner_uid();
      owner_step[r.job_id()] = r.step();
      owner_from_data_.insert(r.job_id());
    }
  }
  for (auto& [key, ranks] : found) {
    const std::vector<uint32_t>& expected = job_ranks[key.first];
    std::set<uint32_t> have;
    for (const auto& rd : ranks) have.insert(rd->rank);
    const bool complete = have.size() == expected.size() &&
                          std::all_of(expected.begin(), expected.end(),
                                      [&](uint32_t r) { return have.count(r) > 0; });
    if (!complete) {
      for (auto& rd : ranks) {
        ++report.ranks_dropped;
        Kill(rd);
      }
      report.notes.push_back(absl::StrFormat(
          "job %s step %d: only %d of %d ranks had committed, dropped", key.first, key.second,
          have.size(), expected.size()));
      continue;
    }
    auto& job = jobs_[key.first];
    if (!job) {
      job = std::make_unique<Job>();
      job->id = key.first;
      job->local_ranks = expected;
    }
    Step& step = job->steps[key.second];
    step.state = v1::LOCAL;
    for (auto& rd : ranks) {
      step.ranks[rd->rank] = rd;
      job->last_committed[rd->rank] = std::max(job->last_committed[rd->rank], key.second);
      ++report.ranks_adopted;
    }
    ++report.steps_adopted;
  }
  for (auto& [id, job] : jobs_) Retire(*job);
  return report;
}

absl::StatusOr<uint64_t> StepStore::Attach(const std::string& job_id, uint32_t rank,
                                           std::vector<uint32_t> local_ranks) {
  const StoreLimits& lim = options_.limits;
  if (!ValidJobId(job_id, lim.max_job_id_bytes)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "job id '%s' is invalid: use 1 to %d characters from [A-Za-z0-9._-]",
        job_id.substr(0, 64), lim.max_job_id_bytes));
  }
  if (local_ranks.empty()) local_ranks.push_back(rank);
  if (local_ranks.size() > lim.max_local_ranks) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%d local ranks named; at most %d per node", local_ranks.size(), lim.max_local_ranks));
  }
  std::sort(local_ranks.begin(), local_ranks.end());
  if (std::adjacent_find(local_ranks.begin(), local_ranks.end()) != local_ranks.end()) {
    return absl::InvalidArgumentError("local ranks name the same rank twice");
  }
  if (!std::binary_search(local_ranks.begin(), local_ranks.end(), rank)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "rank %d is not among the local ranks {%s} it named", rank,
        absl::StrJoin(local_ranks, ", ")));
  }
  absl::MutexLock lock(&mu_);
  auto& job = jobs_[job_id];
  if (!job) {
    job = std::make_unique<Job>();
    job->id = job_id;
    job->local_ranks = local_ranks;
  } else if (job->local_ranks.empty() && job->sessions.empty()) {
    // A job this node only took part in with empty payloads, and now its
    // first rank here (a trainer that started late). The empty steps were
    // placeholders: they go, so that the rank may write any step; the
    // group re-folds a step whose real chunks differ from the empty ones.
    job->local_ranks = local_ranks;
    job->steps.clear();
  } else if (job->local_ranks != local_ranks) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "job %s runs ranks {%s} on this node, but rank %d attached with {%s}; every rank must "
        "name the same set (or drop the job with ecsnapctl)",
        job_id, absl::StrJoin(job->local_ranks, ", "), rank, absl::StrJoin(local_ranks, ", ")));
  }
  auto old = job->sessions.find(rank);
  if (old != job->sessions.end()) {
    // A restarted trainer: its previous connection is gone or going.
    auto s = sessions_.find(old->second);
    if (s != sessions_.end()) {
      DiscardOpenRank(s->second.get());
      for (auto& [id, rd] : s->second->leases) Unpin(rd);
      sessions_.erase(s);
    }
  } else if (sessions_.size() >= lim.max_sessions) {
    return absl::ResourceExhaustedError(
        absl::StrFormat("this daemon already serves %d sessions, its limit", sessions_.size()));
  }
  auto session = std::make_unique<Session>();
  session->id = next_id_++;
  session->job_id = job_id;
  session->rank = rank;
  const uint64_t id = session->id;
  job->sessions[rank] = id;
  sessions_[id] = std::move(session);
  return id;
}

void StepStore::Detach(uint64_t session) {
  absl::MutexLock lock(&mu_);
  auto it = sessions_.find(session);
  if (it == sessions_.end()) return;
  Session* s = it->second.get();
  DiscardOpenRank(s);
  for (auto& [id, rd] : s->leases) Unpin(rd);
  auto job = jobs_.find(s->job_id);
  if (job != jobs_.end()) {
    auto js = job->second->sessions.find(s->rank);
    if (js != job->second->sessions.end() && js->second == session) job->second->sessions.erase(js);
  }
  sessions_.erase(it);
}

absl::StatusOr<StepStore::Session*> StepStore::FindSession(uint64_t id) {
  auto it = sessions_.find(id);
  if (it == sessions_.end()) {
    return absl::NotFoundError(absl::StrFormat(
        "session %d is not attached (it ended, or the daemon restarted); attach again", id));
  }
  return it->second.get();
}

absl::StatusOr<StepStore::RankData*> StepStore::OpenRank(Session* s, uint64_t step) {
  if (!s->open || s->open->step != step) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "%s is not open%s; call BeginRank first", RankLabel(s->job_id, step, s->rank),
        s->open ? absl::StrFormat(" (step %d is)", s->open->step) : std::string()));
  }
  return s->open.get();
}

absl::StatusOr<std::shared_ptr<StepStore::RankData>> StepStore::WritableRank(uint64_t session,
                                                                              uint64_t step) {
  auto s = FindSession(session);
  if (!s.ok()) return s.status();
  auto r = OpenRank(*s, step);
  if (!r.ok()) return r.status();
  if ((*r)->phase != RankData::Phase::kWriting) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "%s is being committed; it takes no more writes or commits",
        RankLabel((*s)->job_id, step, (*s)->rank)));
  }
  return (*s)->open;
}

absl::StatusOr<std::shared_ptr<StepStore::RankData>> StepStore::FindLease(uint64_t session,
                                                                           uint64_t lease_id) {
  auto s = FindSession(session);
  if (!s.ok()) return s.status();
  auto it = (*s)->leases.find(lease_id);
  if (it == (*s)->leases.end()) {
    return absl::NotFoundError(absl::StrFormat("lease %d is not held by this session", lease_id));
  }
  return it->second;
}

void StepStore::DiscardOpenRank(Session* s) {
  if (!s->open) return;
  std::shared_ptr<RankData> rd = std::move(s->open);
  auto job = jobs_.find(rd->job_id);
  if (job != jobs_.end()) {
    auto step = job->second->steps.find(rd->step);
    if (step != job->second->steps.end()) {
      step->second.ranks.erase(rd->rank);
      if (step->second.ranks.empty()) job->second->steps.erase(step);
    }
  }
  Kill(std::move(rd));
}

void StepStore::Kill(std::shared_ptr<RankData> rd) {
  if (rd->dead) return;
  rd->dead = true;
  // Unpublish first: a daemon killed from here on never re-adopts it.
  if (rd->record_id >= 0) arena_->RemoveRecord(static_cast<uint32_t>(rd->record_id));
  rd->record_id = -1;
  if (rd->pins == 0) {
    arena_->Free(rd->extent);
  } else {
    ++dying_;
  }
}

void StepStore::Unpin(const std::shared_ptr<RankData>& rd) {
  if (--rd->pins == 0 && rd->dead) {
    arena_->Free(rd->extent);
    --dying_;
    ++dying_freed_;
  }
}

absl::StatusOr<Window> StepStore::BeginRank(uint64_t session, uint64_t step, uint64_t bytes,
                                            bool streamed) {
  std::string rewound_job;
  uint64_t rewound_to = 0;
  absl::StatusOr<Window> window =
      BeginRankImpl(session, step, bytes, streamed, &rewound_job, &rewound_to);
  if (!rewound_job.empty() && rewind_listener_) rewind_listener_(rewound_job, rewound_to);
  return window;
}

absl::StatusOr<ArenaExtent> StepStore::PrepareRank(uint64_t session, uint64_t bytes,
                                                   int spares) {
  std::string owner;
  {
    absl::MutexLock lock(&mu_);
    auto s = FindSession(session);
    if (!s.ok()) return s.status();
    owner = WindowOwner((*s)->job_id, (*s)->rank);
  }
  if (bytes == 0 || bytes > arena_->data_bytes()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "cannot prepare a window of %d bytes in an arena of %s", bytes,
        FormatBytes(arena_->data_bytes())));
  }
  return arena_->PrepareWindow(bytes, owner, static_cast<int>(options_.retain) + 2,
                               std::clamp(spares, 1, windows_ahead_of_first_step()));
}

absl::StatusOr<Window> StepStore::BeginRankImpl(uint64_t session, uint64_t step, uint64_t bytes,
                                                  bool streamed,
                                                  std::string* rewound_job,
                                                  uint64_t* rewound_to) {
  std::string owner, label;
  {
    absl::MutexLock lock(&mu_);
    auto s = FindSession(session);
    if (!s.ok()) return s.status();
    Session* ses = *s;
    label = RankLabel(ses->job_id, step, ses->rank);
    if (step == 0) return absl::InvalidArgumentError("steps are numbered from 1");
    if (ses->opening) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "%s: this rank's previous BeginRank is still getting its window; wait for its answer",
          label));
    }
    if (ses->open) {
      if (ses->open->step == step && ses->open->bytes == bytes &&
          ses->open->phase == RankData::Phase::kWriting) {
        return Window{ses->open->extent.offset, bytes, ses->open->extent};  // a retried BeginRank
      }
      return absl::FailedPreconditionError(absl::StrFormat(
          "%s: step %d is still open for this rank; commit or abort it first", label,
          ses->open->step));
    }
    if (ses->withdrawn != 0) {
      return absl::AbortedError(absl::StrFormat(
          "%s: the step this rank restored (%d) was withdrawn, its rebuild having failed after "
          "the rank was served; the other ranks of this node restore an older step: restore "
          "again before the next snapshot",
          label, ses->withdrawn));
    }
    Job& job = *jobs_.at(ses->job_id);
    // The first snapshot after restoring an older step rewinds the job to it
    // (DESIGN.md §5): the steps newer than it that existed when the rank
    // restored never completed everywhere, and the trainers write them again.
    // Steps opened since (by the other ranks of the job, already writing the
    // next step) are kept.
    bool stale = false;
    if (ses->restored != 0 && step > ses->restored) {
      for (auto it = job.steps.upper_bound(ses->restored); it != job.steps.end(); ++it) {
        stale |= it->second.created <= ses->restored_at;
      }
    }
    if (stale) {
      RewindLocked(job, ses->restored, /*keep_receiving=*/false, ses->restored_at);
      *rewound_job = job.id;
      *rewound_to = ses->restored;
    }
    ses->restored = 0;
    if (absl::Status st = CheckNewerLocked(job, ses->rank, step, label); !st.ok()) return st;
    if (bytes > arena_->data_bytes()) {
      return absl::ResourceExhaustedError(absl::StrFormat(
          "%s needs %s but the whole arena holds %s; raise --arena_bytes", label,
          FormatBytes(bytes), FormatBytes(arena_->data_bytes())));
    }
    owner = WindowOwner(ses->job_id, ses->rank);
    ses->opening = true;
  }
  // Off the lock: a fresh window file takes ~0.1 s/GiB to make, and a window
  // the preparer is making for this rank is waited for; other ranks' calls go
  // on meanwhile. What was checked above is checked again after.
  // Memory a discarded rank still pins comes back within moments (its last
  // copy or read ends): a trainer that reconnects after a fault and
  // snapshots at once is not refused for it. Each such free is waited for,
  // and the window asked for again, for at most 2 s in all.
  uint64_t freed = DyingFreed();
  auto extent = arena_->AllocateWindow(bytes, owner, streamed);
  const absl::Time give_up = absl::Now() + absl::Seconds(2);
  while (absl::IsResourceExhausted(extent.status()) && absl::Now() < give_up) {
    {
      absl::MutexLock lock(&mu_);
      auto more = [this, freed]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return dying_freed_ != freed;
      };
      if (dying_freed_ == freed &&
          (dying_ == 0 || !mu_.AwaitWithDeadline(absl::Condition(&more), give_up))) {
        break;
      }
      freed = dying_freed_;
    }
    extent = arena_->AllocateWindow(bytes, owner, streamed);
  }
  absl::MutexLock lock(&mu_);
  auto s = FindSession(session);
  absl::Status st = s.status();
  if (s.ok()) {
    (*s)->opening = false;
    auto job = jobs_.find((*s)->job_id);
    if (job == jobs_.end()) {
      st = absl::NotFoundError(absl::StrCat(label, ": the job was dropped meanwhile"));
    } else if (!extent.ok()) {
      st = absl::ResourceExhaustedError(absl::StrCat(label, " ", extent.status().message()));
    } else {
      st = CheckNewerLocked(*job->second, (*s)->rank, step, label);
    }
    if (st.ok() && (*s)->withdrawn != 0) {
      st = absl::AbortedError(absl::StrFormat(
          "%s: the step this rank restored (%d) was withdrawn while this snapshot began; "
          "restore again before the next snapshot",
          label, (*s)->withdrawn));
    }
  }
  if (!st.ok()) {
    if (extent.ok()) arena_->Free(*extent);
    return st;
  }
  Session* ses = *s;
  Job& job = *jobs_.at(ses->job_id);
  auto rd = std::make_shared<RankData>();
  rd->job_id = ses->job_id;
  rd->step = step;
  rd->rank = ses->rank;
  rd->extent = *extent;
  rd->bytes = bytes;
  Step& opened = job.steps[step];
  if (opened.created == 0) opened.created = ++step_seq_;
  opened.ranks[ses->rank] = rd;
  ses->open = rd;
  ses->restored_until_open = 0;
  return Window{extent->offset, bytes, *extent};
}

absl::Status StepStore::CheckNewerLocked(Job& job, uint32_t rank, uint64_t step,
                                         const std::string& label) {
  uint64_t newest = job.last_committed.count(rank) ? job.last_committed[rank] : 0;
  for (const auto& [n, st] : job.steps) {
    if (st.state != v1::RECEIVING) newest = std::max(newest, n);
  }
  if (step > newest) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrFormat(
      "%s: step %d is not newer than step %d, which this job already holds; steps only grow",
      label, step, newest));
}

absl::Status StepStore::Write(uint64_t session, uint64_t step, uint64_t offset,
                              absl::Span<const absl::Span<const uint8_t>> pieces) {
  uint64_t bytes = 0;
  for (const auto& p : pieces) bytes += p.size();  // each within one message
  std::shared_ptr<RankData> rd;
  {
    absl::MutexLock lock(&mu_);
    auto r = WritableRank(session, step);
    if (!r.ok()) return r.status();
    rd = *std::move(r);
    if (offset > rd->bytes || bytes > rd->bytes - offset) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "write of %d bytes at offset %d passes the end of the %d-byte window", bytes, offset,
          rd->bytes));
    }
    ++rd->pins;
  }
  uint8_t* at = arena_->base() + rd->extent.offset + offset;
  for (const auto& p : pieces) {
    if (!p.empty()) std::memcpy(at, p.data(), p.size());
    at += p.size();
  }
  absl::MutexLock lock(&mu_);
  Unpin(rd);
  return absl::OkStatus();
}

absl::StatusOr<v1::StepState> StepStore::CommitRank(uint64_t session, uint64_t step,
                                                    const v1::Manifest& manifest) {
  std::shared_ptr<RankData> rd;
  std::vector<uint32_t> local_ranks;
  std::optional<uint32_t> owner;
  {
    absl::MutexLock lock(&mu_);
    auto r = WritableRank(session, step);
    if (!r.ok()) return r.status();
    rd = *std::move(r);
    rd->phase = RankData::Phase::kCommitting;
    ++rd->pins;
    local_ranks = jobs_.at(rd->job_id)->local_ranks;
    owner = OwnerLocked(rd->job_id);
  }
  // The checks read the whole window: outside the lock, the window pinned.
  const auto check_start = std::chrono::steady_clock::now();
  const std::string label = RankLabel(rd->job_id, step, rd->rank);
  absl::Status st = CheckManifest(manifest, rd->bytes, ManifestLimitsOf(options_.limits));
  if (st.ok()) {
    st = CheckCrcs(manifest, arena_->Bytes(rd->extent).first(rd->bytes), options_.verify_threads,
                   nullptr);
  }
  std::string record;
  if (st.ok()) {
    record = EncodeRankRecord(
        {rd->job_id, step, rd->rank, local_ranks, rd->extent, rd->bytes, &manifest, owner});
  }

  absl::MutexLock lock(&mu_);
  Unpin(rd);
  if (rd->dead) {
    return absl::AbortedError(absl::StrFormat(
        "%s was discarded while its commit was checked (the session ended or the step was "
        "dropped)",
        label));
  }
  if (!st.ok()) {
    rd->phase = RankData::Phase::kWriting;  // the client may fix it or abort
    return absl::Status(st.code(), absl::StrCat(label, ": ", st.message()));
  }
  auto id = arena_->AddRecord(RecordKind::kRank, absl::Span<const uint8_t>(
      reinterpret_cast<const uint8_t*>(record.data()), record.size()));
  if (!id.ok()) {
    rd->phase = RankData::Phase::kWriting;
    return absl::ResourceExhaustedError(absl::StrCat(label, ": ", id.status().message()));
  }
  rd->record_id = *id;
  rd->phase = RankData::Phase::kCommitted;
  rd->manifest = manifest;
  static Counter& commits = Metrics().GetCounter(
      "ecsnap_rank_commits_total", "Ranks committed (their checksums verified) on this node.");
  static Counter& committed_bytes = Metrics().GetCounter(
      "ecsnap_committed_bytes_total", "Bytes of the ranks committed on this node.");
  static Histogram& commit_seconds = Metrics().GetHistogram(
      "ecsnap_snapshot_commit_seconds",
      "Time the daemon takes to verify and commit a rank's snapshot (CommitRank).");
  commits.Add();
  committed_bytes.Add(rd->bytes);
  commit_seconds.Observe(
      std::chrono::duration<double>(std::chrono::steady_clock::now() - check_start).count());
  Job& job = *jobs_.at(rd->job_id);
  job.last_committed[rd->rank] = std::max(job.last_committed[rd->rank], step);
  auto ses = sessions_.find(session);
  if (ses != sessions_.end() && ses->second->open == rd) ses->second->open.reset();
  Step& settled = job.steps.at(step);
  const v1::StepState before = settled.state;
  const v1::StepState after = Settle(job, settled);
  if (before == v1::RECEIVING && after == v1::LOCAL && local_listener_) {
    const std::string job_id = job.id;
    mu_.Unlock();
    local_listener_(job_id, step);
    mu_.Lock();
  }
  return after;
}

v1::StepState StepStore::Settle(Job& job, Step& step) {
  if (step.state == v1::RECEIVING) {
    size_t committed = 0;
    for (const auto& [rank, rd] : step.ranks) {
      committed += rd->phase == RankData::Phase::kCommitted;
    }
    if (committed == job.local_ranks.size()) step.state = v1::LOCAL;
  }
  const v1::StepState state = step.state;
  Retire(job);
  return state;
}

void StepStore::Retire(Job& job) {
  // Keep the newest `retain` complete steps, the newest LOCAL step above
  // them (protection may still finish), and RECEIVING steps newer than every
  // LOCAL one. A step older than a LOCAL or complete one can never finish.
  // With a group (gate_), nothing from the group floor on is retired, and a
  // superseded LOCAL step above the floor only once the gate has made sure it
  // can never be protected anywhere.
  // With peers, nothing is retired before the gate is there to say what the
  // group still needs (a daemon re-adopting its arena at start).
  if (gate_ == nullptr && options_.final_state == v1::PROTECTED) return;
  const uint64_t floor = gate_ != nullptr ? gate_->GroupFloor(job.id) : 0;
  uint32_t complete_seen = 0;
  bool newer_seen = false;
  std::vector<uint64_t> doomed;
  for (auto it = job.steps.rbegin(); it != job.steps.rend(); ++it) {
    const uint64_t step = it->first;
    const v1::StepState st = it->second.state;
    const bool complete = st == options_.final_state || st == v1::PROTECTED;
    if (complete) {
      if (complete_seen++ >= options_.retain && (gate_ == nullptr || step < floor)) {
        doomed.push_back(step);
      }
      newer_seen = true;
    } else if (st == v1::LOCAL) {
      if (newer_seen) {
        if (gate_ == nullptr || step < floor ||
            (step > floor && gate_->MayDropUnprotected(job.id, step))) {
          doomed.push_back(step);
        }
      }
      newer_seen = true;
    } else if (newer_seen) {
      doomed.push_back(step);
    }
  }
  for (uint64_t step : doomed) EraseStep(job, step);
}

void StepStore::EraseStep(Job& job, uint64_t step) {
  auto it = job.steps.find(step);
  if (it == job.steps.end()) return;
  for (auto& [rank, rd] : it->second.ranks) {
    auto js = job.sessions.find(rank);
    if (js != job.sessions.end()) {
      auto ses = sessions_.find(js->second);
      if (ses != sessions_.end() && ses->second->open == rd) ses->second->open.reset();
    }
    Kill(rd);
  }
  job.steps.erase(it);
}

absl::Status StepStore::AbortRank(uint64_t session, uint64_t step) {
  absl::MutexLock lock(&mu_);
  auto s = FindSession(session);
  if (!s.ok()) return s.status();
  auto r = OpenRank(*s, step);
  if (!r.ok()) return r.status();
  DiscardOpenRank(*s);
  return absl::OkStatus();
}

absl::StatusOr<std::vector<v1::RestorableStep>> StepStore::ListRestorable(uint64_t session) {
  absl::MutexLock lock(&mu_);
  auto s = FindSession(session);
  if (!s.ok()) return s.status();
  std::vector<v1::RestorableStep> out;
  const Job& job = *jobs_.at((*s)->job_id);
  for (auto it = job.steps.rbegin(); it != job.steps.rend(); ++it) {
    if (it->second.state == v1::RECEIVING) continue;
    auto rd = it->second.ranks.find((*s)->rank);
    if (rd == it->second.ranks.end()) continue;
    v1::RestorableStep r;
    r.set_step(it->first);
    r.set_state(it->second.state);
    r.set_bytes(rd->second->bytes);
    out.push_back(r);
  }
  return out;
}

absl::StatusOr<RestoreLease> StepStore::Restore(uint64_t session, uint64_t step) {
  absl::MutexLock lock(&mu_);
  auto s = FindSession(session);
  if (!s.ok()) return s.status();
  Session* ses = *s;
  // Asked again, whatever it finds (nothing, even: the trainer starts over),
  // the rank knows a step it restored was withdrawn.
  ses->withdrawn = 0;
  ses->restored_until_open = 0;
  Job& job = *jobs_.at(ses->job_id);
  std::shared_ptr<RankData> found;
  std::vector<uint64_t> restorable;
  for (auto it = job.steps.rbegin(); it != job.steps.rend(); ++it) {
    if (it->second.state == v1::RECEIVING) continue;
    auto rd = it->second.ranks.find(ses->rank);
    if (rd == it->second.ranks.end()) continue;
    restorable.push_back(it->first);
    if (!found && (step == 0 || step == it->first)) found = rd->second;
  }
  if (!found && unrecoverable_.count(ses->job_id)) return unrecoverable_.at(ses->job_id);
  if (!found) {
    return absl::NotFoundError(absl::StrFormat(
        "job %s has no restorable %s for rank %d on this node; restorable steps: {%s}",
        ses->job_id, step == 0 ? std::string("step") : absl::StrFormat("step %d", step),
        ses->rank, absl::StrJoin(restorable, ", ")));
  }
  if (ses->leases.size() >= options_.limits.max_leases_per_session) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "session holds %d restore leases, its limit; release some", ses->leases.size()));
  }
  // The rank's next snapshot, if it is not newer than what the job holds,
  // rewinds the job to this step (BeginRank).
  ses->restored = found->step;
  ses->restored_at = step_seq_;
  ses->restored_until_open = found->step;
  ++found->pins;
  RestoreLease lease;
  lease.lease_id = next_id_++;
  lease.step = found->step;
  lease.window = Window{found->extent.offset, found->bytes, found->extent};
  lease.manifest = found->manifest;
  ses->leases[lease.lease_id] = found;
  return lease;
}

uint32_t StepStore::RewindLocked(Job& job, uint64_t step, bool keep_receiving,
                                 uint64_t created_until) {
  std::vector<uint64_t> newer;
  for (auto it = job.steps.upper_bound(step); it != job.steps.end(); ++it) {
    // A peer's rewind never takes a window a trainer here is writing.
    if (keep_receiving && it->second.state == v1::RECEIVING) continue;
    if (it->second.created > created_until) continue;
    newer.push_back(it->first);
  }
  for (uint64_t n : newer) EraseStep(job, n);
  for (auto& [rank, last] : job.last_committed) last = std::min(last, step);
  return static_cast<uint32_t>(newer.size());
}

uint32_t StepStore::RewindTo(const std::string& job_id, uint64_t step) {
  absl::MutexLock lock(&mu_);
  auto it = jobs_.find(job_id);
  if (it == jobs_.end()) return 0;
  return RewindLocked(*it->second, step, /*keep_receiving=*/true);
}

void StepStore::SetRetentionGate(RetentionGate* gate) {
  absl::MutexLock lock(&mu_);
  gate_ = gate;
}

void StepStore::SetRewindListener(std::function<void(const std::string&, uint64_t)> listener) {
  absl::MutexLock lock(&mu_);
  rewind_listener_ = std::move(listener);
}

absl::Status StepStore::Demote(const std::string& job_id, uint64_t step) {
  absl::MutexLock lock(&mu_);
  auto it = jobs_.find(job_id);
  if (it == jobs_.end() || it->second->steps.count(step) == 0 ||
      it->second->steps.at(step).state != v1::PROTECTED) {
    return absl::FailedPreconditionError(
        absl::StrFormat("job %s holds no PROTECTED step %d", job_id, step));
  }
  it->second->steps.at(step).state = v1::LOCAL;
  return absl::OkStatus();
}

bool StepStore::AddEmptyStep(const std::string& job_id, uint64_t step) {
  if (!ValidJobId(job_id, options_.limits.max_job_id_bytes) || step == 0) return false;
  absl::MutexLock lock(&mu_);
  auto& job = jobs_[job_id];
  if (!job) {
    job = std::make_unique<Job>();
    job->id = job_id;
  }
  if (!job->local_ranks.empty()) return false;
  if (!job->steps.empty() && job->steps.rbegin()->first >= step) return false;
  Step& st = job->steps[step];
  st.state = v1::LOCAL;
  Retire(*job);
  return true;
}

void StepStore::ApplyRetention(const std::string& job_id) {
  absl::MutexLock lock(&mu_);
  auto it = jobs_.find(job_id);
  if (it != jobs_.end()) Retire(*it->second);
}

absl::Status StepStore::Release(uint64_t session, uint64_t lease_id) {
  absl::MutexLock lock(&mu_);
  auto rd = FindLease(session, lease_id);
  if (!rd.ok()) return rd.status();
  Unpin(*rd);
  sessions_.at(session)->leases.erase(lease_id);
  return absl::OkStatus();
}

absl::StatusOr<StepStore::PinnedBytes> StepStore::Read(uint64_t session, uint64_t lease_id,
                                                       uint64_t offset, uint64_t length) {
  // Made before the lock: a pin that could not be made never runs its
  // release under it.
  auto pin = std::make_shared<ReadPin>(pin_owner_);
  absl::MutexLock lock(&mu_);
  auto lease = FindLease(session, lease_id);
  if (!lease.ok()) return lease.status();
  std::shared_ptr<RankData> rd = *lease;
  if (offset > rd->bytes || length > rd->bytes - offset) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "read of %d bytes at offset %d passes the end of the %d-byte window", length, offset,
        rd->bytes));
  }
  Session* ses = sessions_.at(session).get();
  if (ses->reads >= options_.limits.max_leases_per_session) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "session has %d reads in flight, its limit; finish reading before starting more",
        ses->reads));
  }
  ++ses->reads;
  ++rd->pins;
  pin->Arm(session, rd);
  PinnedBytes out;
  out.bytes = absl::Span<const uint8_t>(arena_->base() + rd->extent.offset + offset, length);
  out.pin = std::move(pin);
  return out;
}

void StepStore::DropReadPin(uint64_t session, const std::shared_ptr<RankData>& rd) {
  absl::MutexLock lock(&mu_);
  Unpin(rd);
  auto it = sessions_.find(session);
  if (it != sessions_.end() && it->second->reads > 0) --it->second->reads;
}

std::vector<StepSummary> StepStore::ListSteps(const std::string& job_id) {
  absl::MutexLock lock(&mu_);
  std::vector<StepSummary> out;
  for (const auto& [id, job] : jobs_) {
    if (!job_id.empty() && id != job_id) continue;
    for (const auto& [n, st] : job->steps) {
      StepSummary s;
      s.job_id = id;
      s.step = n;
      s.state = st.state;
      s.ranks_expected = job->local_ranks.size();
      for (const auto& [rank, rd] : st.ranks) {
        s.bytes += rd->bytes;
        s.ranks_committed += rd->phase == RankData::Phase::kCommitted;
      }
      out.push_back(s);
    }
  }
  return out;
}

std::optional<uint32_t> StepStore::OwnerLocked(const std::string& job_id) const {
  auto it = owners_.find(job_id);
  if (it == owners_.end()) return std::nullopt;
  return it->second;
}

absl::Status StepStore::ClaimJob(const std::string& job_id, uint32_t uid, uint32_t exempt_uid) {
  // Jobs whose owner this daemon remembers; beyond, new jobs are refused on
  // the socket until some are dropped.
  // One uid's claims are bounded too, so that it cannot use them all up.
  constexpr size_t kMaxOwnedJobs = 65536, kMaxOwnedJobsPerUid = 4096;
  if (!ValidJobId(job_id, options_.limits.max_job_id_bytes)) {  // as Attach says it
    return absl::InvalidArgumentError(absl::StrFormat(
        "job id '%s' is invalid: use 1 to %d characters from [A-Za-z0-9._-]",
        job_id.substr(0, 64), options_.limits.max_job_id_bytes));
  }
  absl::MutexLock lock(&mu_);
  auto it = owners_.find(job_id);
  if (it == owners_.end()) {
    // Recorded for the daemon's own uid too: its trainers' jobs are not
    // there for another admitted uid to take.
    const size_t mine = std::count_if(owners_.begin(), owners_.end(),
                                      [&](const auto& o) { return o.second == uid; });
    if (owners_.size() >= kMaxOwnedJobs || (uid != exempt_uid && mine >= kMaxOwnedJobsPerUid)) {
      return absl::ResourceExhaustedError(absl::StrFormat(
          "ecsnapd already tracks the owners of %d jobs (%d of them uid %d's); drop finished "
          "jobs with ecsnapctl drop",
          owners_.size(), mine, uid));
    }
    owners_[job_id] = uid;
    return absl::OkStatus();
  }
  if (it->second == uid || uid == exempt_uid) return absl::OkStatus();
  return absl::PermissionDeniedError(absl::StrFormat(
      "job %s belongs to uid %d; uid %d may not attach to it", job_id, it->second, uid));
}

void StepStore::SetOwnerFromGroup(const std::string& job_id, uint32_t uid) {
  if (!ValidJobId(job_id, options_.limits.max_job_id_bytes)) return;
  int spares = 0;
  {
    absl::MutexLock lock(&mu_);
    auto [it, fresh] = owners_.try_emplace(job_id, uid);
    const bool from_data = owner_from_data_.insert(job_id).second == false;
    if (fresh || it->second == uid) return;
    if (from_data) {
      // This node's own records name the owner: they are newer than what a
      // peer kept of a job since dropped and made again.
      return;
    }
    // A uid claimed the job here since this node came back empty: what it
    // wrote meanwhile is not the job's. Its open steps and the steps it
    // committed go, and so do the spare windows it may still map.
    const uint32_t displaced = it->second;
    it->second = uid;
    auto job = jobs_.find(job_id);
    if (job != jobs_.end()) {
      for (const auto& [rank, id] : job->second->sessions) {
        auto ses = sessions_.find(id);
        if (ses != sessions_.end()) DiscardOpenRank(ses->second.get());
      }
      std::vector<uint64_t> steps;
      for (const auto& [n, st] : job->second->steps) steps.push_back(n);
      for (uint64_t n : steps) EraseStep(*job->second, n);
      job->second->last_committed.clear();
    }
    Log("job %s: claimed here by uid %d since this node came back, but its data, rebuilt from "
        "the group, belongs to uid %d; uid %d is refused from now on and what it wrote here is "
        "dropped",
        job_id, displaced, uid, displaced);
  }
  spares = arena_->ReclaimSparesOfJob(job_id);
  if (spares > 0) Log("job %s: %d spare windows of the displaced uid removed", job_id, spares);
}

absl::StatusOr<std::pair<uint32_t, uint64_t>> StepStore::Drop(const std::string& job_id,
                                                             uint64_t step) {
  absl::MutexLock lock(&mu_);
  auto it = jobs_.find(job_id);
  if (it == jobs_.end()) {
    // A job claimed on the socket that never attached or committed: dropping
    // it whole frees its name.
    if (step == 0 && owners_.erase(job_id) > 0) {
      owner_from_data_.erase(job_id);
      return std::make_pair(0u, uint64_t{0});
    }
    return absl::NotFoundError(absl::StrFormat("job %s is not held by this daemon", job_id));
  }
  Job& job = *it->second;
  std::vector<uint64_t> steps;
  for (const auto& [n, st] : job.steps) {
    if (step == 0 || n == step) steps.push_back(n);
  }
  if (steps.empty() && step == 0) {
    owners_.erase(job_id);
    owner_from_data_.erase(job_id);
    if (job.sessions.empty()) jobs_.erase(it);
    return std::make_pair(0u, uint64_t{0});
  }
  if (steps.empty()) {
    return absl::NotFoundError(absl::StrFormat("job %s holds no step %d", job_id, step));
  }
  uint64_t bytes = 0;
  for (uint64_t n : steps) {
    for (const auto& [rank, rd] : job.steps[n].ranks) bytes += rd->bytes;
    EraseStep(job, n);
  }
  if (step == 0 && job.sessions.empty()) {
    owners_.erase(job_id);
    owner_from_data_.erase(job_id);
    jobs_.erase(it);
  }
  return std::make_pair(static_cast<uint32_t>(steps.size()), bytes);
}

absl::StatusOr<VerifyReport> StepStore::Verify(const std::string& job_id, uint64_t step) {
  std::vector<std::shared_ptr<RankData>> ranks;
  {
    absl::MutexLock lock(&mu_);
    if (!job_id.empty() && jobs_.count(job_id) == 0) {
      return absl::NotFoundError(absl::StrFormat("job %s is not held by this daemon", job_id));
    }
    for (const auto& [id, job] : jobs_) {
      if (!job_id.empty() && id != job_id) continue;
      for (const auto& [n, st] : job->steps) {
        if (step != 0 && n != step) continue;
        for (const auto& [rank, rd] : st.ranks) {
          if (rd->phase != RankData::Phase::kCommitted) continue;
          ++rd->pins;
          ranks.push_back(rd);
        }
      }
    }
  }
  VerifyReport report;
  for (const auto& rd : ranks) {
    absl::Status st =
        CheckCrcs(rd->manifest, arena_->Bytes(rd->extent).first(rd->bytes), 1, &report);
    if (!st.ok()) {
      report.errors.push_back(
          absl::StrCat(RankLabel(rd->job_id, rd->step, rd->rank), ": ", st.message()));
    }
  }
  absl::MutexLock lock(&mu_);
  for (const auto& rd : ranks) Unpin(rd);
  return report;
}

absl::Status StepStore::MarkProtected(const std::string& job_id, uint64_t step) {
  absl::MutexLock lock(&mu_);
  auto it = jobs_.find(job_id);
  if (it == jobs_.end() || it->second->steps.count(step) == 0) {
    return absl::NotFoundError(absl::StrFormat("job %s holds no step %d", job_id, step));
  }
  Step& st = it->second->steps.at(step);
  if (st.state != v1::LOCAL) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "job %s step %d is %s, not LOCAL", job_id, step, v1::StepState_Name(st.state)));
  }
  st.state = v1::PROTECTED;
  Settle(*it->second, st);
  return absl::OkStatus();
}

void StepStore::SetLocalListener(std::function<void(const std::string&, uint64_t)> listener) {
  absl::MutexLock lock(&mu_);
  local_listener_ = std::move(listener);
}

absl::StatusOr<Payload> StepStore::PinPayload(const std::string& job_id, uint64_t step) {
  absl::MutexLock lock(&mu_);
  auto job = jobs_.find(job_id);
  if (job == jobs_.end() || job->second->steps.count(step) == 0) {
    return absl::NotFoundError(absl::StrFormat("job %s holds no step %d here", job_id, step));
  }
  const Step& st = job->second->steps.at(step);
  if (st.state == v1::RECEIVING) {
    return absl::FailedPreconditionError(
        absl::StrFormat("job %s step %d is still receiving", job_id, step));
  }
  Payload p;
  p.local_ranks = job->second->local_ranks;
  p.state = st.state;
  p.owner_uid = OwnerLocked(job_id);
  auto pinned = std::make_shared<std::vector<std::shared_ptr<RankData>>>();
  for (const auto& [rank, rd] : st.ranks) {
    ++rd->pins;
    pinned->push_back(rd);
    p.ranks.push_back({rank, absl::Span<const uint8_t>(arena_->base() + rd->extent.offset, rd->bytes),
                       &rd->manifest});
    p.bytes += rd->bytes;
  }
  p.pin = std::shared_ptr<void>(nullptr, [this, pinned](void*) {
    absl::MutexLock lock(&mu_);
    for (const auto& rd : *pinned) Unpin(rd);
  });
  return p;
}

absl::Status StepStore::CheckRebuilt(const std::string& job_id, uint64_t step,
                                     const RebuiltRank& r) const {
  absl::Status st = CheckManifest(r.manifest, r.bytes, ManifestLimitsOf(options_.limits));
  if (st.ok()) {
    st = CheckCrcs(r.manifest, arena_->Bytes(r.extent).first(r.bytes), options_.verify_threads,
                   nullptr);
  }
  if (!st.ok()) {
    return absl::DataLossError(
        absl::StrCat("rebuilt ", RankLabel(job_id, step, r.rank), ": ", st.message()));
  }
  return absl::OkStatus();
}

absl::Status StepStore::InstallRebuilt(const std::string& job_id, uint64_t step,
                                       std::vector<uint32_t> local_ranks,
                                       std::vector<RebuiltRank> ranks) {
  std::sort(local_ranks.begin(), local_ranks.end());
  for (const RebuiltRank& r : ranks) RETURN_IF_ERROR(CheckRebuilt(job_id, step, r));
  absl::MutexLock lock(&mu_);
  return AddRebuilt(job_id, step, local_ranks, std::move(ranks), v1::PROTECTED);
}

absl::Status StepStore::InstallRebuiltRank(const std::string& job_id, uint64_t step,
                                           std::vector<uint32_t> local_ranks, RebuiltRank rank) {
  std::sort(local_ranks.begin(), local_ranks.end());
  RETURN_IF_ERROR(CheckRebuilt(job_id, step, rank));
  absl::MutexLock lock(&mu_);
  std::vector<RebuiltRank> one;
  one.push_back(std::move(rank));
  return AddRebuilt(job_id, step, local_ranks, std::move(one), v1::REBUILDING);
}

absl::Status StepStore::AddRebuilt(const std::string& job_id, uint64_t step,
                                   const std::vector<uint32_t>& local_ranks,
                                   std::vector<RebuiltRank> ranks, v1::StepState state) {
  unrecoverable_.erase(job_id);
  auto& job = jobs_[job_id];
  if (!job) {
    job = std::make_unique<Job>();
    job->id = job_id;
    job->local_ranks = local_ranks;
  }
  // A REBUILDING step holds only ranks served on demand by a rebuild; the
  // rebuilder works on one step at a time, so a newer one than `step` is
  // what a rebuild that failed left. It does not stand in the way of the
  // older step the pass falls back to, and goes as soon as that step's
  // first rank is here: from then on every rank restores the same newest
  // step. (A lease on it keeps its bytes readable until released.)
  // One that holds every rank of the node is whole here, though its rebuild
  // failed: newer than anything the pass falls back to, it stays.
  std::vector<uint64_t> partial;
  for (auto it = job->steps.lower_bound(step); it != job->steps.end(); ++it) {
    bool whole = it->second.state != v1::REBUILDING;
    if (!whole && it->first != step) {
      whole = !local_ranks.empty() &&
              std::all_of(local_ranks.begin(), local_ranks.end(),
                          [&](uint32_t r) { return it->second.ranks.count(r) > 0; });
      if (!whole) partial.push_back(it->first);
    }
    if (!whole) continue;
    return absl::FailedPreconditionError(absl::StrFormat(
        "job %s already holds step %d, not older than the rebuilt step %d", job_id, it->first,
        step));
  }
  for (uint64_t p : partial) {
    Log("job %s step %d: the ranks served from it on demand are withdrawn; its rebuild "
        "failed and step %d is rebuilt instead",
        job_id, p, step);
    // A rank that restored it is told at its next snapshot.
    for (const auto& [rank, id] : job->sessions) {
      auto ses = sessions_.find(id);
      if (ses != sessions_.end() && ses->second->restored_until_open == p) {
        ses->second->withdrawn = p;
      }
    }
    EraseStep(*job, p);
  }
  // As after a rewind: the ranks' next steps count from here, not from the
  // withdrawn one.
  if (!partial.empty()) {
    for (auto& [rank, last] : job->last_committed) last = std::min(last, step);
  }
  Step& st = job->steps[step];
  st.state = state;
  for (RebuiltRank& r : ranks) {
    const std::string bytes =
        EncodeRankRecord({job_id, step, r.rank, local_ranks, r.extent, r.bytes, &r.manifest,
                          OwnerLocked(job_id)});
    auto rd = std::make_shared<RankData>();
    rd->job_id = job_id;
    rd->step = step;
    rd->rank = r.rank;
    rd->extent = r.extent;
    rd->bytes = r.bytes;
    rd->phase = RankData::Phase::kCommitted;
    rd->manifest = std::move(r.manifest);
    auto id = arena_->AddRecord(RecordKind::kRank, absl::Span<const uint8_t>(
        reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()));
    if (id.ok()) rd->record_id = *id;  // without a record it is lost at a restart only
    // A rank served early (or by a rebuild that failed) is replaced: its
    // record goes now, its window once no restore pins it.
    std::shared_ptr<RankData>& slot = st.ranks[r.rank];
    if (slot) Kill(slot);
    slot = rd;
    job->last_committed[r.rank] = std::max(job->last_committed[r.rank], step);
  }
  if (state == v1::PROTECTED) Retire(*job);
  return absl::OkStatus();
}

absl::StatusOr<std::pair<std::string, uint32_t>> StepStore::SessionRank(uint64_t session) {
  absl::MutexLock lock(&mu_);
  auto s = FindSession(session);
  if (!s.ok()) return s.status();
  return std::make_pair((*s)->job_id, (*s)->rank);
}

void StepStore::SetUnrecoverable(const std::string& job_id, absl::Status why) {
  absl::MutexLock lock(&mu_);
  unrecoverable_[job_id] = std::move(why);
}

void StepStore::ClearUnrecoverable(const std::string& job_id) {
  absl::MutexLock lock(&mu_);
  unrecoverable_.erase(job_id);
}

std::vector<std::pair<std::string, uint64_t>> StepStore::CompleteSteps() {
  absl::MutexLock lock(&mu_);
  std::vector<std::pair<std::string, uint64_t>> out;
  for (const auto& [id, job] : jobs_) {
    for (const auto& [n, st] : job->steps) {
      if (st.state == v1::LOCAL || st.state == v1::PROTECTED) out.emplace_back(id, n);
    }
  }
  return out;
}

uint32_t StepStore::sessions() const {
  absl::MutexLock lock(&mu_);
  return sessions_.size();
}

uint32_t StepStore::jobs() const {
  absl::MutexLock lock(&mu_);
  return jobs_.size();
}

}  // namespace ecsnap::daemon
