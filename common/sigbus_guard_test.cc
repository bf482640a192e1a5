#include "common/sigbus_guard.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <string>

#include "common/unique_fd.h"
#include "gtest/gtest.h"

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
