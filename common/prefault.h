// Populating a shared mapping for writing, so that no later write stalls.
//
// Measured on these machines (1 GiB of a fallocated tmpfs file, memcpy of
// 1 GiB into it; later copies take 0.07 s):
//   plain mmap                      first copy 3.38 s (262144 page faults)
//   MAP_POPULATE                    first copy 0.68 s (no faults)
//   MADV_POPULATE_WRITE             first copy 0.71 s (no faults)
//   a write to each page, then copy first copy 0.08 s
// Mapping the pages, even writable, is not enough: the first store through
// each page of *this mapping* still costs ~2.7 us (below the guest's fault
// counters; a virtualised page-table walk). So the pages are populated with
// MADV_POPULATE_WRITE (Linux 5.14; it allocates them and reports ENOMEM
// instead of dying of SIGBUS) and then each is written once, through the
// mapping that will be used. The write is an atomic add of zero, which is
// safe while other processes store into the same memory: it cannot lose a
// concurrent store. On a machine without that cost the second pass is a
// page-table walk (about 10 ms per GiB); here it is 0.8-1.3 s per GiB, which
// is why a client runs it in the background, pausing while it copies
// (client/client.cc). The cost is per page-table entry: on a tmpfs mounted
// with huge=within_size, whose 2 MiB pages are mapped one entry each, the
// same pass over 256 MiB took 3 ms instead of 0.9 s here
// (daemon/store/arena_pages.h).
#ifndef ECSNAP_COMMON_PREFAULT_H_
#define ECSNAP_COMMON_PREFAULT_H_

#include <sched.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>

#include "absl/base/attributes.h"
#include "common/unique_fd.h"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

namespace ecsnap {

// Allocates and maps [addr, addr + bytes) (page-aligned `addr`) writable
// with MADV_POPULATE_WRITE. Returns 0, or the errno when the memory behind
// the mapping cannot be had (ENOMEM, EFAULT). A kernel without it (EINVAL)
// returns 0: the touch pass below then takes the faults.
inline int PopulateForWrite(void* addr, size_t bytes) {
  int rc;
  do {
    rc = ::madvise(addr, bytes, MADV_POPULATE_WRITE);
  } while (rc != 0 && (errno == EINTR || errno == EAGAIN));
  return rc != 0 && errno != EINVAL ? errno : 0;
}

// Writes each page of [addr, addr + bytes) once (an atomic add of zero).
// Every 256 KiB it returns early when `*stop` is true, and waits (1 ms at a
// time) while `*pause` is non-zero: a background pass must not compete with
// the copies it is there to speed up, and one at idle priority must still
// stop soon after it is told to.
//
// The pass runs beside writers of the same memory on purpose (the arena's
// index, windows being filled): a locked add of zero cannot interleave with
// another store and leaves every byte as it was, so it changes nothing they
// wrote. C++ still calls atomic-beside-plain a race, so ThreadSanitizer is
// told not to watch this one function (it would report every first write
// of the arena's index and of each window).
ABSL_ATTRIBUTE_NO_SANITIZE_THREAD
inline void TouchForWrite(void* addr, size_t bytes, const std::atomic<bool>* stop = nullptr,
                          const std::atomic<int>* pause = nullptr) {
  const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  auto* p = static_cast<uint8_t*>(addr);
  for (size_t off = 0; off < bytes; off += page) {
    if ((off & ((size_t{256} << 10) - 1)) == 0) {
      while (pause != nullptr && pause->load() != 0 && !(stop != nullptr && stop->load())) {
        ::usleep(1000);
      }
      if (stop != nullptr && stop->load()) return;
    }
    uint64_t* word = reinterpret_cast<uint64_t*>(p + off);
#if defined(__x86_64__)
    // The locked add itself: ThreadSanitizer instruments atomic builtins even
    // in a function it is told not to watch.
    asm volatile("lock addq $0, %0" : "+m"(*word));
#else
    __atomic_fetch_add(word, 0, __ATOMIC_RELAXED);
#endif
  }
}

// Moves the calling thread (only it) to SCHED_IDLE: it runs when a core has
// nothing else to do. For the background first-write passes: on a machine
// where a first store costs microseconds per page (a virtual machine's page
// tables) a pass over a large arena is seconds of a core, and it must not
// take them from the copies, pushes and rebuilds it is there to speed up; a
// page the pass has not reached yet is simply faulted in by its writer.
// Returns 0 or the errno (EPERM under a system-call filter that denies it):
// the pass then runs at normal priority, which is only slower for others.
inline int RunAtIdlePriority() {
  sched_param param{};
  param.sched_priority = 0;
  return ::sched_setscheduler(0, SCHED_IDLE, &param) == 0 ? 0 : errno;
}

// Both, as above.
inline int PrefaultForWrite(void* addr, size_t bytes) {
  if (const int err = PopulateForWrite(addr, bytes); err != 0) return err;
  TouchForWrite(addr, bytes);
  return 0;
}

// Reserves `bytes` of anonymous memory with `prot` at an address that is a
// multiple of `align` (a power of two; a huge page, so that the kernel can
// map huge pages there whole), by reserving `align` more and giving back
// what lies around the aligned part. MAP_FAILED with errno as mmap.
inline void* ReserveAligned(size_t bytes, size_t align, int prot) {
  void* room = ::mmap(nullptr, bytes + align, prot, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                      -1, 0);
  if (room == MAP_FAILED) return MAP_FAILED;
  const uintptr_t start = reinterpret_cast<uintptr_t>(room);
  const uintptr_t aligned = (start + align - 1) / align * align;
  if (aligned > start) ::munmap(room, aligned - start);
  const uintptr_t end = aligned + bytes, room_end = start + bytes + align;
  if (room_end > end) ::munmap(reinterpret_cast<void*>(end), room_end - end);
  return reinterpret_cast<void*>(aligned);
}

// Private memory for bytes that pass through (a rebuild's survivor slices),
// at least `bytes`, populated for writing, so that receiving into it takes
// no fault per 4 KiB page; from 1 MiB up, whole 2 MiB pieces on 2 MiB
// boundaries advised into transparent huge pages (MADV_HUGEPAGE, which the
// common "madvise" setting honours), below that whole 4 KiB pages. Measured
// here: a rebuild's fresh 4 MiB survivor buffers of 4 KiB pages cost 90 ms
// of faults and zeroing per GiB rebuilt, more than its decoding. An empty
// Mapping when the memory cannot be had.
inline Mapping MapScratch(size_t bytes) {
  constexpr size_t kHuge = size_t{2} << 20, kPage = 4096;
  const bool huge = bytes >= kHuge / 2;
  const size_t grain = huge ? kHuge : kPage;
  const size_t len = (std::max<size_t>(bytes, 1) + grain - 1) / grain * grain;
  void* p = huge ? ReserveAligned(len, kHuge, PROT_READ | PROT_WRITE)
                 : ::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                          -1, 0);
  if (p == MAP_FAILED) return Mapping();
  if (huge) ::madvise(p, len, MADV_HUGEPAGE);
  if (PopulateForWrite(p, len) != 0) {
    ::munmap(p, len);
    return Mapping();
  }
  return Mapping(p, len);
}

}  // namespace ecsnap

#endif  // ECSNAP_COMMON_PREFAULT_H_
