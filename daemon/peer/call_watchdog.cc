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
  calls_[id] = Entry{std::move(cancel), watch.get(), std::chrono::steady_clock::now()};
  return watch;
}

void CallWatchdog::Finish(uint64_t id) {
  absl::MutexLock lock(&mu_);
  calls_.erase(id);
}

void CallWatchdog::Touch(uint64_t id) {
  absl::MutexLock lock(&mu_);
  auto it = calls_.find(id);
  if (it != calls_.end()) it->second.last_progress = std::chrono::steady_clock::now();
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
  // Progress is timed on the monotonic clock: a step of the wall clock cuts
  // nothing. A tick that comes far later than asked means this process was
  // itself held up (stopped, frozen, starved): the calls' clocks are moved on
  // by the pause (and only by it) rather than blaming peers for it.
  const absl::Duration tick = std::clamp(stall_ / 4, absl::Milliseconds(10), absl::Seconds(1));
  const auto stall = absl::ToChronoNanoseconds(stall_);
  const auto late = absl::ToChronoNanoseconds(tick + stall_ / 2);
  auto last_tick = std::chrono::steady_clock::now();
  absl::MutexLock lock(&mu_);
  while (true) {
    auto stop = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stopping_; };
    if (mu_.AwaitWithTimeout(absl::Condition(&stop), tick)) return;
    const auto now = std::chrono::steady_clock::now();
    const auto pause = now - last_tick > late ? now - last_tick - absl::ToChronoNanoseconds(tick)
                                              : std::chrono::steady_clock::duration::zero();
    last_tick = now;
    for (auto& [id, e] : calls_) {
      e.last_progress += pause;
      if (!e.watch->cancelled_ && now - e.last_progress > stall) {
        e.watch->cancelled_ = true;
        e.cancel();
      }
    }
  }
}

}  // namespace ecsnap::daemon
