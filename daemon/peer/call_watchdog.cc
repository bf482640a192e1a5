#include "daemon/peer/call_watchdog.h"

#include <algorithm>

namespace ecsnap::daemon {

CallWatchdog::CallWatchdog(absl::Duration stall) : stall_(stall) {
  thread_ = std::thread([this] { Loop(); });
}

CallWatchdog::~CallWatchdog() {
  CancelAll();
  thread_.join();
}

CallWatchdog::Watch::~Watch() { dog_->Finish(id_); }

void CallWatchdog::Watch::Progress() { dog_->Touch(id_); }

std::unique_ptr<CallWatchdog::Watch> CallWatchdog::Start(grpc::ClientContext* ctx) {
  return Start([ctx] { ctx->TryCancel(); });
}

std::unique_ptr<CallWatchdog::Watch> CallWatchdog::Start(grpc::ServerContext* ctx) {
  return Start([ctx] { ctx->TryCancel(); });
}

std::unique_ptr<CallWatchdog::Watch> CallWatchdog::Start(std::function<void()> cancel) {
  absl::MutexLock lock(&mu_);
  const uint64_t id = next_id_++;
  std::unique_ptr<Watch> watch(new Watch(this, id));
  if (stopping_) {
    watch->cancelled_ = true;
    cancel();
  }
  calls_[id] = Entry{std::move(cancel), watch.get(), absl::Now()};
  return watch;
}

void CallWatchdog::Finish(uint64_t id) {
  absl::MutexLock lock(&mu_);
  calls_.erase(id);
}

void CallWatchdog::Touch(uint64_t id) {
  absl::MutexLock lock(&mu_);
  auto it = calls_.find(id);
  if (it != calls_.end()) it->second.last_progress = absl::Now();
}

void CallWatchdog::CancelAll() {
  absl::MutexLock lock(&mu_);
  stopping_ = true;
  for (auto& [id, e] : calls_) {
    e.watch->cancelled_ = true;
    e.cancel();
  }
}

void CallWatchdog::Loop() {
  // Checks a few times per stall period: a stalled call is cut within
  // about 1.25 x `stall`.
  const absl::Duration tick = std::clamp(stall_ / 4, absl::Milliseconds(10), absl::Seconds(1));
  absl::MutexLock lock(&mu_);
  while (true) {
    auto stop = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stopping_; };
    if (mu_.AwaitWithTimeout(absl::Condition(&stop), tick)) return;
    const absl::Time now = absl::Now();
    for (auto& [id, e] : calls_) {
      if (!e.watch->cancelled_ && now - e.last_progress > stall_) {
        e.watch->cancelled_ = true;
        e.cancel();
      }
    }
  }
}

}  // namespace ecsnap::daemon
