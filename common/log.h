// One-line, timestamped log messages on stderr. Debian's abseil (20220623)
// predates absl/log; this is the small part of it the programs need.
#ifndef ECSNAP_COMMON_LOG_H_
#define ECSNAP_COMMON_LOG_H_

#include <cstdio>
#include <string>

#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace ecsnap {

template <typename... Args>
void Log(const absl::FormatSpec<Args...>& format, const Args&... args) {
  const std::string line = absl::StrFormat(
      "%s %s\n", absl::FormatTime("%Y-%m-%dT%H:%M:%E3S", absl::Now(), absl::LocalTimeZone()),
      absl::StrFormat(format, args...));
  std::fwrite(line.data(), 1, line.size(), stderr);
}

}  // namespace ecsnap

#endif  // ECSNAP_COMMON_LOG_H_
