// What every benchmark needs to be a good citizen on a shared machine: how
// much memory it may take, and cleaning up after itself on any exit; and the
// two helpers each of them times and fails with.
#ifndef ECSNAP_TESTS_BENCH_BENCH_UTIL_H_
#define ECSNAP_TESTS_BENCH_BENCH_UTIL_H_

#include <cstdint>
#include <functional>
#include <string>

#include "absl/status/status.h"

namespace ecsnap::bench {

// Wall-clock seconds `fn` takes.
double Seconds(const std::function<void()>& fn);
// The fewest seconds `fn` takes in `reps` runs.
double Best(int reps, const std::function<void()>& fn);

// Exits with "BENCH: WHAT: message" when `st` is an error.
void CheckOk(const absl::Status& st, const char* bench, const char* what);

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

// Where the daemons' arenas go, as --arena_pages says: "huge" mounts a
// tmpfs with huge=within_size over `dir` (testing::MountHugeTmpfs; call it
// after RemoveWhenGone(dir), from the main thread, before anything starts),
// "base" leaves `dir` on /dev/shm. Prints which; exits 2 on any other word.
void PutArenasOn(const std::string& arena_pages, const std::string& dir);


}  // namespace ecsnap::bench

#endif  // ECSNAP_TESTS_BENCH_BENCH_UTIL_H_
