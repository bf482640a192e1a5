// Protector: moves a slot's LOCAL steps to PROTECTED across its group
// (DESIGN.md §2, §3).
//
// When a step becomes LOCAL, the protector pushes each of the slot's k data
// chunks to the m holders of that chunk's stripe, one gRPC stream per holder,
// all holders at once, each under a deadline. A holder folds what it gets
// (ParityStore) and, when a row is complete, announces it to the whole group.
// A slot marks a step PROTECTED once it has heard all n * m rows complete,
// and frees parity of older steps. A peer that is down or slow leaves the
// step LOCAL; the next step tries again. Nothing here blocks a trainer.
//
// Peers are pinged every second; their state is shown by ecsnapctl status.
#ifndef ECSNAP_DAEMON_PROTECTOR_H_
#define ECSNAP_DAEMON_PROTECTOR_H_

#include <chrono>
#include <deque>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "daemon/group.h"
#include "daemon/parity_store.h"
#include "daemon/step_store.h"
#include "ec/codec.h"
#include "ec/layout.h"
#include "proto/peer.grpc.pb.h"

namespace ecsnap::daemon {

// Payload bytes per PushChunk / GetChunk message.
inline constexpr uint64_t kPeerChunkBytes = 1 << 20;

struct PeerState {
  int position = 0;
  uint32_t slot = 0;
  std::string address;
  bool reachable = true;
  int64_t last_seen_ms_ago = -1;
  std::string last_error;
};

class Protector {
 public:
  struct Options {
    // A peer's deadline: per call, plus time for the bytes at 50 MB/s.
    // Default: 5000.
    int peer_timeout_ms = 5000;
    // Default: 1000.
    int ping_interval_ms = 1000;
    // Protected steps whose parity is kept per job. Default: 1.
    uint32_t retain = 1;
  };

  // The stores must outlive the protector.
  Protector(StepStore* store, ParityStore* parity, Group group, const ec::Layout& layout,
            Options options);
  ~Protector();

  void Start();
  void Stop();

  // StepStore's listener: queues the step's push.
  void OnLocal(const std::string& job, uint64_t step);
  // A holder's row is complete (heard from the group, or folded here).
  void OnRowComplete(const peer::StripeProtected& row);
  // Tells the whole group (this slot too) that a row is complete.
  void Announce(const peer::StripeProtected& row);

  std::vector<PeerState> Peers() const;
  // A stub to group position `position` (not this slot).
  peer::Peer::Stub* Stub(int position) const { return stubs_[position].get(); }
  const Group& group() const { return group_; }
  const ec::Layout& layout() const { return layout_; }
  std::chrono::system_clock::time_point Deadline(uint64_t bytes) const;

  // The shape this slot announces for a step: payload size, manifests and
  // the CRC of each data chunk.
  static peer::SlotStep Describe(const Payload& payload, const ec::Layout& layout, int self);

 private:
  // Pops the front of `queue` into *out, waiting for one; false once stopping.
  template <typename T>
  bool Next(std::deque<T>& queue, T* out) ABSL_LOCKS_EXCLUDED(mu_);
  void PushLoop();
  void AnnounceLoop();
  void PingLoop();
  void PushStep(const std::string& job, uint64_t step);
  absl::Status PushTo(int holder, const std::string& job, uint64_t step, const Payload& payload,
                      const peer::SlotStep& me, const std::vector<int>& chunks);
  void NotePeer(int position, const absl::Status& status);
  void NotePeerLocked(int position, const absl::Status& status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  StepStore* const store_;
  ParityStore* const parity_;
  const Group group_;
  const ec::Layout layout_;
  const Options options_;
  std::vector<std::unique_ptr<peer::Peer::Stub>> stubs_;

  mutable absl::Mutex mu_;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::deque<std::pair<std::string, uint64_t>> pushes_ ABSL_GUARDED_BY(mu_);
  std::deque<peer::StripeProtected> announcements_ ABSL_GUARDED_BY(mu_);
  std::vector<PeerState> peers_ ABSL_GUARDED_BY(mu_);
  std::vector<std::chrono::steady_clock::time_point> seen_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, std::deque<uint64_t>> protected_ ABSL_GUARDED_BY(mu_);
  std::vector<std::thread> threads_;
};

}  // namespace ecsnap::daemon

#endif  // ECSNAP_DAEMON_PROTECTOR_H_
