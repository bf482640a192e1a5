#include "daemon/service/admin_auth.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <string>

#include "gtest/gtest.h"

namespace ecsnap::daemon {
namespace {

std::string Dir() { return std::string(std::getenv("TEST_TMPDIR")); }

TEST(AdminTokenTest, MadeOnceInItsOwnDirectoryReadableByItsOwnerOnly) {
  const std::string path = Dir() + "/fresh/admin.token";
  bool created = false;
  auto first = LoadOrCreateSecret("admin token file", path, &created);
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_TRUE(created);
  EXPECT_EQ(first->size(), 64u);
  struct stat st {};
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  auto again = LoadOrCreateSecret("admin token file", path, &created);
  ASSERT_TRUE(again.ok());
  EXPECT_FALSE(created);
  EXPECT_EQ(*again, *first);
}

TEST(AdminTokenTest, FilesOthersCouldReadOrRedirectAreRefused) {
  bool created = false;
  const std::string open = Dir() + "/open.token";
  std::ofstream(open) << "secret\n";
  ::chmod(open.c_str(), 0644);
  auto st = LoadOrCreateSecret("admin token file", open, &created);
  EXPECT_EQ(st.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(st.status().message().find("chmod 600"), std::string::npos) << st.status();
  // A link, dangling or not, is never followed (nor written through).
  const std::string link = Dir() + "/link.token";
  ASSERT_EQ(::symlink((Dir() + "/elsewhere").c_str(), link.c_str()), 0);
  st = LoadOrCreateSecret("admin token file", link, &created);
  EXPECT_EQ(st.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(st.status().message().find("symbolic link"), std::string::npos) << st.status();
  EXPECT_NE(::access((Dir() + "/elsewhere").c_str(), F_OK), 0);
  // Empty.
  const std::string empty = Dir() + "/empty.token";
  std::ofstream(empty).close();
  ::chmod(empty.c_str(), 0600);
  EXPECT_NE(LoadOrCreateSecret("admin token file", empty, &created).status().message().find("is empty"),
            std::string::npos);
  // Longer than one token: refused, not cut to a prefix that would differ
  // from what a client reading the whole file sends.
  const std::string longer = Dir() + "/long.secret";
  std::ofstream(longer) << std::string(300, 'a') << "\n";
  ::chmod(longer.c_str(), 0600);
  st = LoadOrCreateSecret("job secret file", longer, &created);
  EXPECT_EQ(st.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(st.status().message().find("job secret file " + longer + " is longer than 256 bytes"),
            std::string::npos)
      << st.status();
}

}  // namespace
}  // namespace ecsnap::daemon
