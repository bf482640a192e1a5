// Where each tensor of a restored step goes: the caller's destination named
// after it, or (when the caller takes the rest) a 64-byte aligned place in
// one buffer of the library's. Pure: no I/O, unit-tested.
#ifndef ECSNAP_CLIENT_RESTORE_PLAN_H_
#define ECSNAP_CLIENT_RESTORE_PLAN_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "client/ecsnap.h"
#include "proto/snapshot.pb.h"

namespace ecsnap::client_internal {

struct RestorePlan {
  static constexpr uint64_t kNone = ~uint64_t{0};
  // By manifest tensor: its destination, or null when it goes to the rest.
  std::vector<const TensorDestination*> dests;
  // By manifest tensor: its offset in the rest buffer, or kNone.
  std::vector<uint64_t> rest_offset;
  uint64_t rest_bytes = 0;
};

// The plan for `manifest` (of `step`, for messages) and `into`. Each
// destination must name a tensor of the step, once, with its exact size and
// a device of -1 (host) or a CUDA ordinal; tensors without one go to the
// rest when `take_rest`, else the plan is refused. INVALID_ARGUMENT naming
// the tensor otherwise.
absl::StatusOr<RestorePlan> PlanRestore(const v1::Manifest& manifest, uint64_t step,
                                        absl::Span<const TensorDestination> into,
                                        bool take_rest);

}  // namespace ecsnap::client_internal

#endif  // ECSNAP_CLIENT_RESTORE_PLAN_H_
