// RebuildPlan: which step of each job a replaced or restarted slot rebuilds,
// decided from the group's merged inventories alone (DESIGN.md §5). Pure.
//
// A step is a candidate when the group heard all n * m of its parity rows
// complete and it is newer than anything this slot holds. Candidates are
// tried newest first; each is either decodable (every stripe has k intact
// chunks among the answering peers and every slot's shape is known) or
// carries the DATA_LOSS status that says why not, naming the group, the lost
// slots and each stripe's shortfall.
#ifndef ECSNAP_DAEMON_PEER_REBUILD_PLAN_H_
#define ECSNAP_DAEMON_PEER_REBUILD_PLAN_H_

#include <cstdint>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "daemon/peer/group.h"
#include "daemon/peer/group_view.h"
#include "ec/layout.h"

namespace ecsnap::daemon {

struct RebuildCandidate {
  uint64_t step = 0;
  absl::Status decodable;  // OK, or DATA_LOSS with the reason
};

struct JobPlan {
  std::string job;
  // Protected steps newer than this slot's newest complete one, newest
  // first. Empty when this slot already holds the newest protected step.
  std::vector<RebuildCandidate> candidates;
};

// One plan per job the group holds a protected step of. `have` lists the
// complete steps this slot holds.
std::vector<JobPlan> PlanRebuild(const ec::Layout& layout, const Group& group,
                                 const GroupView& view, const std::set<StepKey>& have);

}  // namespace ecsnap::daemon

#endif  // ECSNAP_DAEMON_PEER_REBUILD_PLAN_H_
