#include "daemon/systemd_notify.h"

#include <systemd/sd-daemon.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "common/log.h"

namespace ecsnap::daemon {
namespace {

// A STATUS= value is one line.
std::string OneLine(const std::string& s) { return absl::StrReplaceAll(s, {{"\n", " "}}); }

}  // namespace

SystemdNotifier::SystemdNotifier() {
  uint64_t usec = 0;
  if (::sd_watchdog_enabled(/*unset_environment=*/0, &usec) > 0 && usec > 0) {
    interval_ = absl::Microseconds(usec);
  }
}

SystemdNotifier::~SystemdNotifier() { Stop(); }

void SystemdNotifier::Ready(const std::string& status) {
  ::sd_notify(0, absl::StrCat("READY=1\nSTATUS=", OneLine(status)).c_str());
}

void SystemdNotifier::Status(const std::string& status) {
  ::sd_notify(0, absl::StrCat("STATUS=", OneLine(status)).c_str());
}

void SystemdNotifier::Stopping() {
  Stop();
  ::sd_notify(0, "STOPPING=1\nSTATUS=stopping");
}

void SystemdNotifier::StartWatchdog(std::function<bool()> alive) {
  if (interval_ == absl::ZeroDuration()) return;
  absl::MutexLock lock(&mu_);
  if (pinger_.joinable() || stop_.HasBeenNotified()) return;
  Log("systemd watchdog: pinging every %s while the daemon answers",
      absl::FormatDuration(interval_ / 2));
  pinger_ = std::thread([this, alive = std::move(alive)] {
    do {
      if (!alive()) {
        Log("systemd watchdog: the daemon does not answer; pings stop and systemd restarts it");
        return;
      }
      ::sd_notify(0, "WATCHDOG=1");
    } while (!stop_.WaitForNotificationWithTimeout(interval_ / 2));
  });
}

void SystemdNotifier::Stop() {
  std::thread pinger;
  {
    absl::MutexLock lock(&mu_);
    if (!stop_.HasBeenNotified()) stop_.Notify();
    pinger = std::move(pinger_);
  }
  if (pinger.joinable()) pinger.join();
}

}  // namespace ecsnap::daemon
