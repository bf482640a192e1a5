// Protector: moves a slot's LOCAL steps to PROTECTED across its group, and
// keeps the group's knowledge of protection honest (DESIGN.md §2, §3).
//
// When a step becomes LOCAL, the protector pushes each of the slot's k data
// chunks to the m holders of that chunk's stripe. Each holder (group
// position) has a pusher thread of its own, working through a queue of
// steps; a push that fails (peer down, reset, a row discarded on the far
// side) is retried with exponential backoff until it succeeds, the step is
// retired here, or the holder answers that the step is retired or abandoned
// there. A call is cut when it stops making progress (CallWatchdog), never
// because a guessed deadline ran out.
//
// A holder folds what it gets (ParityStore) and, when a row is complete,
// announces it to the whole group. Notices to a peer (rows complete or lost,
// steps protected, abandoned or rewound) go through that peer's outbox: one
// sender thread per peer, deduplicated, retried until delivered, so a dead
// peer delays nobody else and a stopped one hears everything when it
// resumes. A slot marks a step PROTECTED once it knows all n * m rows
// complete, and moves it back to LOCAL when a holder reports a row lost.
//
// Retention is a group decision: the protector tracks, per job, the newest
// step each group member holds PROTECTED; steps from the smallest of those
// (the group floor) on are never retired, so some step always survives any
// m losses. A LOCAL step superseded by a newer one is dropped only when this
// slot can seal it as never-protectable (ParityStore::TryAbandon) and tells
// the group. It implements StepStore's RetentionGate.
//
// Peers are pinged every second; their state is shown by ecsnapctl status.
#ifndef ECSNAP_DAEMON_PEER_PROTECTOR_H_
#define ECSNAP_DAEMON_PEER_PROTECTOR_H_

#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/security/credentials.h>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/metrics.h"
#include "daemon/peer/call_watchdog.h"
#include "daemon/peer/group.h"
#include "daemon/peer/parity_store.h"
#include "daemon/peer/payload_chunks.h"
#include "daemon/peer/rdma_transport.h"
#include "daemon/peer/transport.h"
#include "daemon/store/step_store.h"
#include "ec/codec.h"
#include "ec/layout.h"
#include "proto/peer.grpc.pb.h"

namespace ecsnap::daemon {

struct PeerState {
  int position = 0;
  uint32_t slot = 0;
  std::string address;
  bool reachable = true;
  int64_t last_seen_ms_ago = -1;
  std::string last_error;
};

// Why a step is not PROTECTED on this slot, for ecsnapctl status.
struct StepExplanation {
  std::vector<std::string> missing_rows;  // "stripe 2 row 0 on slot 3"
  std::vector<std::string> pushes;        // "to slot 1: 4 attempts since 12 s: <error>"
};

class Protector : public RetentionGate {
 public:
  struct Options {
    // A call to a peer that moves no byte for this long is cut (and a push
    // retried). Default: 5000.
    int peer_timeout_ms = 5000;
    // Default: 1000.
    int ping_interval_ms = 1000;
    // Protected steps whose parity is kept per job. Default: 1.
    uint32_t retain = 1;
    // How peers are dialled. Default (null): plaintext.
    std::shared_ptr<grpc::ChannelCredentials> credentials;
    // Per group position, the name the peer's certificate must carry, so
    // that a call reaches that slot and no other (empty: not checked).
    std::vector<std::string> peer_names;
    // How chunk bytes travel: over TCP bulk connections (true), or inside
    // the gRPC streams (false; encrypted under mutual TLS).
    bool tcp_bulk = true;
    // With tcp_bulk: over RDMA through this fabric to every holder that has
    // a device too (BULK_RDMA); it outlives the protector. Default: none.
    RdmaFabric* rdma = nullptr;
  };

  // The stores must outlive the protector.
  Protector(StepStore* store, ParityStore* parity, Group group, const ec::Layout& layout,
            Options options);
  ~Protector() override;

  void Start();
  // Cancels every call in flight and waits for the threads, at most
  // `grace`. Returns false when some thread is still inside a call (gRPC
  // does not always end a write blocked by a stopped peer's flow control
  // when the call is cancelled): the threads are then left to the process's
  // exit, and the caller must exit without destroying the protector.
  bool Stop(absl::Duration grace = absl::Seconds(1));

  // StepStore's listener: queues the step's pushes to every holder.
  void OnLocal(const std::string& job, uint64_t step);
  // A peer pushed `step` of `job`: if no rank of the job runs here, this
  // slot takes part with an empty payload (StepStore::AddEmptyStep).
  // Only after SetReady (the start-up rebuild pass is over), and never for a
  // job the group knows this slot had a payload of (a replaced node whose
  // ranks have not come back yet).
  void OnPeerStep(const std::string& job, uint64_t step);
  void SetReady();
  // A holder's row is complete, or lost (heard from the group, or here).
  void OnRowComplete(const peer::StripeProtected& row);
  // Tells the whole group (this slot too) that a row is complete or lost.
  void Announce(const peer::StripeProtected& row);
  // A peer's notice about a job. INVALID_ARGUMENT for a sender outside the
  // group.
  absl::Status OnJobNotice(const peer::JobNotice& notice);
  // A restore here rewound `job` to `step`: the group discards newer steps.
  void OnRewind(const std::string& job, uint64_t step);
  // A step was installed PROTECTED by a rebuild.
  void OnInstalled(const std::string& job, uint64_t step);
  // The newest step of each job this slot holds PROTECTED.
  std::vector<std::pair<std::string, uint64_t>> NewestProtected() const;

  // RetentionGate (called under the step store's lock).
  uint64_t GroupFloor(const std::string& job) override;
  bool MayDropUnprotected(const std::string& job, uint64_t step) override;

  StepExplanation Explain(const std::string& job, uint64_t step) const;
  std::vector<PeerState> Peers() const;
  // A stub to group position `position` (not this slot).
  peer::Peer::Stub* Stub(int position) const { return stubs_[position].get(); }
  // Where chunk bytes cross to and from peers.
  PeerTransport* transport() const { return transport_.get(); }
  const Group& group() const { return group_; }
  const ec::Layout& layout() const { return layout_; }
  std::chrono::system_clock::time_point Deadline(uint64_t bytes) const;
  CallWatchdog* watchdog() { return &watchdog_; }

  // Chunk bytes pushed to, and read for a rebuild from, group position
  // `position` (ecsnap_peer_pushed_bytes_total / _fetched_, by slot): looked
  // up once here, not in the registry on each chunk and slice.
  Counter& pushed_bytes(int position) { return *pushed_bytes_[position]; }
  Counter& fetched_bytes(int position) { return *fetched_bytes_[position]; }

  // The shape this slot announces for a step: payload size, manifests and
  // the CRC of each data chunk.
  static peer::SlotStep Describe(const Payload& payload, const ec::Layout& layout, int self);

 private:
  using Key = std::pair<std::string, uint64_t>;
  struct PushTask {
    absl::Time due;
    int attempts = 0;
    absl::Time first_failure;
    std::string last_error;
  };
  struct Outgoing {
    uint64_t seq = 0;
    std::string job;
    uint64_t step = 0;
    std::optional<peer::StripeProtected> row;
    std::optional<peer::JobNotice> notice;
  };
  // Everything this slot owes one peer.
  struct Link {
    std::map<Key, PushTask> pushes;
    std::map<std::string, Outgoing> outbox;
    bool wake = false;
  };

  void PushLoop(int holder);
  void NotifyLoop(int peer);
  void PingLoop();
  // Pushes what `holder` keeps of (job, step). Permanent failures come back
  // as FAILED_PRECONDITION or NOT_FOUND.
  absl::Status PushStep(int holder, const std::string& job, uint64_t step);
  absl::Status PushChunk(int holder, const std::string& job, uint64_t step, const Payload& payload,
                         const PayloadChunks& chunks, const peer::SlotStep& me, int p);
  void QueuePushLocked(int holder, const std::string& job, uint64_t step)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void SendLocked(int peer, std::string key, Outgoing out) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void BroadcastLocked(const peer::JobNotice& notice, const std::string& key)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Records that group position `position` holds `step` of `job` PROTECTED;
  // applies retention when the group floor moves.
  void NoteProtected(int position, const std::string& job, uint64_t step);
  void ApplyFloor(const std::string& job);
  // Drops the row notices of `job` owed to peers whose step is `moot`.
  void DropRowNoticesLocked(const std::string& job, const std::function<bool(uint64_t)>& moot)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  uint64_t FloorLocked(const std::string& job) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The newest step of `job` some group member is known to hold PROTECTED.
  uint64_t NewestProtectedAnywhereLocked(const std::string& job) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void NotePeer(int position, const absl::Status& status);
  // Waits up to `d` or until stopping; false once stopping.
  bool SleepFor(absl::Duration d);
  absl::StatusOr<peer::SlotStep> Described(const std::string& job, uint64_t step,
                                           const Payload& payload);

  StepStore* const store_;
  ParityStore* const parity_;
  const Group group_;
  const ec::Layout layout_;
  const Options options_;
  std::vector<std::unique_ptr<peer::Peer::Stub>> stubs_;
  CallWatchdog watchdog_;
  std::unique_ptr<RdmaCarrier> rdma_;  // before transport_, which uses it
  std::unique_ptr<PeerTransport> transport_;

  mutable absl::Mutex mu_;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  bool ready_ ABSL_GUARDED_BY(mu_) = false;
  int running_ ABSL_GUARDED_BY(mu_) = 0;  // threads not yet returned
  // Per job, the newest step a peer pushed before SetReady.
  std::map<std::string, uint64_t> deferred_ ABSL_GUARDED_BY(mu_);
  uint64_t seq_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<Link> links_ ABSL_GUARDED_BY(mu_);  // by group position
  std::vector<PeerState> peers_ ABSL_GUARDED_BY(mu_);
  std::vector<std::chrono::steady_clock::time_point> seen_ ABSL_GUARDED_BY(mu_);
  // Newest protected steps here, per job (at most `retain`).
  std::vector<Counter*> pushed_bytes_;   // by group position
  std::vector<Counter*> fetched_bytes_;  // by group position
  std::map<std::string, std::vector<uint64_t>> protected_ ABSL_GUARDED_BY(mu_);
  // When each step went LOCAL here, until it is PROTECTED (at most
  // kMaxLocalSince entries).
  static constexpr size_t kMaxLocalSince = 4096;
  std::map<std::pair<std::string, uint64_t>, std::chrono::steady_clock::time_point> local_since_
      ABSL_GUARDED_BY(mu_);
  // Per job, the newest step each group position holds PROTECTED.
  std::map<std::string, std::vector<uint64_t>> newest_protected_ ABSL_GUARDED_BY(mu_);
  // Per job, the step it was last rewound to.
  std::map<std::string, uint64_t> rewound_ ABSL_GUARDED_BY(mu_);
  // This slot's shape of each step being pushed (its CRCs cost a pass).
  std::map<Key, std::shared_ptr<const peer::SlotStep>> described_ ABSL_GUARDED_BY(mu_);
  std::vector<std::thread> threads_;
};

}  // namespace ecsnap::daemon

#endif  // ECSNAP_DAEMON_PEER_PROTECTOR_H_
