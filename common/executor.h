// A fixed set of threads that run submitted closures in order: one bounded
// executor in place of a thread started per task. Submit blocks while the
// queue is full, so a burst of work waits instead of growing memory.
//
// A task must not wait for another task of the same executor (RunAll from
// inside a task can deadlock once every thread waits).
#ifndef ECSNAP_COMMON_EXECUTOR_H_
#define ECSNAP_COMMON_EXECUTOR_H_

#include <cstddef>
#include <deque>
#include <functional>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace ecsnap {

class Executor {
 public:
  // `threads` >= 1 threads; at most `max_queued` tasks wait at once.
  Executor(int threads, size_t max_queued);
  // Runs what is queued, then joins the threads.
  ~Executor();
  Executor(const Executor&) = delete;
  Executor& operator=(const Executor&) = delete;

  // Queues `task`; blocks while `max_queued` tasks wait.
  void Submit(std::function<void()> task);
  // Runs every task on the executor; returns once all have run.
  void RunAll(std::vector<std::function<void()>> tasks);

  int threads() const { return static_cast<int>(threads_.size()); }

 private:
  void Loop();

  const size_t max_queued_;
  absl::Mutex mu_;
  std::deque<std::function<void()>> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

}  // namespace ecsnap

#endif  // ECSNAP_COMMON_EXECUTOR_H_
