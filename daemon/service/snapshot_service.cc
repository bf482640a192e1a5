#include "daemon/service/snapshot_service.h"

#include <algorithm>
#include <utility>
#include <vector>

#include <openssl/rand.h>

#include <cstdlib>

#include "common/bulk_message.h"
#include "common/grpc_status.h"
#include "common/job_token.h"
#include "common/log.h"
#include "common/status_macros.h"
#include "daemon/service/trainer_listener.h"

namespace ecsnap::daemon {
namespace {

constexpr int kSessionIdBytes = 16;

}  // namespace

// Holds a session open for as long as its client keeps the stream.
class SnapshotService::AttachReactor final : public grpc::ServerWriteReactor<v1::AttachEvent> {
 public:
  AttachReactor(SnapshotService* service, const std::string& connection,
                std::optional<uint32_t> uid, const v1::AttachRequest& request,
                v1::AttachEvent first)
      : service_(service) {
    auto session = service_->store_->Attach(
        request.job_id(), request.rank(),
        std::vector<uint32_t>(request.local_ranks().begin(), request.local_ranks().end()));
    if (!session.ok()) {
      End(ToGrpc(session.status()));
      return;
    }
    session_ = *session;
    wire_id_ = service_->AddSession(session_, connection, request.windows(), uid, this);
    job_ = request.job_id();
    rank_ = request.rank();
    Log("session %d attached: job %s rank %d", session_, job_, rank_);
    first.set_session_id(wire_id_);
    Push(std::move(first));
  }

  // Sends `event` after those queued before it. Events beyond a small
  // backlog are dropped: each is an offer the client may do without.
  // StartWrite is called under mu_, where End cannot have finished the
  // call in between (gRPC never runs a reaction inline from StartWrite).
  void Push(v1::AttachEvent event) {
    absl::MutexLock lock(&mu_);
    if (finished_ || events_.size() >= kMaxQueuedEvents) return;
    events_.push_back(std::move(event));
    if (!writing_) {
      writing_ = true;
      StartWrite(&events_.front());
    }
  }

  void OnWriteDone(bool ok) override {
    if (!ok) {
      End(grpc::Status::CANCELLED);
      return;
    }
    absl::MutexLock lock(&mu_);
    events_.pop_front();
    if (events_.empty() || finished_) {
      writing_ = false;  // the stream stays open until the client goes
    } else {
      StartWrite(&events_.front());
    }
  }

  void OnCancel() override { End(grpc::Status::CANCELLED); }

  void OnDone() override {
    service_->Forget(this);
    if (session_ != 0) {
      service_->RemoveSession(wire_id_);
      service_->store_->Detach(session_);
      Log("session %d ended: job %s rank %d", session_, job_, rank_);
    }
    delete this;
  }

  // Finishes the stream once, whoever asks first.
  void End(const grpc::Status& status) {
    {
      absl::MutexLock lock(&mu_);
      if (finished_) return;
      finished_ = true;
    }
    Finish(status);
  }

 private:
  static constexpr size_t kMaxQueuedEvents = 8;
  SnapshotService* const service_;
  uint64_t session_ = 0;
  std::string wire_id_;
  std::string job_;
  uint32_t rank_ = 0;
  absl::Mutex mu_;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  // Queued events; the front one is being written while writing_. A deque:
  // pushing keeps the address of the one in flight.
  std::deque<v1::AttachEvent> events_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
};

// Answers an Attach that may not open a session.
class SnapshotService::RefusedReactor final : public grpc::ServerWriteReactor<v1::AttachEvent> {
 public:
  void OnDone() override { delete this; }
};

absl::Status SnapshotService::CheckJobToken(const grpc::CallbackServerContext& context,
                                            const std::string& job_id) const {
  // The Unix socket admitted the process by its uid (TrainerListener).
  if (TrainerListener::IsSocketPeer(context.peer())) return absl::OkStatus();
  if (job_secret_.empty()) {
    return absl::PermissionDeniedError(
        "this daemon takes trainers on its Unix socket only (no job secret for TCP)");
  }
  const auto& md = context.client_metadata();
  auto it = md.find("authorization");
  if (it == md.end()) {
    return absl::UnauthenticatedError(
        "a TCP client must present its job's token (ClientOptions::job_token; "
        "`ecsnapctl job-token --job=ID` on the daemon's node prints it)");
  }
  const absl::string_view got(it->second.data(), it->second.size());
  if (!TokensEqual(got, "Bearer " + JobToken(job_secret_, job_id))) {
    return absl::PermissionDeniedError(
        "the job token does not match this job and this daemon's job secret");
  }
  return absl::OkStatus();
}

SnapshotService::SnapshotService(StepStore* store, uint32_t slot)
    : store_(store),
      slot_(slot),
      bulk_(std::make_unique<Executor>(kBulkThreads, kMaxBulkQueued)) {}

std::string SnapshotService::ConnectionOf(const grpc::ServerContextBase& context) const {
  const std::string peer = context.peer();
  return connection_key_ ? connection_key_(peer) : peer;
}

std::string SnapshotService::AddSession(uint64_t session, std::string connection, bool windows,
                                        std::optional<uint32_t> uid, AttachReactor* reactor) {
  std::string id(kSessionIdBytes, '\0');
  // OpenSSL's generator, seeded by the kernel: ids nobody can predict. It
  // cannot fail once OpenSSL has initialised; if it ever did, a predictable
  // id would be worse than a dead daemon.
  if (RAND_bytes(reinterpret_cast<unsigned char*>(id.data()), kSessionIdBytes) != 1) {
    Log("no randomness for a session id; stopping");
    std::abort();
  }
  absl::MutexLock lock(&mu_);
  sessions_[id] = WireSession{session, std::move(connection), windows, uid, reactor};
  return id;
}

void SnapshotService::RemoveSession(const std::string& id) {
  absl::MutexLock lock(&mu_);
  sessions_.erase(id);
}

absl::StatusOr<uint64_t> SnapshotService::SessionOf(const grpc::ServerContextBase& context,
                                                    const std::string& id, WireSession* out) {
  const std::string connection = ConnectionOf(context);
  absl::MutexLock lock(&mu_);
  auto it = sessions_.find(id);
  // One answer for an unknown id and for another connection's: the caller
  // learns nothing about sessions it does not hold.
  if (it == sessions_.end() || it->second.connection != connection) {
    return absl::NotFoundError(
        "no session with this id on this connection: it ended (the client's Attach stream "
        "closed) or belongs to another connection; attach again");
  }
  if (out != nullptr) *out = it->second;
  return it->second.session;
}

absl::Status SnapshotService::CheckJobOwner(std::optional<uint32_t> uid,
                                            const std::string& job_id) {
  if (!uid.has_value()) return absl::OkStatus();  // TCP: the job token decides
  return store_->ClaimJob(job_id, *uid, daemon_uid_);
}

absl::Status SnapshotService::CheckSessionOwner(const WireSession& ws, uint64_t session) {
  if (!ws.uid.has_value()) return absl::OkStatus();
  auto who = store_->SessionRank(session);
  if (!who.ok()) return who.status();
  return CheckJobOwner(ws.uid, who->first);
}

absl::Status SnapshotService::Grant(const WireSession& session, const ArenaExtent& extent,
                                    bool writable, std::string* token, uint64_t* file_id,
                                    bool spare) {
  // A trainer that streams, or one not on the socket, gets no token.
  if (grants_ == nullptr || !session.windows || !session.uid.has_value()) {
    return absl::OkStatus();
  }
  auto g = grants_->Issue(extent, writable, *session.uid, spare);
  if (!g.ok()) return g.status();
  *token = std::move(g->token);
  *file_id = g->file_id;
  return absl::OkStatus();
}

grpc::ServerWriteReactor<v1::AttachEvent>* SnapshotService::Attach(
    grpc::CallbackServerContext* context, const v1::AttachRequest* request) {
  v1::AttachEvent first;
  first.set_slot(slot_);
  first.set_daemon_version("ecsnapd 0.1");
  const std::optional<uint32_t> uid = uid_of_ ? uid_of_(context->peer()) : std::nullopt;
  absl::Status admitted = CheckJobToken(*context, request->job_id());
  if (admitted.ok()) admitted = CheckJobOwner(uid, request->job_id());
  if (absl::Status st = admitted; !st.ok()) {
    auto* refused = new RefusedReactor();
    refused->Finish(ToGrpc(st));
    return refused;
  }
  auto* reactor =
      new AttachReactor(this, ConnectionOf(*context), uid, *request, std::move(first));
  absl::MutexLock lock(&mu_);
  if (closing_) {
    reactor->End(grpc::Status(grpc::StatusCode::UNAVAILABLE, "ecsnapd is shutting down"));
  } else {
    live_.insert(reactor);
  }
  return reactor;
}

void SnapshotService::EndSessions() {
  std::vector<AttachReactor*> live;
  {
    absl::MutexLock lock(&mu_);
    closing_ = true;
    live.assign(live_.begin(), live_.end());
  }
  // A reactor is deleted only after OnDone, which first takes it out of
  // live_ under mu_; End() is safe on those still listed. Ending them all
  // here (not through OnCancel after the grace period) lets shutdown finish
  // at once.
  {
    absl::MutexLock lock(&mu_);
    for (AttachReactor* r : live) {
      if (live_.count(r)) r->End(grpc::Status(grpc::StatusCode::UNAVAILABLE, "ecsnapd is shutting down"));
    }
  }
  if (preparer_.joinable()) preparer_.join();  // it ends once closing_ is set
}

SnapshotService::~SnapshotService() {
  {
    absl::MutexLock lock(&mu_);
    closing_ = true;
  }
  if (preparer_.joinable()) preparer_.join();
}

void SnapshotService::Forget(AttachReactor* reactor) {
  absl::MutexLock lock(&mu_);
  live_.erase(reactor);
}

grpc::Status SnapshotService::BeginRank(grpc::ServerContext* context,
                                        const v1::BeginRankRequest* request,
                                        v1::BeginRankResponse* response) {
  WireSession ws;
  auto session = SessionOf(*context, request->session_id(), &ws);
  if (!session.ok()) return ToGrpc(session.status());
  if (absl::Status st = CheckSessionOwner(ws, *session); !st.ok()) return ToGrpc(st);
  auto window = store_->BeginRank(*session, request->step(), request->bytes(),
                                  /*streamed=*/!ws.windows);
  if (!window.ok()) return ToGrpc(window.status());
  response->set_window_offset(window->offset);
  response->set_window_bytes(window->bytes);
  uint64_t file = 0;
  absl::Status granted =
      Grant(ws, window->extent, /*writable=*/true, response->mutable_window_token(), &file);
  if (!granted.ok()) {
    store_->AbortRank(*session, request->step()).IgnoreError();
    return ToGrpc(granted);
  }
  response->set_window_file(file);
  // A window for a later step, made in the background for the trainer to
  // map before then (best effort: without it that step makes its own). It
  // is asked for now, while the trainer copies this step in: made at the
  // commit instead, it shares the cores with the step's protection, which
  // took 20-30% longer for it on a 2-core machine (protect_bench, A/B). The
  // first steps' windows come from Prepare, ahead of them.
  if (!response->window_token().empty()) {
    QueuePrepare(request->session_id(), request->bytes(), /*spares=*/1);
  }
  return grpc::Status::OK;
}

grpc::Status SnapshotService::PrepareRank(grpc::ServerContext* context,
                                          const v1::PrepareRankRequest* request,
                                          v1::PrepareRankResponse*) {
  WireSession ws;
  auto session = SessionOf(*context, request->session_id(), &ws);
  if (!session.ok()) return ToGrpc(session.status());
  if (absl::Status st = CheckSessionOwner(ws, *session); !st.ok()) return ToGrpc(st);
  if (request->bytes() == 0) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "a window of 0 bytes was asked for");
  }
  // Asked ahead of the first step (or of the first after a restore): the
  // windows of the first steps, which each need a fresh one.
  if (ws.windows) {
    QueuePrepare(request->session_id(), request->bytes(), store_->windows_ahead_of_first_step());
  }
  return grpc::Status::OK;
}

void SnapshotService::QueuePrepare(const std::string& wire_id, uint64_t bytes, int spares) {
  absl::MutexLock lock(&mu_);
  if (closing_ || grants_ == nullptr) return;
  for (PrepareWork& queued : prepare_queue_) {
    if (queued.wire_id != wire_id) continue;
    // One entry per session, with the latest wish: the spares a rank wants
    // beyond the windows its steps hold (fewer once its first step began).
    queued.bytes = bytes;
    queued.spares = spares;
    queued.made = 0;
    return;
  }
  if (prepare_queue_.size() >= kMaxQueuedPrepares) return;
  prepare_queue_.push_back(PrepareWork{wire_id, bytes, spares});
  if (!preparer_.joinable()) preparer_ = std::thread([this] { PrepareLoop(); });
}

void SnapshotService::PrepareLoop() {
  while (true) {
    PrepareWork work;
    WireSession ws;
    {
      absl::MutexLock lock(&mu_);
      auto has_work = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return closing_ || !prepare_queue_.empty();
      };
      mu_.Await(absl::Condition(&has_work));
      if (closing_) return;
      work = std::move(prepare_queue_.front());
      prepare_queue_.pop_front();
      auto it = sessions_.find(work.wire_id);
      // Only a trainer that can be granted the window gets one made.
      if (it == sessions_.end() || !it->second.windows || !it->second.uid.has_value()) continue;
      ws = it->second;
    }
    // A uid displaced as the job's owner gets no window of it.
    if (!CheckSessionOwner(ws, ws.session).ok()) continue;
    // Slow (a fresh window is allocated and populated): no lock held.
    ++work.made;
    auto ready = store_->PrepareRank(ws.session, work.bytes, work.spares);
    if (!ready.ok()) continue;  // enough windows already, or no room
    v1::AttachEvent event;
    uint64_t file = 0;
    // A step may take the window before its grant (NOT_FOUND): it is made
    // all the same, and the next turn goes on.
    const bool granted = Grant(ws, *ready, /*writable=*/true, event.mutable_ready_token(), &file,
                               /*spare=*/true)
                             .ok() &&
                         !event.ready_token().empty();
    event.set_ready_file(file);
    absl::MutexLock lock(&mu_);
    auto it = sessions_.find(work.wire_id);
    if (it == sessions_.end()) continue;
    if (granted && live_.count(it->second.reactor) != 0) it->second.reactor->Push(std::move(event));
    // The session's next window, after every other session's turn.
    // (Asked again meanwhile: that entry, the latest wish, stands instead.)
    if (work.made < work.spares && !closing_ &&
        std::none_of(prepare_queue_.begin(), prepare_queue_.end(),
                     [&](const PrepareWork& q) { return q.wire_id == work.wire_id; })) {
      prepare_queue_.push_back(std::move(work));
    }
  }
}

// WriteRank's stream: each message's payload goes from where gRPC received
// it straight into the window. The first message names the session and the
// step. One read in flight at a time; each message is taken on the bulk
// executor, not on gRPC's few callback threads (a copy into a fresh window,
// or a wait for the store's lock, would hold up every Attach and ReadRank),
// and let go of before the next read, so an idle stream holds no message.
class SnapshotService::WriteReactor final : public grpc::ServerReadReactor<grpc::ByteBuffer> {
 public:
  WriteReactor(SnapshotService* service, grpc::CallbackServerContext* context,
               grpc::ByteBuffer* response)
      : service_(service), context_(context), response_(response) {
    StartRead(&message_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {  // the trainer's last message came, or the stream broke
      if (context_->IsCancelled()) {
        Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the trainer cancelled the stream"));
        return;
      }
      if (first_) {
        Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                            "WriteRank stream carried no message"));
        return;
      }
      v1::WriteRankResponse r;
      r.set_bytes_written(written_);
      bool own = false;
      Finish(grpc::SerializationTraits<v1::WriteRankResponse>::Serialize(r, response_, &own));
      return;
    }
    service_->bulk_->Submit([this] {
      absl::Status st = Take();
      message_.Clear();
      // The last use of `this`: once finished or read, OnDone may come.
      if (!st.ok()) {
        Finish(ToGrpc(st));
      } else {
        StartRead(&message_);
      }
    });
  }
  void OnDone() override { delete this; }

 private:
  using Chunk = v1::WriteRankChunk;
  static constexpr WireField kFields[] = {{Chunk::kSessionIdFieldNumber, WireField::kBytes},
                                          {Chunk::kStepFieldNumber, WireField::kVarint},
                                          {Chunk::kOffsetFieldNumber, WireField::kVarint},
                                          {Chunk::kDataFieldNumber, WireField::kBytes}};

  absl::Status Take() {
    absl::StatusOr<BulkMessage> m = BulkMessage::Parse(message_, kFields);
    if (!m.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("a WriteRank message is not a WriteRankChunk: ", m.status().message()));
    }
    if (first_) {
      WireSession ws;
      auto found =
          service_->SessionOf(*context_, m->BytesAsString(Chunk::kSessionIdFieldNumber), &ws);
      if (!found.ok()) return found.status();
      RETURN_IF_ERROR(service_->CheckSessionOwner(ws, *found));
      session_ = *found;
      step_ = m->Varint(Chunk::kStepFieldNumber);
      first_ = false;
    }
    RETURN_IF_ERROR(service_->store_->Write(session_, step_, m->Varint(Chunk::kOffsetFieldNumber),
                                            m->Bytes(Chunk::kDataFieldNumber)));
    written_ += m->BytesLength(Chunk::kDataFieldNumber);
    return absl::OkStatus();
  }

  SnapshotService* const service_;
  grpc::CallbackServerContext* const context_;
  grpc::ByteBuffer* const response_;
  grpc::ByteBuffer message_;
  bool first_ = true;
  uint64_t session_ = 0;
  uint64_t step_ = 0;
  uint64_t written_ = 0;
};

grpc::ServerReadReactor<grpc::ByteBuffer>* SnapshotService::WriteRank(
    grpc::CallbackServerContext* context, grpc::ByteBuffer* response) {
  return new WriteReactor(this, context, response);
}

grpc::Status SnapshotService::CommitRank(grpc::ServerContext* context,
                                         const v1::CommitRankRequest* request,
                                         v1::CommitRankResponse* response) {
  WireSession ws;
  auto session = SessionOf(*context, request->session_id(), &ws);
  if (!session.ok()) return ToGrpc(session.status());
  if (absl::Status st = CheckSessionOwner(ws, *session); !st.ok()) return ToGrpc(st);
  auto state = store_->CommitRank(*session, request->step(), request->manifest());
  if (!state.ok()) return ToGrpc(state.status());
  response->set_step_state(*state);
  return grpc::Status::OK;
}

grpc::Status SnapshotService::AbortRank(grpc::ServerContext* context,
                                        const v1::AbortRankRequest* request,
                                        v1::AbortRankResponse*) {
  auto session = SessionOf(*context, request->session_id());
  if (!session.ok()) return ToGrpc(session.status());
  return ToGrpc(store_->AbortRank(*session, request->step()));
}

grpc::Status SnapshotService::ListRestorable(grpc::ServerContext* context,
                                             const v1::ListRestorableRequest* request,
                                             v1::ListRestorableResponse* response) {
  WireSession ws;
  auto session = SessionOf(*context, request->session_id(), &ws);
  if (!session.ok()) return ToGrpc(session.status());
  // Before the degraded-restore hook (no decoding for a uid refused anyway)
  // and after it (the rebuild it waits for may bring the job's owner).
  if (absl::Status st = CheckSessionOwner(ws, *session); !st.ok()) return ToGrpc(st);
  if (before_restore_) before_restore_(*session);
  if (absl::Status st = CheckSessionOwner(ws, *session); !st.ok()) return ToGrpc(st);
  auto steps = store_->ListRestorable(*session);
  if (!steps.ok()) return ToGrpc(steps.status());
  for (auto& s : *steps) *response->add_steps() = std::move(s);
  return grpc::Status::OK;
}

grpc::Status SnapshotService::Restore(grpc::ServerContext* context,
                                      const v1::RestoreRequest* request,
                                      v1::RestoreResponse* response) {
  WireSession ws;
  auto session = SessionOf(*context, request->session_id(), &ws);
  if (!session.ok()) return ToGrpc(session.status());
  // Before the degraded-restore hook (no decoding for a uid refused anyway)
  // and after it (the rebuild it waits for may bring the job's owner).
  if (absl::Status st = CheckSessionOwner(ws, *session); !st.ok()) return ToGrpc(st);
  if (before_restore_) before_restore_(*session);
  if (absl::Status st = CheckSessionOwner(ws, *session); !st.ok()) return ToGrpc(st);
  auto lease = store_->Restore(*session, request->step());
  if (!lease.ok()) return ToGrpc(lease.status());
  response->set_step(lease->step);
  *response->mutable_manifest() = std::move(lease->manifest);
  response->set_window_offset(lease->window.offset);
  response->set_window_bytes(lease->window.bytes);
  response->set_lease_id(lease->lease_id);
  uint64_t file = 0;
  absl::Status granted = Grant(ws, lease->window.extent, /*writable=*/false,
                               response->mutable_window_token(), &file);
  if (!granted.ok()) {
    store_->Release(*session, lease->lease_id).IgnoreError();
    return ToGrpc(granted);
  }
  response->set_window_file(file);
  return grpc::Status::OK;
}

// ReadRank's stream: the pinned window sent as messages whose payloads are
// slices of the window itself; gRPC holds the pin with each slice, so the
// window stays put until the last one is written, whatever the trainer
// releases meanwhile. One write in flight at a time.
class SnapshotService::ReadReactor final : public grpc::ServerWriteReactor<grpc::ByteBuffer> {
 public:
  // Finishes at once with `status` (nothing to send).
  explicit ReadReactor(grpc::Status status) { Finish(std::move(status)); }
  ReadReactor(SnapshotService* service, grpc::CallbackServerContext* context,
              uint64_t offset, StepStore::PinnedBytes bytes)
      : offset_(offset), bytes_(std::move(bytes)) {
    if (service->stall_dog_ != nullptr && service->stall_cut_ != nullptr) {
      const absl::Duration stall = service->stall_dog_->stall();
      // Never called once the watch is gone (OnDone), so `context` is live.
      watch_ = service->stall_dog_->Start([cut = service->stall_cut_, context, stall,
                                           key = service->ConnectionOf(*context)] {
        Log("data plane: the trainer on %s took no bytes of a restore for %s; %s", key,
            absl::FormatDuration(stall),
            "its connection is closed (its session ends), or its stream cancelled");
        if (!cut(key)) context->TryCancel();
      });
    }
    Next();
  }

  void OnWriteDone(bool ok) override {
    if (!ok) {
      Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the trainer stopped reading"));
      return;
    }
    if (watch_ != nullptr) watch_->Progress();
    Next();
  }
  void OnDone() override {
    watch_.reset();  // the cut is never called after this
    delete this;
  }

 private:
  void Next() {
    if (sent_ == bytes_.bytes.size()) {
      bytes_.pin.reset();
      Finish(grpc::Status::OK);
      return;
    }
    const size_t n = std::min(kStreamChunkBytes, bytes_.bytes.size() - sent_);
    WireWriter w;
    w.Varint(v1::ReadRankChunk::kOffsetFieldNumber, offset_ + sent_);
    w.BytesHeader(v1::ReadRankChunk::kDataFieldNumber, n);
    grpc::Slice parts[] = {w.TakeSlice(),
                           BorrowedSlice(bytes_.bytes.data() + sent_, n, bytes_.pin)};
    message_ = grpc::ByteBuffer(parts, 2);
    sent_ += n;
    StartWrite(&message_);
  }

  const uint64_t offset_ = 0;
  StepStore::PinnedBytes bytes_;
  size_t sent_ = 0;
  grpc::ByteBuffer message_;
  std::unique_ptr<CallWatchdog::Watch> watch_;
};

grpc::ServerWriteReactor<grpc::ByteBuffer>* SnapshotService::ReadRank(
    grpc::CallbackServerContext* context, const grpc::ByteBuffer* request) {
  v1::ReadRankRequest req;
  grpc::ByteBuffer copy(*request);
  if (!grpc::SerializationTraits<v1::ReadRankRequest>::Deserialize(&copy, &req).ok()) {
    return new ReadReactor(
        grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "ReadRank's request is not a ReadRankRequest"));
  }
  auto session = SessionOf(*context, req.session_id());
  if (!session.ok()) return new ReadReactor(ToGrpc(session.status()));
  auto bytes = store_->Read(*session, req.lease_id(), req.offset(), req.length());
  if (!bytes.ok()) return new ReadReactor(ToGrpc(bytes.status()));
  return new ReadReactor(this, context, req.offset(), *std::move(bytes));
}

grpc::Status SnapshotService::ReleaseRestore(grpc::ServerContext* context,
                                             const v1::ReleaseRestoreRequest* request,
                                             v1::ReleaseRestoreResponse*) {
  auto session = SessionOf(*context, request->session_id());
  if (!session.ok()) return ToGrpc(session.status());
  return ToGrpc(store_->Release(*session, request->lease_id()));
}

}  // namespace ecsnap::daemon
