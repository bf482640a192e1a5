// Test harness: real ecsnapd processes on private Unix sockets.
//
// Every daemon binds sockets inside a fresh temporary directory, is started
// with fork/exec, and is stopped by its process id. Waits are bounded.
#ifndef ECSNAP_TESTS_HARNESS_H_
#define ECSNAP_TESTS_HARNESS_H_

#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "proto/admin.grpc.pb.h"

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

// Path of a binary built by Bazel, from the test's runfiles.
std::string RunfilePath(const std::string& workspace_relative);

// Runs `argv` with stdout and stderr sent to `log_path`; returns its pid.
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
    std::vector<std::string> extra_flags;
  };

  // Starts ecsnapd with its arena and sockets in `dir` and waits until its
  // admin plane answers.
  static absl::StatusOr<std::unique_ptr<DaemonProcess>> Start(const std::string& dir,
                                                              Options options);
  ~DaemonProcess();

  // SIGKILL, reaped. The arena file stays, as after a crash.
  void Kill();
  // Same directory, same flags: the daemon a supervisor would restart.
  absl::Status Restart();

  pid_t pid() const { return pid_; }
  // Reaps the daemon if it exited.
  bool alive();
  const std::string& socket() const { return socket_; }
  std::string admin_address() const { return "unix:" + admin_socket_; }
  const std::string& log_path() const { return log_; }
  std::string Log() const;
  std::unique_ptr<admin::Admin::Stub> AdminStub() const;

 private:
  DaemonProcess(std::string dir, Options options);
  absl::Status Launch();

  const std::string dir_;
  const Options options_;
  std::string socket_;
  std::string admin_socket_;
  std::string log_;
  pid_t pid_ = -1;  // -1 once reaped
};

}  // namespace ecsnap::testing

#endif  // ECSNAP_TESTS_HARNESS_H_
