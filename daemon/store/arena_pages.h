// Which pages back an arena's files: the tmpfs's base pages, or transparent
// huge pages when the tmpfs was mounted to give them.
//
// On a virtual machine the first access to each page through each new
// mapping costs microseconds (measured here: 8 us per 4 KiB page, 1 s per
// 512 MiB, even for pages already populated through another mapping; see
// common/prefault.h). A trainer maps each window it is granted, and the
// daemon maps each window file over its range: with 4 KiB pages both pay it
// per page. A tmpfs mounted with huge=within_size (or huge=always) backs a
// file in 2 MiB pages, mapped with one page-table entry each: the same
// first access costs 512 times fewer of them (measured here: 3 ms instead
// of 0.9 s for 256 MiB through a trainer's mapping). The arena then places
// and sizes its windows on huge-page boundaries, so that every mapping of
// them can use huge pages.
//
// huge=advise is not used: the arena reserves its files' memory with
// fallocate, before any mapping could advise it, so they get base pages.
#ifndef ECSNAP_DAEMON_STORE_ARENA_PAGES_H_
#define ECSNAP_DAEMON_STORE_ARENA_PAGES_H_

#include <cstdint>
#include <optional>
#include <string>

#include "absl/strings/string_view.h"

namespace ecsnap::daemon {

struct ArenaPages {
  // The pages the tmpfs gives the arena's files: 4096, or the huge page
  // size (hpage_pmd_size, 2 MiB on x86-64).
  uint64_t page_bytes = 4096;
  // For the start-up log: which pages, and why (the mount option, the
  // system setting), and what to do to get huge pages when not.
  std::string how;
  bool huge() const { return page_bytes > 4096; }
};

// Huge pages larger than this are not used (windows would be placed and
// sized on them): arm64 kernels with 64 KiB base pages have 512 MiB ones.
inline constexpr uint64_t kMaxHugePageBytes = uint64_t{32} << 20;

// The super options (the field after the file system's source) of the
// file system that holds `path` (an absolute path without symbolic links),
// from the text of /proc/self/mountinfo: those of a mount of `device`
// ("major:minor" of the path's st_dev) when one is listed, else of the
// mounts whose mount point is `path` or a directory above it, the longest,
// and of equal ones the last (it is mounted over the others). Nothing when
// none matches or the text cannot be read.
std::optional<std::string> SuperOptionsOf(absl::string_view mountinfo, const std::string& path,
                                          const std::string& device = "");

// The pages a tmpfs mounted with `super_options` gives a file of a
// multiple of `pmd_bytes`, under the system setting `shmem_enabled` (the
// text of /sys/kernel/mm/transparent_hugepage/shmem_enabled, the choice in
// brackets: "deny" turns huge pages off on every tmpfs, "force" on).
// `pmd_bytes` 0: the kernel offers no huge pages for shared memory.
ArenaPages TmpfsPages(absl::string_view super_options, absl::string_view shmem_enabled,
                      uint64_t pmd_bytes, const std::string& dir);

// The pages of the tmpfs at `dir` on this machine, from /proc and /sys.
// A file system that is not a tmpfs gets base pages (and the reason).
ArenaPages DetectArenaPages(const std::string& dir);

}  // namespace ecsnap::daemon

#endif  // ECSNAP_DAEMON_STORE_ARENA_PAGES_H_
