// The data plane's gRPC service (proto/snapshot.proto): a thin layer over
// StepStore. Attach is a callback-API stream that lives as long as the
// client: its end (the trainer died, the socket closed) detaches the session.
// The other methods run on gRPC's bounded pool of sync threads, where copies
// and checksums may take their time without blocking any reaction.
//
// A session is named on the wire by 16 random bytes, not by the store's
// counter, and only on the connection that attached it: another process
// that learns the id (or guesses it) still cannot use it.
#ifndef ECSNAP_DAEMON_SERVICE_SNAPSHOT_SERVICE_H_
#define ECSNAP_DAEMON_SERVICE_SNAPSHOT_SERVICE_H_

#include <deque>
#include <functional>
#include <map>
#include <thread>
#include <optional>
#include <set>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

#include "common/executor.h"
#include "daemon/peer/call_watchdog.h"
#include "daemon/store/step_store.h"
#include "daemon/store/window_grants.h"
#include "proto/snapshot.grpc.pb.h"

namespace ecsnap::daemon {

// Bytes of one ReadRank message payload: a message (with its few bytes of
// fields) stays within gRPC's default 4 MiB receive limit.
inline constexpr size_t kStreamChunkBytes = (4 << 20) - 4096;

// Attach is a callback stream; WriteRank and ReadRank raw ones (their
// payloads are copied once, from gRPC's buffers into the window, or sent as
// slices of the window: common/bulk_message.h); the rest run on sync
// threads.
using SnapshotServiceBase = v1::Snapshot::WithRawCallbackMethod_WriteRank<
    v1::Snapshot::WithRawCallbackMethod_ReadRank<
        v1::Snapshot::WithCallbackMethod_Attach<v1::Snapshot::Service>>>;

class SnapshotService final : public SnapshotServiceBase {
 public:
  // `store` must outlive the service.
  SnapshotService(StepStore* store, uint32_t slot);
  ~SnapshotService() override;

  // Names the connection a call came in on, from its peer string
  // (TrainerListener::ConnectionKey). Default: the peer string itself.
  void SetConnectionKey(std::function<std::string(const std::string& peer)> key) {
    connection_key_ = std::move(key);
  }

  // A ReadRank stream whose next message the trainer has not taken for
  // `dog`'s stall (the trainer stopped, or stopped reading) has its
  // connection ended by `cut`, given the connection's key (a ping cannot
  // pass the bytes the trainer leaves unread, and the stream's slices pin
  // the window until gRPC drops the connection); where `cut` cannot (a TCP
  // trainer), the call is cancelled (its unsent slices go, but the window
  // stays pinned by the session's lease until the trainer releases it or
  // its connection ends: a TCP trainer relies on keepalive for that).
  // `dog` outlives the service. Unset: such a stream waits for as long as
  // the connection lasts.
  void SetStallCut(CallWatchdog* dog, std::function<bool(const std::string& key)> cut) {
    stall_dog_ = dog;
    stall_cut_ = std::move(cut);
  }

  // Called with the session before each Restore and ListRestorable; with
  // peers, it serves the session's rank from a rebuild in progress.
  void SetBeforeRestore(std::function<void(uint64_t session)> hook) {
    before_restore_ = std::move(hook);
  }

  // Unix-socket trainers: the uid a call's connection was admitted with
  // (TrainerListener::ConnectionUid), and the grants by which such a
  // trainer fetches each window it is given (`grants` must outlive the
  // service). Without them trainers stream their bytes over gRPC.
  void SetWindowGrants(std::function<std::optional<uint32_t>(const std::string& peer)> uid_of,
                       WindowGrants* grants) {
    uid_of_ = std::move(uid_of);
    grants_ = grants;
  }
  // The uid whose trainers may attach to `job` besides the first one's
  // (the daemon's own).
  void SetDaemonUid(uint32_t uid) { daemon_uid_ = uid; }

  // Clients that do not come through the Unix socket (the TCP data plane)
  // must attach with "authorization: Bearer JobToken(secret, job)"
  // (common/job_token.h). Unset: only Unix-socket clients can attach.
  void SetJobSecret(std::string secret) { job_secret_ = std::move(secret); }

  grpc::ServerWriteReactor<v1::AttachEvent>* Attach(grpc::CallbackServerContext* context,
                                                    const v1::AttachRequest* request) override;
  grpc::Status BeginRank(grpc::ServerContext*, const v1::BeginRankRequest* request,
                         v1::BeginRankResponse* response) override;
  grpc::Status PrepareRank(grpc::ServerContext*, const v1::PrepareRankRequest* request,
                           v1::PrepareRankResponse* response) override;
  grpc::ServerReadReactor<grpc::ByteBuffer>* WriteRank(grpc::CallbackServerContext* context,
                                                       grpc::ByteBuffer* response) override;
  grpc::Status CommitRank(grpc::ServerContext*, const v1::CommitRankRequest* request,
                          v1::CommitRankResponse* response) override;
  grpc::Status AbortRank(grpc::ServerContext*, const v1::AbortRankRequest* request,
                         v1::AbortRankResponse* response) override;
  grpc::Status ListRestorable(grpc::ServerContext*, const v1::ListRestorableRequest* request,
                              v1::ListRestorableResponse* response) override;
  grpc::Status Restore(grpc::ServerContext*, const v1::RestoreRequest* request,
                       v1::RestoreResponse* response) override;
  grpc::ServerWriteReactor<grpc::ByteBuffer>* ReadRank(grpc::CallbackServerContext* context,
                                                       const grpc::ByteBuffer* request) override;
  grpc::Status ReleaseRestore(grpc::ServerContext*, const v1::ReleaseRestoreRequest* request,
                              v1::ReleaseRestoreResponse* response) override;

  // Ends every Attach stream now, so that a shutdown need not wait for
  // clients to hang up. Later Attach calls are refused.
  void EndSessions();

 private:
  class AttachReactor;
  class RefusedReactor;
  class ReadReactor;
  class WriteReactor;
  struct WireSession {
    uint64_t session;
    std::string connection;
    bool windows = false;  // the trainer maps windows (AttachRequest.windows)
    std::optional<uint32_t> uid;  // a Unix-socket trainer's
    AttachReactor* reactor = nullptr;  // valid while in live_
  };
  void Forget(AttachReactor* reactor);
  absl::Status CheckJobToken(const grpc::CallbackServerContext& context,
                             const std::string& job_id) const;
  // A job's trainers on the socket are of one uid, the first to attach it
  // (the daemon's own uid may attach any job; the owner is kept in the job's
  // rank records across restarts): another uid may not read or write its
  // steps. `uid`: the attaching connection's, none for TCP.
  absl::Status CheckJobOwner(std::optional<uint32_t> uid, const std::string& job_id);
  // The same, again, for an attached session: asked at every snapshot and
  // restore, since a job's owner can change under a live session (a rebuilt
  // job's owner comes from its group and wins over a claim made here).
  absl::Status CheckSessionOwner(const WireSession& ws, uint64_t session);
  // Fills a grant for the window at `extent` when `session`'s trainer maps
  // windows (it came through the socket, from a known uid, and asked to);
  // leaves the token empty otherwise.
  absl::Status Grant(const WireSession& session, const ArenaExtent& extent, bool writable,
                     std::string* token, uint64_t* file_id, bool spare = false);
  std::string ConnectionOf(const grpc::ServerContextBase& context) const;
  // A fresh wire id for store session `session` opened on `connection`.
  std::string AddSession(uint64_t session, std::string connection, bool windows,
                         std::optional<uint32_t> uid, AttachReactor* reactor);
  void RemoveSession(const std::string& id);
  // The store session named by `id`, if the call came on its connection;
  // `out`, when given, receives the whole wire session.
  absl::StatusOr<uint64_t> SessionOf(const grpc::ServerContextBase& context,
                                     const std::string& id, WireSession* out = nullptr);

  // Sessions whose next window waits to be made, at most this many.
  static constexpr size_t kMaxQueuedPrepares = 256;
  // Makes ready windows for a session's rank in the background, until the
  // rank has `spares` of them (StepStore::PrepareRank), and offers each on
  // the session's Attach stream. One window a turn: sessions take turns.
  void QueuePrepare(const std::string& wire_id, uint64_t bytes, int spares);
  void PrepareLoop();

  StepStore* const store_;
  const uint32_t slot_;
  std::function<void(uint64_t)> before_restore_;
  CallWatchdog* stall_dog_ = nullptr;
  std::function<bool(const std::string& key)> stall_cut_;
  std::function<std::string(const std::string&)> connection_key_;
  std::string job_secret_;
  std::function<std::optional<uint32_t>(const std::string&)> uid_of_;
  WindowGrants* grants_ = nullptr;
  uint32_t daemon_uid_ = 0;

  absl::Mutex mu_;
  std::set<AttachReactor*> live_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, WireSession> sessions_ ABSL_GUARDED_BY(mu_);
  bool closing_ ABSL_GUARDED_BY(mu_) = false;
  struct PrepareWork {
    std::string wire_id;
    uint64_t bytes;
    int spares;    // wanted (StepStore::PrepareRank), one made a turn
    int made = 0;  // this entry's turns so far
  };
  std::deque<PrepareWork> prepare_queue_ ABSL_GUARDED_BY(mu_);
  std::thread preparer_;  // PrepareLoop, started by the first QueuePrepare
  // WriteRank's messages are copied into windows here (WriteReactor): a
  // stream has at most one message queued, so the queue's bound is one of
  // streams, far above what the data server admits. Last: its threads end
  // (running what is queued) before any other member goes.
  static constexpr int kBulkThreads = 4;
  static constexpr size_t kMaxBulkQueued = 4096;
  std::unique_ptr<Executor> bulk_;
};

}  // namespace ecsnap::daemon

#endif  // ECSNAP_DAEMON_SERVICE_SNAPSHOT_SERVICE_H_
