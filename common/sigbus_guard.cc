#include "common/sigbus_guard.h"

#include <errno.h>
#include <signal.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <mutex>

namespace ecsnap {
namespace {

// Read by the handler: plain atomics, nothing that allocates or locks.
// A range is live while its end is non-zero; a slot is claimed by setting
// its base under g_mu and published by setting its end last.
struct Range {
  std::atomic<uintptr_t> base{0};
  std::atomic<uintptr_t> end{0};
};
Range g_ranges[kMaxSigbusRanges];
std::atomic<uint64_t> g_replaced{0};
std::mutex g_mu;

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

// The handler and RemapGuarded exclude each other (sequentially consistent
// counters, no locks: the handler may not take one). A handler counts itself
// in `g_handling`, then looks at `g_remapping`; a remap counts itself in
// `g_remapping`, then waits for `g_handling` to be zero. So either the
// handler sees the remap and backs off, or the remap waits for the handler,
// and the mapping a handler looks at cannot change under it.
std::atomic<int> g_handling{0};
std::atomic<int> g_remapping{0};

void Nap() {
  const timespec ts{0, 20000};  // 20 us: a waiter gives its core away
  ::nanosleep(&ts, nullptr);
}

bool Guarded(uintptr_t at) {
  for (const Range& r : g_ranges) {
    const uintptr_t end = r.end.load();
    if (end != 0 && at >= r.base.load() && at < end) return true;
  }
  return false;
}

// What the handler does with a fault past the end of a file at `at`.
enum class Outcome { kRetry, kReplaced, kNotOurs };

Outcome Handle(uintptr_t at) {
  // Counted before the range is looked up: UnguardSigbus waits for the
  // handlers it could not have told about the range going.
  g_handling.fetch_add(1);
  if (!Guarded(at)) {
    g_handling.fetch_sub(1);
    return Outcome::kNotOurs;
  }
  if (g_remapping.load() != 0) {
    // The page is being mapped anew: the access runs again once that is
    // done, on the new mapping (and comes back here if it faults still).
    g_handling.fetch_sub(1);
    while (g_remapping.load() != 0) Nap();
    return Outcome::kRetry;
  }
  // The mapping at `p` holds still until g_handling drops. It may have been
  // replaced between the fault and here (a window freed, a new one made): a
  // zero page now would hide the new window's page from this process. So
  // only a page that still cannot be had (EFAULT: a SIGBUS on access) is
  // replaced. The probe allocates what the faulting access would have and
  // writes nothing. Any other failure (ENOMEM of a memory cgroup, a
  // poisoned page) is left to the access itself, run again. A kernel
  // without the probe (EINVAL, before Linux 5.14) replaces the page as
  // earlier releases did, race and all.
  const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  void* p = reinterpret_cast<void*>(at & ~(page - 1));
  int rc;
  do {
    rc = ::madvise(p, page, MADV_POPULATE_WRITE);
  } while (rc != 0 && errno == EINTR);
  Outcome out = Outcome::kRetry;
  if (rc != 0 && (errno == EFAULT || errno == EINVAL)) {
    out = ::mmap(p, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1,
                 0) != MAP_FAILED
              ? Outcome::kReplaced
              : Outcome::kNotOurs;
    if (out == Outcome::kReplaced) g_replaced.fetch_add(1, std::memory_order_relaxed);
  }
  g_handling.fetch_sub(1);
  return out;
}

void OnSigbus(int sig, siginfo_t* info, void*) {
  // BUS_ADRERR: the page is past the end of its file. A hardware memory
  // error (BUS_MCEERR_*) is not ours to hide.
  if (info->si_code == BUS_ADRERR) {
    const int saved_errno = errno;
    const Outcome out = Handle(reinterpret_cast<uintptr_t>(info->si_addr));
    errno = saved_errno;
    // The faulting access runs again: on the zero page, or on whatever is
    // mapped there now.
    if (out != Outcome::kNotOurs) return;
  }
  // Not ours (or no page to be had): the default action, as if unguarded.
  struct sigaction dfl;
  std::memset(&dfl, 0, sizeof(dfl));
  dfl.sa_handler = SIG_DFL;
  ::sigaction(sig, &dfl, nullptr);
}

}  // namespace

bool GuardAgainstSigbus(void* base, size_t bytes) {
  static std::once_flag installed;
  std::call_once(installed, [] {
    struct sigaction sa;
    std::memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = OnSigbus;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    ::sigaction(SIGBUS, &sa, nullptr);
  });
  const uintptr_t b = reinterpret_cast<uintptr_t>(base);
  std::lock_guard<std::mutex> lock(g_mu);
  for (Range& r : g_ranges) {
    if (r.end.load(std::memory_order_relaxed) != 0) continue;
    r.base.store(b);
    r.end.store(b + bytes);
    return true;
  }
  return false;
}

void UnguardSigbus(void* base) {
  const uintptr_t b = reinterpret_cast<uintptr_t>(base);
  std::lock_guard<std::mutex> lock(g_mu);
  for (Range& r : g_ranges) {
    if (r.end.load(std::memory_order_relaxed) != 0 && r.base.load(std::memory_order_relaxed) == b) {
      r.end.store(0);
    }
  }
  // A handler that found the range before it went may still map its zero
  // page: the caller unmaps the range (and may map something else there)
  // only once none is left.
  while (g_handling.load() != 0) Nap();
}

void* RemapGuarded(void* addr, size_t bytes, int fd, off_t offset) {
  g_remapping.fetch_add(1);
  while (g_handling.load() != 0) Nap();
  void* got = ::mmap(addr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, offset);
  const int err = errno;
  g_remapping.fetch_sub(1);
  errno = err;
  return got;
}

uint64_t SigbusPagesReplaced() { return g_replaced.load(std::memory_order_relaxed); }

}  // namespace ecsnap
