#include "common/sigbus_guard.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>

#include "absl/base/attributes.h"
#include "absl/cleanup/cleanup.h"
#include "common/unique_fd.h"
#include "gtest/gtest.h"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

namespace ecsnap {
namespace {

constexpr size_t kPage = 4096;

// A 4-page tmpfs file, mapped shared and filled with 0x5a, then unlinked.
struct SharedFile {
  UniqueFd fd;
  Mapping map;
};

SharedFile MakeShared() {
  const std::string path = "/dev/shm/ecsnap-sigbus-test." + std::to_string(::getpid());
  SharedFile f;
  f.fd = UniqueFd(::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600));
  ::unlink(path.c_str());
  EXPECT_TRUE(f.fd.valid());
  EXPECT_EQ(::ftruncate(f.fd.get(), 4 * kPage), 0);
  void* p = ::mmap(nullptr, 4 * kPage, PROT_READ | PROT_WRITE, MAP_SHARED, f.fd.get(), 0);
  EXPECT_NE(p, MAP_FAILED);
  f.map = Mapping(p, 4 * kPage);
  for (size_t i = 0; i < 4 * kPage; ++i) f.map.data()[i] = 0x5a;
  return f;
}

TEST(SigbusGuard, AShrunkFileReadsAsZerosInsideTheRange) {
  SharedFile f = MakeShared();
  ASSERT_TRUE(GuardAgainstSigbus(f.map.data(), f.map.size()));
  const uint64_t before = SigbusPagesReplaced();
  // Another holder of the file cuts it to one page: pages 1-3 are gone.
  ASSERT_EQ(::ftruncate(f.fd.get(), kPage), 0);
  volatile uint8_t* p = f.map.data();
  EXPECT_EQ(p[0], 0x5a);               // still in the file
  EXPECT_EQ(p[kPage + 7], 0);          // replaced by a zero page
  p[2 * kPage] = 1;                    // a write goes to a private page
  EXPECT_EQ(p[2 * kPage], 1);
  EXPECT_EQ(SigbusPagesReplaced() - before, 2u);
  UnguardSigbus(f.map.data());
}

// A thread keeps reading a page whose file is cut, while this one maps a
// fresh file there and writes it: the reader's zero page must never land on
// the fresh mapping (a plain MAP_FIXED between the reader's fault and its
// handler's zero page lost the write, now and then).
// Reads `page` until `stop`; beside the writes of the test on purpose, so
// ThreadSanitizer is told not to watch it.
ABSL_ATTRIBUTE_NO_SANITIZE_THREAD
void ReadUntilStopped(volatile uint8_t* page, const std::atomic<bool>* stop) {
  while (!stop->load(std::memory_order_relaxed)) (void)page[64];
}

TEST(SigbusGuard, ARemapIsNeverCoveredByAZeroPageMeantForTheOldMapping) {
  SharedFile f = MakeShared();
  if (::madvise(f.map.data(), kPage, MADV_POPULATE_WRITE) != 0 && errno == EINVAL) {
    GTEST_SKIP() << "this kernel has no MADV_POPULATE_WRITE (Linux 5.14): the handler cannot "
                    "tell a new mapping from the old one";
  }
  ASSERT_TRUE(GuardAgainstSigbus(f.map.data(), f.map.size()));
  volatile uint8_t* page = f.map.data() + kPage;
  std::atomic<bool> stop{false};
  std::thread reader(ReadUntilStopped, page, &stop);
  // An assertion that fails returns with the reader still running.
  absl::Cleanup join = [&] {
    stop = true;
    reader.join();
    UnguardSigbus(f.map.data());
  };
  const uint64_t before = SigbusPagesReplaced();
  int lost = 0, rounds = 0;
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  for (; rounds < 20000 && std::chrono::steady_clock::now() < until; ++rounds) {
    UniqueFd cut(::memfd_create("ecsnap-sigbus-cut", MFD_CLOEXEC));
    UniqueFd fresh(::memfd_create("ecsnap-sigbus-fresh", MFD_CLOEXEC));
    ASSERT_TRUE(cut.valid() && fresh.valid());
    ASSERT_EQ(::ftruncate(cut.get(), kPage), 0);
    ASSERT_EQ(::ftruncate(fresh.get(), kPage), 0);
    ASSERT_NE(RemapGuarded(const_cast<uint8_t*>(page), kPage, cut.get(), 0), MAP_FAILED);
    ASSERT_EQ(::ftruncate(cut.get(), 0), 0);  // the reader faults from here on
    std::this_thread::yield();
    ASSERT_NE(RemapGuarded(const_cast<uint8_t*>(page), kPage, fresh.get(), 0), MAP_FAILED);
    std::memset(const_cast<uint8_t*>(page), 0xab, kPage);
    uint8_t back[kPage];
    ASSERT_EQ(::pread(fresh.get(), back, kPage, 0), static_cast<ssize_t>(kPage));
    lost += back[0] != 0xab || back[kPage - 1] != 0xab;
  }
  std::move(join).Invoke();
  const uint64_t zero_pages = SigbusPagesReplaced() - before;
  std::printf("%d rounds, %lu zero pages, %d writes lost\n", rounds,
              static_cast<unsigned long>(zero_pages), lost);
  EXPECT_EQ(lost, 0);
  EXPECT_GT(zero_pages, 0u) << "the reader never faulted on a cut page: nothing was tested";
}

TEST(SigbusGuard, OutsideTheRangeTheProcessStillDies) {
  SharedFile guarded = MakeShared();
  SharedFile other = MakeShared();
  ASSERT_TRUE(GuardAgainstSigbus(guarded.map.data(), guarded.map.size()));
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    if (::ftruncate(other.fd.get(), 0) != 0) ::_exit(2);
    volatile uint8_t x = other.map.data()[kPage];
    (void)x;
    ::_exit(0);  // not reached: the read above is a SIGBUS
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFSIGNALED(status)) << "child exited with " << status;
  EXPECT_EQ(WTERMSIG(status), SIGBUS);
  UnguardSigbus(guarded.map.data());
}

}  // namespace
}  // namespace ecsnap
