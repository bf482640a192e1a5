#include "daemon/peer/group.h"

#include <map>
#include <set>

#include "absl/strings/str_format.h"

namespace ecsnap::daemon {

absl::StatusOr<Group> FormGroup(const config::Cluster& cluster, uint32_t slot) {
  const uint32_t n = cluster.k() + cluster.m();
  const uint32_t total = cluster.slots_size();
  if (total == 0) {
    Group g;
    g.slots = {slot};
    g.addresses = {""};
    return g;
  }
  if (n == 0 || total % n != 0 || slot >= total) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%d slots cannot form groups of k + m = %d (or slot %d is not among them)", total, n,
        slot));
  }
  bool domains = true;
  for (const auto& s : cluster.slots()) domains &= !s.failure_domain().empty();

  // An order of the slots whose consecutive runs of n form the groups.
  std::vector<uint32_t> order;
  if (!domains) {
    for (uint32_t i = 0; i < total; ++i) order.push_back(i);
  } else {
    // Deal the slots round-robin over the domains: consecutive slots of the
    // order then come from different domains.
    std::map<std::string, std::vector<uint32_t>> by_domain;
    for (uint32_t i = 0; i < total; ++i) by_domain[cluster.slots(i).failure_domain()].push_back(i);
    for (size_t round = 0; order.size() < total; ++round) {
      for (auto& [domain, slots] : by_domain) {
        if (round < slots.size()) order.push_back(slots[round]);
      }
    }
  }
  // Every group is checked, not only this slot's: all daemons must judge the
  // same config the same way.
  const uint32_t groups = total / n;
  Group mine;
  for (uint32_t g = 0; g < groups; ++g) {
    Group group;
    group.id = g;
    std::set<std::string> seen;
    for (uint32_t i = 0; i < n; ++i) {
      const uint32_t s = order[g * n + i];
      const auto& spec = cluster.slots(s);
      if (domains && !seen.insert(spec.failure_domain()).second) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "group %d would hold two slots of failure domain '%s': with %d groups of %d, no "
            "domain may have more than %d slots",
            g, spec.failure_domain(), groups, n, groups));
      }
      if (s == slot) group.self = static_cast<int>(i);
      group.slots.push_back(s);
      group.addresses.push_back(spec.peer_address());
    }
    for (uint32_t s : group.slots) {
      if (s == slot) mine = group;
    }
  }
  return mine;
}

}  // namespace ecsnap::daemon
