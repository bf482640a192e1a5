#include "daemon/store/arena_pages.h"

#include <string>

#include "gtest/gtest.h"

namespace ecsnap::daemon {
namespace {

// As /proc/self/mountinfo prints them (a container's, trimmed).
constexpr char kMountInfo[] =
    "600 500 0:50 / / rw,relatime - overlay overlay rw,lowerdir=/l,upperdir=/u,workdir=/w\n"
    "601 600 0:52 / /dev rw,nosuid - tmpfs tmpfs rw,size=65536k,mode=755\n"
    "602 601 0:53 / /dev/shm rw,nosuid,nodev - tmpfs shm rw,size=24683756k\n"
    "603 602 0:60 / /dev/shm/ecsnap rw,relatime shared:7 - tmpfs tmpfs "
    "rw,size=8388608k,mode=700,huge=within_size\n"
    "604 600 0:61 / /mnt/with\\040space rw - tmpfs tmpfs rw,huge=always\n"
    "605 602 0:62 / /dev/shm rw - tmpfs tmpfs rw,huge=always\n";

TEST(ArenaPagesTest, TheMountHoldingAPathIsTheLongestMountPointAboveIt) {
  EXPECT_EQ(SuperOptionsOf(kMountInfo, "/dev/shm/ecsnap/slot0").value_or("?"),
            "rw,size=8388608k,mode=700,huge=within_size");
  EXPECT_EQ(SuperOptionsOf(kMountInfo, "/dev/shm/ecsnap").value_or("?"),
            "rw,size=8388608k,mode=700,huge=within_size");
  // /dev/shm/ecsnapx is not under /dev/shm/ecsnap; of the two /dev/shm
  // mounts, the later one is on top.
  EXPECT_EQ(SuperOptionsOf(kMountInfo, "/dev/shm/ecsnapx").value_or("?"), "rw,huge=always");
  EXPECT_EQ(SuperOptionsOf(kMountInfo, "/mnt/with space/a").value_or("?"), "rw,huge=always");
  EXPECT_EQ(SuperOptionsOf(kMountInfo, "/var/tmp").value_or("?"),
            "rw,lowerdir=/l,upperdir=/u,workdir=/w");
  // The device decides when given: a mount hidden under a later one on a
  // parent path, or reached through a bind mount elsewhere, is found by it.
  EXPECT_EQ(SuperOptionsOf(kMountInfo, "/dev/shm/ecsnap", "0:62").value_or("?"),
            "rw,huge=always");
  EXPECT_EQ(SuperOptionsOf(kMountInfo, "/elsewhere", "0:60").value_or("?"),
            "rw,size=8388608k,mode=700,huge=within_size");
  EXPECT_EQ(SuperOptionsOf(kMountInfo, "/dev/shm/ecsnap", "9:9").value_or("?"),
            "rw,size=8388608k,mode=700,huge=within_size");
  // An empty source field (mount -t tmpfs '' dir) is a field all the same.
  EXPECT_EQ(SuperOptionsOf("700 600 0:70 / /x rw - tmpfs  rw,huge=always\n", "/x/y").value_or("?"),
            "rw,huge=always");
  EXPECT_FALSE(SuperOptionsOf("", "/dev/shm").has_value());
  EXPECT_FALSE(SuperOptionsOf("garbage without fields\n1 2 3\n", "/dev/shm").has_value());
}

constexpr char kNever[] = "always within_size advise [never] deny force\n";
constexpr uint64_t kPmd = 2 << 20;

TEST(ArenaPagesTest, HugeWithinSizeAndAlwaysGiveHugePages) {
  for (const char* options : {"rw,huge=within_size,size=1g", "rw,huge=always"}) {
    const ArenaPages p = TmpfsPages(options, kNever, kPmd, "/a");
    EXPECT_TRUE(p.huge()) << options;
    EXPECT_EQ(p.page_bytes, kPmd) << options;
    EXPECT_NE(p.how.find("tmpfs huge="), std::string::npos) << p.how;
  }
}

TEST(ArenaPagesTest, ATmpfsWithoutHugeOrWithAdviseHasBasePagesAndSaysHowToGetHuge) {
  for (const char* options : {"rw,size=1g", "rw,huge=never", "rw,huge=advise"}) {
    const ArenaPages p = TmpfsPages(options, kNever, kPmd, "/dev/shm/ecsnap");
    EXPECT_FALSE(p.huge()) << options;
    EXPECT_EQ(p.page_bytes, 4096u);
    EXPECT_NE(p.how.find("huge=within_size"), std::string::npos) << p.how;
  }
}

TEST(ArenaPagesTest, TheSystemSettingDenyOrForceWinsOverTheMount) {
  EXPECT_FALSE(TmpfsPages("rw,huge=always", "always within_size advise never [deny] force", kPmd,
                          "/a")
                   .huge());
  const ArenaPages forced =
      TmpfsPages("rw", "always within_size advise never deny [force]", kPmd, "/a");
  EXPECT_TRUE(forced.huge());
  EXPECT_NE(forced.how.find("force"), std::string::npos);
}

TEST(ArenaPagesTest, NoHugePageSizeMeansBasePages) {
  EXPECT_FALSE(TmpfsPages("rw,huge=always", kNever, 0, "/a").huge());
  EXPECT_FALSE(TmpfsPages("rw,huge=always", kNever, 4096, "/a").huge());
  EXPECT_FALSE(TmpfsPages("rw,huge=always", kNever, 3 << 20, "/a").huge());  // not a power of 2
  // arm64 with 64 KiB base pages: 512 MiB huge pages are not used.
  const ArenaPages too_large = TmpfsPages("rw,huge=always", kNever, 512u << 20, "/a");
  EXPECT_FALSE(too_large.huge());
  EXPECT_NE(too_large.how.find("too large"), std::string::npos) << too_large.how;
  // An older kernel without the setting file: the mount decides.
  EXPECT_TRUE(TmpfsPages("rw,huge=always", "", kPmd, "/a").huge());
}

TEST(ArenaPagesTest, DetectsThisMachinesDevShm) {
  // Whatever this machine has, the answer names it.
  const ArenaPages p = DetectArenaPages("/dev/shm");
  EXPECT_FALSE(p.how.empty());
  EXPECT_TRUE(p.page_bytes == 4096 || p.page_bytes >= (2u << 20)) << p.page_bytes;
  EXPECT_EQ(DetectArenaPages("/proc").how, "4 KiB pages: not a tmpfs");
}

}  // namespace
}  // namespace ecsnap::daemon
