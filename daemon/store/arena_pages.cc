#include "daemon/store/arena_pages.h"

#include <linux/magic.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/vfs.h>

#include <climits>
#include <cstdlib>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/format.h"
#include "common/read_file.h"

namespace ecsnap::daemon {
namespace {

// mountinfo writes a space, tab, newline and backslash in a path as \040,
// \011, \012 and \134.
std::string Unescape(absl::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 3 < s.size()) {
      const absl::string_view digits = s.substr(i + 1, 3);
      if (digits[0] >= '0' && digits[0] <= '3' && digits[1] >= '0' &&
          digits[1] <= '7' && digits[2] >= '0' && digits[2] <= '7') {
        out.push_back(static_cast<char>((digits[0] - '0') * 64 + (digits[1] - '0') * 8 +
                                        (digits[2] - '0')));
        i += 3;
        continue;
      }
    }
    out.push_back(s[i]);
  }
  return out;
}

// True when `mount_point` is `path` or a directory above it.
bool Holds(const std::string& mount_point, const std::string& path) {
  if (mount_point == "/") return true;
  return path.compare(0, mount_point.size(), mount_point) == 0 &&
         (path.size() == mount_point.size() || path[mount_point.size()] == '/');
}

}  // namespace

std::optional<std::string> SuperOptionsOf(absl::string_view mountinfo, const std::string& path,
                                          const std::string& device) {
  std::optional<std::string> best, of_device;
  size_t best_len = 0;
  for (absl::string_view line : absl::StrSplit(mountinfo, '\n', absl::SkipEmpty())) {
    // id parent major:minor root mount-point options [optional...] - type source super
    // (split on every space: an empty source is an empty field)
    const std::vector<absl::string_view> f = absl::StrSplit(line, ' ');
    if (f.size() < 10) continue;
    size_t dash = 6;
    while (dash < f.size() && f[dash] != "-") ++dash;
    if (dash + 3 >= f.size()) continue;
    const std::string super(f[dash + 3]);
    // Super options are the file system's: any mount of its device will do.
    if (!device.empty() && f[2] == device) of_device = super;
    const std::string mount_point = Unescape(f[4]);
    if (!Holds(mount_point, path) || mount_point.size() < best_len) continue;
    best_len = mount_point.size();
    best = super;
  }
  return of_device.has_value() ? of_device : best;
}

ArenaPages TmpfsPages(absl::string_view super_options, absl::string_view shmem_enabled,
                      uint64_t pmd_bytes, const std::string& dir) {
  ArenaPages pages;
  // The setting in brackets ("always within_size advise [never] deny force").
  absl::string_view setting;
  if (const size_t open = shmem_enabled.find('['); open != absl::string_view::npos) {
    const size_t close = shmem_enabled.find(']', open);
    if (close != absl::string_view::npos) setting = shmem_enabled.substr(open + 1, close - open - 1);
  }
  std::string huge = "never";
  for (absl::string_view opt : absl::StrSplit(super_options, ',')) {
    if (absl::ConsumePrefix(&opt, "huge=")) huge = std::string(opt);
  }
  const std::string advice = absl::StrFormat(
      "mount a tmpfs there with huge=within_size (deploy/dev-shm-ecsnap.mount) for windows in "
      "huge pages: on a virtual machine the first touch of each 4 KiB page through each new "
      "mapping costs microseconds");
  if (pmd_bytes <= 4096 || (pmd_bytes & (pmd_bytes - 1)) != 0) {
    pages.how = "4 KiB pages: this kernel offers no transparent huge pages for shared memory";
    return pages;
  }
  if (pmd_bytes > kMaxHugePageBytes) {
    // 512 MiB on an arm64 kernel with 64 KiB base pages: windows of that
    // grain would cost more memory than the pages save.
    pages.how = absl::StrFormat(
        "base pages: this kernel's huge pages are %s, too large to place windows on",
        FormatBytes(pmd_bytes));
    return pages;
  }
  if (setting == "deny") {
    pages.how = "4 KiB pages: transparent_hugepage/shmem_enabled is 'deny' on this machine";
    return pages;
  }
  if (setting == "force" || huge == "always" || huge == "within_size") {
    pages.page_bytes = pmd_bytes;
    pages.how = absl::StrFormat("%s pages (%s): windows placed and sized on %s boundaries",
                                FormatBytes(pmd_bytes),
                                setting == "force" ? "transparent_hugepage/shmem_enabled force"
                                                   : "tmpfs huge=" + huge,
                                FormatBytes(pmd_bytes));
    return pages;
  }
  if (huge == "advise") {
    pages.how = absl::StrFormat(
        "4 KiB pages: the tmpfs of %s has huge=advise, which the arena's fallocated files do "
        "not get; %s",
        dir, advice);
    return pages;
  }
  pages.how = absl::StrFormat("4 KiB pages (the tmpfs of %s has huge=%s); %s", dir, huge, advice);
  return pages;
}

ArenaPages DetectArenaPages(const std::string& dir) {
  ArenaPages pages;
  struct statfs fs {};
  if (::statfs(dir.c_str(), &fs) != 0 || fs.f_type != TMPFS_MAGIC) {
    pages.how = "4 KiB pages: not a tmpfs";
    return pages;
  }
  char real[PATH_MAX];
  if (::realpath(dir.c_str(), real) == nullptr) {
    pages.how = "4 KiB pages: its path cannot be resolved";
    return pages;
  }
  const std::optional<std::string> mountinfo = ReadWholeFile("/proc/self/mountinfo");
  struct stat st {};
  const std::string device =
      ::stat(real, &st) == 0 ? absl::StrFormat("%u:%u", major(st.st_dev), minor(st.st_dev)) : "";
  const std::optional<std::string> options =
      mountinfo.has_value() ? SuperOptionsOf(*mountinfo, real, device) : std::nullopt;
  const std::string shmem_enabled =
      ReadWholeFile("/sys/kernel/mm/transparent_hugepage/shmem_enabled").value_or("");
  uint64_t pmd_bytes = 0;
  if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(
                            ReadWholeFile("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size")
                                .value_or("0")),
                        &pmd_bytes)) {
    pmd_bytes = 0;
  }
  return TmpfsPages(options.value_or(""), shmem_enabled, pmd_bytes, dir);
}

}  // namespace ecsnap::daemon
