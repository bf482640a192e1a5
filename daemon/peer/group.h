// Which slots protect each other (DESIGN.md §1, §6).
//
// Groups of n = k + m slots partition the cluster. Without failure domains a
// group is n consecutive slots; when every slot names a failure domain, each
// group takes at most one slot per domain, so losing a whole domain costs a
// group one slot.
#ifndef ECSNAP_DAEMON_PEER_GROUP_H_
#define ECSNAP_DAEMON_PEER_GROUP_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "proto/config.pb.h"

namespace ecsnap::daemon {

struct Group {
  uint32_t id = 0;
  // Cluster slot of each group position 0..n-1.
  std::vector<uint32_t> slots;
  // Peer address of each group position.
  std::vector<std::string> addresses;
  // This daemon's position in the group.
  int self = 0;
};

// The group of cluster slot `slot`. INVALID_ARGUMENT when the slots cannot be
// cut into groups of k + m (with distinct failure domains where given).
absl::StatusOr<Group> FormGroup(const config::Cluster& cluster, uint32_t slot);

}  // namespace ecsnap::daemon

#endif  // ECSNAP_DAEMON_PEER_GROUP_H_
