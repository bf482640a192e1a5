// CallWatchdog: cancels gRPC calls that stop making progress, and every call
// at once when the daemon stops. Outgoing calls (a push, a fetch) and
// incoming streams (a peer's push: a peer that stops sending would hold a
// server thread and the row's reservation) alike.
//
// A deadline fixed in advance has to guess the peer's speed: too short and a
// slow but healthy push is cut (and retried, and cut again), too long and a
// hung peer holds a sender for minutes. Instead each call registers its
// ClientContext and reports progress (a message written or read); a call
// without progress for `stall` is cancelled with TryCancel, which fails it
// with CANCELLED at once. CancelAll cancels every registered call and every
// later one, so that Stop never waits for a peer.
//
// Thread-safe. A Watch must be destroyed before its ClientContext.
#ifndef ECSNAP_DAEMON_PEER_CALL_WATCHDOG_H_
#define ECSNAP_DAEMON_PEER_CALL_WATCHDOG_H_

#include <grpcpp/client_context.h>
#include <grpcpp/server_context.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace ecsnap::daemon {

class CallWatchdog {
 public:
  explicit CallWatchdog(absl::Duration stall);
  ~CallWatchdog();

  CallWatchdog(const CallWatchdog&) = delete;
  CallWatchdog& operator=(const CallWatchdog&) = delete;

  class Watch {
   public:
    ~Watch();
    Watch(const Watch&) = delete;
    Watch& operator=(const Watch&) = delete;
    // The call moved bytes: its stall clock starts again.
    void Progress();
    // True when the watchdog cancelled the call (stalled or stopping).
    bool cancelled() const { return cancelled_.load(); }

   private:
    friend class CallWatchdog;
    Watch(CallWatchdog* dog, uint64_t id) : dog_(dog), id_(id) {}
    CallWatchdog* const dog_;
    const uint64_t id_;
    std::atomic<bool> cancelled_{false};
  };

  // Watches `ctx` from now on. After CancelAll the call is cancelled at once.
  std::unique_ptr<Watch> Start(grpc::ClientContext* ctx);
  std::unique_ptr<Watch> Start(grpc::ServerContext* ctx);
  // Any other call: `cancel` cuts it (a socket's shutdown). It is never
  // called once the Watch is gone.
  std::unique_ptr<Watch> Start(std::function<void()> cancel);
  // Cancels every call in flight and every later one.
  void CancelAll();
  absl::Duration stall() const { return stall_; }

 private:
  struct Entry {
    std::function<void()> cancel;  // TryCancel on the call's context
    Watch* watch;
    std::chrono::steady_clock::time_point last_progress;
  };
  void Loop();
  void Finish(uint64_t id);
  void Touch(uint64_t id);

  const absl::Duration stall_;
  absl::Mutex mu_;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  std::map<uint64_t, Entry> calls_ ABSL_GUARDED_BY(mu_);
  std::thread thread_;
};

}  // namespace ecsnap::daemon

#endif  // ECSNAP_DAEMON_PEER_CALL_WATCHDOG_H_
