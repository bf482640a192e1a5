#include "common/executor.h"

#include <algorithm>
#include <utility>

#include "absl/synchronization/blocking_counter.h"

namespace ecsnap {

Executor::Executor(int threads, size_t max_queued) : max_queued_(std::max<size_t>(max_queued, 1)) {
  for (int i = 0; i < std::max(threads, 1); ++i) threads_.emplace_back([this] { Loop(); });
}

Executor::~Executor() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  for (std::thread& t : threads_) t.join();
}

void Executor::Submit(std::function<void()> task) {
  absl::MutexLock lock(&mu_);
  auto room = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return queue_.size() < max_queued_;
  };
  mu_.Await(absl::Condition(&room));
  queue_.push_back(std::move(task));
}

void Executor::RunAll(std::vector<std::function<void()>> tasks) {
  absl::BlockingCounter done(static_cast<int>(tasks.size()));
  for (auto& task : tasks) {
    Submit([&done, task = std::move(task)] {
      task();
      done.DecrementCount();
    });
  }
  done.Wait();
}

void Executor::Loop() {
  while (true) {
    std::function<void()> task;
    {
      absl::MutexLock lock(&mu_);
      auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return stopping_ || !queue_.empty();
      };
      mu_.Await(absl::Condition(&ready));
      if (queue_.empty()) return;  // stopping, and nothing left to run
      task = std::move(queue_.front());
      queue_.pop_front();
    }
    task();
  }
}

}  // namespace ecsnap
