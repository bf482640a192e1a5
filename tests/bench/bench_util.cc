#include "tests/bench/bench_util.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "tests/harness.h"


namespace ecsnap::bench {

double Seconds(const std::function<void()>& fn) {
  const auto t0 = std::chrono::steady_clock::now();
  fn();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

double Best(int reps, const std::function<void()>& fn) {
  double best = 1e30;
  for (int i = 0; i < reps; ++i) best = std::min(best, Seconds(fn));
  return best;
}

void CheckOk(const absl::Status& st, const char* bench, const char* what) {
  if (!st.ok()) {
    std::fprintf(stderr, "%s: %s: %s\n", bench, what, std::string(st.message()).c_str());
    std::exit(1);
  }
}

uint64_t AvailableBytes() {
  std::ifstream in("/proc/meminfo");
  std::string key, unit;
  uint64_t kib = 0;
  while (in >> key >> kib >> unit) {
    if (key == "MemAvailable:") return kib * 1024;
  }
  return 0;
}

void RefuseUnlessMemoryFor(uint64_t need, const char* bench) {
  const uint64_t have = AvailableBytes();
  if (have != 0 && need > have / 10 * 9) {
    std::fprintf(stderr,
                 "%s: this size needs about %.1f GiB of memory but %.1f GiB is available; "
                 "pass a smaller --bytes\n",
                 bench, need / 1073741824.0, have / 1073741824.0);
    std::exit(2);
  }
}

void RemoveWhenGone(const std::string& dir) {
  int fds[2];
  if (::pipe(fds) != 0) return;
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::close(fds[1]);
    ::setsid();  // not killed with the bench's process group
    char c;
    while (::read(fds[0], &c, 1) > 0) {
    }
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
    ::_exit(0);
  }
  ::close(fds[0]);  // the write end stays open, close-on-exec, until we die
  ::fcntl(fds[1], F_SETFD, FD_CLOEXEC);
}

void PutArenasOn(const std::string& arena_pages, const std::string& dir) {
  if (arena_pages == "base") {
    std::printf("arenas in the pages of /dev/shm\n");
  } else if (arena_pages == "huge") {
    if (const std::string why = testing::MountHugeTmpfs(dir); !why.empty()) {
      std::printf("arenas in the pages of /dev/shm: no huge-page tmpfs (%s)\n", why.c_str());
    } else {
      std::printf("arenas on a tmpfs mounted huge=within_size\n");
    }
  } else {
    std::fprintf(stderr, "--arena_pages is huge or base, not %s\n", arena_pages.c_str());
    std::exit(2);
  }
}

}  // namespace ecsnap::bench
