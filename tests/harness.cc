#include "tests/harness.h"

#include <filesystem>
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <cstdlib>
#include <fstream>
#include <optional>
#include <random>
#include <thread>

#include <grpcpp/grpcpp.h>

#include "absl/strings/str_cat.h"
#include "client/admin_channel.h"
#include "common/read_file.h"
#include "absl/strings/str_format.h"

namespace ecsnap::testing {

TempDir::TempDir() {
  char templ[] = "/tmp/ecsnap-test-XXXXXX";
  char* p = ::mkdtemp(templ);
  if (p == nullptr) std::abort();
  path_ = p;
}

TempDir::~TempDir() { std::filesystem::remove_all(path_); }

std::string PrivateMountNamespace() {
  static const std::string* why = [] {
    if (::unshare(CLONE_NEWNS) != 0) {
      return new std::string(absl::StrCat("cannot make a mount namespace (",
                                          std::strerror(errno),
                                          "; it needs root or CAP_SYS_ADMIN)"));
    }
    // Nothing mounted here propagates back to the machine's own mounts.
    if (::mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0) {
      return new std::string(
          absl::StrCat("cannot make the mounts private: ", std::strerror(errno)));
    }
    return new std::string();
  }();
  return *why;
}

std::string MountHugeTmpfs(const std::string& dir) {
  if (std::string why = PrivateMountNamespace(); !why.empty()) return why;
  const char* options = "mode=0700,huge=within_size";
  if (::mount("tmpfs", dir.c_str(), "tmpfs", 0, options) != 0) {
    return absl::StrCat("cannot mount a tmpfs with ", options, ": ", std::strerror(errno));
  }
  return "";
}

std::string RunfilePath(const std::string& workspace_relative) {
  const char* srcdir = std::getenv("TEST_SRCDIR");
  if (srcdir == nullptr) return workspace_relative;
  return absl::StrCat(srcdir, "/ecsnap/", workspace_relative);
}

pid_t Spawn(const std::vector<std::string>& argv, const std::string& log_path) {
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid != 0) return pid;
  // Die with the parent. If it already died between fork and prctl, the
  // signal will never come: exit now.
  if (::prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || ::getppid() != parent) ::_exit(126);
  const int fd = ::open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  if (fd >= 0) {
    ::dup2(fd, 1);
    ::dup2(fd, 2);
  }
  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  ::execv(args[0], args.data());
  ::_exit(127);
}

int StopProcess(pid_t pid, int signal, int timeout_ms) {
  if (pid <= 0) return -1;
  ::kill(pid, signal);
  int status = 0;
  for (int waited = 0; waited < timeout_ms; waited += 10) {
    if (::waitpid(pid, &status, WNOHANG) == pid) return status;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ::kill(pid, SIGKILL);
  ::waitpid(pid, &status, 0);
  return status;
}

DaemonProcess::DaemonProcess(std::string dir, Options options)
    : dir_(std::move(dir)), options_(std::move(options)) {
  socket_ = dir_ + "/data.sock";
  admin_socket_ = dir_ + "/admin.sock";
  log_ = dir_ + "/ecsnapd.log";
}

absl::StatusOr<std::unique_ptr<DaemonProcess>> DaemonProcess::Start(const std::string& dir,
                                                                    Options options) {
  std::unique_ptr<DaemonProcess> d(new DaemonProcess(dir, std::move(options)));
  absl::Status st = d->Launch();
  if (!st.ok()) return st;
  return d;
}

absl::Status DaemonProcess::Launch() {
  std::vector<std::string> argv = {
      RunfilePath("daemon/ecsnapd"),
      "--arena_dir=" + dir_ + "/arena",
      absl::StrCat("--arena_bytes=", options_.arena_bytes),
      "--socket=" + socket_,
      "--admin_address=unix:" + admin_socket_,
      absl::StrCat("--retain=", options_.retain),
  };
  if (!options_.admin_token_file.empty()) {
    argv.push_back("--admin_token_file=" + options_.admin_token_file);
  }
  if (!options_.config_path.empty()) {
    argv.push_back("--config=" + options_.config_path);
    argv.push_back(absl::StrCat("--slot=", options_.slot));
  }
  for (const auto& f : options_.extra_flags) argv.push_back(f);
  pid_ = Spawn(argv, log_);
  // Ready when the admin plane answers; bounded at 20 s plus 5 s per GiB of
  // arena (it is populated before the daemon serves). A fresh channel per
  // probe: one that failed before the socket existed would sit out gRPC's
  // reconnect backoff.
  const int attempts = 400 + static_cast<int>(options_.arena_bytes >> 30) * 100;
  for (int attempt = 0; attempt < attempts; ++attempt) {
    auto stub = AdminStub();
    if (!alive()) {
      return absl::InternalError(absl::StrCat("ecsnapd exited during start:\n", Log()));
    }
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(200));
    admin::StatusResponse r;
    if (stub->Status(&ctx, {}, &r).ok()) return absl::OkStatus();
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return absl::DeadlineExceededError(absl::StrCat("ecsnapd did not become ready:\n", Log()));
}

DaemonProcess::~DaemonProcess() {
  if (pid_ > 0) StopProcess(pid_, SIGKILL);
}

absl::Duration DaemonProcess::Terminate(absl::Duration bound, int* wait_status) {
  if (wait_status != nullptr) *wait_status = -1;
  if (pid_ <= 0) return absl::InfiniteDuration();
  const absl::Time start = absl::Now();
  ::kill(pid_, SIGTERM);
  ::kill(pid_, SIGCONT);
  int status = 0;
  absl::Duration took = absl::InfiniteDuration();
  while (absl::Now() - start < bound) {
    if (::waitpid(pid_, &status, WNOHANG) == pid_) {
      took = absl::Now() - start;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  if (took == absl::InfiniteDuration()) {
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, &status, 0);
  }
  pid_ = -1;
  if (wait_status != nullptr) *wait_status = status;
  return took;
}

void DaemonProcess::Kill() {
  StopProcess(pid_, SIGKILL);
  pid_ = -1;
}

absl::Status DaemonProcess::Restart() {
  if (pid_ > 0) Kill();
  return Launch();
}

absl::Status DaemonProcess::Replace() {
  if (pid_ > 0) Kill();
  std::filesystem::remove_all(dir_ + "/arena");
  return Launch();
}

void DaemonProcess::Pause() {
  if (pid_ > 0) ::kill(pid_, SIGSTOP);
}

void DaemonProcess::Resume() {
  if (pid_ > 0) ::kill(pid_, SIGCONT);
}

bool DaemonProcess::alive() {
  if (pid_ <= 0) return false;
  int status;
  if (::waitpid(pid_, &status, WNOHANG) == 0) return true;
  pid_ = -1;
  return false;
}

std::string DaemonProcess::Log() const { return ReadWholeFile(log_).value_or(""); }

std::shared_ptr<grpc::Channel> DaemonProcess::AdminChannel() const {
  AdminChannelOptions o;
  o.address = admin_address();
  o.token_file = admin_token_file();
  auto channel = OpenAdminChannel(o);
  if (!channel.ok()) {
    return grpc::CreateChannel("unix:" + dir_ + "/no-token-yet",
                               grpc::InsecureChannelCredentials());
  }
  return *channel;
}

std::unique_ptr<admin::Admin::Stub> DaemonProcess::AdminStub() const {
  return admin::Admin::NewStub(AdminChannel());
}

std::unique_ptr<grpc::health::v1::Health::Stub> DaemonProcess::HealthStub() const {
  return grpc::health::v1::Health::NewStub(AdminChannel());
}

absl::StatusOr<absl::Duration> DaemonProcess::WaitArenaFirstWrites(absl::Duration limit) const {
  const absl::Time start = absl::Now();
  auto stub = AdminStub();
  while (absl::Now() - start < limit) {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(5)));
    admin::StatusRequest req;
    admin::StatusResponse resp;
    if (stub->Status(&ctx, req, &resp).ok() && resp.arena_first_writes_done()) {
      return absl::Now() - start;
    }
    absl::SleepFor(absl::Milliseconds(20));
  }
  return absl::DeadlineExceededError(absl::StrCat(
      "the arena's first writes were not done within ", absl::FormatDuration(limit)));
}

std::string DaemonProcess::admin_token_file() const {
  return options_.admin_token_file.empty() ? dir_ + "/admin.token" : options_.admin_token_file;
}

std::vector<int> FreePorts(int count) {
  // Below the kernel's ephemeral range (ip_local_port_range): a port from
  // that range, free now, can be taken as the source port of a connection
  // the daemons already up make before the daemon it is meant for binds it.
  int low = 32768;
  if (std::optional<std::string> range = ReadWholeFile("/proc/sys/net/ipv4/ip_local_port_range")) {
    low = std::atoi(range->c_str());
  }
  const int lo = std::max(1024, low - 12000), hi = std::max(lo + 1000, low);
  static std::mt19937 rng(static_cast<uint32_t>(::getpid()) * 2654435761u);
  // All held open at once, so that none is handed out twice.
  std::vector<int> fds, ports;
  for (int tries = 0; static_cast<int>(ports.size()) < count && tries < 10000; ++tries) {
    const int port = lo + static_cast<int>(rng() % static_cast<uint32_t>(hi - lo));
    const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(static_cast<uint16_t>(port));
    if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
      ::close(fd);
      continue;
    }
    ports.push_back(port);
    fds.push_back(fd);
  }
  for (int fd : fds) ::close(fd);
  return ports;
}

absl::StatusOr<std::unique_ptr<Cluster>> Cluster::Start(const std::string& dir, int k, int m,
                                                        DaemonProcess::Options options) {
  const int n = k + m;
  const std::vector<int> ports = FreePorts(n);
  // peer_timeout_ms 2000 unless the test sets its own (a field may appear
  // only once).
  const bool own_timeout = options.cluster_fields.find("peer_timeout_ms") != std::string::npos;
  std::string config = absl::StrFormat("cluster {\n  k: %d\n  m: %d\n%s  %s\n", k, m,
                                       own_timeout ? "" : "  peer_timeout_ms: 2000\n",
                                       options.cluster_fields);
  for (int port : ports) {
    absl::StrAppend(&config, "  slots { peer_address: \"127.0.0.1:", port, "\" }\n");
  }
  absl::StrAppend(&config, "}\n");
  if (options.tls) {
    const std::string tls = dir + "/tls";
    const std::string make = absl::StrCat("bash ", RunfilePath("deploy/make_certs.sh"), " ", tls,
                                          " ", n, " >", dir, "/make_certs.log 2>&1");
    if (std::system(make.c_str()) != 0) {
      return absl::InternalError(absl::StrCat("deploy/make_certs.sh failed; see ", dir,
                                              "/make_certs.log"));
    }
    absl::StrAppend(&config, "daemon {\n  tls {\n    cert_file: \"", tls,
                    "/slot-{slot}.crt\"\n    key_file: \"", tls,
                    "/slot-{slot}.key\"\n    ca_file: \"", tls, "/ca.crt\"\n  }\n}\n");
  } else {
    absl::StrAppend(&config, "daemon { plaintext: true }\n");
  }
  const std::string config_path = dir + "/cluster.textproto";
  std::ofstream(config_path) << config;
  std::unique_ptr<Cluster> c(new Cluster());
  for (int port : ports) c->peer_addresses_.push_back(absl::StrCat("127.0.0.1:", port));
  if (options.tls) c->tls_dir_ = dir + "/tls";
  options.config_path = config_path;
  for (int slot = 0; slot < n; ++slot) {
    const std::string d = absl::StrCat(dir, "/slot", slot);
    ::mkdir(d.c_str(), 0755);
    options.slot = slot;
    auto daemon = DaemonProcess::Start(d, options);
    if (!daemon.ok()) return daemon.status();
    c->daemons_.push_back(std::move(*daemon));
  }
  return c;
}

bool DaemonProcess::FlipByteAfter(const void* pattern, size_t pattern_bytes, size_t at) const {
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(dir_ + "/arena", ec)) {
    const int fd = ::open(entry.path().c_str(), O_RDWR | O_CLOEXEC);
    if (fd < 0) continue;
    struct stat st {};
    bool flipped = false;
    if (::fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_size > 0) {
      void* base = ::mmap(nullptr, st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
      if (base != MAP_FAILED) {
        auto* found = static_cast<uint8_t*>(::memmem(base, st.st_size, pattern, pattern_bytes));
        if (found != nullptr && found + at < static_cast<uint8_t*>(base) + st.st_size) {
          found[at] ^= 0xFF;
          flipped = true;
        }
        ::munmap(base, st.st_size);
      }
    }
    ::close(fd);
    if (flipped) return true;
  }
  return false;
}

}  // namespace ecsnap::testing
