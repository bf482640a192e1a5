#include "common/sigbus_guard.h"

#include <signal.h>
#include <sys/mman.h>
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

bool Guarded(uintptr_t at) {
  for (const Range& r : g_ranges) {
    const uintptr_t end = r.end.load(std::memory_order_acquire);
    if (end != 0 && at >= r.base.load(std::memory_order_relaxed) && at < end) return true;
  }
  return false;
}

void OnSigbus(int sig, siginfo_t* info, void*) {
  const uintptr_t at = reinterpret_cast<uintptr_t>(info->si_addr);
  // BUS_ADRERR: the page is past the end of its file. A hardware memory
  // error (BUS_MCEERR_*) is not ours to hide.
  if (info->si_code == BUS_ADRERR && Guarded(at)) {
    const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
    void* p = reinterpret_cast<void*>(at & ~(page - 1));
    if (::mmap(p, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) !=
        MAP_FAILED) {
      g_replaced.fetch_add(1, std::memory_order_relaxed);
      return;  // the faulting access runs again, on the zero page
    }
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
    r.base.store(b, std::memory_order_relaxed);
    r.end.store(b + bytes, std::memory_order_release);
    return true;
  }
  return false;
}

void UnguardSigbus(void* base) {
  const uintptr_t b = reinterpret_cast<uintptr_t>(base);
  std::lock_guard<std::mutex> lock(g_mu);
  for (Range& r : g_ranges) {
    if (r.end.load(std::memory_order_relaxed) != 0 && r.base.load(std::memory_order_relaxed) == b) {
      r.end.store(0, std::memory_order_release);
    }
  }
}

uint64_t SigbusPagesReplaced() { return g_replaced.load(std::memory_order_relaxed); }

}  // namespace ecsnap
