// Deliberate data races, for tests/tsan/run.sh: two threads write one plain
// counter without a lock, and two threads set fields of one protobuf message
// (generated code, as ecsnap's manifests and records are). Under TSan both
// reports must appear and be classed as ecsnap's; otherwise the TSan run
// cannot be trusted to fail on a real race.
#include <thread>

#include "gtest/gtest.h"
#include "proto/snapshot.pb.h"

namespace ecsnap {
namespace {

int counter = 0;  // deliberately unguarded

void Bump() {
  for (int i = 0; i < 1000; ++i) counter = counter + 1;
}

TEST(RaceCanaryTest, TwoThreadsWriteOneCounterWithoutALock) {
  std::thread a(Bump), b(Bump);
  a.join();
  b.join();
  EXPECT_GT(counter, 0);
}

TEST(RaceCanaryTest, TwoThreadsSetOneMessageWithoutALock) {
  v1::TensorEntry entry;  // deliberately unguarded
  auto set = [&entry](uint64_t seed) {
    for (uint64_t i = 0; i < 1000; ++i) entry.set_length(seed + i);
  };
  std::thread a(set, 0), b(set, 5000);
  a.join();
  b.join();
  EXPECT_GT(entry.length(), 0u);
}

}  // namespace
}  // namespace ecsnap
