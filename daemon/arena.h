// The shared-memory arena: one file in a tmpfs directory, mapped by the daemon
// and by every trainer on the node, pre-faulted at start.
//
//   +--------+--------------------+------------------------------------------+
//   | header | index: N entries   | data: windows and records, page-aligned  |
//   | 4 KiB  | of 64 B, each a    | extents handed out by Allocate()         |
//   |        | checksummed pointer|                                          |
//   |        | to one record      |                                          |
//   +--------+--------------------+------------------------------------------+
//
// The index makes the file self-describing: a record (the daemon writes a
// serialized RankRecord) is stored in the data region and published by
// writing its index entry last, so a daemon killed at any point leaves either
// a valid entry or none. A restarted daemon lists the surviving records with
// Records(), re-reserves the extents it keeps with Reserve(), and the rest of
// the data region is free again.
//
// Thread-safe: every method may be called from any thread. The bytes of an
// extent belong to whoever allocated it; the Arena never touches them.
#ifndef ECSNAP_DAEMON_ARENA_H_
#define ECSNAP_DAEMON_ARENA_H_

#include <atomic>
#include <cstdint>
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
  // True when Open() found a previous daemon's file.
  bool adopted() const { return adopted_; }
  // Bytes of the data region (all that Allocate can ever hand out).
  uint64_t data_bytes() const { return size() - data_offset_; }

  // A free extent of at least `bytes`; RESOURCE_EXHAUSTED naming the bytes
  // asked for and free when none is large enough.
  absl::StatusOr<ArenaExtent> Allocate(uint64_t bytes);
  // Returns an extent from Allocate or Reserve. The extent must be exactly one
  // that is in use (same offset, same bytes): freeing anything else (twice,
  // a part, an overlap) would let two owners share memory, so it is a broken
  // invariant and aborts the process after naming the extent on stderr.
  void Free(const ArenaExtent& extent);
  // Marks an extent of an adopted record or window as in use. FAILED_PRECONDITION
  // when it is outside the data region or overlaps an extent in use.
  absl::Status Reserve(const ArenaExtent& extent);
  uint64_t free_bytes() const;

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
  // keeps, such as parity rows after a restart without peers).
  void DropUnclaimedRecords();

  // The bytes of an extent; the extent must lie inside the file.
  absl::Span<uint8_t> Bytes(const ArenaExtent& extent) const {
    return absl::Span<uint8_t>(base() + extent.offset, extent.bytes);
  }

 private:
  struct IndexEntry;

  Arena(std::string path, UniqueFd fd, Mapping mapping, uint32_t index_entries,
        double prefault_seconds, bool adopted);
  IndexEntry* Entry(uint32_t id) const;
  void InitFresh();
  void LoadIndex();
  absl::StatusOr<ArenaExtent> AllocateLocked(uint64_t bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void FreeLocked(const ArenaExtent& extent) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Takes `extent` out of the free map; false if it is not wholly free.
  bool ReserveLocked(const ArenaExtent& extent) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const std::string path_;
  const UniqueFd fd_;  // holds the flock that keeps a second daemon out
  const Mapping mapping_;
  const uint32_t index_entries_;
  const uint64_t data_offset_;
  const double prefault_seconds_;
  const bool adopted_;
  // Writes each page once in the background (common/prefault.h); stops
  // and is joined before the mapping goes.
  std::atomic<bool> stop_touching_{false};
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
};

}  // namespace ecsnap::daemon

#endif  // ECSNAP_DAEMON_ARENA_H_
