#include "daemon/arena.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>

#include "absl/strings/str_format.h"
#include "common/format.h"
#include "common/prefault.h"
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

}  // namespace

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

  const auto t0 = std::chrono::steady_clock::now();
  if (!existing) {
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
  void* addr = ::mmap(nullptr, options.bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
  if (addr == MAP_FAILED) return Errno("cannot map arena " + path);
  if (const int err = PopulateForWrite(addr, options.bytes); err != 0) {
    ::munmap(addr, options.bytes);
    return absl::ResourceExhaustedError(absl::StrFormat(
        "cannot populate the %s arena in %s: %s", FormatBytes(options.bytes), options.dir,
        std::strerror(err)));
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  std::unique_ptr<Arena> arena(new Arena(path, std::move(fd), Mapping(addr, options.bytes),
                                         options.index_entries, seconds, existing));
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
  return arena;
}

Arena::Arena(std::string path, UniqueFd fd, Mapping mapping, uint32_t index_entries,
             double prefault_seconds, bool adopted)
    : path_(std::move(path)),
      fd_(std::move(fd)),
      mapping_(std::move(mapping)),
      index_entries_(index_entries),
      data_offset_(DataOffset(index_entries)),
      prefault_seconds_(prefault_seconds),
      adopted_(adopted) {
  {
    absl::MutexLock lock(&mu_);
    free_[data_offset_] = size() - data_offset_;
    free_bytes_ = size() - data_offset_;
  }
  toucher_ = std::thread([this] { TouchForWrite(base(), size(), &stop_touching_); });
}

Arena::~Arena() {
  stop_touching_ = true;
  toucher_.join();
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
  // Best fit keeps large extents whole for large windows.
  auto best = free_.end();
  for (auto it = free_.begin(); it != free_.end(); ++it) {
    if (it->second >= want && (best == free_.end() || it->second < best->second)) best = it;
  }
  if (best == free_.end() || bytes > size()) {
    uint64_t largest = 0;
    for (const auto& [off, len] : free_) largest = std::max(largest, len);
    return absl::ResourceExhaustedError(absl::StrFormat(
        "needs %s but the arena has %s free (largest free piece %s) of %s; raise --arena_bytes "
        "or keep fewer steps (--retain)",
        FormatBytes(bytes), FormatBytes(free_bytes_), FormatBytes(largest), FormatBytes(size())));
  }
  ArenaExtent e{best->first, want};
  const uint64_t left = best->second - want;
  const uint64_t rest_at = best->first + want;
  free_.erase(best);
  if (left > 0) free_[rest_at] = left;
  free_bytes_ -= want;
  allocated_[e.offset] = e.bytes;
  return e;
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
  uint64_t off = extent.offset, len = extent.bytes;
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
  free_bytes_ += extent.bytes;
}

absl::Status Arena::Reserve(const ArenaExtent& extent) {
  absl::MutexLock lock(&mu_);
  if (ReserveLocked(extent)) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrFormat(
      "extent [%d, +%d) is outside the data region or overlaps one in use", extent.offset,
      extent.bytes));
}

bool Arena::ReserveLocked(const ArenaExtent& extent) {
  if (extent.offset < data_offset_ || extent.offset % kArenaAlignBytes != 0 ||
      extent.bytes == 0 || extent.bytes % kArenaAlignBytes != 0) {
    return false;
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
  // Walk both maps in offset order: each extent must start where the one
  // before it ended, so that together they tile the data region.
  auto used = allocated_.begin();
  auto free = free_.begin();
  uint64_t at = data_offset_, free_sum = 0;
  while (used != allocated_.end() || free != free_.end()) {
    const bool take_used =
        free == free_.end() || (used != allocated_.end() && used->first < free->first);
    const auto [off, len] = take_used ? *used++ : *free++;
    const char* kind = take_used ? "in use" : "free";
    if (len == 0 || off % kArenaAlignBytes != 0 || len % kArenaAlignBytes != 0) {
      return absl::InternalError(absl::StrFormat(
          "arena extent [%d, +%d) %s is empty or not aligned to %d bytes", off, len, kind,
          kArenaAlignBytes));
    }
    if (off != at) {
      return absl::InternalError(absl::StrFormat(
          "arena extent [%d, +%d) %s %s the extents before it, which end at %d", off, len, kind,
          off < at ? "overlaps" : "leaves a gap after", at));
    }
    if (len > size() - off) {
      return absl::InternalError(absl::StrFormat(
          "arena extent [%d, +%d) %s passes the end of the arena (%d bytes)", off, len, kind,
          size()));
    }
    if (!take_used) free_sum += len;
    at = off + len;
  }
  if (at != size()) {
    return absl::InternalError(absl::StrFormat(
        "arena extents cover the data region only up to %d of %d bytes", at, size()));
  }
  if (free_sum != free_bytes_) {
    return absl::InternalError(absl::StrFormat(
        "arena free extents add up to %d bytes but free_bytes says %d", free_sum, free_bytes_));
  }
  for (const auto& [id, extent] : records_) {
    auto it = allocated_.find(extent.offset);
    if (it == allocated_.end() || it->second != extent.bytes) {
      return absl::InternalError(absl::StrFormat(
          "arena record %d at [%d, +%d) is not an extent in use", id, extent.offset,
          extent.bytes));
    }
  }
  return absl::OkStatus();
}

uint64_t Arena::free_bytes() const {
  absl::MutexLock lock(&mu_);
  return free_bytes_;
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
