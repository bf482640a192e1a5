// The data plane's gRPC service (proto/snapshot.proto): a thin layer over
// StepStore. Attach is a callback-API stream that lives as long as the
// client: its end (the trainer died, the socket closed) detaches the session.
// The other methods run on gRPC's bounded pool of sync threads, where copies
// and checksums may take their time without blocking any reaction.
#ifndef ECSNAP_DAEMON_SNAPSHOT_SERVICE_H_
#define ECSNAP_DAEMON_SNAPSHOT_SERVICE_H_

#include <functional>
#include <set>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

#include "daemon/step_store.h"
#include "proto/snapshot.grpc.pb.h"

namespace ecsnap::daemon {

// Bytes of one WriteRank / ReadRank message payload.
inline constexpr size_t kStreamChunkBytes = 1 << 20;

class SnapshotService final : public v1::Snapshot::WithCallbackMethod_Attach<v1::Snapshot::Service> {
 public:
  // `arena_path` is told to clients that may map the arena; empty when they
  // must stream. `store` must outlive the service.
  SnapshotService(StepStore* store, std::string arena_path, uint64_t arena_bytes, uint32_t slot);

  // Called with the session before each Restore and ListRestorable; with
  // peers, it serves the session's rank from a rebuild in progress.
  void SetBeforeRestore(std::function<void(uint64_t session)> hook) {
    before_restore_ = std::move(hook);
  }

  grpc::ServerWriteReactor<v1::AttachEvent>* Attach(grpc::CallbackServerContext* context,
                                                    const v1::AttachRequest* request) override;
  grpc::Status BeginRank(grpc::ServerContext*, const v1::BeginRankRequest* request,
                         v1::BeginRankResponse* response) override;
  grpc::Status WriteRank(grpc::ServerContext*, grpc::ServerReader<v1::WriteRankChunk>* reader,
                         v1::WriteRankResponse* response) override;
  grpc::Status CommitRank(grpc::ServerContext*, const v1::CommitRankRequest* request,
                          v1::CommitRankResponse* response) override;
  grpc::Status AbortRank(grpc::ServerContext*, const v1::AbortRankRequest* request,
                         v1::AbortRankResponse* response) override;
  grpc::Status ListRestorable(grpc::ServerContext*, const v1::ListRestorableRequest* request,
                              v1::ListRestorableResponse* response) override;
  grpc::Status Restore(grpc::ServerContext*, const v1::RestoreRequest* request,
                       v1::RestoreResponse* response) override;
  grpc::Status ReadRank(grpc::ServerContext*, const v1::ReadRankRequest* request,
                        grpc::ServerWriter<v1::ReadRankChunk>* writer) override;
  grpc::Status ReleaseRestore(grpc::ServerContext*, const v1::ReleaseRestoreRequest* request,
                              v1::ReleaseRestoreResponse* response) override;

  // Ends every Attach stream now, so that a shutdown need not wait for
  // clients to hang up. Later Attach calls are refused.
  void EndSessions();

 private:
  class AttachReactor;
  void Forget(AttachReactor* reactor);

  StepStore* const store_;
  const std::string arena_path_;
  const uint64_t arena_bytes_;
  const uint32_t slot_;
  std::function<void(uint64_t)> before_restore_;

  absl::Mutex mu_;
  std::set<AttachReactor*> live_ ABSL_GUARDED_BY(mu_);
  bool closing_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace ecsnap::daemon

#endif  // ECSNAP_DAEMON_SNAPSHOT_SERVICE_H_
