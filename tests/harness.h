// Test harness: real ecsnapd processes on private Unix sockets.
//
// Every daemon binds sockets inside a fresh temporary directory, is started
// with fork/exec, and is stopped by its process id. Waits are bounded.
//
// A daemon never outlives the test: it is SIGKILLed when the thread that
// spawned it exits (PR_SET_PDEATHSIG), so a test killed by a timeout or a
// crash leaves no ecsnapd behind; its arena lives in the test's TempDir.
// Spawn daemons from a thread that lives as long as they should (the test's
// main thread).
#ifndef ECSNAP_TESTS_HARNESS_H_
#define ECSNAP_TESTS_HARNESS_H_

#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "proto/admin.grpc.pb.h"
#include "proto/health.grpc.pb.h"

namespace ecsnap::testing {

// A fresh directory under /tmp (short paths: Unix sockets allow 107 bytes),
// removed on destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// Moves the calling thread into a mount namespace of its own, whose mounts
// propagate nowhere (once; later calls return the first answer). A mount
// namespace belongs to a thread, not a process: threads started before
// keep the machine's mounts and do not see what is mounted after. So a test
// binary calls it while it has one thread, at static initialisation:
//   const std::string kMounts = ecsnap::testing::PrivateMountNamespace();
// Returns "" or why not (it needs root or CAP_SYS_ADMIN).
std::string PrivateMountNamespace();

// Mounts a tmpfs with huge=within_size over the directory `dir`, in the
// namespace PrivateMountNamespace() made (made here if it was not), so the
// mount goes with the last process in it and nothing is left behind on any
// exit. Arenas in it are backed by huge pages (daemon/store/arena_pages.h),
// as under deploy/dev-shm-ecsnap.mount. Call it from the thread that starts
// the daemons, before it starts them. `dir` must be emptied and unmounted
// (umount2 MNT_DETACH) before it can be removed from inside the namespace.
// Returns "" or why not (it needs root and a namespace; the kernel may
// refuse huge pages all the same, which the daemons then say in their
// status).
std::string MountHugeTmpfs(const std::string& dir);

// Path of a binary built by Bazel, from the test's runfiles.
std::string RunfilePath(const std::string& workspace_relative);

// Runs `argv` with stdout and stderr sent to `log_path`; returns its pid. The
// child is SIGKILLed when the calling thread exits.
pid_t Spawn(const std::vector<std::string>& argv, const std::string& log_path);
// Sends `signal` to `pid` and reaps it within `timeout_ms` (SIGKILL after).
// Returns the exit status as waitpid reports it.
int StopProcess(pid_t pid, int signal, int timeout_ms = 5000);

class DaemonProcess {
 public:
  struct Options {
    uint64_t arena_bytes = 64 << 20;
    uint32_t retain = 1;
    std::string admin_token_file;
    // Extra fields of the cluster {} block, for Cluster::Start.
    std::string cluster_fields;
    // For Cluster::Start: mutual TLS on the peer plane, with a CA and
    // per-slot certificates made by deploy/make_certs.sh (false: plaintext).
    bool tls = true;
    // A cluster file and this daemon's slot in it (empty: a lone daemon).
    std::string config_path;
    uint32_t slot = 0;
    std::vector<std::string> extra_flags;
  };

  // Starts ecsnapd with its arena and sockets in `dir` and waits until its
  // admin plane answers.
  static absl::StatusOr<std::unique_ptr<DaemonProcess>> Start(const std::string& dir,
                                                              Options options);
  // SIGKILL, reaped: no graceful shutdown, which a stopped process would not
  // run anyway.
  ~DaemonProcess();

  // SIGTERM (and SIGCONT, in case it is paused), then reaps the process
  // within `bound`, SIGKILLing it after that. Returns how long it took to
  // exit, or absl::InfiniteDuration() when it had to be killed (or was not
  // running). `wait_status`, when given, receives waitpid's status.
  absl::Duration Terminate(absl::Duration bound = absl::Seconds(10), int* wait_status = nullptr);

  // SIGKILL, reaped. The arena file stays, as after a crash.
  void Kill();
  // Same directory, same flags: the daemon a supervisor would restart.
  absl::Status Restart();
  // A replacement node: SIGKILL, the arena file deleted, started afresh in
  // the same slot.
  absl::Status Replace();
  // Stops (SIGSTOP) or resumes (SIGCONT) the process.
  void Pause();
  void Resume();
  // The arena file (shared memory: writing it changes the live daemon's data).
  std::string arena_path() const { return dir_ + "/arena/arena"; }
  // Flips the byte `at` bytes past the first place where `pattern` lies in
  // the daemon's memory (the arena file or a window file), as a memory fault
  // would. False when the pattern is nowhere.
  bool FlipByteAfter(const void* pattern, size_t pattern_bytes, size_t at) const;

  pid_t pid() const { return pid_; }
  // Reaps the daemon if it exited.
  bool alive();
  const std::string& socket() const { return socket_; }
  std::string admin_address() const { return "unix:" + admin_socket_; }
  const std::string& log_path() const { return log_; }
  std::string Log() const;
  // Local credentials and this daemon's admin token.
  std::unique_ptr<admin::Admin::Stub> AdminStub() const;
  // grpc.health.v1 on the admin plane, over the same channel as AdminStub.
  std::unique_ptr<grpc::health::v1::Health::Stub> HealthStub() const;
  // Waits until the daemon says its arena's background first writes are
  // done (admin Status); the time waited, DEADLINE_EXCEEDED past `limit`.
  absl::StatusOr<absl::Duration> WaitArenaFirstWrites(absl::Duration limit) const;
  std::string admin_token_file() const;

 private:
  DaemonProcess(std::string dir, Options options);
  absl::Status Launch();
  // The admin plane's channel; before the daemon wrote its token, one whose
  // calls fail, so that callers probing for readiness try again.
  std::shared_ptr<grpc::Channel> AdminChannel() const;

  const std::string dir_;
  const Options options_;
  std::string socket_;
  std::string admin_socket_;
  std::string log_;
  pid_t pid_ = -1;  // -1 once reaped
};

// Free TCP ports on 127.0.0.1, as the kernel hands them out.
std::vector<int> FreePorts(int count);

// n = k + m daemons forming one group on 127.0.0.1.
class Cluster {
 public:
  static absl::StatusOr<std::unique_ptr<Cluster>> Start(const std::string& dir, int k, int m,
                                                        DaemonProcess::Options options);
  int n() const { return static_cast<int>(daemons_.size()); }
  DaemonProcess& daemon(int slot) { return *daemons_[slot]; }
  // host:port of a slot's peer plane.
  const std::string& peer_address(int slot) const { return peer_addresses_[slot]; }
  // The CA and per-slot certificates (with options.tls): ca.crt, slot-N.crt,
  // slot-N.key; empty without TLS.
  const std::string& tls_dir() const { return tls_dir_; }

 private:
  std::vector<std::unique_ptr<DaemonProcess>> daemons_;
  std::vector<std::string> peer_addresses_;
  std::string tls_dir_;
};

}  // namespace ecsnap::testing

#endif  // ECSNAP_TESTS_HARNESS_H_
