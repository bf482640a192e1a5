// Survives memory that another process can shrink under us.
//
// A trainer holds its windows read-write, so it can also ftruncate one; the
// daemon's next access to the vanished pages would then die of SIGBUS, and
// with it every other job on the node. Inside the guarded range a SIGBUS
// instead maps a private zero page over the faulting page and the access is
// retried: the daemon reads zeros (which the window's checksums catch) and
// its writes go nowhere. The mapping behind a window is replaced when the
// window is freed, so the zero pages never outlive the damaged window.
// (Compositors guard client buffers the same way, for the same reason.)
//
// Only faults past the end of a file (BUS_ADRERR) are caught; a hardware
// memory error keeps its default action. Up to kMaxSigbusRanges ranges per
// process. A SIGBUS outside them keeps its
// default action (the process dies with a core, as it would unguarded).
#ifndef ECSNAP_COMMON_SIGBUS_GUARD_H_
#define ECSNAP_COMMON_SIGBUS_GUARD_H_

#include <sys/types.h>

#include <cstddef>
#include <cstdint>

namespace ecsnap {

inline constexpr int kMaxSigbusRanges = 16;

// Installs the handler (once) and guards [base, base + bytes). False when
// kMaxSigbusRanges ranges are guarded already.
bool GuardAgainstSigbus(void* base, size_t bytes);
// Stops guarding the range that starts at `base`; returns once no handler
// can still map a zero page into it.
void UnguardSigbus(void* base);

// mmap(addr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd,
// offset), for a part of a guarded range whose mapping is replaced while
// other threads may touch it. A plain MAP_FIXED could land between another
// thread's fault on the old mapping and the handler's zero page, which
// would then cover a page of the new mapping for good; this one waits for
// handlers in progress, and a handler that begins meanwhile lets its access
// run again on the new mapping instead. (On a kernel before Linux 5.14,
// without MADV_POPULATE_WRITE, a handler cannot tell the new mapping from
// the old, and the race remains.)
void* RemapGuarded(void* addr, size_t bytes, int fd, off_t offset);

// Pages the guard has replaced since the process started.
uint64_t SigbusPagesReplaced();

}  // namespace ecsnap

#endif  // ECSNAP_COMMON_SIGBUS_GUARD_H_
