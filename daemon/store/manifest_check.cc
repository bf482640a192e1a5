#include "daemon/store/manifest_check.h"

#include <algorithm>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "common/balanced_for.h"
#include "ec/crc32c.h"

namespace ecsnap::daemon {

bool ValidJobId(const std::string& id, size_t max_bytes) {
  if (id.empty() || id.size() > max_bytes) return false;
  return std::all_of(id.begin(), id.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           c == '-' || c == '_' || c == '.';
  });
}

size_t DTypeBytes(v1::DType dtype) {
  switch (dtype) {
    case v1::FLOAT64:
    case v1::INT64:
      return 8;
    case v1::FLOAT32:
    case v1::INT32:
      return 4;
    case v1::FLOAT16:
    case v1::BFLOAT16:
    case v1::INT16:
      return 2;
    case v1::INT8:
    case v1::UINT8:
    case v1::BOOL:
    case v1::FLOAT8_E4M3:
    case v1::FLOAT8_E5M2:
      return 1;
    default:
      return 0;
  }
}

absl::Status CheckManifest(const v1::Manifest& manifest, uint64_t window_bytes,
                           const ManifestLimits& lim) {
  if (static_cast<size_t>(manifest.tensors_size()) > lim.max_tensors) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "the manifest lists %d tensors; at most %d are allowed per rank", manifest.tensors_size(),
        lim.max_tensors));
  }
  std::set<std::string> names;
  for (const v1::TensorEntry& t : manifest.tensors()) {
    if (t.name().empty() || t.name().size() > lim.max_name_bytes) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "tensor name of %d bytes: names must have 1 to %d bytes", t.name().size(),
          lim.max_name_bytes));
    }
    if (!names.insert(t.name()).second) {
      return absl::InvalidArgumentError(
          absl::StrFormat("tensor '%s' appears twice in the manifest", t.name()));
    }
    if (!v1::TensorKind_IsValid(t.kind()) || t.kind() == v1::TENSOR_KIND_UNSPECIFIED) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "tensor '%s' has kind %d; use PARAM, OPTIMIZER, RNG or EXTRA", t.name(), t.kind()));
    }
    if (!v1::DType_IsValid(t.dtype()) || t.dtype() == v1::DTYPE_UNSPECIFIED) {
      return absl::InvalidArgumentError(
          absl::StrFormat("tensor '%s' has unknown dtype %d", t.name(), t.dtype()));
    }
    if (static_cast<size_t>(t.shape_size()) > lim.max_dims) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "tensor '%s' has %d dimensions; at most %d are allowed", t.name(), t.shape_size(),
          lim.max_dims));
    }
    if (t.offset() > window_bytes || t.length() > window_bytes - t.offset()) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "tensor '%s' at offset %d with %d bytes lies outside the rank's %d-byte window",
          t.name(), t.offset(), t.length(), window_bytes));
    }
    const size_t elem = DTypeBytes(t.dtype());
    if (elem != 0) {
      // Elements times element size must equal the length, without overflow.
      uint64_t elements = 1;
      for (int64_t d : t.shape()) {
        if (d < 0 || (d > 0 && elements > window_bytes / static_cast<uint64_t>(d))) {
          return absl::InvalidArgumentError(absl::StrFormat(
              "tensor '%s' has shape dimension %d, negative or larger than its window",
              t.name(), d));
        }
        elements *= static_cast<uint64_t>(d);
      }
      if (elements * elem != t.length()) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "tensor '%s' has %d elements of %d bytes but claims %d bytes", t.name(), elements,
            elem, t.length()));
      }
    }
  }
  return absl::OkStatus();
}

absl::Status CheckCrcs(const v1::Manifest& manifest, absl::Span<const uint8_t> window,
                       int threads, VerifyReport* report) {
  const int n = manifest.tensors_size();
  std::vector<uint32_t> crcs(n);
  std::vector<uint64_t> bytes;
  for (const v1::TensorEntry& e : manifest.tensors()) bytes.push_back(e.length());
  BalancedFor(bytes, threads, [&](size_t i) {
    const v1::TensorEntry& e = manifest.tensors(static_cast<int>(i));
    crcs[i] = ec::Crc32c(window.subspan(e.offset(), e.length()));
  });

  for (int i = 0; i < n; ++i) {
    const v1::TensorEntry& t = manifest.tensors(i);
    if (report != nullptr) {
      ++report->tensors_checked;
      report->bytes_checked += t.length();
    }
    if (crcs[i] != t.crc32c()) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "tensor '%s' has crc32c 0x%08x in the manifest but its %d bytes in the window have "
          "0x%08x; the copy was incomplete or the manifest is stale",
          t.name(), t.crc32c(), t.length(), crcs[i]));
    }
  }
  return absl::OkStatus();
}

}  // namespace ecsnap::daemon
