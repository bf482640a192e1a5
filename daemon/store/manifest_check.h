// Checks of a rank's manifest against the window it describes (DESIGN.md §8):
// the shape of every tensor entry before anything trusts it, then every
// tensor's CRC-32C against the bytes. Used when a rank commits, when a
// restarted daemon re-adopts a recorded rank, and when a rebuilt rank is
// installed; pure functions, no state.
#ifndef ECSNAP_DAEMON_STORE_MANIFEST_CHECK_H_
#define ECSNAP_DAEMON_STORE_MANIFEST_CHECK_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "proto/snapshot.pb.h"

namespace ecsnap::daemon {

// Bounds on a manifest, from the store's limits.
struct ManifestLimits {
  size_t max_tensors = size_t{1} << 20;
  size_t max_name_bytes = 4096;
  size_t max_dims = 16;
};

// What Verify found: tensors and bytes checked, and one line per mismatch.
struct VerifyReport {
  uint32_t tensors_checked = 0;
  uint64_t bytes_checked = 0;
  std::vector<std::string> errors;
};

// INVALID_ARGUMENT, with a sentence naming the tensor, when an entry has no
// or a duplicate name, an unknown kind or dtype, too many dimensions, bytes
// outside [0, window_bytes), or a shape whose size disagrees with its length.
absl::Status CheckManifest(const v1::Manifest& manifest, uint64_t window_bytes,
                           const ManifestLimits& limits);

// Checks every tensor's CRC-32C against the bytes of `window` (the manifest
// already passed CheckManifest for it), spreading whole tensors over up to
// `threads` threads, largest first. Counts into *report when given.
absl::Status CheckCrcs(const v1::Manifest& manifest, absl::Span<const uint8_t> window,
                       int threads, VerifyReport* report);

// A job id: 1 to `max_bytes` characters of [A-Za-z0-9._-].
bool ValidJobId(const std::string& id, size_t max_bytes);

// Bytes per element of a dtype; 0 for BYTES (any length) and unknown values.
size_t DTypeBytes(v1::DType dtype);

}  // namespace ecsnap::daemon

#endif  // ECSNAP_DAEMON_STORE_MANIFEST_CHECK_H_
