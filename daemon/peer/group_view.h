// GroupView: what the answering peers of a group know of each (job, step),
// merged (DESIGN.md §5): every slot's shape, every parity row heard complete,
// and who holds which chunk intact. A rebuild plans from it.
//
// Peers' words are range-checked before use: an entry naming a slot, stripe,
// row or chunk outside the group's RS(k, m) is ignored and counted, never
// used as an index. Pure: no gRPC, no state beyond what was merged.
#ifndef ECSNAP_DAEMON_PEER_GROUP_VIEW_H_
#define ECSNAP_DAEMON_PEER_GROUP_VIEW_H_

#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "daemon/peer/group.h"
#include "ec/layout.h"
#include "proto/peer.pb.h"

namespace ecsnap::daemon {

// (stripe, position) -> group positions holding that chunk intact.
using Holders = std::map<std::pair<int, int>, std::set<int>>;

// A holder that stands for "nobody needs to hold it": a chunk of zero bytes
// (the payload of a node that runs no rank of the job) is known without
// asking anyone, even after the node that had it restarted or was lost.
constexpr int kKnownEmpty = -1;

// What the group knows of one (job, step).
struct StepView {
  std::map<int, peer::SlotStep> slots;                        // by group position
  std::map<std::pair<int, int>, peer::StripeProtected> rows;  // (stripe, row)
  Holders held;
};

using StepKey = std::pair<std::string, uint64_t>;  // (job, step)

class GroupView {
 public:
  explicit GroupView(const ec::Layout& layout) : layout_(layout) {}

  // Merges the inventory that group position `from` answered. Returns how
  // many entries were out of range and ignored.
  int Merge(int from, const peer::InventoryResponse& inventory);
  // Once every answer is merged: chunks of zero bytes need no holder.
  void AddKnownEmptyChunks();

  const std::map<StepKey, StepView>& steps() const { return steps_; }
  const std::set<int>& answered() const { return answered_; }

 private:
  const ec::Layout& layout_;
  std::map<StepKey, StepView> steps_;
  std::set<int> answered_;
};

// Positions of stripe `s` that nobody holds intact.
std::vector<int> MissingPositions(const Holders& held, int n, int s);

// "stripe 1 has 1 of the 2 intact chunks it needs (positions {0, 2}, on
// slots {3, 5}, are lost)", for a stripe that cannot be decoded.
std::string StripeLoss(const ec::Layout& layout, const Group& group, const Holders& held, int s);

}  // namespace ecsnap::daemon

#endif  // ECSNAP_DAEMON_PEER_GROUP_VIEW_H_
