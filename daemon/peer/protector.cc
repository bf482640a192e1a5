#include "daemon/peer/protector.h"

#include "daemon/peer/grpc_transport.h"
#include "daemon/peer/tcp_transport.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <chrono>
#include <set>

#include "absl/strings/str_format.h"
#include "common/grpc_status.h"
#include "common/log.h"
#include "common/metrics.h"
#include "daemon/store/store.pb.h"
#include "ec/crc32c.h"

namespace ecsnap::daemon {
namespace {

// Retry backoff of pushes and notices: doubles from the first to the cap.
constexpr absl::Duration kFirstBackoff = absl::Milliseconds(100);
constexpr absl::Duration kMaxBackoff = absl::Seconds(2);
// A push failure is logged the first time and every this many attempts.
constexpr int kLogEveryAttempts = 10;
// Notices owed to one peer; past this the oldest are dropped (the peer
// re-learns them from inventories and pings).
constexpr size_t kMaxOutbox = 65536;

absl::Duration Backoff(int attempts) {
  absl::Duration d = kFirstBackoff;
  for (int i = 1; i < attempts && d < kMaxBackoff; ++i) d *= 2;
  return std::min(d, kMaxBackoff);
}

// A refusal that no retry can change: the step is retired, rewound or
// abandoned there, or gone here.
bool Permanent(const absl::Status& st) {
  return st.code() == absl::StatusCode::kFailedPrecondition ||
         st.code() == absl::StatusCode::kNotFound ||
         st.code() == absl::StatusCode::kInvalidArgument;
}

}  // namespace

Protector::Protector(StepStore* store, ParityStore* parity, Group group, const ec::Layout& layout,
                     Options options)
    : store_(store),
      parity_(parity),
      group_(std::move(group)),
      layout_(layout),
      options_(options),
      watchdog_(absl::Milliseconds(options.peer_timeout_ms)) {
  for (uint32_t slot : group_.slots) {
    const MetricLabels peer = {{"peer", std::to_string(slot)}};
    pushed_bytes_.push_back(&Metrics().GetCounter(
        "ecsnap_peer_pushed_bytes_total", "Chunk bytes pushed to a parity holder.", peer));
    fetched_bytes_.push_back(&Metrics().GetCounter(
        "ecsnap_peer_fetched_bytes_total", "Chunk bytes read from a survivor for a rebuild.",
        peer));
  }
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(64 << 20);
  // Reconnect quickly once a replaced peer comes back.
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 100);
  absl::MutexLock lock(&mu_);
  links_.resize(group_.addresses.size());
  const std::shared_ptr<grpc::ChannelCredentials> credentials =
      options.credentials ? options.credentials : grpc::InsecureChannelCredentials();
  for (size_t i = 0; i < group_.addresses.size(); ++i) {
    grpc::ChannelArguments peer_args = args;
    if (i < options.peer_names.size() && !options.peer_names[i].empty()) {
      peer_args.SetSslTargetNameOverride(options.peer_names[i]);
    }
    stubs_.push_back(static_cast<int>(i) == group_.self
                         ? nullptr
                         : peer::Peer::NewStub(grpc::CreateCustomChannel(
                               group_.addresses[i], credentials, peer_args)));
    PeerState p;
    p.position = static_cast<int>(i);
    p.slot = group_.slots[i];
    p.address = group_.addresses[i];
    peers_.push_back(p);
    seen_.push_back(std::chrono::steady_clock::time_point());
  }
  std::vector<peer::Peer::Stub*> stubs;
  for (const auto& stub : stubs_) stubs.push_back(stub.get());
  if (options.tcp_bulk) {
    auto tcp = std::make_unique<TcpTransport>(std::move(stubs), group_.addresses, group_.slots,
                                              &watchdog_);
    if (options.rdma != nullptr) {
      rdma_ = std::make_unique<RdmaCarrier>(options.rdma, &watchdog_);
      tcp->UseRdma(rdma_.get());
    }
    transport_ = std::move(tcp);
  } else {
    transport_ = std::make_unique<GrpcTransport>(std::move(stubs), group_.slots, &watchdog_);
  }
}

Protector::~Protector() {
  // A thread left inside a call would use this object after it is gone.
  if (!Stop()) std::abort();
}

void Protector::Start() {
  auto run = [this](auto fn) {
    {
      absl::MutexLock lock(&mu_);
      ++running_;
    }
    threads_.emplace_back([this, fn] {
      fn();
      absl::MutexLock lock(&mu_);
      --running_;
    });
  };
  for (int i = 0; i < layout_.n(); ++i) {
    if (i == group_.self) continue;
    run([this, i] { PushLoop(i); });
    run([this, i] { NotifyLoop(i); });
  }
  run([this] { PingLoop(); });
}

bool Protector::Stop(absl::Duration grace) {
  bool all_done = false;
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  watchdog_.CancelAll();
  {
    absl::MutexLock lock(&mu_);
    auto done = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return running_ == 0; };
    all_done = mu_.AwaitWithTimeout(absl::Condition(&done), grace);
  }
  for (auto& t : threads_) {
    if (all_done) {
      t.join();
    } else {
      t.detach();
    }
  }
  threads_.clear();
  return all_done;
}

bool Protector::SleepFor(absl::Duration d) {
  absl::MutexLock lock(&mu_);
  auto stop = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stopping_; };
  return !mu_.AwaitWithTimeout(absl::Condition(&stop), d);
}

std::chrono::system_clock::time_point Protector::Deadline(uint64_t bytes) const {
  return std::chrono::system_clock::now() + std::chrono::milliseconds(options_.peer_timeout_ms) +
         std::chrono::microseconds(bytes / 50);  // 50 MB/s at the slowest
}

// ---------------------------------------------------------------------------
// Pushes.

void Protector::QueuePushLocked(int holder, const std::string& job, uint64_t step) {
  Link& link = links_[holder];
  auto [it, added] = link.pushes.try_emplace({job, step});
  if (added) it->second.due = absl::Now();
  else it->second.due = std::min(it->second.due, absl::Now());
  link.wake = true;
}

void Protector::SetReady() {
  {
    absl::MutexLock lock(&mu_);
    ready_ = true;
  }
  // Peers' steps that arrived during the start-up pass.
  std::map<std::string, uint64_t> deferred;
  {
    absl::MutexLock lock(&mu_);
    deferred.swap(deferred_);
  }
  for (const auto& [job, step] : deferred) OnPeerStep(job, step);
  // Retention waited for the start-up pass (a re-adopted arena keeps every
  // step until then): apply it now.
  std::set<std::string> jobs;
  for (const auto& [job, step] : store_->CompleteSteps()) jobs.insert(job);
  for (const std::string& job : jobs) store_->ApplyRetention(job);
}

uint64_t Protector::NewestProtectedAnywhereLocked(const std::string& job) const {
  auto it = newest_protected_.find(job);
  if (it == newest_protected_.end()) return 0;
  return *std::max_element(it->second.begin(), it->second.end());
}

void Protector::OnPeerStep(const std::string& job, uint64_t step) {
  {
    absl::MutexLock lock(&mu_);
    if (!ready_) {
      // Decided once the start-up pass is over (SetReady).
      uint64_t& newest = deferred_[job];
      newest = std::max(newest, step);
      return;
    }
  }
  if (parity_->KnowsPayloadOf(job, group_.self)) return;
  if (!store_->AddEmptyStep(job, step)) return;
  Log("job %s step %d: no rank of the job runs on this node; it takes part with an empty "
      "payload",
      job, step);
  OnLocal(job, step);
}

void Protector::OnLocal(const std::string& job, uint64_t step) {
  absl::MutexLock lock(&mu_);
  // For ecsnap_protect_seconds; bounded (steps that never get protected are
  // forgotten oldest first).
  local_since_.insert_or_assign(std::make_pair(job, step), std::chrono::steady_clock::now());
  if (local_since_.size() > kMaxLocalSince) {
    local_since_.erase(std::min_element(
        local_since_.begin(), local_since_.end(),
        [](const auto& a, const auto& b) { return a.second < b.second; }));
  }
  for (int i = 0; i < layout_.n(); ++i) {
    if (i != group_.self) QueuePushLocked(i, job, step);
  }
}

void Protector::PushLoop(int holder) {
  while (true) {
    Key key;
    PushTask task;
    {
      absl::MutexLock lock(&mu_);
      Link& link = links_[holder];
      while (true) {
        if (stopping_) return;
        auto next = link.pushes.end();
        for (auto it = link.pushes.begin(); it != link.pushes.end(); ++it) {
          // Newest steps first among those due: they are what protection is for.
          if (it->second.due <= absl::Now() &&
              (next == link.pushes.end() || it->first.second > next->first.second)) {
            next = it;
          }
        }
        if (next != link.pushes.end()) {
          key = next->first;
          task = next->second;
          link.pushes.erase(next);
          break;
        }
        absl::Time wake_at = absl::Now() + absl::Seconds(1);
        for (const auto& [k, t] : link.pushes) wake_at = std::min(wake_at, t.due);
        link.wake = false;
        auto woken = [this, &link]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
          return stopping_ || link.wake;
        };
        mu_.AwaitWithDeadline(absl::Condition(&woken), wake_at);
      }
    }
    const absl::Status st = PushStep(holder, key.first, key.second);
    if (st.ok() || Permanent(st)) {
      if (task.attempts > 0) {
        Log("push of job %s step %d to slot %d %s after %d failed attempt(s)", key.first,
            key.second, group_.slots[holder], st.ok() ? "succeeded" : "given up", task.attempts);
      }
      continue;
    }
    absl::MutexLock lock(&mu_);
    if (stopping_) return;
    ++task.attempts;
    if (task.attempts == 1) task.first_failure = absl::Now();
    task.last_error = std::string(st.message());
    if (task.attempts == 1 || task.attempts % kLogEveryAttempts == 0) {
      Log("push of job %s step %d to slot %d failed (attempt %d, retrying with backoff): %s",
          key.first, key.second, group_.slots[holder], task.attempts, st.message());
    }
    task.due = absl::Now() + Backoff(task.attempts);
    // A newer OnLocal of the same step may have queued it again meanwhile.
    links_[holder].pushes.try_emplace(key, task);
  }
}

absl::StatusOr<peer::SlotStep> Protector::Described(const std::string& job, uint64_t step,
                                                    const Payload& payload) {
  {
    absl::MutexLock lock(&mu_);
    auto it = described_.find({job, step});
    if (it != described_.end()) return *it->second;
  }
  auto me = std::make_shared<const peer::SlotStep>(Describe(payload, layout_, group_.self));
  parity_->RecordSlot(job, step, *me);
  absl::MutexLock lock(&mu_);
  // Keeps the shapes of the few steps in flight: older ones are done.
  while (described_.size() >= 16) described_.erase(described_.begin());
  described_[{job, step}] = me;
  return *me;
}

absl::Status Protector::PushStep(int holder, const std::string& job, uint64_t step) {
  auto payload = store_->PinPayload(job, step);
  if (!payload.ok()) return payload.status();                 // retired meanwhile
  if (payload->state == v1::PROTECTED) return absl::OkStatus();  // no longer needed
  if (parity_->Abandoned(job, step)) {
    return absl::FailedPreconditionError("the step was abandoned by the group");
  }
  auto me = Described(job, step, *payload);
  if (!me.ok()) return me.status();
  const int k = layout_.k(), m = layout_.m();
  const PayloadChunks chunks(layout_, group_.self, payload->RankBytes());
  for (int p = 0; p < k; ++p) {
    const int stripe = chunks.StripeOf(p);
    bool keeps = false;
    for (int r = 0; r < m; ++r) keeps |= layout_.SlotOf(stripe, k + r) == holder;
    if (!keeps) continue;
    absl::Status st = PushChunk(holder, job, step, *payload, chunks, *me, p);
    NotePeer(holder, Permanent(st) ? absl::OkStatus() : st);
    if (!st.ok()) return st;
  }
  return absl::OkStatus();
}

absl::Status Protector::PushChunk(int holder, const std::string& job, uint64_t step,
                                  const Payload& payload, const PayloadChunks& chunks,
                                  const peer::SlotStep& me, int p) {
  const ec::Extent e = chunks.Chunk(p);
  peer::PushChunkHeader h;
  h.mutable_id()->set_job_id(job);
  h.mutable_id()->set_step(step);
  h.mutable_id()->set_stripe(chunks.StripeOf(p));
  h.mutable_id()->set_position(p);
  h.set_length(e.length);
  h.set_crc32c(me.chunk_crc32c(p));
  *h.mutable_from() = me;
  const absl::Status st =
      transport_
          ->Push(holder, h,
                 [&](const std::function<bool(absl::Span<const uint8_t>)>& piece) {
                   bool more = true;
                   payload.ForEachPiece(e.offset, e.length, [&](absl::Span<const uint8_t> bytes) {
                     if (more) more = piece(bytes);
                   });
                 })
          .status();
  if (st.ok()) {
    pushed_bytes(holder).Add(e.length);
  } else {
    Metrics()
        .GetCounter("ecsnap_peer_push_errors_total",
                    "Chunk pushes that failed (retried), by holder and status code.",
                    {{"peer", std::to_string(group_.slots[holder])},
                     {"code", absl::StatusCodeToString(st.code())}})
        .Add();
  }
  return st;
}

// ---------------------------------------------------------------------------
// Notices.

void Protector::SendLocked(int peer, std::string key, Outgoing out) {
  Link& link = links_[peer];
  out.seq = ++seq_;
  link.outbox[std::move(key)] = std::move(out);
  while (link.outbox.size() > kMaxOutbox) {
    auto oldest = std::min_element(link.outbox.begin(), link.outbox.end(),
                                   [](const auto& a, const auto& b) { return a.second.seq < b.second.seq; });
    link.outbox.erase(oldest);
  }
  link.wake = true;
}

void Protector::BroadcastLocked(const peer::JobNotice& notice, const std::string& key) {
  for (int i = 0; i < layout_.n(); ++i) {
    if (i == group_.self) continue;
    Outgoing out;
    out.job = notice.job_id();
    out.notice = notice;
    SendLocked(i, key, out);
  }
}

void Protector::Announce(const peer::StripeProtected& row) {
  OnRowComplete(row);
  absl::MutexLock lock(&mu_);
  const std::string key =
      absl::StrFormat("r/%s/%d/%d/%d", row.job_id(), row.step(), row.stripe(), row.row());
  for (int i = 0; i < layout_.n(); ++i) {
    if (i == group_.self) continue;
    Outgoing out;
    out.job = row.job_id();
    out.step = row.step();
    out.row = row;
    SendLocked(i, key, out);
  }
}

void Protector::NotifyLoop(int peer) {
  int failures = 0;
  while (true) {
    std::string key;
    Outgoing out;
    {
      absl::MutexLock lock(&mu_);
      Link& link = links_[peer];
      auto ready = [this, &link]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return stopping_ || !link.outbox.empty();
      };
      mu_.Await(absl::Condition(&ready));
      if (stopping_) return;
      auto first = std::min_element(link.outbox.begin(), link.outbox.end(),
                                    [](const auto& a, const auto& b) { return a.second.seq < b.second.seq; });
      key = first->first;
      out = first->second;
    }
    grpc::ClientContext ctx;
    ctx.set_deadline(Deadline(0));
    auto watch = watchdog_.Start(&ctx);
    absl::Status st;
    if (out.row.has_value()) {
      peer::StripeProtectedResponse resp;
      st = FromGrpc(stubs_[peer]->NotifyStripeProtected(&ctx, *out.row, &resp));
    } else {
      peer::JobNoticeResponse resp;
      st = FromGrpc(stubs_[peer]->NotifyJob(&ctx, *out.notice, &resp));
    }
    watch.reset();
    // A refusal is final: resending the same notice cannot change it.
    const bool delivered = st.ok() || st.code() == absl::StatusCode::kInvalidArgument ||
                           st.code() == absl::StatusCode::kFailedPrecondition;
    NotePeer(peer, delivered ? absl::OkStatus() : st);
    if (delivered) {
      failures = 0;
      absl::MutexLock lock(&mu_);
      auto& outbox = links_[peer].outbox;
      auto it = outbox.find(key);
      if (it != outbox.end() && it->second.seq == out.seq) outbox.erase(it);
      continue;
    }
    if (!SleepFor(Backoff(++failures))) return;
  }
}

// ---------------------------------------------------------------------------
// Protection state and retention.

void Protector::OnRowComplete(const peer::StripeProtected& row) {
  const int k = layout_.k(), m = layout_.m(), n = layout_.n();
  if (row.stripe() >= static_cast<uint32_t>(n) || row.row() >= static_cast<uint32_t>(m) ||
      static_cast<int>(row.holder_slot()) != layout_.SlotOf(row.stripe(), k + row.row())) {
    return;  // not a row of this group's layout
  }
  const int heard = parity_->RecordRow(row);
  if (row.lost()) {
    // A holder lost the row: the step is not protected until the stripe's
    // data chunks are folded in again. Its data slots push them again.
    if (store_->Demote(row.job_id(), row.step()).ok()) {
      absl::MutexLock lock(&mu_);
      auto& steps = protected_[row.job_id()];
      steps.erase(std::remove(steps.begin(), steps.end(), row.step()), steps.end());
      Log("job %s step %d back to LOCAL: slot %d lost parity row %d of stripe %d", row.job_id(),
          row.step(), group_.slots[row.holder_slot()], row.row(), row.stripe());
    }
    if (layout_.PositionOf(row.stripe(), group_.self) < k) {
      absl::MutexLock lock(&mu_);
      QueuePushLocked(row.holder_slot(), row.job_id(), row.step());
    }
    return;
  }
  if (heard < n * m) return;
  absl::Status st = store_->MarkProtected(row.job_id(), row.step());
  if (!st.ok()) return;  // not LOCAL here (yet, or any more)
  {
    static Histogram& protect_seconds = Metrics().GetHistogram(
        "ecsnap_protect_seconds", "Time from a step's LOCAL to its PROTECTED on this node.");
    absl::MutexLock lock(&mu_);
    auto since = local_since_.find({row.job_id(), row.step()});
    if (since != local_since_.end()) {
      protect_seconds.Observe(std::chrono::duration<double>(
                                  std::chrono::steady_clock::now() - since->second)
                                  .count());
      local_since_.erase(since);
    }
  }
  Log("job %s step %d PROTECTED across group %d (RS %d+%d)", row.job_id(), row.step(), group_.id,
      k, m);
  OnInstalled(row.job_id(), row.step());
}

void Protector::OnInstalled(const std::string& job, uint64_t step) {
  {
    absl::MutexLock lock(&mu_);
    auto& steps = protected_[job];
    if (std::find(steps.begin(), steps.end(), step) == steps.end()) steps.push_back(step);
    std::sort(steps.begin(), steps.end());
    while (steps.size() > std::max<uint32_t>(options_.retain, 1)) steps.erase(steps.begin());
    described_.erase({job, step});
    peer::JobNotice notice;
    notice.set_job_id(job);
    notice.set_slot(group_.self);
    notice.set_protected_step(steps.back());
    BroadcastLocked(notice, "p/" + job);
  }
  NoteProtected(group_.self, job, step);
}

void Protector::NoteProtected(int position, const std::string& job, uint64_t step) {
  bool moved = false;
  {
    absl::MutexLock lock(&mu_);
    auto& newest = newest_protected_[job];
    if (newest.empty()) newest.assign(layout_.n(), 0);
    if (step > newest[position]) {
      const uint64_t before = FloorLocked(job);
      newest[position] = step;
      moved = FloorLocked(job) != before;
    }
  }
  if (moved) ApplyFloor(job);
}

uint64_t Protector::FloorLocked(const std::string& job) const {
  auto it = newest_protected_.find(job);
  if (it == newest_protected_.end()) return 0;
  return *std::min_element(it->second.begin(), it->second.end());
}

uint64_t Protector::GroupFloor(const std::string& job) {
  absl::MutexLock lock(&mu_);
  return FloorLocked(job);
}

void Protector::ApplyFloor(const std::string& job) {
  store_->ApplyRetention(job);
  uint64_t drop_below = 0;
  {
    absl::MutexLock lock(&mu_);
    const uint64_t floor = FloorLocked(job);
    auto it = protected_.find(job);
    // Parity of the steps kept here (the newest `retain` protected ones and
    // everything from the group floor on) stays.
    if (it != protected_.end() && !it->second.empty()) {
      drop_below = std::min(floor, it->second.front());
    }
    // Notices about steps below that point are moot.
    DropRowNoticesLocked(job, [drop_below](uint64_t s) { return s < drop_below; });
  }
  if (drop_below > 0) parity_->DropBelow(job, drop_below);
}

void Protector::DropRowNoticesLocked(const std::string& job,
                                     const std::function<bool(uint64_t)>& moot) {
  for (Link& link : links_) {
    for (auto o = link.outbox.begin(); o != link.outbox.end();) {
      const bool drop = o->second.job == job && o->second.row.has_value() && moot(o->second.step);
      o = drop ? link.outbox.erase(o) : std::next(o);
    }
  }
}

bool Protector::MayDropUnprotected(const std::string& job, uint64_t step) {
  {
    absl::MutexLock lock(&mu_);
    // Before the start-up pass, this slot does not know what the group
    // protected; and a step some member holds PROTECTED is never abandoned,
    // whatever rows this slot lacks of it.
    if (!ready_ || step <= NewestProtectedAnywhereLocked(job)) return false;
  }
  if (parity_->Abandoned(job, step)) return true;  // told the group already
  if (!parity_->TryAbandon(job, step)) return false;
  absl::MutexLock lock(&mu_);
  peer::JobNotice notice;
  notice.set_job_id(job);
  notice.set_slot(group_.self);
  notice.set_abandoned_step(step);
  BroadcastLocked(notice, absl::StrFormat("a/%s/%d", job, step));
  for (Link& link : links_) link.pushes.erase({job, step});
  return true;
}

absl::Status Protector::OnJobNotice(const peer::JobNotice& notice) {
  if (notice.slot() >= static_cast<uint32_t>(layout_.n()) ||
      static_cast<int>(notice.slot()) == group_.self) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "a job notice from group position %d: the group has positions 0 to %d", notice.slot(),
        layout_.n() - 1));
  }
  const std::string& job = notice.job_id();
  switch (notice.what_case()) {
    case peer::JobNotice::kProtectedStep:
      NoteProtected(static_cast<int>(notice.slot()), job, notice.protected_step());
      break;
    case peer::JobNotice::kAbandonedStep: {
      {
        absl::MutexLock lock(&mu_);
        if (notice.abandoned_step() <= NewestProtectedAnywhereLocked(job)) {
          return absl::FailedPreconditionError(absl::StrFormat(
              "job %s step %d is PROTECTED in the group; it cannot be abandoned", job,
              notice.abandoned_step()));
        }
      }
      parity_->MarkAbandoned(job, notice.abandoned_step());
      {
        absl::MutexLock lock(&mu_);
        for (Link& link : links_) link.pushes.erase({job, notice.abandoned_step()});
      }
      store_->ApplyRetention(job);
      break;
    }
    case peer::JobNotice::kRewoundTo: {
      const uint64_t step = notice.rewound_to();
      if (step == 0) return absl::InvalidArgumentError("a rewind to step 0");
      {
        absl::MutexLock lock(&mu_);
        auto it = rewound_.find(job);
        if (it != rewound_.end() && it->second == step) break;  // done here already
      }
      store_->RewindTo(job, step);
      OnRewind(job, step);
      break;
    }
    default:
      return absl::InvalidArgumentError("a job notice that says nothing");
  }
  return absl::OkStatus();
}

void Protector::OnRewind(const std::string& job, uint64_t step) {
  parity_->DropAbove(job, step);
  absl::MutexLock lock(&mu_);
  auto it = rewound_.find(job);
  if (it != rewound_.end() && it->second == step) return;
  rewound_[job] = step;
  Log("job %s rewound to step %d: newer steps are discarded across group %d", job, step,
      group_.id);
  auto& newest = newest_protected_[job];
  for (uint64_t& s : newest) s = std::min(s, step);
  auto& steps = protected_[job];
  steps.erase(std::remove_if(steps.begin(), steps.end(), [&](uint64_t s) { return s > step; }),
              steps.end());
  local_since_.erase(local_since_.upper_bound({job, step}),
                     local_since_.lower_bound({job, UINT64_MAX}));
  for (Link& link : links_) {
    for (auto p = link.pushes.begin(); p != link.pushes.end();) {
      p = p->first.first == job && p->first.second > step ? link.pushes.erase(p) : std::next(p);
    }
  }
  DropRowNoticesLocked(job, [step](uint64_t s) { return s > step; });
  for (auto d = described_.begin(); d != described_.end();) {
    d = d->first.first == job && d->first.second > step ? described_.erase(d) : std::next(d);
  }
  peer::JobNotice notice;
  notice.set_job_id(job);
  notice.set_slot(group_.self);
  notice.set_rewound_to(step);
  BroadcastLocked(notice, "w/" + job);
}

std::vector<std::pair<std::string, uint64_t>> Protector::NewestProtected() const {
  absl::MutexLock lock(&mu_);
  std::vector<std::pair<std::string, uint64_t>> out;
  for (const auto& [job, steps] : protected_) {
    if (!steps.empty()) out.emplace_back(job, steps.back());
  }
  return out;
}

StepExplanation Protector::Explain(const std::string& job, uint64_t step) const {
  StepExplanation e;
  const auto knowledge = parity_->Knowledge();
  auto it = knowledge.find({job, step});
  const int k = layout_.k();
  for (int s = 0; s < layout_.n(); ++s) {
    for (int r = 0; r < layout_.m(); ++r) {
      if (it != knowledge.end() && it->second.rows.count({s, r})) continue;
      e.missing_rows.push_back(absl::StrFormat("stripe %d row %d on slot %d", s, r,
                                               group_.slots[layout_.SlotOf(s, k + r)]));
    }
  }
  absl::MutexLock lock(&mu_);
  for (size_t i = 0; i < links_.size(); ++i) {
    auto p = links_[i].pushes.find({job, step});
    if (p == links_[i].pushes.end() || p->second.attempts == 0) continue;
    e.pushes.push_back(absl::StrFormat(
        "push to slot %d: %d failed attempts since %s ago: %s", group_.slots[i],
        p->second.attempts,
        absl::FormatDuration(absl::Trunc(absl::Now() - p->second.first_failure, absl::Seconds(1))),
        p->second.last_error));
  }
  return e;
}

// ---------------------------------------------------------------------------
// Peers.

peer::SlotStep Protector::Describe(const Payload& payload, const ec::Layout& layout, int self) {
  SlotManifest sm;
  for (uint32_t r : payload.local_ranks) sm.add_local_ranks(r);
  if (payload.owner_uid.has_value()) sm.set_owner_uid(*payload.owner_uid);
  for (const Payload::Rank& r : payload.ranks) {
    SlotManifest::Rank* out = sm.add_ranks();
    out->set_rank(r.rank);
    out->set_bytes(r.bytes.size());
    *out->mutable_manifest() = *r.manifest;
  }
  peer::SlotStep me;
  me.set_slot(self);
  me.set_payload_bytes(payload.bytes);
  me.set_manifests(sm.SerializeAsString());
  me.set_manifests_crc32c(ec::Crc32c(absl::Span<const uint8_t>(
      reinterpret_cast<const uint8_t*>(me.manifests().data()), me.manifests().size())));
  const PayloadChunks chunks(layout, self, payload.RankBytes());
  for (int p = 0; p < layout.k(); ++p) {
    const ec::Extent e = chunks.Chunk(p);
    uint32_t crc = 0;
    payload.ForEachPiece(e.offset, e.length,
                         [&](absl::Span<const uint8_t> piece) { crc = ec::Crc32c(piece, crc); });
    me.add_chunk_crc32c(crc);
  }
  return me;
}

void Protector::PingLoop() {
  while (SleepFor(absl::Milliseconds(options_.ping_interval_ms))) {
    for (int i = 0; i < layout_.n(); ++i) {
      if (i == group_.self) continue;
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::milliseconds(std::min(options_.peer_timeout_ms, 1000)));
      auto watch = watchdog_.Start(&ctx);
      peer::PingRequest req;
      req.set_from_slot(group_.slots[group_.self]);
      peer::PingResponse resp;
      absl::Status st = FromGrpc(stubs_[i]->Ping(&ctx, req, &resp));
      watch.reset();
      NotePeer(i, st);
      if (!st.ok()) continue;
      for (const auto& p : resp.protected_steps()) NoteProtected(i, p.job_id(), p.step());
    }
  }
}

void Protector::NotePeer(int position, const absl::Status& status) {
  bool back = false;
  {
    absl::MutexLock lock(&mu_);
    PeerState& p = peers_[position];
    back = status.ok() && !p.reachable;
    if (status.ok()) {
      if (!p.reachable) Log("peer slot %d (%s) answers again", p.slot, p.address);
      p.reachable = true;
      p.last_error.clear();
      seen_[position] = std::chrono::steady_clock::now();
    } else {
      if (p.reachable) Log("peer slot %d (%s): %s", p.slot, p.address, status.message());
      p.reachable = false;
      p.last_error = std::string(status.message());
    }
  }
  if (back) {
    // Steps left LOCAL while the peer was away: push them again now rather
    // than at the end of their backoff. Holders acknowledge what they
    // folded already without reading it again.
    const auto steps = store_->CompleteSteps();
    absl::MutexLock lock(&mu_);
    for (const auto& [job, step] : steps) QueuePushLocked(position, job, step);
  }
}

std::vector<PeerState> Protector::Peers() const {
  absl::MutexLock lock(&mu_);
  std::vector<PeerState> out;
  const auto now = std::chrono::steady_clock::now();
  for (size_t i = 0; i < peers_.size(); ++i) {
    if (static_cast<int>(i) == group_.self) continue;
    PeerState p = peers_[i];
    if (seen_[i] != std::chrono::steady_clock::time_point()) {
      p.last_seen_ms_ago =
          std::chrono::duration_cast<std::chrono::milliseconds>(now - seen_[i]).count();
    }
    out.push_back(p);
  }
  return out;
}

}  // namespace ecsnap::daemon
