#include "common/executor.h"

#include <atomic>
#include <chrono>
#include <thread>

#include "absl/synchronization/notification.h"
#include "gtest/gtest.h"

namespace ecsnap {
namespace {

TEST(ExecutorTest, RunAllRunsEveryTaskOnTheExecutorsThreadsOnly) {
  Executor executor(3, 4);
  std::atomic<int> ran{0}, running{0}, most{0};
  std::vector<std::function<void()>> tasks;
  for (int i = 0; i < 40; ++i) {
    tasks.push_back([&] {
      const int now = ++running;
      int seen = most.load();
      while (now > seen && !most.compare_exchange_weak(seen, now)) {
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
      --running;
      ++ran;
    });
  }
  executor.RunAll(std::move(tasks));
  EXPECT_EQ(ran.load(), 40);
  EXPECT_LE(most.load(), 3);  // never more at once than its threads
  EXPECT_GE(most.load(), 1);
}

// Submit waits while the queue is full: a burst cannot grow it past its
// bound.
TEST(ExecutorTest, SubmitBlocksWhileTheQueueIsFull) {
  Executor executor(1, 2);
  absl::Notification release;
  executor.Submit([&] { release.WaitForNotification(); });  // holds the only thread
  // The queue may still be taking the first task off; fill it behind.
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  executor.Submit([] {});
  executor.Submit([] {});
  std::atomic<bool> third_in{false};
  std::thread submitter([&] {
    executor.Submit([] {});
    third_in = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_FALSE(third_in.load());
  release.Notify();
  submitter.join();
  EXPECT_TRUE(third_in.load());
}

TEST(ExecutorTest, TheDestructorRunsWhatWasQueued) {
  std::atomic<int> ran{0};
  {
    Executor executor(2, 16);
    for (int i = 0; i < 10; ++i) executor.Submit([&] { ++ran; });
  }
  EXPECT_EQ(ran.load(), 10);
}

}  // namespace
}  // namespace ecsnap
