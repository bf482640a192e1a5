#include "daemon/store/arena.h"

#include <dirent.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <linux/magic.h>
#include <sys/stat.h>
#include <sys/vfs.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <optional>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/format.h"
#include "common/log.h"
#include "common/prefault.h"
#include "common/sigbus_guard.h"
#include "ec/crc32c.h"

namespace ecsnap::daemon {
namespace {

constexpr char kMagic[8] = {'E', 'C', 'S', 'N', 'A', 'P', 'A', '1'};
// 2: index entries name the kind of their record.
constexpr uint32_t kVersion = 2;
constexpr uint64_t kHeaderBytes = 4096;
constexpr uint64_t kEntryValid = 0x45435350454e5452ull;  // "ECSPENTR"

struct Header {
  char magic[8];
  uint32_t version;
  uint32_t index_entries;
  uint64_t file_bytes;
  uint64_t data_offset;
  uint32_t crc;  // over the fields above
};

uint64_t AlignUp(uint64_t v) { return (v + kArenaAlignBytes - 1) / kArenaAlignBytes * kArenaAlignBytes; }

uint64_t DataOffset(uint32_t index_entries) { return AlignUp(kHeaderBytes + uint64_t{64} * index_entries); }

uint32_t Crc(const void* p, size_t n) {
  return ec::Crc32c(absl::Span<const uint8_t>(static_cast<const uint8_t*>(p), n));
}

absl::Status Errno(const std::string& what) {
  return absl::InternalError(absl::StrFormat("%s: %s", what, std::strerror(errno)));
}

constexpr char kWindowPrefix[] = "w.";

}  // namespace

std::string WindowOwner(const std::string& job_id, uint32_t rank) {
  return absl::StrCat(job_id, std::string(1, '\0'), rank);
}

std::string RebuiltWindowOwner(const std::string& job_id, uint32_t rank) {
  return absl::StrCat(WindowOwner(job_id, rank), std::string(1, '\0'), "rebuilt");
}

struct Arena::IndexEntry {
  uint64_t valid;  // kEntryValid when published
  uint64_t sequence;
  uint64_t record_offset;
  uint64_t record_bytes;  // exact length of the record
  uint32_t record_crc;
  uint32_t kind;       // RecordKind
  uint32_t entry_crc;  // over the fields above
  uint8_t pad[20];
};

namespace {

// The window files an arena may hold: `asked`, or 16384, and in any case 256
// fewer than the descriptors this process may open (ecsnapd raises its soft
// limit to the hard one at start), so that sockets and the rest still have
// room.
size_t MaxWindowFiles(uint32_t asked) {
  size_t bound = asked != 0 ? asked : 16384;
  rlimit lim{};
  if (::getrlimit(RLIMIT_NOFILE, &lim) == 0) {
    if (lim.rlim_cur != RLIM_INFINITY) {
      const size_t room = lim.rlim_cur > 512 ? lim.rlim_cur - 256 : lim.rlim_cur / 2;
      bound = std::min(bound, room);
    }
  }
  return std::max<size_t>(bound, 1);
}

// Maps `bytes` of `fd` shared at an address that is a multiple of `align`
// (a huge page: only then can the kernel map the file's huge pages whole),
// over addresses reserved there first. MAP_FAILED with errno as mmap.
void* MapAligned(int fd, uint64_t bytes, uint64_t align) {
  if (align <= kArenaAlignBytes) {
    return ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  }
  void* room = ReserveAligned(bytes, align, PROT_NONE);
  if (room == MAP_FAILED) return MAP_FAILED;
  void* addr = ::mmap(room, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0);
  if (addr == MAP_FAILED) {
    const int err = errno;
    ::munmap(room, bytes);
    errno = err;
  }
  return addr;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Arena>> Arena::Open(const Options& options) {
  const uint64_t min_bytes = DataOffset(options.index_entries) + 16 * kArenaAlignBytes;
  if (options.bytes < min_bytes || options.bytes % kArenaAlignBytes != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "arena size %d is too small or not a multiple of %d bytes; use at least %s", options.bytes,
        kArenaAlignBytes, FormatBytes(min_bytes)));
  }
  if (options.index_entries == 0 || options.index_entries > (1u << 20)) {
    return absl::InvalidArgumentError("arena index must have 1 to 1048576 entries");
  }
  // A hugetlbfs is refused before anything in it is made or changed.
  if (struct statfs dir_fs {}; ::statfs(options.dir.c_str(), &dir_fs) == 0 &&
                               dir_fs.f_type == HUGETLBFS_MAGIC) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "arena directory %s is on a hugetlbfs, which the arena cannot use (its window files "
        "are resized and written like files); use a tmpfs mounted with huge=within_size for "
        "huge pages",
        options.dir));
  }
  std::error_code ec;
  std::filesystem::create_directories(options.dir, ec);
  if (ec) {
    return absl::InternalError(absl::StrFormat("cannot create arena directory %s: %s",
                                               options.dir, ec.message()));
  }
  ::chmod(options.dir.c_str(), 0700);
  const std::string path = options.dir + "/arena";
  UniqueFd fd(::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
  if (!fd.valid()) return Errno(absl::StrFormat("cannot open arena file %s", path));
  if (::flock(fd.get(), LOCK_EX | LOCK_NB) != 0) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "arena %s is in use by another ecsnapd; give each daemon its own --arena_dir", path));
  }
  struct stat st;
  if (::fstat(fd.get(), &st) != 0) return Errno("cannot stat " + path);
  const bool existing = st.st_size > 0;
  if (existing && static_cast<uint64_t>(st.st_size) != options.bytes) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "arena %s holds %d bytes of snapshots but --arena_bytes asks for %d; start with the old "
        "size, or delete the file to discard what it holds",
        path, st.st_size, options.bytes));
  }
  ::fchmod(fd.get(), 0600);
  const ArenaPages pages = DetectArenaPages(options.dir);

  const auto t0 = std::chrono::steady_clock::now();
  if (!existing) {
    // Start-up checks with the reason, before anything is reserved: the
    // directory's file system must hold the arena, and is expected to be
    // memory (a tmpfs), or every snapshot goes to a disk.
    struct statfs fs {};
    if (::fstatfs(fd.get(), &fs) == 0) {
      const uint64_t free_bytes = static_cast<uint64_t>(fs.f_bavail) * fs.f_bsize;
      if (free_bytes < options.bytes) {
        [[maybe_unused]] int ignored = ::ftruncate(fd.get(), 0);
        return absl::ResourceExhaustedError(absl::StrFormat(
            "the file system of %s has %s free, and the arena needs %s: grow it (for a tmpfs: "
            "mount -o remount,size=...) or lower --arena_bytes",
            options.dir, FormatBytes(free_bytes), FormatBytes(options.bytes)));
      }
      if (fs.f_type != TMPFS_MAGIC) {
        Log("warning: arena directory %s is not on a tmpfs (file system type 0x%x): snapshots "
            "will be written to that file system, not only to memory",
            options.dir, static_cast<unsigned>(fs.f_type));
      }
    }
    const int rc = ::posix_fallocate(fd.get(), 0, static_cast<off_t>(options.bytes));
    if (rc != 0) {
      [[maybe_unused]] int ignored = ::ftruncate(fd.get(), 0);
      return absl::ResourceExhaustedError(absl::StrFormat(
          "cannot reserve %s for the arena in %s: %s", FormatBytes(options.bytes), options.dir,
          std::strerror(rc)));
    }
  }
  // A first store into a page costs 10-40x a memcpy: the pages are
  // populated now, and written once each by a background thread (MAP_POPULATE
  // alone is not enough; see common/prefault.h). A restarted daemon serves
  // its re-adopted steps without waiting for a pass over the whole arena.
  void* addr = MapAligned(fd.get(), options.bytes, pages.page_bytes);
  if (addr == MAP_FAILED) return Errno("cannot map arena " + path);
  // A restarted daemon leaves the ranges of its window files alone: their
  // pages are in the window files, and the node need not hold them twice.
  std::map<uint64_t, uint64_t> skip =
      ScanWindowFiles(options.dir, DataOffset(options.index_entries), options.bytes);
  uint64_t at = 0;
  skip[options.bytes] = 0;  // the end, so the last gap is populated too
  for (const auto& [offset, bytes] : skip) {
    if (offset > at) {
      if (const int err = PopulateForWrite(static_cast<uint8_t*>(addr) + at, offset - at);
          err != 0) {
        ::munmap(addr, options.bytes);
        return absl::ResourceExhaustedError(absl::StrFormat(
            "cannot populate the %s arena in %s: %s", FormatBytes(options.bytes), options.dir,
            std::strerror(err)));
      }
    }
    at = std::max(at, offset + bytes);
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  std::unique_ptr<Arena> arena(new Arena(options.dir, path, std::move(fd),
                                         Mapping(addr, options.bytes), options.index_entries,
                                         seconds, existing, pages));
  arena->before_window_made_ = options.before_window_made;
  arena->max_window_files_ = MaxWindowFiles(options.max_window_files);
  const Header* h = reinterpret_cast<const Header*>(arena->base());
  const bool header_ok = existing && std::memcmp(h->magic, kMagic, 8) == 0 &&
                         h->version == kVersion && h->crc == Crc(h, offsetof(Header, crc)) &&
                         h->file_bytes == options.bytes &&
                         h->index_entries == options.index_entries;
  if (header_ok) {
    arena->LoadIndex();
  } else {
    arena->InitFresh();
  }
  {
    // Window files are kept only beside the index that describes them.
    absl::MutexLock lock(&arena->mu_);
    skip.erase(options.bytes);
    if (header_ok) {
      arena->AdoptWindowFiles(skip);
    } else {
      for (const auto& [offset, bytes] : skip) {
        ::unlink(arena->WindowPath(offset).c_str());
        arena->BackRangeLocked(offset, bytes);
      }
    }
  }
  return arena;
}

Arena::Arena(std::string dir, std::string path, UniqueFd fd, Mapping mapping,
             uint32_t index_entries, double prefault_seconds, bool adopted, ArenaPages pages)
    : dir_(std::move(dir)),
      path_(std::move(path)),
      fd_(std::move(fd)),
      mapping_(std::move(mapping)),
      index_entries_(index_entries),
      data_offset_(DataOffset(index_entries)),
      prefault_seconds_(prefault_seconds),
      adopted_(adopted),
      pages_(std::move(pages)),
      window_align_(std::max<uint64_t>(pages_.page_bytes, kArenaAlignBytes)) {
  {
    absl::MutexLock lock(&mu_);
    free_[data_offset_] = size() - data_offset_;
    free_bytes_ = size() - data_offset_;
  }
  if (!GuardAgainstSigbus(base(), size())) {
    Log("arena %s: more arenas in this process than the SIGBUS guard covers; a trainer that "
        "truncates its window can crash this process",
        path_);
  }
  toucher_ = std::thread([this] {
    if (const int err = RunAtIdlePriority(); err != 0) {
      Log("arena %s: the background first writes run at normal priority (SCHED_IDLE: %s)", path_,
          std::strerror(err));
    }
    const auto t0 = std::chrono::steady_clock::now();
    // In pieces, each checked against the holes (ranges the file could not
    // back again after a window gave them up: a store there is SIGBUS).
    constexpr uint64_t kPiece = uint64_t{8} << 20;
    for (uint64_t at = 0; at < size() && !stop_touching_; at += kPiece) {
      const uint64_t len = std::min<uint64_t>(kPiece, size() - at);
      if (OverlapsHole(at, len)) continue;
      TouchForWrite(base() + at, len, &stop_touching_);
    }
    if (!stop_touching_) {
      touched_ = true;
      Log("arena %s: first writes to every page done in the background in %.2f s", path_,
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
  });
}

Arena::~Arena() {
  stop_touching_ = true;
  toucher_.join();
  UnguardSigbus(base());
}

std::string Arena::WindowPath(uint64_t offset) const {
  return absl::StrFormat("%s/%s%x", dir_, kWindowPrefix, offset);
}

std::map<uint64_t, uint64_t> Arena::ScanWindowFiles(const std::string& dir, uint64_t data_offset,
                                                    uint64_t arena_bytes) {
  std::map<uint64_t, uint64_t> found;
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return found;
  std::vector<std::string> names;
  while (dirent* e = ::readdir(d)) {
    if (absl::StartsWith(e->d_name, kWindowPrefix)) names.push_back(e->d_name);
  }
  ::closedir(d);
  std::map<uint64_t, std::string> by_offset;
  for (const std::string& name : names) {
    const std::string path = dir + "/" + name;
    uint64_t offset = 0;
    struct stat st {};
    const bool ok =
        absl::SimpleHexAtoi(name.substr(2), &offset) &&
        name == absl::StrFormat("%s%x", kWindowPrefix, offset) &&
        ::lstat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode) && st.st_size > 0 &&
        static_cast<uint64_t>(st.st_size) % kArenaAlignBytes == 0 &&
        offset % kArenaAlignBytes == 0 && offset >= data_offset &&
        static_cast<uint64_t>(st.st_size) <= arena_bytes &&
        offset <= arena_bytes - static_cast<uint64_t>(st.st_size);
    if (!ok || found.count(offset) != 0) {
      ::unlink(path.c_str());  // not a window any arena here can describe
      continue;
    }
    found[offset] = static_cast<uint64_t>(st.st_size);
  }
  // Of files that overlap, the first by offset stays.
  uint64_t end = 0;
  for (auto it = found.begin(); it != found.end();) {
    if (it->first < end) {
      ::unlink(absl::StrFormat("%s/%s%x", dir, kWindowPrefix, it->first).c_str());
      it = found.erase(it);
      continue;
    }
    end = it->first + it->second;
    ++it;
  }
  return found;
}

void Arena::AdoptWindowFiles(const std::map<uint64_t, uint64_t>& files) {
  for (const auto& [offset, bytes] : files) {
    const std::string path = WindowPath(offset);
    struct stat st {};
    UniqueFd wfd(::open(path.c_str(), O_RDWR | O_CLOEXEC | O_NOFOLLOW));
    bool adopted = wfd.valid() && ::fstat(wfd.get(), &st) == 0 && S_ISREG(st.st_mode) &&
                   static_cast<uint64_t>(st.st_size) == bytes && ReserveLocked({offset, bytes});
    if (adopted) {
      allocated_.erase(offset);  // neither free nor in use until Reserve claims it
      if (RemapGuarded(base() + offset, bytes, wfd.get(), 0) == MAP_FAILED) {
        Log("arena %s: cannot map window file %s: %s; dropped", path_, path,
            std::strerror(errno));
        AddFreeLocked(offset, bytes);
        adopted = false;
      }
    }
    if (!adopted) {
      // Not a window this index can describe (it overlaps a record, or
      // changed since the scan): the arena file backs its range again.
      ::unlink(path.c_str());
      BackRangeLocked(offset, bytes);
      continue;
    }
    Punch(offset, bytes);
    PopulateForWrite(base() + offset, bytes);
    Window& w = windows_[offset];
    w.fd = std::move(wfd);
    w.file_id = next_file_id_++;
    w.bytes = bytes;
    w.state = Window::State::kAdopted;
  }
}

absl::StatusOr<UniqueFd> Arena::CreateWindowFile(uint64_t offset, uint64_t bytes, bool copy,
                                                 bool populate) const {
  const std::string path = WindowPath(offset);
  ::unlink(path.c_str());
  UniqueFd wfd(::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600));
  if (!wfd.valid()) return Errno("cannot create window file " + path);
  auto fail = [&](absl::Status st) {
    ::unlink(path.c_str());
    return st;
  };
  auto reserve = [&]() -> absl::Status {
    const int rc = ::posix_fallocate(wfd.get(), 0, static_cast<off_t>(bytes));
    if (rc == 0) return absl::OkStatus();
    return absl::ResourceExhaustedError(absl::StrFormat(
        "cannot hold a %s window in %s: %s", FormatBytes(bytes), dir_, std::strerror(rc)));
  };
  auto put_arena_back = [&] {
    RemapGuarded(base() + offset, bytes, fd_.get(), static_cast<off_t>(offset));
  };
  if (::ftruncate(wfd.get(), static_cast<off_t>(bytes)) != 0) {
    return fail(Errno("cannot size window file " + path));
  }
  if (copy) {
    // The bytes in place move into the file first; the node holds them
    // twice until the arena's pages go below.
    if (absl::Status st = reserve(); !st.ok()) return fail(st);
    for (uint64_t done = 0; done < bytes;) {
      const ssize_t n = ::pwrite(wfd.get(), base() + offset + done, bytes - done,
                                 static_cast<off_t>(done));
      if (n <= 0) {
        if (n < 0 && errno == EINTR) continue;
        return fail(Errno("cannot copy a window into " + path));
      }
      done += static_cast<uint64_t>(n);
    }
  }
  if (RemapGuarded(base() + offset, bytes, wfd.get(), 0) == MAP_FAILED) {
    const absl::Status st = Errno("cannot map window file " + path);
    put_arena_back();  // MAP_FIXED may have unmapped the range
    return fail(st);
  }
  // The arena file's pages go only now that nothing, the background toucher
  // included, can reach them through the mapping. A fresh window's own pages
  // are allocated after: they come from the pages just given back (warm,
  // where a virtual machine backs memory lazily: populating the window costs
  // 0.14 s per GiB here instead of 0.98 s), and the node never holds both.
  Punch(offset, bytes);
  if (!copy) {
    if (absl::Status st = reserve(); !st.ok()) {
      put_arena_back();  // the caller backs the range again (or records a hole)
      return fail(st);
    }
  }
  if (populate) PopulateForWrite(base() + offset, bytes);
  return wfd;
}

void Arena::PublishWindowLocked(uint64_t offset, uint64_t bytes, UniqueFd fd,
                                const std::string& owner, Window::State state) {
  Window& w = windows_[offset];
  w.fd = std::move(fd);
  w.file_id = next_file_id_++;
  w.bytes = bytes;
  w.owner = owner;
  w.state = state;
  w.used = state == Window::State::kInUse;
  w.sigbus_at_start = SigbusPagesReplaced();
  if (state == Window::State::kSpare) {
    spare_bytes_ += bytes;
  } else {
    allocated_[offset] = bytes;
  }
}

absl::StatusOr<ArenaExtent> Arena::MakeWindow(uint64_t bytes, const std::string& owner,
                                              Window::State state, bool reclaim, bool populate) {
  uint64_t offset;
  {
    absl::MutexLock lock(&mu_);
    if (bytes > size() || (reclaim && !ReclaimSparesFor(bytes, WindowAlign(bytes)))) {
      return NoSpace(bytes);
    }
    // At the bound, a window a step needs takes the place of a spare (only
    // warm memory); one made ahead of its step (no `reclaim`) never evicts.
    while (windows_.size() + making_.size() >= max_window_files_) {
      auto spare = std::find_if(windows_.begin(), windows_.end(), [](const auto& w) {
        return w.second.state == Window::State::kSpare;
      });
      if (!reclaim || spare == windows_.end()) {
        return absl::ResourceExhaustedError(absl::StrFormat(
            "this daemon already holds %d window files, its bound (one per rank and retained "
            "step); keep fewer steps (--retain), fewer ranks per node, or drop finished jobs",
            windows_.size() + making_.size()));
      }
      ReclaimWindowLocked(spare->first);
    }
    auto best = BestFitLocked(bytes, WindowAlign(bytes));
    if (best == free_.end()) return NoSpace(bytes);
    offset = TakeFreeLocked(best, bytes, WindowAlign(bytes));
    ForgetHolesLocked(offset, bytes);  // the window file backs it now
    making_[offset] = {bytes, owner};
  }
  // The file is made, mapped and populated without the lock: a range being
  // made is no one else's, and other allocations need not wait for it.
  if (before_window_made_) before_window_made_(owner);
  absl::StatusOr<UniqueFd> fd = CreateWindowFile(offset, bytes, /*copy=*/false, populate);
  absl::MutexLock lock(&mu_);
  making_.erase(offset);
  if (!fd.ok()) {
    BackRangeLocked(offset, bytes);
    AddFreeLocked(offset, bytes);
    return fd.status();
  }
  PublishWindowLocked(offset, bytes, *std::move(fd), owner, state);
  return ArenaExtent{offset, bytes};
}

void Arena::ForgetHolesLocked(uint64_t offset, uint64_t bytes) {
  const uint64_t end = offset + bytes;
  std::vector<std::pair<uint64_t, uint64_t>> keep;
  for (auto h = holes_.begin(); h != holes_.end();) {
    const uint64_t a = h->first, b = h->first + h->second;
    if (b <= offset || a >= end) {
      ++h;
      continue;
    }
    if (a < offset) keep.emplace_back(a, offset - a);
    if (b > end) keep.emplace_back(end, b - end);
    h = holes_.erase(h);
  }
  for (const auto& [a, len] : keep) holes_[a] = len;
}

bool Arena::OverlapsHole(uint64_t offset, uint64_t bytes) const {
  absl::MutexLock lock(&mu_);
  auto h = holes_.upper_bound(offset);
  if (h != holes_.begin() && std::prev(h)->first + std::prev(h)->second > offset) return true;
  return h != holes_.end() && h->first < offset + bytes;
}

void Arena::Punch(uint64_t offset, uint64_t bytes) const {
  ::fallocate(fd_.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset),
              static_cast<off_t>(bytes));
}

void Arena::BackRangeLocked(uint64_t offset, uint64_t bytes) {
  if (::posix_fallocate(fd_.get(), static_cast<off_t>(offset), static_cast<off_t>(bytes)) != 0) {
    holes_[offset] = bytes;
    return;
  }
  PopulateForWrite(base() + offset, bytes);
}

uint64_t Arena::TakeFreeLocked(std::map<uint64_t, uint64_t>::iterator piece, uint64_t bytes,
                               uint64_t align) {
  const uint64_t start = piece->first, end = piece->first + piece->second;
  const uint64_t offset = (start + align - 1) / align * align;
  free_.erase(piece);
  if (offset > start) free_[start] = offset - start;
  if (end > offset + bytes) free_[offset + bytes] = end - (offset + bytes);
  free_bytes_ -= bytes;
  return offset;
}

void Arena::ReclaimWindowLocked(uint64_t offset) {
  auto it = windows_.find(offset);
  if (it == windows_.end()) return;
  const uint64_t bytes = it->second.bytes;
  if (it->second.state == Window::State::kSpare) spare_bytes_ -= bytes;
  if (RemapGuarded(base() + offset, bytes, fd_.get(), static_cast<off_t>(offset)) ==
      MAP_FAILED) {
    // The window file stays mapped there; the range is lost to allocation
    // until a restart rather than shared by two owners.
    Log("arena %s: cannot map the arena back under window %s: %s", path_, WindowPath(offset),
        std::strerror(errno));
    windows_.erase(it);
    ::unlink(WindowPath(offset).c_str());
    allocated_[offset] = bytes;
    return;
  }
  ::unlink(WindowPath(offset).c_str());
  windows_.erase(it);  // closes the file: its pages go once trainers unmap them
  BackRangeLocked(offset, bytes);
  AddFreeLocked(offset, bytes);
}

int Arena::ReclaimSparesOfJob(const std::string& job_id) {
  const std::string prefix = job_id + std::string(1, '\0');
  absl::MutexLock lock(&mu_);
  std::vector<uint64_t> spares;
  for (const auto& [offset, w] : windows_) {
    if (w.state == Window::State::kSpare && w.owner.compare(0, prefix.size(), prefix) == 0) {
      spares.push_back(offset);
    }
  }
  for (uint64_t offset : spares) ReclaimWindowLocked(offset);
  return static_cast<int>(spares.size());
}

bool Arena::ReclaimSparesFor(uint64_t bytes, uint64_t align) {
  while (BestFitLocked(bytes, align) == free_.end()) {
    auto spare = std::find_if(windows_.begin(), windows_.end(), [](const auto& w) {
      return w.second.state == Window::State::kSpare;
    });
    if (spare == windows_.end()) return false;
    ReclaimWindowLocked(spare->first);
  }
  return true;
}

std::map<uint64_t, uint64_t>::iterator Arena::BestFitLocked(uint64_t bytes, uint64_t align) {
  // Best fit keeps large extents whole for large windows.
  auto best = free_.end();
  for (auto it = free_.begin(); it != free_.end(); ++it) {
    const uint64_t skip = (align - it->first % align) % align;
    if (it->second >= skip && it->second - skip >= bytes &&
        (best == free_.end() || it->second < best->second)) {
      best = it;
    }
  }
  return best;
}

absl::Status Arena::NoSpace(uint64_t bytes) const {
  uint64_t largest = 0;
  for (const auto& [off, len] : free_) largest = std::max(largest, len);
  return absl::ResourceExhaustedError(absl::StrFormat(
      "needs %s but the arena has %s free (largest free piece %s) of %s; raise --arena_bytes "
      "or keep fewer steps (--retain)",
      FormatBytes(bytes), FormatBytes(free_bytes_ + spare_bytes_), FormatBytes(largest),
      FormatBytes(size())));
}

Arena::IndexEntry* Arena::Entry(uint32_t id) const {
  static_assert(sizeof(IndexEntry) == 64, "index entries are 64 bytes");
  return reinterpret_cast<IndexEntry*>(base() + kHeaderBytes) + id;
}

void Arena::InitFresh() {
  std::memset(base(), 0, data_offset_);
  Header* h = reinterpret_cast<Header*>(base());
  std::memcpy(h->magic, kMagic, 8);
  h->version = kVersion;
  h->index_entries = index_entries_;
  h->file_bytes = size();
  h->data_offset = data_offset_;
  h->crc = Crc(h, offsetof(Header, crc));
  absl::MutexLock lock(&mu_);
  for (uint32_t id = index_entries_; id > 0; --id) free_entries_.push_back(id - 1);
}

void Arena::LoadIndex() {
  absl::MutexLock lock(&mu_);
  for (uint32_t id = index_entries_; id > 0; --id) {
    IndexEntry* e = Entry(id - 1);
    const bool ok = e->valid == kEntryValid && e->entry_crc == Crc(e, offsetof(IndexEntry, entry_crc)) &&
                    e->record_offset >= data_offset_ && e->record_offset % kArenaAlignBytes == 0 &&
                    e->record_bytes <= size() - e->record_offset &&
                    e->record_crc == Crc(base() + e->record_offset, e->record_bytes);
    if (!ok) {
      std::memset(e, 0, sizeof(*e));
      free_entries_.push_back(id - 1);
      continue;
    }
    sequence_ = std::max(sequence_, e->sequence);
    ArenaRecord r;
    r.id = id - 1;
    r.kind = static_cast<RecordKind>(e->kind);
    r.extent = {e->record_offset, AlignUp(std::max<uint64_t>(e->record_bytes, 1))};
    r.bytes = absl::Span<const uint8_t>(base() + e->record_offset, e->record_bytes);
    adopted_records_.push_back(r);
  }
  // Reserve record extents; an entry overlapping an earlier one is dropped.
  std::vector<ArenaRecord> kept;
  for (const ArenaRecord& r : adopted_records_) {
    if (!ReserveLocked(r.extent)) {
      std::memset(Entry(r.id), 0, sizeof(IndexEntry));
      free_entries_.push_back(r.id);
      continue;
    }
    records_[r.id] = r.extent;
    kept.push_back(r);
  }
  adopted_records_ = std::move(kept);
}

absl::StatusOr<ArenaExtent> Arena::Allocate(uint64_t bytes) {
  absl::MutexLock lock(&mu_);
  return AllocateLocked(bytes);
}

absl::StatusOr<ArenaExtent> Arena::AllocateLocked(uint64_t bytes) {
  const uint64_t want = AlignUp(std::max<uint64_t>(bytes, 1));
  if (bytes > size() || !ReclaimSparesFor(want)) return NoSpace(bytes);
  auto best = BestFitLocked(want);
  ArenaExtent e{best->first, want};
  // A range a window left while the tmpfs was full has no pages behind it:
  // back it now, or a store into it would die of SIGBUS.
  for (auto h = holes_.begin(); h != holes_.end();) {
    if (h->first >= e.offset + e.bytes || h->first + h->second <= e.offset) {
      ++h;
      continue;
    }
    if (::posix_fallocate(fd_.get(), static_cast<off_t>(h->first),
                          static_cast<off_t>(h->second)) != 0) {
      return absl::ResourceExhaustedError(absl::StrFormat(
          "needs %s but the tmpfs of %s is full; free memory on the node", FormatBytes(bytes),
          dir_));
    }
    // A store that met the hole (the background first writes, racing its
    // making) got a zero page of the SIGBUS guard, which would stay over the
    // range and take the writes meant for the file: the file is mapped
    // there again.
    if (RemapGuarded(base() + h->first, h->second, fd_.get(), static_cast<off_t>(h->first)) ==
        MAP_FAILED) {
      return Errno("cannot map the arena again over a range it backed anew");
    }
    PopulateForWrite(base() + h->first, h->second);
    h = holes_.erase(h);
  }
  TakeFreeLocked(best, want);
  allocated_[e.offset] = e.bytes;
  return e;
}

uint64_t Arena::WindowBytes(uint64_t bytes) const {
  bytes = std::min<uint64_t>(bytes, uint64_t{1} << 62);  // no wrap; larger is refused anyway
  uint64_t power = 1;
  while (power <= bytes / 2) power *= 2;  // the largest power of two <= bytes
  // Both powers of two: from one huge page up, the grain is a multiple of it.
  const uint64_t grain = std::max<uint64_t>(
      bytes >= window_align_ ? window_align_ : kArenaAlignBytes, power / 16);
  return (std::max<uint64_t>(bytes, 1) + grain - 1) / grain * grain;
}

int Arena::MakingLocked(uint64_t bytes, const std::string& owner) const {
  int n = 0;
  for (const auto& [offset, m] : making_) {
    if (m.first == bytes && m.second == owner) ++n;
  }
  return n;
}

absl::StatusOr<ArenaExtent> Arena::PrepareWindow(uint64_t bytes, const std::string& owner,
                                                 int max_windows, int spares) {
  const uint64_t want = WindowBytes(bytes);
  absl::ReleasableMutexLock lock(&mu_);
  int held = 0, intact_spares = 0;
  std::optional<uint64_t> a_spare;
  for (const auto& [offset, w] : windows_) {
    if (w.owner != owner || w.bytes != want) continue;
    ++held;
    if (w.state == Window::State::kSpare && IntactLocked(w)) {
      ++intact_spares;
      if (!a_spare.has_value()) a_spare = offset;
    }
  }
  // Windows of the owner still being made (a step's, or one ahead) count
  // toward its bound too, or two makers at once would pass it.
  held += MakingLocked(want, owner);
  // Enough spares, or as many windows as the owner may hold: a spare, if
  // there is one, is the answer.
  if (a_spare.has_value() && (intact_spares >= spares || held >= max_windows)) {
    return ArenaExtent{*a_spare, want};
  }
  if (held >= max_windows) {
    return absl::FailedPreconditionError("the owner holds enough windows of this size");
  }
  if (BestFitLocked(want, WindowAlign(want)) == free_.end()) {
    return absl::ResourceExhaustedError("no free memory for a window ahead of its step");
  }
  lock.Release();
  // Populated here, off every caller's path: the window is wanted later.
  return MakeWindow(want, owner, Window::State::kSpare, /*reclaim=*/false, /*populate=*/true);
}

absl::StatusOr<ArenaExtent> Arena::AllocateWindow(uint64_t bytes, const std::string& owner,
                                                  bool populate) {
  const uint64_t want = WindowBytes(bytes);
  {
    absl::MutexLock lock(&mu_);
    // The owner's spares: first one it has used before (its trainer holds
    // it mapped and warm), else one made ahead; only when it has none is one
    // being made ahead waited for rather than made twice.
    auto take = [&](bool used_only) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) -> std::optional<uint64_t> {
      for (auto it = windows_.begin(); it != windows_.end(); ++it) {
        Window& w = it->second;
        if (w.state != Window::State::kSpare || w.bytes != want || w.owner != owner) continue;
        if (used_only && !w.used) continue;
        if (!IntactLocked(w)) {
          // Shrunk by the trainer that still holds it: never handed out again.
          ReclaimWindowLocked(it->first);
          return std::nullopt;
        }
        w.state = Window::State::kInUse;
        w.used = true;
        spare_bytes_ -= want;
        allocated_[it->first] = want;
        return it->first;
      }
      return std::nullopt;
    };
    if (auto at = take(/*used_only=*/true)) return ArenaExtent{*at, want};
    if (auto at = take(/*used_only=*/false)) return ArenaExtent{*at, want};
    auto none_making = [this, &owner, want]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return MakingLocked(want, owner) == 0;
    };
    mu_.AwaitWithTimeout(absl::Condition(&none_making), absl::Seconds(30));
    if (auto at = take(/*used_only=*/false)) return ArenaExtent{*at, want};
  }
  // Without `populate` the trainer writes the window through its own
  // mapping, and the daemon's first reads of it (the commit's checksums)
  // take the page faults, off the trainer's stall.
  return MakeWindow(want, owner, Window::State::kInUse, /*reclaim=*/true, populate);
}

void Arena::Free(const ArenaExtent& extent) {
  absl::MutexLock lock(&mu_);
  FreeLocked(extent);
}

void Arena::FreeLocked(const ArenaExtent& extent) {
  if (extent.bytes == 0) return;
  auto in_use = allocated_.find(extent.offset);
  if (in_use == allocated_.end() || in_use->second != extent.bytes) {
    // Freeing what is not in use would put memory that someone still owns on
    // the free list, to be handed out a second time: stop here, loudly.
    const std::string why =
        in_use == allocated_.end()
            ? std::string("no extent in use starts there")
            : absl::StrFormat("the extent in use there has %d bytes", in_use->second);
    std::string nearest = "none";
    auto after = allocated_.upper_bound(extent.offset);
    if (after != allocated_.begin()) {
      auto before = std::prev(after);
      nearest = absl::StrFormat("[%d, +%d)", before->first, before->second);
    }
    std::fprintf(stderr,
                 "ecsnapd: FATAL: arena %s: Free of extent [%lu, +%lu) that is not an extent in "
                 "use (a double, partial or overlapping free: %s; the nearest extent in use at "
                 "or below it is %s); aborting before the free list overlaps\n",
                 path_.c_str(), static_cast<unsigned long>(extent.offset),
                 static_cast<unsigned long>(extent.bytes), why.c_str(), nearest.c_str());
    std::fflush(stderr);
    std::abort();
  }
  allocated_.erase(in_use);
  auto w = windows_.find(extent.offset);
  if (w != windows_.end()) {
    // Kept for its owner's next step, unless a trainer shrank a file (the
    // daemon's view may hold zero pages of the SIGBUS guard since), or it
    // was made where windows go no longer (by a daemon that had base pages
    // where this one has huge ones): reused, it would never be mapped in
    // huge pages.
    const bool intact = IntactLocked(w->second);
    const uint64_t align = WindowAlign(WindowBytes(w->second.bytes));
    const bool placed = extent.offset % align == 0 && w->second.bytes % align == 0;
    w->second.state = Window::State::kSpare;
    spare_bytes_ += w->second.bytes;
    if (!intact) {
      Log("arena %s: window %s was truncated while in use; its memory goes back to the arena",
          path_, WindowPath(extent.offset));
    }
    if (!intact || !placed) ReclaimWindowLocked(extent.offset);
    return;
  }
  AddFreeLocked(extent.offset, extent.bytes);
}

bool Arena::IntactLocked(const Window& w) const {
  struct stat st {};
  return ::fstat(w.fd.get(), &st) == 0 && static_cast<uint64_t>(st.st_size) == w.bytes &&
         SigbusPagesReplaced() == w.sigbus_at_start;
}

void Arena::AddFreeLocked(uint64_t offset, uint64_t bytes) {
  uint64_t off = offset, len = bytes;
  auto next = free_.lower_bound(off);
  if (next != free_.end() && next->first == off + len) {
    len += next->second;
    next = free_.erase(next);
  }
  if (next != free_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second == off) {
      off = prev->first;
      len += prev->second;
      free_.erase(prev);
    }
  }
  free_[off] = len;
  free_bytes_ += bytes;
}

absl::Status Arena::Reserve(const ArenaExtent& extent, const std::string& owner) {
  absl::MutexLock lock(&mu_);
  if (!owner.empty()) {
    auto w = windows_.find(extent.offset);
    if (w != windows_.end()) {
      if (w->second.state != Window::State::kAdopted || w->second.bytes != extent.bytes) {
        return absl::FailedPreconditionError(absl::StrFormat(
            "window [%d, +%d) does not match the window file there", extent.offset,
            extent.bytes));
      }
      w->second.state = Window::State::kInUse;
      w->second.used = true;
      w->second.owner = owner;
      w->second.sigbus_at_start = SigbusPagesReplaced();
      allocated_[extent.offset] = extent.bytes;
      return absl::OkStatus();
    }
    // An arena written before windows had files of their own: the window's
    // bytes move into one.
    if (ReserveLocked(extent)) {
      absl::StatusOr<UniqueFd> fd =
          CreateWindowFile(extent.offset, extent.bytes, /*copy=*/true, /*populate=*/true);
      allocated_.erase(extent.offset);
      if (!fd.ok()) {
        AddFreeLocked(extent.offset, extent.bytes);
        return fd.status();
      }
      PublishWindowLocked(extent.offset, extent.bytes, *std::move(fd), owner,
                          Window::State::kInUse);
      return absl::OkStatus();
    }
  } else if (ReserveLocked(extent)) {
    return absl::OkStatus();
  }
  return absl::FailedPreconditionError(absl::StrFormat(
      "extent [%d, +%d) is outside the data region or overlaps one in use", extent.offset,
      extent.bytes));
}

bool Arena::ReserveLocked(const ArenaExtent& extent) {
  if (extent.offset < data_offset_ || extent.offset % kArenaAlignBytes != 0 ||
      extent.bytes == 0 || extent.bytes % kArenaAlignBytes != 0 || extent.bytes > size() ||
      extent.offset > size() - extent.bytes) {
    return false;  // (the sum could wrap: a w.fffffffffffff000 file must not)
  }
  auto it = free_.upper_bound(extent.offset);
  if (it == free_.begin()) return false;
  --it;
  const uint64_t start = it->first, len = it->second;
  if (extent.bytes > len || extent.offset + extent.bytes > start + len) return false;
  free_.erase(it);
  if (extent.offset > start) free_[start] = extent.offset - start;
  const uint64_t end = extent.offset + extent.bytes;
  if (end < start + len) free_[end] = start + len - end;
  free_bytes_ -= extent.bytes;
  allocated_[extent.offset] = extent.bytes;
  return true;
}

absl::Status Arena::CheckConsistency() const {
  absl::MutexLock lock(&mu_);
  // Every extent, in offset order: each must start where the one before it
  // ended, so that together they tile the data region.
  struct Piece {
    uint64_t off, len;
    const char* kind;
  };
  std::vector<Piece> pieces;
  for (const auto& [off, len] : allocated_) pieces.push_back({off, len, "in use"});
  for (const auto& [off, len] : free_) pieces.push_back({off, len, "free"});
  for (const auto& [off, m] : making_) pieces.push_back({off, m.first, "window being made"});
  uint64_t spare_sum = 0;
  for (const auto& [off, w] : windows_) {
    if (w.state == Window::State::kInUse) {
      auto it = allocated_.find(off);
      if (it == allocated_.end() || it->second != w.bytes) {
        return absl::InternalError(absl::StrFormat(
            "arena window [%d, +%d) is in use but not an extent in use", off, w.bytes));
      }
      continue;
    }
    if (w.state == Window::State::kSpare) spare_sum += w.bytes;
    pieces.push_back(
        {off, w.bytes, w.state == Window::State::kSpare ? "spare window" : "adopted window"});
  }
  std::sort(pieces.begin(), pieces.end(),
            [](const Piece& a, const Piece& b) { return a.off < b.off; });
  uint64_t at = data_offset_, free_sum = 0;
  for (const Piece& p : pieces) {
    if (p.len == 0 || p.off % kArenaAlignBytes != 0 || p.len % kArenaAlignBytes != 0) {
      return absl::InternalError(absl::StrFormat(
          "arena extent [%d, +%d) %s is empty or not aligned to %d bytes", p.off, p.len, p.kind,
          kArenaAlignBytes));
    }
    if (p.off != at) {
      return absl::InternalError(absl::StrFormat(
          "arena extent [%d, +%d) %s %s the extents before it, which end at %d", p.off, p.len,
          p.kind, p.off < at ? "overlaps" : "leaves a gap after", at));
    }
    if (p.len > size() - p.off) {
      return absl::InternalError(absl::StrFormat(
          "arena extent [%d, +%d) %s passes the end of the arena (%d bytes)", p.off, p.len,
          p.kind, size()));
    }
    if (std::string(p.kind) == "free") free_sum += p.len;
    at = p.off + p.len;
  }
  if (at != size()) {
    return absl::InternalError(absl::StrFormat(
        "arena extents cover the data region only up to %d of %d bytes", at, size()));
  }
  if (free_sum != free_bytes_ || spare_sum != spare_bytes_) {
    return absl::InternalError(absl::StrFormat(
        "arena free extents add up to %d bytes and spare windows to %d, but the counters say %d "
        "and %d",
        free_sum, spare_sum, free_bytes_, spare_bytes_));
  }
  for (const auto& [id, extent] : records_) {
    auto it = allocated_.find(extent.offset);
    if (it == allocated_.end() || it->second != extent.bytes) {
      return absl::InternalError(absl::StrFormat(
          "arena record %d at [%d, +%d) is not an extent in use", id, extent.offset,
          extent.bytes));
    }
    if (windows_.count(extent.offset) != 0) {
      return absl::InternalError(
          absl::StrFormat("arena record %d at [%d, +%d) lies in a window file", id,
                          extent.offset, extent.bytes));
    }
  }
  return absl::OkStatus();
}

uint64_t Arena::free_bytes() const {
  absl::MutexLock lock(&mu_);
  return free_bytes_ + spare_bytes_;
}

size_t Arena::window_files() const {
  absl::MutexLock lock(&mu_);
  return windows_.size();
}

absl::StatusOr<uint64_t> Arena::WindowFileId(const ArenaExtent& extent, bool spare) const {
  absl::MutexLock lock(&mu_);
  auto w = windows_.find(extent.offset);
  const Window::State want = spare ? Window::State::kSpare : Window::State::kInUse;
  if (w == windows_.end() || w->second.state != want ||
      w->second.bytes != extent.bytes) {
    return absl::NotFoundError(absl::StrFormat("no window at [%d, +%d)", extent.offset,
                                               extent.bytes));
  }
  return w->second.file_id;
}

absl::StatusOr<Arena::WindowFile> Arena::OpenWindow(const ArenaExtent& extent, uint64_t file_id,
                                                    bool writable, bool spare) const {
  absl::MutexLock lock(&mu_);
  auto w = windows_.find(extent.offset);
  const Window::State want = spare ? Window::State::kSpare : Window::State::kInUse;
  if (w == windows_.end() || w->second.state != want ||
      w->second.bytes != extent.bytes || (file_id != 0 && w->second.file_id != file_id)) {
    return absl::NotFoundError(absl::StrFormat(
        "the window at [%d, +%d) is no longer held (retired or rebuilt since it was granted)",
        extent.offset, extent.bytes));
  }
  WindowFile out;
  out.file_id = w->second.file_id;
  out.bytes = w->second.bytes;
  if (writable) {
    out.fd = UniqueFd(::fcntl(w->second.fd.get(), F_DUPFD_CLOEXEC, 0));
  } else {
    // A descriptor of its own, opened for reading: what a trainer maps
    // from it cannot be written, and the file cannot be truncated by it.
    const std::string self = absl::StrCat("/proc/self/fd/", w->second.fd.get());
    out.fd = UniqueFd(::open(self.c_str(), O_RDONLY | O_CLOEXEC));
  }
  if (!out.fd.valid()) return Errno("cannot open a descriptor of " + WindowPath(extent.offset));
  return out;
}

absl::StatusOr<uint32_t> Arena::AddRecord(RecordKind kind, absl::Span<const uint8_t> record) {
  absl::MutexLock lock(&mu_);
  if (free_entries_.empty()) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "the arena index is full (%d committed ranks held); drop old steps or jobs",
        index_entries_));
  }
  absl::StatusOr<ArenaExtent> extent = AllocateLocked(record.size());
  if (!extent.ok()) return extent.status();
  const uint32_t id = free_entries_.back();
  free_entries_.pop_back();
  if (!record.empty()) std::memcpy(base() + extent->offset, record.data(), record.size());
  IndexEntry e{};
  e.sequence = ++sequence_;
  e.record_offset = extent->offset;
  e.record_bytes = record.size();
  e.record_crc = Crc(record.data(), record.size());
  e.kind = static_cast<uint32_t>(kind);
  e.valid = kEntryValid;
  e.entry_crc = Crc(&e, offsetof(IndexEntry, entry_crc));
  // Publish: the record is in place before its entry says so.
  std::atomic_thread_fence(std::memory_order_release);
  std::memcpy(Entry(id), &e, sizeof(e));
  records_[id] = *extent;
  return id;
}

void Arena::RemoveRecord(uint32_t id) {
  absl::MutexLock lock(&mu_);
  auto it = records_.find(id);
  if (it == records_.end()) return;
  std::memset(Entry(id), 0, sizeof(IndexEntry));
  FreeLocked(it->second);
  records_.erase(it);
  free_entries_.push_back(id);
}

void Arena::DropUnclaimedRecords() {
  std::vector<ArenaRecord> left;
  {
    absl::MutexLock lock(&mu_);
    left.swap(adopted_records_);
    std::vector<uint64_t> unclaimed;
    for (const auto& [offset, w] : windows_) {
      if (w.state == Window::State::kAdopted) unclaimed.push_back(offset);
    }
    for (uint64_t offset : unclaimed) {
      windows_.at(offset).state = Window::State::kSpare;  // reclaimed as a spare
      spare_bytes_ += windows_.at(offset).bytes;
      ReclaimWindowLocked(offset);
    }
  }
  for (const ArenaRecord& r : left) RemoveRecord(r.id);
}

std::vector<ArenaRecord> Arena::TakeAdoptedRecords(RecordKind kind) {
  absl::MutexLock lock(&mu_);
  std::vector<ArenaRecord> taken, rest;
  for (ArenaRecord& r : adopted_records_) (r.kind == kind ? taken : rest).push_back(r);
  adopted_records_ = std::move(rest);
  return taken;
}

}  // namespace ecsnap::daemon
