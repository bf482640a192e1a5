// Fuzzes the checks a trainer's manifest passes before the daemon trusts it
// (CommitRank, re-adoption, rebuilt ranks). Input: 8 bytes of window size,
// then a serialized ecsnap.v1.Manifest. A manifest that passes must lie
// inside its window; the CRC check then runs over a real window.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "daemon/store/manifest_check.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace ecsnap;
  if (size < 8) return 0;
  uint64_t window;
  std::memcpy(&window, data, 8);
  v1::Manifest manifest;
  if (!manifest.ParseFromArray(data + 8, static_cast<int>(size - 8))) return 0;
  daemon::ManifestLimits limits;
  limits.max_tensors = 1024;
  if (!daemon::CheckManifest(manifest, window, limits).ok()) return 0;
  for (const auto& t : manifest.tensors()) {
    if (t.offset() > window || t.length() > window - t.offset()) std::abort();
  }
  window %= 1 << 16;  // a window this process can hold; checks still apply
  if (!daemon::CheckManifest(manifest, window, limits).ok()) return 0;
  std::vector<uint8_t> bytes(window, 0xa5);
  daemon::VerifyReport report;
  daemon::CheckCrcs(manifest, bytes, 1, &report).IgnoreError();
  return 0;
}
