// What every benchmark needs to be a good citizen on a shared machine: how
// much memory it may take, and cleaning up after itself on any exit.
#ifndef ECSNAP_TESTS_BENCH_BENCH_UTIL_H_
#define ECSNAP_TESTS_BENCH_BENCH_UTIL_H_

#include <cstdint>
#include <string>

namespace ecsnap::bench {

// Bytes of memory the kernel says it can still hand out (MemAvailable).
uint64_t AvailableBytes();

// Exits with a sentence when `need` bytes exceed 90% of AvailableBytes()
// (no check where the kernel does not say).
void RefuseUnlessMemoryFor(uint64_t need, const char* bench);

// Removes `dir` once this process is gone, however it goes (a return, a
// crash, SIGKILL): a forked watcher waits for the end of a pipe that only
// this process holds open. The daemons die with the bench (PR_SET_PDEATHSIG
// in the harness), so nothing is left behind.
void RemoveWhenGone(const std::string& dir);

}  // namespace ecsnap::bench

#endif  // ECSNAP_TESTS_BENCH_BENCH_UTIL_H_
