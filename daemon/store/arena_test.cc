#include "daemon/store/arena.h"

#include <fcntl.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <cctype>
#include <map>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "common/sigbus_guard.h"
#include "gtest/gtest.h"

namespace ecsnap::daemon {
namespace {

constexpr uint64_t kMiB = 1 << 20;

class ArenaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* tmp = std::getenv("TEST_TMPDIR");
    dir_ = std::string(tmp ? tmp : "/tmp") + "/arena_" +
           ::testing::UnitTest::GetInstance()->current_test_info()->name();
    std::filesystem::remove_all(dir_);
  }
  Arena::Options Opts(uint64_t bytes = 8 * kMiB) {
    Arena::Options o;
    o.dir = dir_;
    o.bytes = bytes;
    o.index_entries = 64;
    return o;
  }
  void TearDown() override {
    if (mounted_) ::umount2(dir_.c_str(), MNT_DETACH);
  }
  // Mounts a tmpfs with `options` at the arena directory, in a mount
  // namespace of this thread's own (it goes with the process; TearDown
  // unmounts it before the next test). Empty, or why the test must skip.
  std::string MountTmpfs(const std::string& options) {
    if (::geteuid() != 0) return "needs root, to mount a tmpfs";
    if (::unshare(CLONE_NEWNS) != 0) {
      return std::string("cannot make a mount namespace (") + std::strerror(errno) +
             "): a container without CAP_SYS_ADMIN";
    }
    if (::mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0) {
      return std::string("cannot make the mounts private: ") + std::strerror(errno);
    }
    std::filesystem::create_directories(dir_);
    if (::mount("tmpfs", dir_.c_str(), "tmpfs", 0, options.c_str()) != 0) {
      return "cannot mount a tmpfs with " + options + ": " + std::strerror(errno);
    }
    mounted_ = true;
    return "";
  }
  // The path of the window file at `offset`: `dir`/w.<offset in hex>.
  std::string WindowPath(uint64_t offset) const {
    char hex[32];
    std::snprintf(hex, sizeof(hex), "%lx", static_cast<unsigned long>(offset));
    return dir_ + "/w." + hex;
  }
  // The names of the w.* files in the arena directory, sorted.
  std::vector<std::string> WindowFileNames() const {
    std::vector<std::string> names;
    for (const auto& e : std::filesystem::directory_iterator(dir_)) {
      const std::string name = e.path().filename().string();
      if (name.rfind("w.", 0) == 0) names.push_back(name);
    }
    std::sort(names.begin(), names.end());
    return names;
  }
  // Writes a file of `bytes` zero bytes at `path` (a window file left behind).
  static void WriteFile(const std::string& path, uint64_t bytes) {
    UniqueFd fd(::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
    ASSERT_TRUE(fd.valid()) << path << ": " << std::strerror(errno);
    ASSERT_EQ(::ftruncate(fd.get(), static_cast<off_t>(bytes)), 0);
  }
  std::string dir_;
  bool mounted_ = false;
};

std::string Owner(uint32_t rank) { return WindowOwner("job", rank); }

// A pattern that differs per byte and per `seed`, so a misplaced or stale
// page does not compare equal.
void Fill(absl::Span<uint8_t> bytes, uint8_t seed) {
  for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<uint8_t>(i * 131 + i / 4096 + seed);
}
std::vector<uint8_t> Pattern(size_t n, uint8_t seed) {
  std::vector<uint8_t> v(n);
  Fill(absl::MakeSpan(v), seed);
  return v;
}
std::vector<uint8_t> Copy(absl::Span<const uint8_t> bytes) {
  return std::vector<uint8_t>(bytes.begin(), bytes.end());
}

// `bytes` of a file from `offset`, read with pread (the file, not a
// mapping): fewer when the file is shorter.
std::vector<uint8_t> PreadAll(int fd, uint64_t bytes, uint64_t offset = 0) {
  std::vector<uint8_t> out(bytes);
  uint64_t done = 0;
  while (done < bytes) {
    const ssize_t n = ::pread(fd, out.data() + done, bytes - done, static_cast<off_t>(offset + done));
    if (n <= 0) break;
    done += static_cast<uint64_t>(n);
  }
  out.resize(done);
  return out;
}

struct stat Stat(const std::string& path) {
  struct stat st {};
  EXPECT_EQ(::stat(path.c_str(), &st), 0) << path << ": " << std::strerror(errno);
  return st;
}
struct stat FdStat(int fd) {
  struct stat st {};
  EXPECT_EQ(::fstat(fd, &st), 0) << std::strerror(errno);
  return st;
}
bool Exists(const std::string& path) {
  struct stat st {};
  return ::lstat(path.c_str(), &st) == 0;
}
// Bytes of storage a file holds (holes punched in it are not counted).
uint64_t StoredBytes(const std::string& path) { return static_cast<uint64_t>(Stat(path).st_blocks) * 512; }

#define EXPECT_CONSISTENT(arena)                                  \
  do {                                                            \
    const absl::Status consistent = (arena)->CheckConsistency();  \
    EXPECT_TRUE(consistent.ok()) << consistent;                   \
  } while (0)

TEST_F(ArenaTest, AllocatesFreesAndCoalesces) {
  auto arena = *Arena::Open(Opts());
  const uint64_t all = arena->free_bytes();
  EXPECT_EQ(all, arena->data_bytes());
  auto a = *arena->Allocate(1);
  auto b = *arena->Allocate(kMiB + 1);
  auto c = *arena->Allocate(4096);
  EXPECT_EQ(a.bytes, 4096u);
  EXPECT_EQ(b.bytes, kMiB + 4096);
  EXPECT_EQ(arena->free_bytes(), all - a.bytes - b.bytes - c.bytes);
  arena->Free(b);
  arena->Free(a);
  arena->Free(c);
  EXPECT_EQ(arena->free_bytes(), all);
  // Coalesced back into one piece: the whole data region fits again.
  auto whole = arena->Allocate(all);
  ASSERT_TRUE(whole.ok()) << whole.status();
}

TEST_F(ArenaTest, RefusesWhatDoesNotFitNamingTheBytes) {
  auto arena = *Arena::Open(Opts());
  auto st = arena->Allocate(64 * kMiB).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(st.message().find("needs 64.00 MiB"), std::string::npos) << st;
  EXPECT_NE(st.message().find("free"), std::string::npos) << st;
}

TEST_F(ArenaTest, AnArenaLargerThanItsFileSystemIsRefusedBeforeAnythingIsReserved) {
  Arena::Options o = Opts();
  o.bytes = uint64_t{1} << 50;  // 1 PiB: more than any test machine's tmpfs
  auto arena = Arena::Open(o);
  ASSERT_FALSE(arena.ok());
  EXPECT_EQ(arena.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(arena.status().message().find("free, and the arena needs 1.00 PiB"),
            std::string::npos)
      << arena.status();
  // Nothing held: the right size opens in the same directory.
  EXPECT_TRUE(Arena::Open(Opts()).ok());
}

TEST_F(ArenaTest, RecordsSurviveAReopenAndRemovedOnesDoNot) {
  uint32_t kept, removed;
  ArenaExtent window;
  {
    auto arena = *Arena::Open(Opts());
    EXPECT_FALSE(arena->adopted());
    window = *arena->Allocate(10000);
    std::memset(arena->Bytes(window).data(), 0x5a, 10000);
    kept = *arena->AddRecord(RecordKind::kRank, {reinterpret_cast<const uint8_t*>("kept record"), 11});
    removed = *arena->AddRecord(RecordKind::kRank, {reinterpret_cast<const uint8_t*>("gone"), 4});
    arena->RemoveRecord(removed);
  }
  auto arena = *Arena::Open(Opts());
  EXPECT_TRUE(arena->adopted());
  auto records = arena->TakeAdoptedRecords(RecordKind::kRank);
  ASSERT_EQ(records.size(), 1u);
  EXPECT_EQ(records[0].id, kept);
  EXPECT_EQ(std::string(records[0].bytes.begin(), records[0].bytes.end()), "kept record");
  // The window's bytes are still there; reserving it again works once.
  ASSERT_TRUE(arena->Reserve(window).ok());
  EXPECT_EQ(arena->Bytes(window)[9999], 0x5a);
  EXPECT_EQ(arena->Reserve(window).code(), absl::StatusCode::kFailedPrecondition);
}

TEST_F(ArenaTest, EachOwnerTakesItsOwnKindAndUnclaimedRecordsAreFreed) {
  {
    auto arena = *Arena::Open(Opts());
    ASSERT_TRUE(arena->AddRecord(RecordKind::kRank, {reinterpret_cast<const uint8_t*>("r"), 1}).ok());
    ASSERT_TRUE(
        arena->AddRecord(RecordKind::kParityRow, {reinterpret_cast<const uint8_t*>("p"), 1}).ok());
  }
  auto arena = *Arena::Open(Opts());
  const uint64_t free_at_open = arena->free_bytes();
  auto ranks = arena->TakeAdoptedRecords(RecordKind::kRank);
  ASSERT_EQ(ranks.size(), 1u);
  EXPECT_EQ(ranks[0].bytes[0], 'r');
  // A daemon restarted without peers keeps no parity: the row record goes.
  arena->DropUnclaimedRecords();
  EXPECT_EQ(arena->free_bytes(), free_at_open + kArenaAlignBytes);
  EXPECT_TRUE(arena->TakeAdoptedRecords(RecordKind::kParityRow).empty());
  EXPECT_TRUE(arena->CheckConsistency().ok());
}

TEST_F(ArenaTest, ACorruptRecordIsDroppedAtReopen) {
  {
    auto arena = *Arena::Open(Opts());
    auto id = *arena->AddRecord(RecordKind::kRank, {reinterpret_cast<const uint8_t*>("record"), 6});
    (void)id;
    // Corrupt the record bytes behind the index's back.
    auto records_extent = *arena->Allocate(1);  // the record sits just before this
    arena->base()[records_extent.offset - 4096] ^= 1;
  }
  auto arena = *Arena::Open(Opts());
  EXPECT_TRUE(arena->TakeAdoptedRecords(RecordKind::kRank).empty());
}

TEST_F(ArenaTest, OneDaemonPerArenaAndTheSizeMustMatch) {
  auto first = *Arena::Open(Opts());
  auto second = Arena::Open(Opts());
  EXPECT_EQ(second.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(second.status().message().find("in use by another ecsnapd"), std::string::npos);
  first.reset();
  auto resized = Arena::Open(Opts(16 * kMiB));
  EXPECT_EQ(resized.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(resized.status().message().find("--arena_bytes"), std::string::npos);
}

TEST_F(ArenaTest, TheIndexBoundsTheRecordsHeld) {
  auto arena = *Arena::Open(Opts());
  for (int i = 0; i < 64; ++i) ASSERT_TRUE(arena->AddRecord(RecordKind::kRank, {}).ok()) << i;
  auto st = arena->AddRecord(RecordKind::kRank, {}).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(st.message().find("index is full"), std::string::npos);
}

TEST_F(ArenaTest, ADoubleFreeAbortsNamingTheExtent) {
  ::testing::FLAGS_gtest_death_test_style = "threadsafe";
  auto arena = *Arena::Open(Opts());
  auto a = *arena->Allocate(3 * 4096);
  auto b = *arena->Allocate(4096);
  arena->Free(a);
  EXPECT_DEATH(arena->Free(a), "Free of extent \\[[0-9]+, \\+12288\\) that is not an extent in use");
  // The process that did not die still has a consistent arena.
  EXPECT_TRUE(arena->CheckConsistency().ok()) << arena->CheckConsistency();
  arena->Free(b);
  EXPECT_EQ(arena->free_bytes(), arena->data_bytes());
}

TEST_F(ArenaTest, APartialOrOverlappingFreeAborts) {
  ::testing::FLAGS_gtest_death_test_style = "threadsafe";
  auto arena = *Arena::Open(Opts());
  auto a = *arena->Allocate(2 * 4096);
  auto b = *arena->Allocate(2 * 4096);
  // A part of an extent, the tail of one, two extents at once, the free space.
  EXPECT_DEATH(arena->Free({a.offset, 4096}), "has 8192 bytes");
  EXPECT_DEATH(arena->Free({a.offset + 4096, 4096}), "no extent in use starts there");
  EXPECT_DEATH(arena->Free({a.offset, a.bytes + b.bytes}), "not an extent in use");
  EXPECT_DEATH(arena->Free({b.offset + b.bytes, 4096}), "not an extent in use");
  // A reserved extent is freed whole too, and only once.
  auto c = *arena->Allocate(4096);
  arena->Free(c);
  ASSERT_TRUE(arena->Reserve(c).ok());
  EXPECT_DEATH(arena->Free({c.offset, 2 * 4096}), "not an extent in use");
  EXPECT_TRUE(arena->CheckConsistency().ok()) << arena->CheckConsistency();
}

TEST_F(ArenaTest, ReserveRefusesEmptyAndUnalignedExtents) {
  auto arena = *Arena::Open(Opts());
  auto a = *arena->Allocate(4096);
  arena->Free(a);
  EXPECT_FALSE(arena->Reserve({a.offset, 0}).ok());
  EXPECT_FALSE(arena->Reserve({a.offset, 100}).ok());
  EXPECT_FALSE(arena->Reserve({a.offset + 1, 4096}).ok());
  EXPECT_TRUE(arena->CheckConsistency().ok()) << arena->CheckConsistency();
  EXPECT_EQ(arena->free_bytes(), arena->data_bytes());
}

// Random allocations, reservations, records and frees, checked against a
// model: the bookkeeping stays consistent after every operation, and no byte
// of an extent in use is ever handed to anyone else (each extent carries its
// own tag, checked when it is freed).
TEST_F(ArenaTest, RandomAllocFreeKeepsTheArenaConsistent) {
  uint64_t seed = std::random_device{}();
  if (const char* s = std::getenv("ARENA_TEST_SEED")) seed = std::strtoull(s, nullptr, 10);
  std::printf("ArenaTest.RandomAllocFreeKeepsTheArenaConsistent seed %lu (ARENA_TEST_SEED=%lu "
              "replays it)\n",
              static_cast<unsigned long>(seed), static_cast<unsigned long>(seed));
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  std::vector<ArenaExtent> held;
  std::vector<uint8_t> tags;
  std::vector<uint32_t> records;
  auto arena = *Arena::Open(Opts());
  auto fill = [&](const ArenaExtent& e, uint8_t tag) {
    std::memset(arena->Bytes(e).data(), tag, e.bytes);
  };
  auto intact = [&](const ArenaExtent& e, uint8_t tag) {
    for (uint8_t b : arena->Bytes(e)) {
      if (b != tag) return false;
    }
    return true;
  };
  for (int op = 0; op < 3000; ++op) {
    const int what = static_cast<int>(rng() % 10);
    if (what < 4) {
      const uint64_t want = 1 + rng() % (what == 0 ? 2 * kMiB : 6 * 4096);
      auto e = arena->Allocate(want);
      if (e.ok()) {
        ASSERT_GE(e->bytes, want);
        const uint8_t tag = static_cast<uint8_t>(rng());
        fill(*e, tag);
        held.push_back(*e);
        tags.push_back(tag);
      } else {
        ASSERT_EQ(e.status().code(), absl::StatusCode::kResourceExhausted);
      }
    } else if (what < 8 && !held.empty()) {
      const size_t i = rng() % held.size();
      ASSERT_TRUE(intact(held[i], tags[i])) << "extent [" << held[i].offset << ", +"
                                            << held[i].bytes << ") was written by another owner";
      arena->Free(held[i]);
      held[i] = held.back();
      tags[i] = tags.back();
      held.pop_back();
      tags.pop_back();
    } else if (what == 8) {
      // Reserve a random page: succeeds only when it is free.
      const uint64_t pages = arena->data_bytes() / 4096;
      const ArenaExtent e{arena->size() - arena->data_bytes() + (rng() % pages) * 4096, 4096};
      bool overlaps = false;
      for (const ArenaExtent& h : held) {
        overlaps |= e.offset < h.offset + h.bytes && h.offset < e.offset + e.bytes;
      }
      const absl::Status st = arena->Reserve(e);
      if (overlaps) {
        ASSERT_FALSE(st.ok()) << "reserved a page in use at " << e.offset;
      } else if (st.ok()) {
        const uint8_t tag = static_cast<uint8_t>(rng());
        fill(e, tag);
        held.push_back(e);
        tags.push_back(tag);
      }
    } else if (rng() % 2 == 0 || records.empty()) {
      const std::string rec(1 + rng() % 6000, 'r');
      auto id = arena->AddRecord(RecordKind::kRank, {reinterpret_cast<const uint8_t*>(rec.data()), rec.size()});
      if (id.ok()) records.push_back(*id);
    } else {
      const size_t i = rng() % records.size();
      arena->RemoveRecord(records[i]);
      records[i] = records.back();
      records.pop_back();
    }
    const absl::Status consistent = arena->CheckConsistency();
    ASSERT_TRUE(consistent.ok()) << "after operation " << op << ": " << consistent;
  }
  for (size_t i = 0; i < held.size(); ++i) {
    ASSERT_TRUE(intact(held[i], tags[i]));
    arena->Free(held[i]);
  }
  for (uint32_t id : records) arena->RemoveRecord(id);
  EXPECT_TRUE(arena->CheckConsistency().ok()) << arena->CheckConsistency();
  EXPECT_EQ(arena->free_bytes(), arena->data_bytes());
}

TEST_F(ArenaTest, AReopenedArenaIsConsistentWithItsRecordsAndWindows) {
  ArenaExtent window;
  {
    auto arena = *Arena::Open(Opts());
    window = *arena->Allocate(5 * 4096);
    for (int i = 0; i < 5; ++i) ASSERT_TRUE(arena->AddRecord(RecordKind::kRank, {}).ok());
    EXPECT_TRUE(arena->CheckConsistency().ok()) << arena->CheckConsistency();
  }
  auto arena = *Arena::Open(Opts());
  auto records = arena->TakeAdoptedRecords(RecordKind::kRank);
  EXPECT_EQ(records.size(), 5u);
  ASSERT_TRUE(arena->Reserve(window).ok());
  EXPECT_TRUE(arena->CheckConsistency().ok()) << arena->CheckConsistency();
  for (const ArenaRecord& r : records) arena->RemoveRecord(r.id);
  arena->Free(window);
  EXPECT_TRUE(arena->CheckConsistency().ok()) << arena->CheckConsistency();
  EXPECT_EQ(arena->free_bytes(), arena->data_bytes());
}

// A window is a file of its own: the bytes the daemon sees at base() + offset
// are the file's bytes, and a read-only descriptor of it cannot write them.
TEST_F(ArenaTest, AWindowsBytesAreItsFilesBytes) {
  auto arena = *Arena::Open(Opts());
  const ArenaExtent w = *arena->AllocateWindow(3 * 4096 + 5, Owner(0));
  EXPECT_EQ(w.bytes, 4 * 4096u);
  EXPECT_EQ(arena->window_files(), 1u);
  Fill(arena->Bytes(w), 7);
  const uint64_t id = *arena->WindowFileId(w);

  Arena::WindowFile ro = *arena->OpenWindow(w, id, /*writable=*/false);
  EXPECT_EQ(ro.file_id, id);
  EXPECT_EQ(ro.bytes, w.bytes);
  EXPECT_EQ(PreadAll(ro.fd.get(), w.bytes), Pattern(w.bytes, 7));
  // Read-only: it maps for reading only, and neither writes nor truncates.
  void* map = ::mmap(nullptr, w.bytes, PROT_READ, MAP_SHARED, ro.fd.get(), 0);
  ASSERT_NE(map, MAP_FAILED) << std::strerror(errno);
  EXPECT_EQ(Copy({static_cast<const uint8_t*>(map), w.bytes}), Pattern(w.bytes, 7));
  ::munmap(map, w.bytes);
  errno = 0;
  EXPECT_EQ(::mmap(nullptr, w.bytes, PROT_READ | PROT_WRITE, MAP_SHARED, ro.fd.get(), 0),
            MAP_FAILED);
  EXPECT_EQ(errno, EACCES);
  EXPECT_LT(::pwrite(ro.fd.get(), "x", 1, 0), 0);
  EXPECT_NE(::ftruncate(ro.fd.get(), 0), 0);
  EXPECT_EQ(static_cast<uint64_t>(FdStat(ro.fd.get()).st_size), w.bytes);
  EXPECT_EQ(arena->Bytes(w)[0], Pattern(1, 7)[0]);

  // Read-write: what a trainer writes to the file is what the daemon reads.
  Arena::WindowFile rw = *arena->OpenWindow(w, id, /*writable=*/true);
  ASSERT_EQ(::pwrite(rw.fd.get(), "trainer", 7, 4096 + 3), 7);
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(arena->Bytes(w).data()) + 4096 + 3, 7),
            "trainer");

  // Both descriptors are the file w.<offset in hex>, never the arena file.
  const struct stat file = Stat(WindowPath(w.offset));
  EXPECT_EQ(static_cast<uint64_t>(file.st_size), w.bytes);
  EXPECT_EQ(FdStat(ro.fd.get()).st_ino, file.st_ino);
  EXPECT_EQ(FdStat(rw.fd.get()).st_ino, file.st_ino);
  EXPECT_NE(Stat(arena->path()).st_ino, file.st_ino);
  EXPECT_EQ(WindowFileNames(), std::vector<std::string>{WindowPath(w.offset).substr(dir_.size() + 1)});

  // Only the window in use, with its own id and size, opens.
  EXPECT_EQ(arena->OpenWindow(w, id + 1, false).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(arena->OpenWindow({w.offset, w.bytes - 4096}, id, false).status().code(),
            absl::StatusCode::kNotFound);
  const ArenaExtent p = *arena->Allocate(4096);
  EXPECT_EQ(arena->WindowFileId(p).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(arena->OpenWindow(p, 0, false).status().code(), absl::StatusCode::kNotFound);
  EXPECT_CONSISTENT(arena);
}

// A freed window is a spare of its owner: the same owner asking for the same
// size gets it back, file and pages included; nobody else does.
TEST_F(ArenaTest, AFreedWindowGoesBackToItsOwnerOnly) {
  auto arena = *Arena::Open(Opts());
  const ArenaExtent w = *arena->AllocateWindow(2 * 4096, Owner(0));
  Fill(arena->Bytes(w), 11);
  const uint64_t id = *arena->WindowFileId(w);
  Arena::WindowFile rw = *arena->OpenWindow(w, id, /*writable=*/true);
  const uint64_t free_before = arena->free_bytes();

  arena->Free(w);
  EXPECT_EQ(arena->free_bytes(), free_before + w.bytes);  // spares count as free
  EXPECT_EQ(arena->window_files(), 1u);
  EXPECT_TRUE(Exists(WindowPath(w.offset)));
  EXPECT_EQ(arena->WindowFileId(w).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(arena->OpenWindow(w, id, false).status().code(), absl::StatusCode::kNotFound);
  EXPECT_CONSISTENT(arena);

  // Another owner, or the same owner with another size: a fresh window.
  const ArenaExtent other_owner = *arena->AllocateWindow(2 * 4096, Owner(1));
  const ArenaExtent other_size = *arena->AllocateWindow(3 * 4096, Owner(0));
  const ArenaExtent other_job = *arena->AllocateWindow(2 * 4096, WindowOwner("job2", 0));
  for (const ArenaExtent& e : {other_owner, other_size, other_job}) {
    EXPECT_NE(e.offset, w.offset);
    EXPECT_NE(*arena->WindowFileId(e), id);
  }
  EXPECT_EQ(arena->window_files(), 4u);
  EXPECT_CONSISTENT(arena);

  // The owner: the same offset, file and pages; a trainer's descriptor from
  // before the free still reaches it.
  const ArenaExtent again = *arena->AllocateWindow(2 * 4096 - 100, Owner(0));
  EXPECT_EQ(again.offset, w.offset);
  EXPECT_EQ(again.bytes, w.bytes);
  EXPECT_EQ(*arena->WindowFileId(again), id);
  EXPECT_EQ(Copy(arena->Bytes(again)), Pattern(w.bytes, 11));
  ASSERT_EQ(::pwrite(rw.fd.get(), "old fd", 6, 0), 6);
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(arena->Bytes(again).data()), 6), "old fd");
  EXPECT_EQ(arena->window_files(), 4u);
  EXPECT_EQ(arena->free_bytes(), free_before - other_owner.bytes - other_size.bytes - other_job.bytes);
  EXPECT_CONSISTENT(arena);
}

// Windows made ahead of a rank's first steps, one call each: a call that
// asks for n spares makes one while the owner has fewer, answers with an
// existing spare once it has n, and never passes the owner's bound.
TEST_F(ArenaTest, PreparingAheadMakesTheSparesAskedForAndNoMore) {
  auto arena = *Arena::Open(Opts());
  auto first = arena->PrepareWindow(64 * 1024, Owner(0), /*max_windows=*/3, /*spares=*/1);
  ASSERT_TRUE(first.ok()) << first.status();
  auto second = arena->PrepareWindow(64 * 1024, Owner(0), 3, /*spares=*/2);
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_NE(second->offset, first->offset);
  EXPECT_EQ(arena->window_files(), 2u);
  // Two spares held: asking for one or two again makes nothing.
  auto again = arena->PrepareWindow(64 * 1024, Owner(0), 3, /*spares=*/2);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_TRUE(again->offset == first->offset || again->offset == second->offset);
  ASSERT_TRUE(arena->PrepareWindow(64 * 1024, Owner(0), 3, /*spares=*/1).ok());
  EXPECT_EQ(arena->window_files(), 2u);
  // A step takes one; the next ask for two spares makes the third window,
  // and the owner's bound (3) stops a fourth.
  ASSERT_TRUE(arena->AllocateWindow(64 * 1024, Owner(0)).ok());
  ASSERT_TRUE(arena->PrepareWindow(64 * 1024, Owner(0), 3, /*spares=*/2).ok());
  EXPECT_EQ(arena->window_files(), 3u);
  ASSERT_TRUE(arena->AllocateWindow(64 * 1024, Owner(0)).ok());
  EXPECT_EQ(arena->PrepareWindow(64 * 1024, Owner(0), 3, /*spares=*/2).status().code(),
            absl::StatusCode::kOk);  // the one spare left answers: the bound is reached
  EXPECT_EQ(arena->window_files(), 3u);
  ASSERT_TRUE(arena->AllocateWindow(64 * 1024, Owner(0)).ok());
  EXPECT_EQ(arena->PrepareWindow(64 * 1024, Owner(0), 3, /*spares=*/2).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(arena->window_files(), 3u);
  EXPECT_CONSISTENT(arena);
}

// A step takes a spare made ahead at once, even while another is being made
// for the same owner: it waits for one being made only when it has none.
TEST_F(ArenaTest, AStepTakesAReadySpareWithoutWaitingForOneBeingMade) {
  absl::Notification release;
  std::atomic<int> making{0};
  Arena::Options o = Opts();
  o.before_window_made = [&](const std::string&) {
    if (++making == 2) release.WaitForNotificationWithTimeout(absl::Seconds(20));
  };
  auto arena = *Arena::Open(o);
  auto ready = arena->PrepareWindow(64 * 1024, Owner(0), 3, /*spares=*/1);
  ASSERT_TRUE(ready.ok()) << ready.status();
  std::thread second([&] { arena->PrepareWindow(64 * 1024, Owner(0), 3, /*spares=*/2).IgnoreError(); });
  for (int i = 0; i < 2000 && making.load() < 2; ++i) absl::SleepFor(absl::Milliseconds(5));
  ASSERT_EQ(making.load(), 2);
  const absl::Time t0 = absl::Now();
  auto step = arena->AllocateWindow(64 * 1024, Owner(0));
  const absl::Duration waited = absl::Now() - t0;
  release.Notify();
  second.join();
  ASSERT_TRUE(step.ok()) << step.status();
  EXPECT_EQ(step->offset, ready->offset);
  EXPECT_LT(waited, absl::Seconds(10)) << "the step waited for the window being made";
  EXPECT_EQ(arena->window_files(), 2u);
  EXPECT_CONSISTENT(arena);
}

// Windows still being made count toward the owner's bound: a window made
// ahead while the owner's step makes its own cannot take it past the bound.
TEST_F(ArenaTest, WindowsBeingMadeCountTowardTheOwnersBound) {
  absl::Notification release, entered;
  std::atomic<int> calls{0};
  Arena::Options o = Opts();
  o.before_window_made = [&](const std::string&) {
    if (++calls == 2) {  // the second window the owner makes is held here
      entered.Notify();
      release.WaitForNotificationWithTimeout(absl::Seconds(20));
    }
  };
  auto arena = *Arena::Open(o);
  ASSERT_TRUE(arena->AllocateWindow(64 * 1024, Owner(0)).ok());
  std::thread step([&] { EXPECT_TRUE(arena->AllocateWindow(64 * 1024, Owner(0)).ok()); });
  ASSERT_TRUE(entered.WaitForNotificationWithTimeout(absl::Seconds(20)));
  // The owner holds one window and is making a second: with a bound of 2,
  // no window is made ahead.
  EXPECT_EQ(arena->PrepareWindow(64 * 1024, Owner(0), /*max_windows=*/2, /*spares=*/1)
                .status()
                .code(),
            absl::StatusCode::kFailedPrecondition);
  release.Notify();
  step.join();
  EXPECT_EQ(arena->window_files(), 2u);
  EXPECT_CONSISTENT(arena);
}

// When memory runs out, spares go back to the arena file: their files are
// removed, and their ranges serve private extents and other owners.
// Window files are bounded in number as well as in bytes (each holds a
// descriptor and a mapping): at the bound a spare is reclaimed for the new
// window; with no spare left the window is refused with the bound named, and
// nothing else changes.
TEST_F(ArenaTest, WindowFilesAreBoundedInNumber) {
  Arena::Options o = Opts();
  o.max_window_files = 3;
  auto arena = *Arena::Open(o);
  std::vector<ArenaExtent> windows;
  for (uint32_t r = 0; r < 3; ++r) {
    windows.push_back(*arena->AllocateWindow(64 * 1024, Owner(r)));
    Fill(arena->Bytes(windows.back()), static_cast<uint8_t>(r));
  }
  const uint64_t free_before = arena->free_bytes();
  auto refused = arena->AllocateWindow(64 * 1024, Owner(3));
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted) << refused.status();
  EXPECT_NE(refused.status().message().find("already holds 3 window files"), std::string::npos)
      << refused.status();
  EXPECT_EQ(arena->free_bytes(), free_before);
  EXPECT_EQ(arena->window_files(), 3u);
  EXPECT_CONSISTENT(arena);
  // Rank 0's window freed stays as its spare. A window made ahead of its
  // step never evicts it; rank 3's window for a step does.
  arena->Free(windows[0]);
  auto ahead = arena->PrepareWindow(64 * 1024, Owner(3), 4);
  EXPECT_EQ(ahead.status().code(), absl::StatusCode::kResourceExhausted) << ahead.status();
  EXPECT_EQ(arena->window_files(), 3u);
  auto taken = arena->AllocateWindow(64 * 1024, Owner(3));
  ASSERT_TRUE(taken.ok()) << taken.status();
  EXPECT_EQ(arena->window_files(), 3u);
  EXPECT_EQ(WindowFileNames().size(), 3u);
  EXPECT_CONSISTENT(arena);
  // The windows in use kept their bytes.
  EXPECT_EQ(Copy(arena->Bytes(windows[1])), Pattern(64 * 1024, 1));
  EXPECT_EQ(Copy(arena->Bytes(windows[2])), Pattern(64 * 1024, 2));
}

TEST_F(ArenaTest, SparesAreReclaimedWhenMemoryRunsOut) {
  auto arena = *Arena::Open(Opts());
  std::vector<ArenaExtent> windows;
  std::vector<uint64_t> ids;
  for (;;) {
    auto w = arena->AllocateWindow(kMiB, Owner(0));
    if (!w.ok()) {
      EXPECT_EQ(w.status().code(), absl::StatusCode::kResourceExhausted) << w.status();
      break;
    }
    Fill(arena->Bytes(*w), static_cast<uint8_t>(windows.size()));
    windows.push_back(*w);
    ids.push_back(*arena->WindowFileId(*w));
  }
  const size_t n = windows.size();
  ASSERT_GE(n, 4u);
  ASSERT_LT(arena->free_bytes(), kMiB);  // not even one more window fits
  // The arena file gave the windows' pages back (a little slack for the
  // file system's own blocks).
  const std::string arena_file = dir_ + "/arena";
  EXPECT_LE(StoredBytes(arena_file), arena->size() - n * kMiB + 64 * 1024);
  // Trainers keep read-only descriptors of the windows past their free.
  std::vector<UniqueFd> trainer_fds;
  for (size_t i = 0; i < n; ++i) {
    trainer_fds.push_back(std::move(arena->OpenWindow(windows[i], ids[i], false)->fd));
  }
  for (const ArenaExtent& w : windows) arena->Free(w);
  EXPECT_EQ(arena->free_bytes(), arena->data_bytes());
  EXPECT_EQ(arena->window_files(), n);
  EXPECT_EQ(WindowFileNames().size(), n);
  EXPECT_CONSISTENT(arena);

  // 2 MiB private: only fits where two adjacent spares were.
  const uint64_t stored_before = StoredBytes(arena_file);
  const ArenaExtent p = *arena->Allocate(2 * kMiB);
  EXPECT_CONSISTENT(arena);
  EXPECT_LE(arena->window_files(), n - 2);
  EXPECT_EQ(WindowFileNames().size(), arena->window_files());
  EXPECT_GE(StoredBytes(arena_file), stored_before + p.bytes)
      << "the arena file did not take the reclaimed range back";
  EXPECT_GE(StoredBytes(arena_file), arena->size() - arena->window_files() * kMiB);
  Fill(arena->Bytes(p), 99);
  // The range is the arena file's again, and what it holds now does not
  // reach the descriptors of the windows that were there.
  UniqueFd arena_fd(::open(arena_file.c_str(), O_RDONLY | O_CLOEXEC));
  EXPECT_EQ(PreadAll(arena_fd.get(), p.bytes, p.offset), Pattern(p.bytes, 99));
  for (size_t i = 0; i < n; ++i) {
    const ArenaExtent& w = windows[i];
    if (w.offset < p.offset + p.bytes && p.offset < w.offset + w.bytes) {
      EXPECT_FALSE(Exists(WindowPath(w.offset))) << "the range of " << w.offset << " is in use";
      EXPECT_EQ(PreadAll(trainer_fds[i].get(), w.bytes), Pattern(w.bytes, static_cast<uint8_t>(i)))
          << "a trainer's old window shows what the range holds now";
    }
  }
  EXPECT_EQ(arena->free_bytes(), arena->data_bytes() - p.bytes);

  // A window of another owner: a spare is reclaimed for it and the old
  // file's id no longer opens there.
  const size_t files_before = arena->window_files();
  const ArenaExtent b = *arena->AllocateWindow(kMiB, Owner(1));
  EXPECT_EQ(arena->window_files(), files_before);  // one spare went, one window came
  EXPECT_EQ(WindowFileNames().size(), arena->window_files());
  const uint64_t b_id = *arena->WindowFileId(b);
  for (size_t i = 0; i < n; ++i) {
    EXPECT_NE(b_id, ids[i]);
    if (windows[i].offset == b.offset) {
      EXPECT_EQ(arena->OpenWindow(b, ids[i], false).status().code(), absl::StatusCode::kNotFound);
    }
  }
  EXPECT_TRUE(arena->OpenWindow(b, b_id, false).ok());
  EXPECT_CONSISTENT(arena);

  // The spares left are still the owner's, with their bytes.
  const ArenaExtent a = *arena->AllocateWindow(kMiB, Owner(0));
  bool found = false;
  for (size_t i = 0; i < n; ++i) {
    if (windows[i].offset != a.offset) continue;
    found = true;
    EXPECT_EQ(*arena->WindowFileId(a), ids[i]);
    EXPECT_EQ(Copy(arena->Bytes(a)), Pattern(kMiB, static_cast<uint8_t>(i)));
  }
  EXPECT_TRUE(found) << "owner 0 got a fresh window while it had spares";
  EXPECT_EQ(Copy(arena->Bytes(p)), Pattern(p.bytes, 99));
  EXPECT_CONSISTENT(arena);

  // Nothing left to reclaim: the arena is full again.
  while (arena->AllocateWindow(kMiB, Owner(2)).ok()) {
  }
  EXPECT_EQ(arena->Allocate(kMiB).status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(arena->window_files(), WindowFileNames().size());
  EXPECT_CONSISTENT(arena);
}

// A restarted daemon finds its windows again by their files; the ones nobody
// claims go back to the arena.
TEST_F(ArenaTest, WindowsSurviveARestartAndUnclaimedOnesAreDropped) {
  ArenaExtent kept, dropped, spare;
  uint32_t record;
  {
    auto arena = *Arena::Open(Opts());
    kept = *arena->AllocateWindow(3 * 4096, Owner(0));
    dropped = *arena->AllocateWindow(2 * 4096, Owner(1));
    spare = *arena->AllocateWindow(4096, Owner(2));
    Fill(arena->Bytes(kept), 1);
    Fill(arena->Bytes(dropped), 2);
    arena->Free(spare);
    record = *arena->AddRecord(RecordKind::kRank, {reinterpret_cast<const uint8_t*>("rank 0"), 6});
  }
  auto arena = *Arena::Open(Opts());
  EXPECT_TRUE(arena->adopted());
  EXPECT_EQ(arena->window_files(), 3u);
  EXPECT_CONSISTENT(arena);
  auto records = arena->TakeAdoptedRecords(RecordKind::kRank);
  ASSERT_EQ(records.size(), 1u);
  EXPECT_EQ(records[0].id, record);
  EXPECT_EQ(std::string(records[0].bytes.begin(), records[0].bytes.end()), "rank 0");

  // Only the exact extent of a window file is its window.
  EXPECT_EQ(arena->Reserve({kept.offset, kept.bytes - 4096}, Owner(0)).code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(arena->Reserve({kept.offset + 4096, 4096}, Owner(0)).code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(arena->Reserve(kept).code(), absl::StatusCode::kFailedPrecondition);  // no owner
  ASSERT_TRUE(arena->Reserve(kept, Owner(0)).ok());
  EXPECT_EQ(arena->Reserve(kept, Owner(0)).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(Copy(arena->Bytes(kept)), Pattern(kept.bytes, 1));
  const uint64_t id = *arena->WindowFileId(kept);
  Arena::WindowFile ro = *arena->OpenWindow(kept, id, false);
  EXPECT_EQ(PreadAll(ro.fd.get(), kept.bytes), Pattern(kept.bytes, 1));
  EXPECT_EQ(FdStat(ro.fd.get()).st_ino, Stat(WindowPath(kept.offset)).st_ino);
  EXPECT_CONSISTENT(arena);

  arena->DropUnclaimedRecords();
  EXPECT_EQ(arena->window_files(), 1u);
  EXPECT_TRUE(Exists(WindowPath(kept.offset)));
  EXPECT_FALSE(Exists(WindowPath(dropped.offset)));
  EXPECT_FALSE(Exists(WindowPath(spare.offset)));
  EXPECT_EQ(arena->free_bytes(), arena->data_bytes() - kept.bytes - records[0].extent.bytes);
  EXPECT_CONSISTENT(arena);
  // The dropped range is the arena's again; the kept window is its owner's
  // spare once freed.
  ASSERT_TRUE(arena->Reserve(dropped).ok());
  arena->Free(kept);
  EXPECT_EQ(arena->AllocateWindow(kept.bytes, Owner(0))->offset, kept.offset);
  EXPECT_EQ(*arena->WindowFileId(kept), id);
  EXPECT_CONSISTENT(arena);
}

// The arena file gives its pages under a window back, and a restart does
// not take them again: the node never holds a window's memory twice. (The
// background pass over the arena's pages, still running right after Open,
// must not take them back either.)
TEST_F(ArenaTest, ARestartDoesNotHoldAWindowsMemoryTwice) {
  ArenaExtent w;
  const std::string arena_file = dir_ + "/arena";
  uint64_t stored_before;
  {
    auto arena = *Arena::Open(Opts());
    const uint64_t fresh = StoredBytes(arena_file);
    w = *arena->AllocateWindow(2 * kMiB, Owner(0));
    Fill(arena->Bytes(w), 3);
    stored_before = StoredBytes(arena_file);
    EXPECT_LE(stored_before + w.bytes, fresh + 64 * 1024) << "the window's range was not given back";
  }
  auto arena = *Arena::Open(Opts());
  ASSERT_TRUE(arena->Reserve(w, Owner(0)).ok());
  EXPECT_EQ(Copy(arena->Bytes(w)), Pattern(w.bytes, 3));
  EXPECT_LT(StoredBytes(arena_file), stored_before + w.bytes / 2)
      << "the arena file holds the window's range again after the restart";
  EXPECT_CONSISTENT(arena);
}

// Open keeps only files that can be windows of this index: named w.<offset in
// lowercase hex>, regular, a whole number of pages, inside the data region,
// overlapping no record and no other window file.
TEST_F(ArenaTest, OpenRemovesFilesThatCannotBeWindows) {
  ArenaExtent w, r;
  {
    auto arena = *Arena::Open(Opts());
    w = *arena->AllocateWindow(2 * 4096, Owner(0));
    Fill(arena->Bytes(w), 5);
    ASSERT_TRUE(arena->AddRecord(RecordKind::kRank, {reinterpret_cast<const uint8_t*>("r"), 1}).ok());
    r = *arena->Allocate(4096);  // the record sits just before this
    r.offset -= 4096;
  }
  const uint64_t free_at = w.offset + 64 * 4096;  // free space, far from both
  WriteFile(dir_ + "/w.zz", 4096);
  WriteFile(dir_ + "/w.", 4096);
  WriteFile(WindowPath(4096), 4096);                    // in the header
  WriteFile(WindowPath(r.offset), 4096);                // over the record
  WriteFile(WindowPath(free_at), 100);                  // not whole pages
  WriteFile(WindowPath(free_at + 4096), 0);             // empty
  WriteFile(WindowPath(free_at + 3), 4096);             // not page-aligned
  WriteFile(WindowPath(8 * kMiB - 4096), 2 * 4096);     // past the end
  WriteFile(dir_ + "/w.0x" + WindowPath(free_at).substr(dir_.size() + 3), 4096);  // not how it is named
  WriteFile(dir_ + "/w.00" + WindowPath(free_at).substr(dir_.size() + 3), 4096);  // nor this
  std::filesystem::create_symlink(dir_ + "/arena", WindowPath(free_at + 8 * 4096));
  // Two that overlap each other in free space: at most one stays.
  WriteFile(WindowPath(free_at + 16 * 4096), 2 * 4096);
  WriteFile(WindowPath(free_at + 17 * 4096), 2 * 4096);

  auto arena = *Arena::Open(Opts());
  EXPECT_CONSISTENT(arena);
  const std::vector<std::string> left = WindowFileNames();
  EXPECT_EQ(left.size(), arena->window_files());
  const std::string w_name = WindowPath(w.offset).substr(dir_.size() + 1);
  const std::string a_name = WindowPath(free_at + 16 * 4096).substr(dir_.size() + 1);
  const std::string b_name = WindowPath(free_at + 17 * 4096).substr(dir_.size() + 1);
  ASSERT_EQ(left.size(), 2u) << ::testing::PrintToString(left);
  EXPECT_EQ(std::count(left.begin(), left.end(), w_name), 1);
  EXPECT_EQ(std::count(left.begin(), left.end(), a_name) + std::count(left.begin(), left.end(), b_name), 1);
  EXPECT_TRUE(Exists(dir_ + "/arena"));  // the symlink's target is untouched

  ASSERT_EQ(arena->TakeAdoptedRecords(RecordKind::kRank).size(), 1u);
  ASSERT_TRUE(arena->Reserve(w, Owner(0)).ok());
  EXPECT_EQ(Copy(arena->Bytes(w)), Pattern(w.bytes, 5));
  arena->DropUnclaimedRecords();
  EXPECT_EQ(WindowFileNames(), std::vector<std::string>{w_name});
  EXPECT_EQ(arena->free_bytes(), arena->data_bytes() - w.bytes - 4096);
  EXPECT_CONSISTENT(arena);
}

// An arena whose window bytes lie in the arena file (written before windows
// had files): reserving the extent with an owner moves them into a file.
TEST_F(ArenaTest, ReserveMovesAWindowHeldInTheArenaFileIntoAFile) {
  ArenaExtent e;
  {
    auto arena = *Arena::Open(Opts());
    e = *arena->Allocate(kMiB + 3 * 4096);
    Fill(arena->Bytes(e), 9);
    ASSERT_TRUE(arena->AddRecord(RecordKind::kRank, {reinterpret_cast<const uint8_t*>("r"), 1}).ok());
  }
  EXPECT_TRUE(WindowFileNames().empty());
  auto arena = *Arena::Open(Opts());
  EXPECT_EQ(arena->window_files(), 0u);
  const uint64_t stored_before = StoredBytes(dir_ + "/arena");
  ASSERT_TRUE(arena->Reserve(e, Owner(0)).ok());
  EXPECT_EQ(arena->window_files(), 1u);
  EXPECT_EQ(static_cast<uint64_t>(Stat(WindowPath(e.offset)).st_size), e.bytes);
  EXPECT_EQ(Copy(arena->Bytes(e)), Pattern(e.bytes, 9));
  const uint64_t id = *arena->WindowFileId(e);
  Arena::WindowFile ro = *arena->OpenWindow(e, id, false);
  EXPECT_EQ(PreadAll(ro.fd.get(), e.bytes), Pattern(e.bytes, 9));
  EXPECT_EQ(FdStat(ro.fd.get()).st_ino, Stat(WindowPath(e.offset)).st_ino);
  EXPECT_LE(StoredBytes(dir_ + "/arena") + e.bytes, stored_before + 64 * 1024)
      << "the arena file still holds the moved window's pages";
  // The daemon and the file see the same bytes from now on.
  arena->Bytes(e)[5] ^= 0xff;
  EXPECT_EQ(PreadAll(ro.fd.get(), e.bytes)[5], static_cast<uint8_t>(Pattern(e.bytes, 9)[5] ^ 0xff));
  EXPECT_EQ(arena->Reserve(e, Owner(0)).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_CONSISTENT(arena);
  arena->Free(e);  // a spare of its owner now
  EXPECT_EQ(arena->window_files(), 1u);
  EXPECT_CONSISTENT(arena);
}

// The node's tmpfs fills up (another process's files) while a trainer still
// maps a window the arena wants back: the range cannot be backed again, so
// it is remembered as a hole; an allocation over it is refused with the
// reason, not handed out to die of SIGBUS, and once memory is free again the
// same range is backed and works.
TEST_F(ArenaTest, AFullTmpfsLeavesAHoleThatIsRefusedUntilMemoryComesBack) {
  const std::string skip = MountTmpfs("size=4352k");
  if (!skip.empty()) GTEST_SKIP() << skip;

  auto arena = *Arena::Open(Opts(4 * kMiB));
  auto w = *arena->AllocateWindow(kMiB, Owner(0));
  Fill(arena->Bytes(w), 1);
  // The trainer keeps its descriptor: the window's pages stay taken.
  UniqueFd trainer = std::move(arena->OpenWindow(w, *arena->WindowFileId(w), false)->fd);
  arena->Free(w);  // a spare now
  // Someone else fills the tmpfs.
  UniqueFd fill(::open((dir_ + "/filler").c_str(), O_CREAT | O_RDWR, 0600));
  ASSERT_TRUE(fill.valid());
  std::vector<uint8_t> block(64 * 1024, 0x5a);
  while (::write(fill.get(), block.data(), block.size()) > 0) {
  }
  // Everything left needs the spare's range back, and it cannot be backed.
  auto refused = arena->Allocate(arena->free_bytes());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted) << refused.status();
  EXPECT_NE(refused.status().message().find("is full"), std::string::npos) << refused.status();
  EXPECT_CONSISTENT(arena);
  // Memory comes back: the same allocation succeeds and its pages hold.
  fill = UniqueFd();
  ::unlink((dir_ + "/filler").c_str());
  trainer = UniqueFd();
  const uint64_t all = arena->free_bytes();
  auto taken = arena->Allocate(all);
  ASSERT_TRUE(taken.ok()) << taken.status();
  Fill(arena->Bytes(*taken), 2);  // would die of SIGBUS over an unbacked hole
  EXPECT_EQ(Copy(arena->Bytes(*taken)), Pattern(all, 2));
  EXPECT_CONSISTENT(arena);
}

// Bytes of the mapping that starts at `start` (one line of
// /proc/self/smaps) mapped with huge-page entries of shared memory.
uint64_t HugeMappedBytes(const void* start) {
  std::ifstream smaps("/proc/self/smaps");
  char head[32];
  std::snprintf(head, sizeof(head), "%lx-", reinterpret_cast<unsigned long>(start));
  bool in = false;
  for (std::string line; std::getline(smaps, line);) {
    const bool header = !line.empty() && std::isxdigit(static_cast<unsigned char>(line[0])) &&
                        line.find('-') != std::string::npos && line.find(':') > line.find('-');
    if (header) {
      in = line.rfind(head, 0) == 0;
      continue;
    }
    unsigned long kib = 0;
    if (in && std::sscanf(line.c_str(), "ShmemPmdMapped: %lu kB", &kib) == 1) return kib << 10;
  }
  return 0;
}

// On a tmpfs mounted huge=within_size the arena places and sizes its windows
// on huge-page boundaries, after small records too, so that the daemon's
// mapping and a trainer's both map a window in huge pages (one entry per
// 2 MiB: on a virtual machine, the first touch of each 4 KiB page through a
// new mapping otherwise costs microseconds). The gaps alignment leaves stay
// free for small extents, and the bytes are the same through both mappings.
TEST_F(ArenaTest, OnAHugePageTmpfsWindowsAreAlignedAndMappedInHugePages) {
  const std::string skip = MountTmpfs("size=64m,huge=within_size");
  if (!skip.empty()) GTEST_SKIP() << skip;
  if (!DetectArenaPages(dir_).huge()) {
    GTEST_SKIP() << "this kernel gives a tmpfs no huge pages: " << DetectArenaPages(dir_).how;
  }
  auto arena = *Arena::Open(Opts(32 * kMiB));
  const uint64_t page = arena->pages().page_bytes;
  ASSERT_GE(page, 2 * kMiB) << arena->pages().how;
  EXPECT_EQ(reinterpret_cast<uintptr_t>(arena->base()) % page, 0u);
  // Below one huge page a window stays in 4 KiB pages, rather than take one.
  EXPECT_EQ(arena->WindowBytes(1), kArenaAlignBytes);
  EXPECT_EQ(arena->WindowBytes(64 << 10), 64u << 10);
  EXPECT_EQ(arena->WindowBytes(3 * kMiB + 1), 4 * kMiB);

  // A small record first, so that the first free byte is not on a boundary.
  const ArenaExtent record = *arena->Allocate(100);
  EXPECT_EQ(record.bytes, kArenaAlignBytes);
  const ArenaExtent w = *arena->AllocateWindow(3 * kMiB + 1, Owner(0));
  EXPECT_EQ(w.offset % page, 0u);
  EXPECT_EQ(w.bytes, 4 * kMiB);
  EXPECT_CONSISTENT(arena);
  // The gap before the window is free for small extents.
  const ArenaExtent small = *arena->Allocate(4096);
  EXPECT_LT(small.offset, w.offset);
  EXPECT_CONSISTENT(arena);

  Fill(arena->Bytes(w), 23);
  if (HugeMappedBytes(arena->Bytes(w).data()) == 0) {
    // The kernel falls back to base pages when it finds no free 2 MiB of
    // memory (it does not compact for a tmpfs); the placement is what the
    // arena controls, and it was checked above.
    GTEST_SKIP() << "the kernel gave the window base pages (memory fragmented)";
  }
  EXPECT_EQ(HugeMappedBytes(arena->Bytes(w).data()), w.bytes);
  Arena::WindowFile rw = *arena->OpenWindow(w, *arena->WindowFileId(w), /*writable=*/true);
  void* trainer = ::mmap(nullptr, rw.bytes, PROT_READ | PROT_WRITE, MAP_SHARED, rw.fd.get(), 0);
  ASSERT_NE(trainer, MAP_FAILED) << std::strerror(errno);
  EXPECT_EQ(Copy({static_cast<const uint8_t*>(trainer), w.bytes}), Pattern(w.bytes, 23));
  EXPECT_EQ(HugeMappedBytes(trainer), w.bytes);
  ::munmap(trainer, rw.bytes);

  // Freed, it is its owner's spare, and the next step of that size gets it.
  arena->Free(w);
  EXPECT_EQ(arena->AllocateWindow(4 * kMiB, Owner(0))->offset, w.offset);
  EXPECT_CONSISTENT(arena);
}

// A window a daemon with base pages left where a huge-page one would not put
// it (a restart after the tmpfs was remounted huge=within_size) serves the
// step that holds it, and then goes back to the arena instead of being kept
// as a spare: reused, it would never be mapped in huge pages.
TEST_F(ArenaTest, AWindowMadeBeforeHugePagesIsNotKeptOnceFreed) {
  const std::string skip = MountTmpfs("size=64m");
  if (!skip.empty()) GTEST_SKIP() << skip;
  ArenaExtent w;
  {
    auto arena = *Arena::Open(Opts(32 * kMiB));
    ASSERT_FALSE(arena->pages().huge()) << arena->pages().how;
    *arena->Allocate(100);  // a record first: the window starts off a 2 MiB boundary
    w = *arena->AllocateWindow(4 * kMiB, Owner(0));
    ASSERT_NE(w.offset % (2 * kMiB), 0u);
    Fill(arena->Bytes(w), 29);
  }
  ASSERT_EQ(::mount(nullptr, dir_.c_str(), nullptr, MS_REMOUNT, "size=64m,huge=within_size"), 0)
      << std::strerror(errno);
  auto arena = *Arena::Open(Opts(32 * kMiB));
  if (!arena->pages().huge()) GTEST_SKIP() << arena->pages().how;
  // The step that holds it is adopted, and reads what was written.
  ASSERT_TRUE(arena->Reserve(w, Owner(0)).ok());
  EXPECT_EQ(Copy(arena->Bytes(w)), Pattern(w.bytes, 29));
  const size_t files = arena->window_files();
  arena->Free(w);
  EXPECT_EQ(arena->window_files(), files - 1);
  EXPECT_FALSE(Exists(WindowPath(w.offset)));
  const ArenaExtent next = *arena->AllocateWindow(4 * kMiB, Owner(0));
  EXPECT_EQ(next.offset % arena->pages().page_bytes, 0u);
  EXPECT_CONSISTENT(arena);
}

// A hugetlbfs directory is refused with the way to get huge pages instead:
// its files cannot be resized and written as the arena's window files are.
TEST_F(ArenaTest, AHugetlbfsDirectoryIsRefusedWithTheTmpfsToUseInstead) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root, to mount a hugetlbfs";
  if (::unshare(CLONE_NEWNS) != 0 ||
      ::mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0) {
    GTEST_SKIP() << "cannot make a mount namespace: " << std::strerror(errno);
  }
  std::filesystem::create_directories(dir_);
  if (::mount("hugetlbfs", dir_.c_str(), "hugetlbfs", 0, nullptr) != 0) {
    GTEST_SKIP() << "cannot mount a hugetlbfs here: " << std::strerror(errno);
  }
  mounted_ = true;
  auto arena = Arena::Open(Opts());
  EXPECT_EQ(arena.status().code(), absl::StatusCode::kFailedPrecondition) << arena.status();
  EXPECT_NE(arena.status().message().find("huge=within_size"), std::string::npos)
      << arena.status();
  EXPECT_FALSE(Exists(dir_ + "/arena"));
}

// A trainer that truncates its window: the daemon reads zeros instead of
// dying, and the window's memory goes back to the arena when it is freed.
TEST_F(ArenaTest, ATruncatedWindowReadsAsZerosAndIsNotKept) {
  auto arena = *Arena::Open(Opts());
  const ArenaExtent w = *arena->AllocateWindow(4 * 4096, Owner(0));
  Fill(arena->Bytes(w), 13);
  const uint64_t id = *arena->WindowFileId(w);
  Arena::WindowFile rw = *arena->OpenWindow(w, id, /*writable=*/true);
  const uint64_t replaced_before = SigbusPagesReplaced();
  ASSERT_EQ(::ftruncate(rw.fd.get(), 4096), 0);  // the first page stays

  const volatile uint8_t* p = arena->Bytes(w).data();
  EXPECT_EQ(p[7], Pattern(8, 13)[7]);
  for (uint64_t i = 4096; i < w.bytes; i += 1000) ASSERT_EQ(p[i], 0) << "at " << i;
  // The background first writes may have faulted on a cut page first, and
  // be between its zero page and its count (at idle priority).
  for (int i = 0; i < 1000 && SigbusPagesReplaced() - replaced_before < 3; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_GE(SigbusPagesReplaced() - replaced_before, 3u);

  const uint64_t free_before = arena->free_bytes();
  arena->Free(w);
  EXPECT_EQ(arena->window_files(), 0u);
  EXPECT_FALSE(Exists(WindowPath(w.offset)));
  EXPECT_EQ(arena->free_bytes(), free_before + w.bytes);
  EXPECT_CONSISTENT(arena);

  // The range is the arena file's again: written and read like any other.
  const ArenaExtent again = *arena->AllocateWindow(4 * 4096, Owner(0));
  EXPECT_NE(*arena->WindowFileId(again), id);
  Fill(arena->Bytes(again), 17);
  Arena::WindowFile ro = *arena->OpenWindow(again, *arena->WindowFileId(again), false);
  EXPECT_EQ(PreadAll(ro.fd.get(), again.bytes), Pattern(again.bytes, 17));
  const ArenaExtent all = *arena->Allocate(arena->free_bytes());
  Fill(arena->Bytes(all), 19);
  EXPECT_EQ(Copy(arena->Bytes(all)), Pattern(all.bytes, 19));
  EXPECT_CONSISTENT(arena);
}

// A trainer keeps its descriptor of a window after the daemon frees it (the
// window is a spare, its mapping stays valid), and may truncate it then. A
// spare must not be handed back as it is: the daemon's writes to it would
// land in the SIGBUS guard's private pages and never reach the file.
TEST_F(ArenaTest, ASpareTruncatedAfterItsFreeIsNotHandedBack) {
  auto arena = *Arena::Open(Opts());
  const ArenaExtent w = *arena->AllocateWindow(2 * 4096, Owner(0));
  Arena::WindowFile rw = *arena->OpenWindow(w, *arena->WindowFileId(w), /*writable=*/true);
  arena->Free(w);
  ASSERT_EQ(::ftruncate(rw.fd.get(), 0), 0);

  const ArenaExtent again = *arena->AllocateWindow(2 * 4096, Owner(0));
  Fill(arena->Bytes(again), 21);  // must not crash either way
  Arena::WindowFile ro = *arena->OpenWindow(again, *arena->WindowFileId(again), false);
  EXPECT_EQ(static_cast<uint64_t>(FdStat(ro.fd.get()).st_size), again.bytes);
  EXPECT_EQ(PreadAll(ro.fd.get(), again.bytes), Pattern(again.bytes, 21))
      << "the daemon's bytes did not reach the window file";
  EXPECT_CONSISTENT(arena);
}

// Random private extents and windows of a few owners and sizes, checked
// against a model: the bookkeeping stays consistent, a window comes back
// (same file) only to its owner at its size and with its bytes, and no
// extent's bytes are changed by anyone else.
TEST_F(ArenaTest, RandomWindowsAndExtentsKeepTheArenaConsistent) {
  uint64_t seed = std::random_device{}();
  if (const char* s = std::getenv("ARENA_TEST_SEED")) seed = std::strtoull(s, nullptr, 10);
  std::printf("ArenaTest.RandomWindowsAndExtentsKeepTheArenaConsistent seed %lu "
              "(ARENA_TEST_SEED=%lu replays it)\n",
              static_cast<unsigned long>(seed), static_cast<unsigned long>(seed));
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  auto arena = *Arena::Open(Opts());
  struct Held {
    ArenaExtent e;
    uint8_t tag;
    bool window;
    uint32_t owner;
    uint64_t file_id;
  };
  std::vector<Held> held;
  // Windows freed: file id -> what it was, to check a reuse against.
  std::map<uint64_t, Held> spares;
  std::set<uint64_t> ids_seen;
  auto intact = [&](const Held& h) {
    const auto bytes = arena->Bytes(h.e);
    for (size_t i = 0; i < bytes.size(); i += 509) {
      if (bytes[i] != static_cast<uint8_t>(h.tag + i / 4096)) return false;
    }
    return true;
  };
  auto fill = [&](const Held& h) {
    uint8_t* p = arena->Bytes(h.e).data();
    for (uint64_t page = 0; page < h.e.bytes / 4096; ++page) {
      std::memset(p + page * 4096, static_cast<uint8_t>(h.tag + page), 4096);
    }
  };
  int reused = 0;
  for (int op = 0; op < 600; ++op) {
    const int what = static_cast<int>(rng() % 10);
    if (what < 3) {
      Held h{};
      h.window = true;
      h.owner = static_cast<uint32_t>(rng() % 3);
      const uint64_t want = (1 + rng() % 3) * 300 * 1024;
      auto e = arena->AllocateWindow(want, Owner(h.owner));
      if (!e.ok()) {
        ASSERT_EQ(e.status().code(), absl::StatusCode::kResourceExhausted) << e.status();
        continue;
      }
      h.e = *e;
      h.file_id = *arena->WindowFileId(*e);
      auto old = spares.find(h.file_id);
      if (old != spares.end()) {
        ++reused;
        ASSERT_EQ(old->second.owner, h.owner) << "another owner's spare was handed out";
        ASSERT_EQ(old->second.e.offset, h.e.offset);
        ASSERT_EQ(old->second.e.bytes, h.e.bytes);
        ASSERT_TRUE(intact(old->second)) << "a spare's pages changed while it was spare";
        spares.erase(old);
      } else {
        ASSERT_TRUE(ids_seen.insert(h.file_id).second) << "file id " << h.file_id << " reused";
      }
      h.tag = static_cast<uint8_t>(rng());
      fill(h);
      held.push_back(h);
    } else if (what < 5) {
      Held h{};
      auto e = arena->Allocate(1 + rng() % kMiB);
      if (!e.ok()) {
        ASSERT_EQ(e.status().code(), absl::StatusCode::kResourceExhausted) << e.status();
        continue;
      }
      h.e = *e;
      h.tag = static_cast<uint8_t>(rng());
      fill(h);
      held.push_back(h);
    } else if (!held.empty()) {
      const size_t i = rng() % held.size();
      ASSERT_TRUE(intact(held[i])) << "extent [" << held[i].e.offset << ", +" << held[i].e.bytes
                                   << ") was written by another owner";
      if (held[i].window) {
        Arena::WindowFile ro = *arena->OpenWindow(held[i].e, held[i].file_id, false);
        ASSERT_EQ(PreadAll(ro.fd.get(), held[i].e.bytes), Copy(arena->Bytes(held[i].e)));
        spares[held[i].file_id] = held[i];
      }
      arena->Free(held[i].e);
      held[i] = held.back();
      held.pop_back();
    }
    const absl::Status consistent = arena->CheckConsistency();
    ASSERT_TRUE(consistent.ok()) << "after operation " << op << ": " << consistent;
    ASSERT_EQ(WindowFileNames().size(), arena->window_files()) << "after operation " << op;
  }
  std::printf("%d spares reused\n", reused);
  for (const Held& h : held) {
    ASSERT_TRUE(intact(h));
    arena->Free(h.e);
  }
  EXPECT_CONSISTENT(arena);
  EXPECT_EQ(arena->free_bytes(), arena->data_bytes());
  // Everything fits again once the spares are given up.
  ASSERT_TRUE(arena->Allocate(arena->data_bytes()).ok());
  EXPECT_EQ(arena->window_files(), 0u);
  EXPECT_TRUE(WindowFileNames().empty());
}

}  // namespace
}  // namespace ecsnap::daemon
