// A deliberate data race, for tests/tsan/run.sh: two threads write one plain
// counter without a lock. Under TSan the report must appear and be classed as
// ecsnap's; otherwise the TSan run cannot be trusted to fail on a real race.
#include <thread>

#include "gtest/gtest.h"

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

}  // namespace
}  // namespace ecsnap
