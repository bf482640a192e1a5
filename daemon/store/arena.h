// The shared-memory arena: the daemon's view of its snapshot memory, one
// range of addresses in which every extent has a fixed offset, pre-faulted
// at start.
//
//   +--------+--------------------+------------------------------------------+
//   | header | index: N entries   | data: windows and records, page-aligned  |
//   | 4 KiB  | of 64 B, each a    | extents handed out by Allocate() and     |
//   |        | checksummed pointer| AllocateWindow()                         |
//   |        | to one record      |                                          |
//   +--------+--------------------+------------------------------------------+
//
// The range is backed by the file `dir`/arena, except for windows: an extent
// a trainer may map (a rank's snapshot, a rebuilt rank) is a file of its own,
// `dir`/w.<offset in hex>, mapped over its part of the range, so base() +
// offset reaches it like any other extent. A trainer receives the descriptor
// of each window it was granted (read-only for restores) and never the
// arena file: its mapping holds its windows and nothing else, not the index,
// not parity, not another job (DESIGN.md §9). A freed window is kept as a
// spare of its owner (the same job and rank) and handed back to that owner
// next: its pages stay populated, and the trainer's mapping of it stays
// valid. Spares go back to the arena file when memory is needed elsewhere.
//
// The index makes the arena self-describing: a record (the daemon writes a
// serialized RankRecord) is stored in the data region and published by
// writing its index entry last, so a daemon killed at any point leaves either
// a valid entry or none. A restarted daemon takes the surviving records
// with TakeAdoptedRecords(), re-reserves the extents it keeps with Reserve()
// (window files are found again by their offset), and the rest of the data
// region is free again.
//
// A trainer can shrink a window file it holds read-write; the range is
// guarded (common/sigbus_guard.h), so the daemon then reads zeros there
// instead of dying, and such a window is never reused.
//
// Thread-safe: every method may be called from any thread. The bytes of an
// extent belong to whoever allocated it; the Arena never touches them.
#ifndef ECSNAP_DAEMON_STORE_ARENA_H_
#define ECSNAP_DAEMON_STORE_ARENA_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "common/unique_fd.h"
#include "daemon/store/arena_pages.h"

namespace ecsnap::daemon {

// Every extent starts on a page, so windows never share a page.
inline constexpr uint64_t kArenaAlignBytes = 4096;

struct ArenaExtent {
  uint64_t offset = 0;  // from the start of the file
  uint64_t bytes = 0;   // rounded up to kArenaAlignBytes
};

// What a record describes. The index holds records of several owners; each
// takes back its own kind at a restart.
enum class RecordKind : uint32_t {
  kRank = 1,       // a committed rank's window (StepStore)
  kParityRow = 2,  // a complete parity row (ParityStore)
};

// A record found in the index at Open().
struct ArenaRecord {
  uint32_t id = 0;
  RecordKind kind = RecordKind::kRank;
  ArenaExtent extent;
  absl::Span<const uint8_t> bytes;
};

class Arena {
 public:
  struct Options {
    // Directory of the arena file, created 0700 if missing. Must be a tmpfs
    // for the memory-speed guarantees. Default: /dev/shm/ecsnap.
    std::string dir = "/dev/shm/ecsnap";
    // File size. Default: 1 GiB.
    uint64_t bytes = uint64_t{1} << 30;
    // Index entries: the most records (committed ranks) held at once.
    // Default: 4096.
    uint32_t index_entries = 4096;
    // Called without the arena's lock before each window file is made, with
    // the window's owner; it may block. For tests that need a window's making
    // to last until they have done something meanwhile. Default: none.
    std::function<void(const std::string& owner)> before_window_made;
    // Window files held at once (each is a descriptor and a mapping), spares
    // included; 0: 16384, or fewer when the process may not open that many
    // descriptors.
    uint32_t max_window_files = 0;
  };

  // Opens the arena file `dir`/arena, creating it (mode 0600) or adopting the
  // one a previous daemon left. Fails with FAILED_PRECONDITION when another
  // process holds it or when its size differs from `bytes`; INTERNAL with the
  // system error when the file cannot be made or mapped.
  static absl::StatusOr<std::unique_ptr<Arena>> Open(const Options& options);

  ~Arena();
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;

  const std::string& path() const { return path_; }
  uint64_t size() const { return mapping_.size(); }
  uint8_t* base() const { return mapping_.data(); }
  // Seconds spent reserving and populating the file at Open() (its first
  // stores then go on in the background).
  double prefault_seconds() const { return prefault_seconds_; }
  // True once the background pass has written every page once (later
  // first writes cost nothing extra); for status and benchmarks.
  bool first_writes_done() const { return touched_; }
  // True when Open() found a previous daemon's file.
  bool adopted() const { return adopted_; }
  // The pages the tmpfs backs the arena with (arena_pages.h): with huge
  // pages, windows start and end on huge-page boundaries.
  const ArenaPages& pages() const { return pages_; }
  // Bytes of the data region (all that Allocate can ever hand out).
  uint64_t data_bytes() const { return size() - data_offset_; }

  // A free extent of at least `bytes`; RESOURCE_EXHAUSTED naming the bytes
  // asked for and free when none is large enough.
  absl::StatusOr<ArenaExtent> Allocate(uint64_t bytes);
  // The size of the window file that holds `bytes`: rounded up to 1/16 of
  // their power of two (at most 6.25% more), so that a rank whose state
  // grows or shrinks a little keeps reusing the same files, and, from one
  // huge page up where the arena has them, to whole huge pages (a smaller
  // window stays in 4 KiB pages rather than take a huge page).
  uint64_t WindowBytes(uint64_t bytes) const;
  // Where a window of `bytes` (WindowBytes already) starts: on a huge page
  // when it is made of them, else on a 4 KiB page.
  uint64_t WindowAlign(uint64_t bytes) const {
    return bytes >= window_align_ && bytes % window_align_ == 0 ? window_align_
                                                                 : kArenaAlignBytes;
  }
  // An extent backed by a window file of its own (see above), for `owner`
  // (WindowOwner), of WindowBytes(bytes): a spare of the same owner and size
  // when there is one, else fresh populated memory. RESOURCE_EXHAUSTED as
  // Allocate, or when the tmpfs cannot hold the file.
  // A fresh file is populated through the daemon's mapping only with
  // `populate` (the daemon will write it); a trainer writes through its own.
  absl::StatusOr<ArenaExtent> AllocateWindow(uint64_t bytes, const std::string& owner,
                                             bool populate = true);
  // A spare window of WindowBytes(bytes) for `owner`, made ahead of the
  // step that will take it, so that the trainer can map it and take its
  // first stores before then: one of the owner's spares of that size when
  // it has `spares` of them already (or holds `max_windows` of that size,
  // windows being made counted), else a new one while the owner has fewer
  // than `max_windows` of that size and free memory allows without giving
  // up anyone's spares. Each call makes one window at most: called n times
  // with spares = n, it makes the owner's first n windows one at a time.
  // FAILED_PRECONDITION when the owner has enough; RESOURCE_EXHAUSTED when
  // memory is short.
  absl::StatusOr<ArenaExtent> PrepareWindow(uint64_t bytes, const std::string& owner,
                                            int max_windows, int spares = 1);
  // Returns an extent from Allocate, AllocateWindow or Reserve. The extent must be exactly one
  // that is in use (same offset, same bytes): freeing anything else (twice,
  // a part, an overlap) would let two owners share memory, so it is a broken
  // invariant and aborts the process after naming the extent on stderr.
  void Free(const ArenaExtent& extent);
  // Marks an extent of an adopted record or window as in use. With an
  // `owner`, the extent is a window: its file is adopted (or, for an arena
  // written before windows had files, made from the bytes in place).
  // FAILED_PRECONDITION when it is outside the data region or overlaps an
  // extent in use.
  absl::Status Reserve(const ArenaExtent& extent, const std::string& owner = "");
  // Free bytes, spare windows included (they are given up on demand).
  uint64_t free_bytes() const;

  // A window's file, as a trainer receives it.
  struct WindowFile {
    UniqueFd fd;
    uint64_t file_id = 0;  // never the same for two files of one daemon
    uint64_t bytes = 0;
  };
  // The id of the file behind the window in use (with `spare`: the spare)
  // at `extent`; NOT_FOUND when no such window is there.
  absl::StatusOr<uint64_t> WindowFileId(const ArenaExtent& extent, bool spare = false) const;
  // A descriptor of the window in use (with `spare`: the spare made by
  // PrepareWindow) at `extent`, read-write or read-only (a read-only one
  // cannot be mapped writable, written or truncated). NOT_FOUND when no such
  // window is there or its file is not `file_id`.
  absl::StatusOr<WindowFile> OpenWindow(const ArenaExtent& extent, uint64_t file_id,
                                        bool writable, bool spare = false) const;
  // Removes every spare of the windows of `job_id` (any rank): a trainer that
  // may still map one writable (a uid displaced as the job's owner) never
  // sees the job's bytes in it. Returns how many went.
  int ReclaimSparesOfJob(const std::string& job_id);
  // Window files mapped now, spares and adopted ones included.
  size_t window_files() const;

  // Checks the arena's bookkeeping: extents in use and free extents are
  // page-aligned, lie inside the data region, do not overlap and together
  // cover it exactly; free_bytes() is the sum of the free ones; every record
  // lies in an extent in use. OK, or INTERNAL naming the first extent that
  // breaks a rule. Takes the lock for a walk over both maps.
  absl::Status CheckConsistency() const;

  // Stores `record` in a fresh extent and publishes it in the index.
  // RESOURCE_EXHAUSTED when the index or the data region is full.
  absl::StatusOr<uint32_t> AddRecord(RecordKind kind, absl::Span<const uint8_t> record);
  // Unpublishes record `id` and frees its extent.
  void RemoveRecord(uint32_t id);
  // The valid records of `kind` found at Open(), with their extents already
  // reserved. Each must be either kept or removed with RemoveRecord().
  std::vector<ArenaRecord> TakeAdoptedRecords(RecordKind kind);
  // Removes the adopted records nobody took (a kind this daemon no longer
  // keeps, such as parity rows after a restart without peers) and the
  // window files no record claimed.
  void DropUnclaimedRecords();

  // The bytes of an extent; the extent must lie inside the file.
  absl::Span<uint8_t> Bytes(const ArenaExtent& extent) const {
    return absl::Span<uint8_t>(base() + extent.offset, extent.bytes);
  }

 private:
  struct IndexEntry;

  Arena(std::string dir, std::string path, UniqueFd fd, Mapping mapping, uint32_t index_entries,
        double prefault_seconds, bool adopted, ArenaPages pages);
  IndexEntry* Entry(uint32_t id) const;
  void InitFresh();
  void LoadIndex();
  absl::StatusOr<ArenaExtent> AllocateLocked(uint64_t bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void FreeLocked(const ArenaExtent& extent) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Takes `extent` out of the free map; false if it is not wholly free.
  bool ReserveLocked(const ArenaExtent& extent) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  struct Window {
    enum class State { kInUse, kSpare, kAdopted };
    UniqueFd fd;
    uint64_t file_id = 0;
    uint64_t bytes = 0;
    std::string owner;
    State state = State::kInUse;
    uint64_t sigbus_at_start = 0;  // SigbusPagesReplaced() when it went in use
    bool used = false;  // has been in use (its trainer has it mapped)
  };
  std::string WindowPath(uint64_t offset) const;
  // The w.* files in `dir` that can be windows of an arena of `arena_bytes`
  // whose data starts at `data_offset`, by offset: named exactly, whole
  // pages, inside the data region, not overlapping one before them. Every
  // other w.* file is removed.
  static std::map<uint64_t, uint64_t> ScanWindowFiles(const std::string& dir,
                                                      uint64_t data_offset,
                                                      uint64_t arena_bytes);
  // Maps the window files a previous daemon left (ScanWindowFiles); one
  // that cannot be adopted is removed and the arena file backs its range.
  void AdoptWindowFiles(const std::map<uint64_t, uint64_t>& files)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Makes the window file for [offset, +bytes), a range nobody else uses
  // (taken out of free_), and maps it there: with `copy`, of the bytes the
  // arena file holds there now; with `populate`, populated for writing.
  // Needs no lock.
  absl::StatusOr<UniqueFd> CreateWindowFile(uint64_t offset, uint64_t bytes, bool copy,
                                            bool populate) const;
  void PublishWindowLocked(uint64_t offset, uint64_t bytes, UniqueFd fd, const std::string& owner,
                           Window::State state) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A new window of `bytes` (WindowBytes already) in `state`; the file is
  // made without holding the lock. With `reclaim`, spares are given up to
  // find the memory.
  absl::StatusOr<ArenaExtent> MakeWindow(uint64_t bytes, const std::string& owner,
                                         Window::State state, bool reclaim, bool populate);
  // Puts the arena file back under a window's range, removes the file and
  // frees the range.
  void ReclaimWindowLocked(uint64_t offset) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // False when a trainer shrank the window's file (or the SIGBUS guard
  // replaced pages anywhere since it went in use).
  bool IntactLocked(const Window& w) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Windows of `bytes` for `owner` being made now (making_).
  int MakingLocked(uint64_t bytes, const std::string& owner) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Forgets the parts of holes_ inside [offset, +bytes): a window file
  // backs them now.
  void ForgetHolesLocked(uint64_t offset, uint64_t bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Gives the arena file's pages in a range back to the tmpfs.
  void Punch(uint64_t offset, uint64_t bytes) const;
  // Backs a range of the arena file with pages again and populates it, or
  // records it in holes_ when the tmpfs is full.
  void BackRangeLocked(uint64_t offset, uint64_t bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Takes `bytes` of the free piece `piece`, starting at its first offset
  // that is a multiple of `align`; returns that offset. What lies before
  // and after stays free.
  uint64_t TakeFreeLocked(std::map<uint64_t, uint64_t>::iterator piece, uint64_t bytes,
                          uint64_t align = kArenaAlignBytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Gives spares back until a free piece holds `bytes` at a multiple of
  // `align`; false if none.
  bool ReclaimSparesFor(uint64_t bytes, uint64_t align = kArenaAlignBytes)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void AddFreeLocked(uint64_t offset, uint64_t bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Best-fit from free_ alone of `bytes` starting at a multiple of `align`
  // (windows: window_align_); end() when nothing fits.
  std::map<uint64_t, uint64_t>::iterator BestFitLocked(uint64_t bytes,
                                                       uint64_t align = kArenaAlignBytes)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status NoSpace(uint64_t bytes) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const std::string dir_;
  const std::string path_;
  const UniqueFd fd_;  // holds the flock that keeps a second daemon out
  const Mapping mapping_;
  const uint32_t index_entries_;
  const uint64_t data_offset_;
  const double prefault_seconds_;
  const bool adopted_;
  const ArenaPages pages_;
  // Where windows start, and what their sizes are multiples of: the
  // arena's page (huge or not), so that each mapping of a window, the
  // daemon's over the arena and the trainer's, can use the file's pages.
  const uint64_t window_align_;
  // True when [offset, offset + bytes) overlaps a hole.
  bool OverlapsHole(uint64_t offset, uint64_t bytes) const ABSL_LOCKS_EXCLUDED(mu_);
  // Writes each page once in the background (common/prefault.h); stops
  // and is joined before the mapping goes.
  std::atomic<bool> stop_touching_{false};
  std::atomic<bool> touched_{false};
  std::thread toucher_;

  mutable absl::Mutex mu_;
  std::map<uint64_t, uint64_t> free_ ABSL_GUARDED_BY(mu_);  // offset -> bytes
  // Extents handed out by Allocate/Reserve and not yet freed: offset -> bytes.
  std::map<uint64_t, uint64_t> allocated_ ABSL_GUARDED_BY(mu_);
  uint64_t free_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<uint32_t> free_entries_ ABSL_GUARDED_BY(mu_);
  std::map<uint32_t, ArenaExtent> records_ ABSL_GUARDED_BY(mu_);
  std::vector<ArenaRecord> adopted_records_ ABSL_GUARDED_BY(mu_);
  uint64_t sequence_ ABSL_GUARDED_BY(mu_) = 0;
  // Window files by offset. In-use windows are also in allocated_; spares
  // and adopted ones (not yet reserved) are in neither map.
  std::map<uint64_t, Window> windows_ ABSL_GUARDED_BY(mu_);
  uint64_t spare_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t next_file_id_ ABSL_GUARDED_BY(mu_) = 1;
  // Ranges of the arena file that could not be backed again after a window
  // left them (the tmpfs was full): handed out only once backed.
  std::map<uint64_t, uint64_t> holes_ ABSL_GUARDED_BY(mu_);
  // Ranges whose window file is being made (MakeWindow), outside the lock:
  // offset -> (bytes, owner).
  std::map<uint64_t, std::pair<uint64_t, std::string>> making_ ABSL_GUARDED_BY(mu_);
  std::function<void(const std::string&)> before_window_made_;  // set once, at Open
  size_t max_window_files_ = 16384;                              // set once, at Open
};

// The owner of a rank's windows: spares go back to the same job and rank.
std::string WindowOwner(const std::string& job_id, uint32_t rank);
// The owner of the windows the daemon fills itself for `rank` of `job_id`
// (rebuilt ranks): never handed out writable, so never a file a trainer maps.
std::string RebuiltWindowOwner(const std::string& job_id, uint32_t rank);

}  // namespace ecsnap::daemon

#endif  // ECSNAP_DAEMON_STORE_ARENA_H_
