#include "client/restore_plan.h"

#include <map>
#include <string>

#include "absl/strings/str_format.h"

namespace ecsnap::client_internal {
namespace {

// Tensors start on this boundary in the rest buffer, as in a window.
constexpr uint64_t kAlignBytes = 64;

}  // namespace

absl::StatusOr<RestorePlan> PlanRestore(const v1::Manifest& manifest, uint64_t step,
                                        absl::Span<const TensorDestination> into,
                                        bool take_rest) {
  std::map<std::string, const TensorDestination*> by_name;
  for (const TensorDestination& d : into) {
    if (!by_name.emplace(d.name, &d).second) {
      return absl::InvalidArgumentError(
          absl::StrFormat("destination '%s' is given twice", d.name));
    }
    if (d.device < -1) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "destination '%s': device %d is neither -1 (host) nor a CUDA device", d.name,
          d.device));
    }
  }
  RestorePlan plan;
  plan.dests.assign(manifest.tensors_size(), nullptr);
  plan.rest_offset.assign(manifest.tensors_size(), RestorePlan::kNone);
  size_t matched = 0;
  for (int i = 0; i < manifest.tensors_size(); ++i) {
    const v1::TensorEntry& t = manifest.tensors(i);
    auto it = by_name.find(t.name());
    if (it == by_name.end()) {
      if (!take_rest) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "step %d holds tensor '%s' but no destination was given for it", step, t.name()));
      }
      plan.rest_offset[i] = (plan.rest_bytes + kAlignBytes - 1) / kAlignBytes * kAlignBytes;
      plan.rest_bytes = plan.rest_offset[i] + t.length();
      continue;
    }
    if (it->second->bytes != t.length()) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "tensor '%s' of step %d has %d bytes but its destination has %d", t.name(), step,
          t.length(), it->second->bytes));
    }
    plan.dests[i] = it->second;
    ++matched;
  }
  if (matched != by_name.size()) {
    for (const auto& [name, d] : by_name) {
      bool found = false;
      for (const v1::TensorEntry& t : manifest.tensors()) found |= t.name() == name;
      if (!found) {
        return absl::InvalidArgumentError(
            absl::StrFormat("destination '%s' is not a tensor of step %d", name, step));
      }
    }
  }
  return plan;
}

}  // namespace ecsnap::client_internal
