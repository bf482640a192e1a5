#include "daemon/snapshot_service.h"

#include <algorithm>
#include <utility>
#include <vector>

#include "common/grpc_status.h"
#include "common/log.h"

namespace ecsnap::daemon {
// Holds a session open for as long as its client keeps the stream.
class SnapshotService::AttachReactor final : public grpc::ServerWriteReactor<v1::AttachEvent> {
 public:
  AttachReactor(SnapshotService* service, const v1::AttachRequest& request, v1::AttachEvent first)
      : service_(service), event_(std::move(first)) {
    auto session = service_->store_->Attach(
        request.job_id(), request.rank(),
        std::vector<uint32_t>(request.local_ranks().begin(), request.local_ranks().end()));
    if (!session.ok()) {
      End(ToGrpc(session.status()));
      return;
    }
    session_ = *session;
    job_ = request.job_id();
    rank_ = request.rank();
    Log("session %d attached: job %s rank %d", session_, job_, rank_);
    event_.set_session_id(session_);
    StartWrite(&event_);
  }

  void OnWriteDone(bool ok) override {
    // Nothing more to send: the stream stays open until the client goes.
    if (!ok) End(grpc::Status::CANCELLED);
  }

  void OnCancel() override { End(grpc::Status::CANCELLED); }

  void OnDone() override {
    service_->Forget(this);
    if (session_ != 0) {
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
  SnapshotService* const service_;
  v1::AttachEvent event_;
  uint64_t session_ = 0;
  std::string job_;
  uint32_t rank_ = 0;
  absl::Mutex mu_;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
};

SnapshotService::SnapshotService(StepStore* store, std::string arena_path, uint64_t arena_bytes,
                                 uint32_t slot)
    : store_(store), arena_path_(std::move(arena_path)), arena_bytes_(arena_bytes), slot_(slot) {}

grpc::ServerWriteReactor<v1::AttachEvent>* SnapshotService::Attach(
    grpc::CallbackServerContext*, const v1::AttachRequest* request) {
  v1::AttachEvent first;
  first.set_arena_path(arena_path_);
  first.set_arena_bytes(arena_bytes_);
  first.set_slot(slot_);
  first.set_daemon_version("ecsnapd 0.1");
  auto* reactor = new AttachReactor(this, *request, std::move(first));
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
  absl::MutexLock lock(&mu_);
  for (AttachReactor* r : live) {
    if (live_.count(r)) r->End(grpc::Status(grpc::StatusCode::UNAVAILABLE, "ecsnapd is shutting down"));
  }
}

void SnapshotService::Forget(AttachReactor* reactor) {
  absl::MutexLock lock(&mu_);
  live_.erase(reactor);
}

grpc::Status SnapshotService::BeginRank(grpc::ServerContext*, const v1::BeginRankRequest* request,
                                        v1::BeginRankResponse* response) {
  auto window = store_->BeginRank(request->session_id(), request->step(), request->bytes());
  if (!window.ok()) return ToGrpc(window.status());
  response->set_window_offset(window->offset);
  response->set_window_bytes(window->bytes);
  return grpc::Status::OK;
}

grpc::Status SnapshotService::WriteRank(grpc::ServerContext*,
                                        grpc::ServerReader<v1::WriteRankChunk>* reader,
                                        v1::WriteRankResponse* response) {
  v1::WriteRankChunk chunk;
  if (!reader->Read(&chunk)) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "WriteRank stream carried no message");
  }
  const uint64_t session = chunk.session_id();
  const uint64_t step = chunk.step();
  uint64_t written = 0;
  do {
    absl::Status st = store_->Write(
        session, step, chunk.offset(),
        absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(chunk.data().data()),
                                  chunk.data().size()));
    if (!st.ok()) return ToGrpc(st);
    written += chunk.data().size();
  } while (reader->Read(&chunk));
  response->set_bytes_written(written);
  return grpc::Status::OK;
}

grpc::Status SnapshotService::CommitRank(grpc::ServerContext*,
                                         const v1::CommitRankRequest* request,
                                         v1::CommitRankResponse* response) {
  auto state = store_->CommitRank(request->session_id(), request->step(), request->manifest());
  if (!state.ok()) return ToGrpc(state.status());
  response->set_step_state(*state);
  return grpc::Status::OK;
}

grpc::Status SnapshotService::AbortRank(grpc::ServerContext*, const v1::AbortRankRequest* request,
                                        v1::AbortRankResponse*) {
  return ToGrpc(store_->AbortRank(request->session_id(), request->step()));
}

grpc::Status SnapshotService::ListRestorable(grpc::ServerContext*,
                                             const v1::ListRestorableRequest* request,
                                             v1::ListRestorableResponse* response) {
  if (before_restore_) before_restore_(request->session_id());
  auto steps = store_->ListRestorable(request->session_id());
  if (!steps.ok()) return ToGrpc(steps.status());
  for (auto& s : *steps) *response->add_steps() = std::move(s);
  return grpc::Status::OK;
}

grpc::Status SnapshotService::Restore(grpc::ServerContext*, const v1::RestoreRequest* request,
                                      v1::RestoreResponse* response) {
  if (before_restore_) before_restore_(request->session_id());
  auto lease = store_->Restore(request->session_id(), request->step());
  if (!lease.ok()) return ToGrpc(lease.status());
  response->set_step(lease->step);
  *response->mutable_manifest() = std::move(lease->manifest);
  response->set_window_offset(lease->window.offset);
  response->set_window_bytes(lease->window.bytes);
  response->set_lease_id(lease->lease_id);
  return grpc::Status::OK;
}

grpc::Status SnapshotService::ReadRank(grpc::ServerContext* context,
                                       const v1::ReadRankRequest* request,
                                       grpc::ServerWriter<v1::ReadRankChunk>* writer) {
  auto bytes = store_->Read(request->session_id(), request->lease_id(), request->offset(),
                            request->length());
  if (!bytes.ok()) return ToGrpc(bytes.status());
  // The lease pins the window: the bytes stay put while they are sent.
  v1::ReadRankChunk chunk;
  for (uint64_t done = 0; done < bytes->size(); done += kStreamChunkBytes) {
    if (context->IsCancelled()) return grpc::Status::CANCELLED;
    const size_t n = std::min<uint64_t>(kStreamChunkBytes, bytes->size() - done);
    chunk.set_offset(request->offset() + done);
    chunk.set_data(reinterpret_cast<const char*>(bytes->data()) + done, n);
    if (!writer->Write(chunk)) return grpc::Status::CANCELLED;
  }
  return grpc::Status::OK;
}

grpc::Status SnapshotService::ReleaseRestore(grpc::ServerContext*,
                                             const v1::ReleaseRestoreRequest* request,
                                             v1::ReleaseRestoreResponse*) {
  return ToGrpc(store_->Release(request->session_id(), request->lease_id()));
}

}  // namespace ecsnap::daemon
