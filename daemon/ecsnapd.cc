// ecsnapd: the per-node snapshot daemon. See DESIGN.md and README.md.
//
//   ecsnapd --config=cluster.textproto --slot=3
//   ecsnapd --arena_dir=/dev/shm/ecsnap --arena_bytes=8589934592 --socket=/run/ecsnap/ecsnapd.sock
//
// Flags override single fields of the config file.
#include <malloc.h>
#include <signal.h>
#include <sys/resource.h>

#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/reflection.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/log.h"
#include "daemon/config.h"
#include "daemon/daemon.h"
#include "daemon/systemd_notify.h"

ABSL_FLAG(std::string, config, "", "Text-format ecsnap.config.Config file (see proto/config.proto).");
ABSL_FLAG(uint32_t, slot, 0, "This node's slot in the cluster config.");
ABSL_FLAG(std::string, node, "",
          "Take the slot whose `node` in the cluster config is this name (instead of --slot); "
          "under Kubernetes, the pod's spec.nodeName.");
ABSL_FLAG(std::string, arena_dir, "/dev/shm/ecsnap", "tmpfs directory of the arena file.");
ABSL_FLAG(uint64_t, arena_bytes, uint64_t{1} << 30, "Arena size in bytes, pre-faulted at start.");
ABSL_FLAG(std::string, socket, "/run/ecsnap/ecsnapd.sock", "Unix socket of the data plane.");
ABSL_FLAG(std::string, data_address, "", "Optional TCP host:port of the data plane.");
ABSL_FLAG(std::string, admin_address, "127.0.0.1:7070", "Admin plane: host:port or unix:PATH.");
ABSL_FLAG(std::string, admin_token_file, "", "File with the admin bearer token.");
ABSL_FLAG(uint32_t, retain, 1, "Newest complete steps kept per job.");
ABSL_FLAG(uint32_t, trainer_keepalive_ms, 30000,
          "A silent trainer connection is pinged after this, and closed (its session ended) "
          "when the ping goes unanswered as long.");
ABSL_FLAG(std::string, peer_listen_host, "",
          "Host the peer plane and bulk port listen on (e.g. 0.0.0.0) instead of the peer "
          "address's own host.");
ABSL_FLAG(std::string, metrics_address, "",
          "Optional host:port serving Prometheus metrics at /metrics (port 0: a free one).");
ABSL_FLAG(std::string, health_address, "",
          "Optional host:port serving only grpc.health.v1, in the clear (for probes).");
ABSL_FLAG(std::vector<std::string>, trainer_uids, {},
          "Comma-separated uids that may use the data socket besides the daemon's own.");
ABSL_FLAG(std::vector<std::string>, trainer_gids, {},
          "Comma-separated primary gids whose processes may use the data socket.");

namespace {

// A flag overrides the config when set to other than its default. (This
// abseil keeps IsSpecifiedOnCommandLine private.)
bool Given(const char* name) {
  const absl::CommandLineFlag* flag = absl::FindCommandLineFlag(name);
  return flag != nullptr && flag->CurrentValue() != flag->DefaultValue();
}

// Replaces `out` with the numbers of a comma-separated id flag.
bool ParseIds(const char* flag, const std::vector<std::string>& ids,
              google::protobuf::RepeatedField<uint32_t>* out) {
  out->Clear();
  for (const std::string& id : ids) {
    uint32_t n = 0;
    if (!absl::SimpleAtoi(id, &n)) {
      std::fprintf(stderr, "ecsnapd: --%s: '%s' is not a number\n", flag, id.c_str());
      return false;
    }
    out->Add(n);
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "ecsnapd: keeps training snapshots in a shared-memory arena and protects "
      "them across nodes with Reed-Solomon erasure coding.\n"
      "Usage: ecsnapd --config=cluster.textproto --slot=N [flags overriding the config]");
  absl::ParseCommandLine(argc, argv);

  // gRPC's receive buffers and the messages of the streams come and go all
  // the time. Kept on the heap, freed ones are reused; above glibc's default
  // threshold (128 KiB once a threshold is set) each would be a fresh mmap
  // whose pages fault in again, which costs more than the copy on machines
  // where a first store costs microseconds a page. 32 MiB is the most glibc
  // takes (it refuses more, and a refused threshold left every buffer over
  // 128 KiB mmapped).
  if (mallopt(M_MMAP_THRESHOLD, 32 << 20) != 1) {
    ecsnap::Log("glibc refused a 32 MiB mmap threshold: stream buffers are mapped afresh");
  }
  if (mallopt(M_TRIM_THRESHOLD, 256 << 20) != 1) {
    ecsnap::Log("glibc refused a 256 MiB trim threshold: freed heap goes back to the kernel");
  }

  // Signals are taken synchronously by main; every other thread blocks them.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  signal(SIGPIPE, SIG_IGN);

  // Each window file is a descriptor: take all the descriptors the hard limit
  // allows (the arena bounds its window files by what is left).
  rlimit files{};
  if (getrlimit(RLIMIT_NOFILE, &files) == 0 && files.rlim_cur < files.rlim_max) {
    files.rlim_cur = files.rlim_max;
    setrlimit(RLIMIT_NOFILE, &files);
  }

  ecsnap::config::Config config;
  if (!absl::GetFlag(FLAGS_config).empty()) {
    auto loaded = ecsnap::daemon::LoadConfig(absl::GetFlag(FLAGS_config));
    if (!loaded.ok()) {
      std::fprintf(stderr, "ecsnapd: %s\n", std::string(loaded.status().message()).c_str());
      return 2;
    }
    config = *loaded;
  }
  auto* d = config.mutable_daemon();
  if (Given("arena_dir") || d->arena_dir().empty()) d->set_arena_dir(absl::GetFlag(FLAGS_arena_dir));
  if (Given("arena_bytes")) d->set_arena_bytes(absl::GetFlag(FLAGS_arena_bytes));
  if (Given("socket")) d->set_socket_path(absl::GetFlag(FLAGS_socket));
  if (Given("data_address")) d->set_data_address(absl::GetFlag(FLAGS_data_address));
  if (Given("admin_address")) d->set_admin_address(absl::GetFlag(FLAGS_admin_address));
  if (Given("admin_token_file")) d->set_admin_token_file(absl::GetFlag(FLAGS_admin_token_file));
  if (Given("retain")) d->set_retain(absl::GetFlag(FLAGS_retain));
  if (Given("trainer_keepalive_ms")) {
    d->set_trainer_keepalive_ms(absl::GetFlag(FLAGS_trainer_keepalive_ms));
  }
  if (Given("health_address")) d->set_health_address(absl::GetFlag(FLAGS_health_address));
  if (Given("peer_listen_host")) d->set_peer_listen_host(absl::GetFlag(FLAGS_peer_listen_host));
  if (Given("metrics_address")) d->set_metrics_address(absl::GetFlag(FLAGS_metrics_address));
  if (Given("trainer_uids") &&
      !ParseIds("trainer_uids", absl::GetFlag(FLAGS_trainer_uids), d->mutable_trainer_uids())) {
    return 2;
  }
  if (Given("trainer_gids") &&
      !ParseIds("trainer_gids", absl::GetFlag(FLAGS_trainer_gids), d->mutable_trainer_gids())) {
    return 2;
  }
  // After the flags: defaults that derive from other fields (the admin token
  // file beside the socket) follow what the flags set.
  ecsnap::daemon::ApplyDefaults(&config);
  uint32_t slot = absl::GetFlag(FLAGS_slot);
  if (const std::string node = absl::GetFlag(FLAGS_node); !node.empty()) {
    auto found = ecsnap::daemon::SlotOfNode(config, node);
    if (!found.ok()) {
      std::fprintf(stderr, "ecsnapd: %s\n", std::string(found.status().message()).c_str());
      return 2;
    }
    slot = *found;
  }
  if (absl::Status st = ecsnap::daemon::ValidateConfig(config, slot); !st.ok()) {
    std::fprintf(stderr, "ecsnapd: %s\n", std::string(st.message()).c_str());
    return 2;
  }

  // Under systemd (Type=notify): READY=1 once the daemon serves, watchdog
  // pings while its store answers, STOPPING=1 at the end. A no-op elsewhere.
  ecsnap::daemon::SystemdNotifier systemd;
  absl::Mutex ready_mu;
  bool ready = false, stopping = false;
  auto daemon = ecsnap::daemon::Daemon::Start(config, slot, [&] {
    absl::MutexLock lock(&ready_mu);
    ready = true;
  });
  if (!daemon.ok()) {
    std::fprintf(stderr, "ecsnapd: %s\n", std::string(daemon.status().message()).c_str());
    return 1;
  }
  ecsnap::daemon::Daemon* started = daemon->get();
  systemd.Status("starting: learning what the group holds");
  // READY waits for the start-up rebuild, off the signal-waiting thread.
  std::thread notify_ready([&] {
    auto decided = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(ready_mu) { return ready || stopping; };
    bool serving = false;
    {
      absl::MutexLock lock(&ready_mu);
      ready_mu.Await(absl::Condition(&decided));
      serving = ready && !stopping;
    }
    if (!serving) return;
    systemd.Ready(absl::StrCat("serving: ", started->Summary()));
    systemd.StartWatchdog([started] { return started->Alive(); });
  });
  int sig = 0;
  sigwait(&signals, &sig);
  ecsnap::Log("signal %d: shutting down; committed steps stay in the arena", sig);
  {
    absl::MutexLock lock(&ready_mu);
    stopping = true;  // a stop before the start-up pass ended
  }
  notify_ready.join();
  systemd.Stopping();
  if (!(*daemon)->Shutdown()) {
    ecsnap::Log("a call to a peer did not end within the grace; exiting without waiting for it");
    std::fflush(nullptr);
    std::_Exit(0);
  }
  daemon->reset();
  return 0;
}
