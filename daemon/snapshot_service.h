// The data plane's gRPC service (proto/snapshot.proto): a thin layer over
// StepStore. Attach is a callback-API stream that lives as long as the
// client: its end (the trainer died, the socket closed) detaches the session.
// The other methods run on gRPC's bounded pool of sync threads, where copies
// and checksums may take their time without blocking any reaction.
//
// A session is named on the wire by 16 random bytes, not by the store's
// counter, and only on the connection that attached it: another process
// that learns the id (or guesses it) still cannot use it.
#ifndef ECSNAP_DAEMON_SNAPSHOT_SERVICE_H_
#define ECSNAP_DAEMON_SNAPSHOT_SERVICE_H_

#include <functional>
#include <map>
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
  // `store` must outlive the service.
  SnapshotService(StepStore* store, uint32_t slot);

  // Names the connection a call came in on, from its peer string
  // (TrainerListener::ConnectionKey). Default: the peer string itself.
  void SetConnectionKey(std::function<std::string(const std::string& peer)> key) {
    connection_key_ = std::move(key);
  }

  // Called with the session before each Restore and ListRestorable; with
  // peers, it serves the session's rank from a rebuild in progress.
  void SetBeforeRestore(std::function<void(uint64_t session)> hook) {
    before_restore_ = std::move(hook);
  }

  // Clients that do not come through the Unix socket (the TCP data plane)
  // must attach with "authorization: Bearer JobToken(secret, job)"
  // (common/job_token.h). Unset: only Unix-socket clients can attach.
  void SetJobSecret(std::string secret) { job_secret_ = std::move(secret); }

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
  class RefusedReactor;
  void Forget(AttachReactor* reactor);
  absl::Status CheckJobToken(const grpc::CallbackServerContext& context,
                             const std::string& job_id) const;
  std::string ConnectionOf(const grpc::ServerContextBase& context) const;
  // A fresh wire id for store session `session` opened on `connection`.
  std::string AddSession(uint64_t session, std::string connection);
  void RemoveSession(const std::string& id);
  // The store session named by `id`, if the call came on its connection.
  absl::StatusOr<uint64_t> SessionOf(const grpc::ServerContextBase& context,
                                     const std::string& id);

  struct WireSession {
    uint64_t session;
    std::string connection;
  };

  StepStore* const store_;
  const uint32_t slot_;
  std::function<void(uint64_t)> before_restore_;
  std::function<std::string(const std::string&)> connection_key_;
  std::string job_secret_;

  absl::Mutex mu_;
  std::set<AttachReactor*> live_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, WireSession> sessions_ ABSL_GUARDED_BY(mu_);
  bool closing_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace ecsnap::daemon

#endif  // ECSNAP_DAEMON_SNAPSHOT_SERVICE_H_
