// Small formatting helpers for messages people read.
#ifndef ECSNAP_COMMON_FORMAT_H_
#define ECSNAP_COMMON_FORMAT_H_

#include <cstdint>
#include <string>

#include "absl/strings/str_format.h"

namespace ecsnap {

// "512 B", "4.00 KiB", "1.50 GiB".
inline std::string FormatBytes(uint64_t bytes) {
  static const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  if (bytes < 1024) return absl::StrFormat("%d B", bytes);
  double v = static_cast<double>(bytes);
  int unit = 0;
  while (v >= 1024 && unit < 5) {
    v /= 1024;
    ++unit;
  }
  return absl::StrFormat("%.2f %s", v, kUnits[unit]);
}

}  // namespace ecsnap

#endif  // ECSNAP_COMMON_FORMAT_H_
