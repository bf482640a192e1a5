// What the rebuilder and the degraded restore share about the step being
// rebuilt: private to daemon/peer/rebuilder.cc and degraded_restore.cc.
#ifndef ECSNAP_DAEMON_PEER_REBUILD_STATE_H_
#define ECSNAP_DAEMON_PEER_REBUILD_STATE_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "daemon/peer/group_view.h"
#include "daemon/peer/payload_chunks.h"
#include "daemon/peer/rebuilder.h"
#include "daemon/store/step_store.h"

namespace ecsnap::daemon {

// Bytes of each survivor fetched per round: bounds the rebuild's memory to
// (k + 1) slices whatever the payload size.
inline constexpr uint64_t kSliceBytes = 4 << 20;

struct Rebuilder::Current {
  // `mu`: the rebuilder's mu_. Code that holds mu_ says so with
  // mu.AssertHeld() before it touches what mu guards (the analysis cannot
  // see that the two names are one lock).
  explicit Current(absl::Mutex& rebuilder_mu) : mu(rebuilder_mu) {}
  absl::Mutex& mu;
  std::string job;
  uint64_t step = 0;
  const StepView* view = nullptr;
  std::vector<uint64_t> lens;          // payload bytes of every group position
  std::vector<uint32_t> local_ranks;
  std::vector<RebuiltRank> ranks;      // fresh windows, laid end to end
  std::unique_ptr<PayloadChunks> payload;  // this slot's payload: chunks and rank windows
  // Served early from an extent of its own.
  std::vector<bool> installed ABSL_GUARDED_BY(mu);
  std::vector<bool> handed_off;  // window now owned by the store (the rebuild's thread only)
  std::vector<bool> claimed ABSL_GUARDED_BY(mu);  // being decoded on demand
  bool finalizing ABSL_GUARDED_BY(mu) = false;    // the rest is being installed
  mutable std::atomic<bool> vanished{false};  // a peer no longer holds the step
};

}  // namespace ecsnap::daemon

#endif  // ECSNAP_DAEMON_PEER_REBUILD_STATE_H_
