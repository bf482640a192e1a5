// What the rebuilder and the degraded restore share about the step being
// rebuilt: private to daemon/peer/rebuilder.cc and degraded_restore.cc.
#ifndef ECSNAP_DAEMON_PEER_REBUILD_STATE_H_
#define ECSNAP_DAEMON_PEER_REBUILD_STATE_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "daemon/peer/group_view.h"
#include "daemon/peer/payload_chunks.h"
#include "daemon/peer/rebuilder.h"
#include "daemon/store/step_store.h"

namespace ecsnap::daemon {

// Bytes of each survivor fetched per round: bounds the rebuild's memory to
// (k + 1) slices whatever the payload size.
inline constexpr uint64_t kSliceBytes = 32 << 20;

struct Rebuilder::Current {
  std::string job;
  uint64_t step = 0;
  const StepView* view = nullptr;
  std::vector<uint64_t> lens;          // payload bytes of every group position
  std::vector<uint32_t> local_ranks;
  std::vector<RebuiltRank> ranks;      // fresh windows, laid end to end
  std::unique_ptr<PayloadChunks> payload;  // this slot's payload: chunks and rank windows
  std::vector<bool> installed;         // served early from an extent of its own (mu_)
  std::vector<bool> handed_off;        // window now owned by the store
  std::vector<bool> claimed;           // being decoded on demand (mu_)
  bool finalizing = false;             // the rest is being installed (mu_)
  mutable std::atomic<bool> vanished{false};  // a peer no longer holds the step
};

}  // namespace ecsnap::daemon

#endif  // ECSNAP_DAEMON_PEER_REBUILD_STATE_H_
