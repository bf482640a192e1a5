// systemd integration of ecsnapd (Type=notify, DESIGN.md §10): READY=1 once
// the daemon serves (arena pre-faulted, start-up rebuild done), a STATUS=
// line, STOPPING=1 at shutdown, and WATCHDOG=1 pings while the daemon is
// alive. Everything is a no-op when the process was not started by systemd
// (no NOTIFY_SOCKET in its environment), so the same binary runs anywhere.
//
// Thread-safe.
#ifndef ECSNAP_DAEMON_SYSTEMD_NOTIFY_H_
#define ECSNAP_DAEMON_SYSTEMD_NOTIFY_H_

#include <functional>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"

namespace ecsnap::daemon {

class SystemdNotifier {
 public:
  SystemdNotifier();
  // Stops the watchdog pings.
  ~SystemdNotifier();
  SystemdNotifier(const SystemdNotifier&) = delete;
  SystemdNotifier& operator=(const SystemdNotifier&) = delete;

  // READY=1 with `status` as the STATUS= line.
  void Ready(const std::string& status);
  void Status(const std::string& status);
  // STOPPING=1 (and stops the watchdog: the stop has its own timeout).
  void Stopping();

  // The unit's watchdog interval (WatchdogSec=), or zero when it has none.
  absl::Duration watchdog_interval() const { return interval_; }
  // Pings WATCHDOG=1 every half interval for as long as `alive` returns true
  // (it is called on the pinging thread: a daemon stuck on a lock stops the
  // pings, and systemd restarts it). No-op without a watchdog.
  void StartWatchdog(std::function<bool()> alive);

 private:
  void Stop();

  absl::Duration interval_ = absl::ZeroDuration();
  absl::Notification stop_;
  absl::Mutex mu_;
  std::thread pinger_ ABSL_GUARDED_BY(mu_);
};

}  // namespace ecsnap::daemon

#endif  // ECSNAP_DAEMON_SYSTEMD_NOTIFY_H_
