// What operators and their tools see of a real ecsnapd (issue: operations):
// the standard grpc.health.v1 service on every port, NOT_SERVING while a
// replaced node rebuilds and SERVING after; systemd's notify protocol
// (READY=1 only once serving, WATCHDOG=1 pings, STOPPING=1) over a real
// notify socket.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/wait.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "proto/health.grpc.pb.h"
#include "tests/cluster_fixture.h"
#include "tests/harness.h"

namespace ecsnap {
namespace {

using grpc::health::v1::Health;
using grpc::health::v1::HealthCheckRequest;
using grpc::health::v1::HealthCheckResponse;
using testing::DaemonProcess;
using testing::FreePorts;
using testing::TempDir;

// The serving status `stub` answers, or the call's error as a status name.
std::string Check(Health::Stub* stub) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  HealthCheckResponse resp;
  grpc::Status st = stub->Check(&ctx, HealthCheckRequest(), &resp);
  if (!st.ok()) return absl::StrCat("error ", st.error_code(), ": ", st.error_message());
  return HealthCheckResponse::ServingStatus_Name(resp.status());
}

// Runs `command` (bounded by ecsnapctl's own deadline); its stdout in `out`,
// its exit status returned.
int RunCommand(const std::string& command, std::string* out) {
  out->clear();
  FILE* p = ::popen((command + " 2>/dev/null").c_str(), "r");
  if (p == nullptr) return -1;
  char buf[256];
  while (std::fgets(buf, sizeof(buf), p) != nullptr) *out += buf;
  const int status = ::pclose(p);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

// Polls `stub` until it answers `want` (bounded); returns the last answer.
std::string WaitFor(Health::Stub* stub, const std::string& want, int seconds) {
  std::string got;
  for (int i = 0; i < seconds * 20; ++i) {
    got = Check(stub);
    if (got == want) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return got;
}

TEST(HealthTest, ALoneDaemonServesHealthOnItsAdminPortAndItsProbePort) {
  TempDir dir;
  const int port = FreePorts(1)[0];
  DaemonProcess::Options o;
  o.extra_flags = {absl::StrCat("--health_address=127.0.0.1:", port)};
  auto d = DaemonProcess::Start(dir.path(), o);
  ASSERT_TRUE(d.ok()) << d.status();
  // The probe port: no credentials at all, as a kubelet asks.
  auto probe = Health::NewStub(
      grpc::CreateChannel(absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials()));
  EXPECT_EQ(WaitFor(probe.get(), "SERVING", 10), "SERVING") << (*d)->Log();
  // The admin port: with the token, as every admin call.
  EXPECT_EQ(WaitFor((*d)->HealthStub().get(), "SERVING", 10), "SERVING");
  // ecsnapctl health: the answer, and an exit status a probe can use.
  const std::string ctl = absl::StrCat(testing::RunfilePath("client/ecsnapctl"), " --address=",
                                       (*d)->admin_address(), " --token_file=",
                                       (*d)->admin_token_file());
  std::string out;
  EXPECT_EQ(RunCommand(ctl + " health", &out), 0);
  EXPECT_EQ(out, "SERVING\n");
  EXPECT_EQ(RunCommand(ctl + " --service=nope health", &out), 1);
  EXPECT_EQ(RunCommand(ctl + " --service=ecsnap.admin.Admin health", &out), 0);
  EXPECT_EQ(RunCommand(absl::StrCat(testing::RunfilePath("client/ecsnapctl"),
                                    " --probe_port --address=127.0.0.1:", port,
                                    " --service=ecsnap.live health"),
                       &out),
            0);
  EXPECT_EQ(out, "SERVING\n");
  // The probe port serves health only: an admin call there is unknown.
  auto admin = admin::Admin::NewStub(
      grpc::CreateChannel(absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  admin::StatusResponse status;
  EXPECT_EQ(admin->Status(&ctx, admin::StatusRequest(), &status).error_code(),
            grpc::StatusCode::UNIMPLEMENTED);
  // Watches held open by anyone on the probe port are budgeted (4 there):
  // the fifth is refused, and the admin port's own budget is untouched.
  std::vector<std::unique_ptr<grpc::ClientContext>> held_ctx;
  std::vector<std::unique_ptr<grpc::ClientReader<HealthCheckResponse>>> held;
  for (int i = 0; i < 4; ++i) {
    held_ctx.push_back(std::make_unique<grpc::ClientContext>());
    held.push_back(probe->Watch(held_ctx.back().get(), HealthCheckRequest()));
    HealthCheckResponse first;
    ASSERT_TRUE(held.back()->Read(&first)) << "watch " << i;
  }
  {
    grpc::ClientContext ctx5;
    auto fifth = probe->Watch(&ctx5, HealthCheckRequest());
    HealthCheckResponse r5;
    EXPECT_FALSE(fifth->Read(&r5));
    EXPECT_EQ(fifth->Finish().error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
    auto admin_health = (*d)->HealthStub();
    grpc::ClientContext ctx6;
    auto other = admin_health->Watch(&ctx6, HealthCheckRequest());
    HealthCheckResponse r6;
    EXPECT_TRUE(other->Read(&r6)) << "the admin port's watches are its own";
    ctx6.TryCancel();
    other->Finish();
  }
  for (size_t i = 0; i < held.size(); ++i) {
    held_ctx[i]->TryCancel();
    held[i]->Finish();
  }
  // Stopping: a watcher hears NOT_SERVING before the port closes. (A
  // cancelled watch frees its place within about a second: the server
  // looks at its client once a second.)
  std::unique_ptr<grpc::ClientContext> watch_ctx;
  std::unique_ptr<grpc::ClientReader<HealthCheckResponse>> watch;
  HealthCheckResponse r;
  bool watching = false;
  for (int i = 0; i < 50 && !watching; ++i) {
    if (watch != nullptr) {
      watch->Finish();
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    watch_ctx = std::make_unique<grpc::ClientContext>();
    watch_ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
    watch = probe->Watch(watch_ctx.get(), HealthCheckRequest());
    watching = watch->Read(&r);
  }
  ASSERT_TRUE(watching) << "the cancelled watches' places were not given back";
  EXPECT_EQ(r.status(), HealthCheckResponse::SERVING);
  std::thread term([&] { (*d)->Terminate(); });
  std::string last;
  while (watch->Read(&r)) last = HealthCheckResponse::ServingStatus_Name(r.status());
  watch->Finish();
  term.join();
  EXPECT_EQ(last, "NOT_SERVING");
}

TEST(HealthTest, AHealthPortThatIsTakenStopsTheDaemonWithASentence) {
  TempDir dir;
  const int port = FreePorts(1)[0];
  // Hold the port.
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  ASSERT_EQ(::listen(fd, 1), 0);
  DaemonProcess::Options o;
  o.extra_flags = {absl::StrCat("--health_address=127.0.0.1:", port)};
  auto d = DaemonProcess::Start(dir.path(), o);
  ::close(fd);
  ASSERT_FALSE(d.ok());
  EXPECT_NE(d.status().message().find("cannot serve health checks on 127.0.0.1:"),
            std::string::npos)
      << d.status();
}

class HealthRebuildTest : public ClusterTest {};

TEST_F(HealthRebuildTest, AReplacedNodeIsNotServingUntilItsRebuildEndsThenServesBitExact) {
  // Rebuilds capped at 10 KB/s: the rebuild of a node takes many seconds,
  // time enough to see it not serving on a loaded machine.
  StartCluster(2, 2, "rebuild_bytes_per_sec: 10000");
  Snapshot(1);
  ASSERT_TRUE(WaitProtected(1));
  for (int s = 0; s < cluster_->n(); ++s) {
    EXPECT_EQ(WaitFor(cluster_->daemon(s).HealthStub().get(), "SERVING", 10), "SERVING");
  }
  ASSERT_NO_FATAL_FAILURE(ReplaceNode(0, /*reconnect=*/false));
  auto health = cluster_->daemon(0).HealthStub();
  EXPECT_EQ(Check(health.get()), "NOT_SERVING") << "a node rebuilding its data is not ready";
  // Alive all the while: a liveness probe must not kill a long rebuild.
  grpc::ClientContext live_ctx;
  HealthCheckRequest live;
  live.set_service("ecsnap.live");
  HealthCheckResponse live_r;
  ASSERT_TRUE(health->Check(&live_ctx, live, &live_r).ok());
  EXPECT_EQ(live_r.status(), HealthCheckResponse::SERVING);
  // A watcher (as gRPC's client-side health checking uses) hears NOT_SERVING,
  // then SERVING once the rebuild is done.
  grpc::ClientContext watch_ctx;
  watch_ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
  auto watch = health->Watch(&watch_ctx, HealthCheckRequest());
  std::vector<std::string> heard;
  HealthCheckResponse r;
  while (watch->Read(&r)) {
    heard.push_back(HealthCheckResponse::ServingStatus_Name(r.status()));
    if (r.status() == HealthCheckResponse::SERVING) break;
  }
  watch_ctx.TryCancel();
  watch->Finish();
  EXPECT_EQ(heard, (std::vector<std::string>{"NOT_SERVING", "SERVING"}))
      << cluster_->daemon(0).Log();
  EXPECT_EQ(Check(health.get()), "SERVING");
  EXPECT_EQ(StateOf(0, 1), v1::PROTECTED) << "SERVING came before the rebuild ended";
  Reconnect(0);
  EXPECT_EQ(RestoreAndCheck(0), 1u);
}

TEST_F(HealthRebuildTest, PeersListeningOnEveryAddressProtectAndRebuild) {
  // peer_listen_host: the peer plane and bulk port bind 0.0.0.0 while peers
  // still dial 127.0.0.1 (as on a host network whose own name is loopback).
  StartCluster(2, 1, "", {"--peer_listen_host=0.0.0.0"});
  Snapshot(1);
  ASSERT_TRUE(WaitProtected(1)) << cluster_->daemon(0).Log();
  EXPECT_NE(cluster_->daemon(0).Log().find("peer plane on 0.0.0.0:"), std::string::npos)
      << cluster_->daemon(0).Log();
  ASSERT_NO_FATAL_FAILURE(ReplaceNode(1));
  EXPECT_EQ(RestoreAndCheck(1), 1u);
}

// GET `path` from 127.0.0.1:`port` (HTTP/1.0, 5 s bound); the whole reply.
std::string HttpGet(int port, const std::string& path) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  timeval tv{5, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  std::string reply;
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0) {
    const std::string req = "GET " + path + " HTTP/1.0\r\n\r\n";
    if (::send(fd, req.data(), req.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(req.size())) {
      char buf[65536];
      ssize_t n;
      while ((n = ::recv(fd, buf, sizeof(buf), 0)) > 0) reply.append(buf, n);
    }
  }
  ::close(fd);
  return reply;
}

// The port the `nth` (1: first) daemon run in `d`'s log serves /metrics on,
// waiting for its line (bounded); -1 when it does not come.
int MetricsPort(DaemonProcess& d, int nth = 1) {
  constexpr char kLine[] = "metrics on http://127.0.0.1:";
  for (int i = 0; i < 200; ++i) {
    const std::string log = d.Log();
    size_t at = std::string::npos;
    int seen = 0;
    for (size_t p = log.find(kLine); p != std::string::npos; p = log.find(kLine, p + 1)) {
      at = p;
      if (++seen == nth) break;
    }
    if (seen >= nth) return std::atoi(log.c_str() + at + std::strlen(kLine));
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return -1;
}

// The sum of the samples of `series` (a name, or a name with its labels up
// to some point: `x{peer="1"`) in a scrape; -1 when there is none.
double Sample(const std::string& body, const std::string& series) {
  double sum = -1;
  for (absl::string_view line : absl::StrSplit(body, '\n')) {
    if (!absl::StartsWith(line, series)) continue;
    const char next = line.size() > series.size() ? line[series.size()] : 0;
    if (series.back() != '"' && next != ' ' && next != '{') continue;  // a longer name
    double v = 0;
    if (!absl::SimpleAtod(line.substr(line.rfind(' ') + 1), &v)) continue;
    sum = (sum < 0 ? 0 : sum) + v;
  }
  return sum;
}

class MetricsTest : public ClusterTest {};

TEST_F(MetricsTest, CountersMoveWithASnapshotAndARebuild) {
  StartCluster(2, 2, "rebuild_bytes_per_sec: 10000", {"--metrics_address=127.0.0.1:0"});
  const int port1 = MetricsPort(cluster_->daemon(1));
  ASSERT_GT(port1, 0) << cluster_->daemon(1).Log();
  // Ready once its start-up pass has asked the group what it holds.
  std::string before;
  for (int i = 0; i < 300; ++i) {
    before = HttpGet(port1, "/metrics");
    if (Sample(before, "ecsnap_ready") == 1) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  ASSERT_NE(before.find("200 OK"), std::string::npos) << before;
  EXPECT_NE(before.find("Content-Type: text/plain; version=0.0.4"), std::string::npos) << before;
  EXPECT_EQ(Sample(before, "ecsnap_ready"), 1) << cluster_->daemon(1).Log();
  EXPECT_NE(HttpGet(port1, "/other").find("404"), std::string::npos);

  Snapshot(1);
  ASSERT_TRUE(WaitProtected(1));
  // PROTECTED is visible a moment before its latency is recorded.
  std::string after;
  for (int i = 0; i < 100; ++i) {
    after = HttpGet(port1, "/metrics");
    if (Sample(after, "ecsnap_protect_seconds_count") >= 1) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_GE(Sample(after, "ecsnap_rank_commits_total"),
            std::max(0.0, Sample(before, "ecsnap_rank_commits_total")) + kRanksPerNode)
      << after;
  EXPECT_GT(Sample(after, "ecsnap_committed_bytes_total"), 0);
  EXPECT_GE(Sample(after, "ecsnap_snapshot_commit_seconds_count"), kRanksPerNode);
  EXPECT_GE(Sample(after, "ecsnap_protect_seconds_count"), 1);
  EXPECT_GT(Sample(after, "ecsnap_peer_pushed_bytes_total"), 0) << after;
  EXPECT_EQ(Sample(after, "ecsnap_steps{job_id=\"job\",state=\"PROTECTED\""), 1) << after;
  EXPECT_EQ(Sample(after, "ecsnap_peer_reachable"), 3) << after;
  EXPECT_GT(Sample(after, "ecsnap_arena_bytes{state=\"used\""), 0);

  // A replaced node rebuilds (capped): not ready, a rebuild running; then
  // ready, with bytes fetched from its peers and decoded.
  ASSERT_NO_FATAL_FAILURE(ReplaceNode(0, /*reconnect=*/false));
  const int port0 = MetricsPort(cluster_->daemon(0), /*nth=*/2);  // the replacement's
  ASSERT_GT(port0, 0) << cluster_->daemon(0).Log();
  const std::string during = HttpGet(port0, "/metrics");
  EXPECT_EQ(Sample(during, "ecsnap_ready"), 0) << during;
  EXPECT_EQ(Sample(during, "ecsnap_rebuild_active"), 1) << during;
  std::string done;
  for (int i = 0; i < 1200; ++i) {
    done = HttpGet(port0, "/metrics");
    if (Sample(done, "ecsnap_ready") == 1) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_EQ(Sample(done, "ecsnap_ready"), 1) << cluster_->daemon(0).Log();
  EXPECT_GT(Sample(done, "ecsnap_rebuild_bytes_total"), 0) << done;
  EXPECT_GE(Sample(done, "ecsnap_rebuild_seconds_count"), 1) << done;
  EXPECT_GT(Sample(done, "ecsnap_peer_fetched_bytes_total"), 0) << done;
  Reconnect(0);
  EXPECT_EQ(RestoreAndCheck(0), 1u);
}

// A notify socket as systemd opens it for a Type=notify unit.
class NotifySocket {
 public:
  explicit NotifySocket(const std::string& path) : path_(path) {
    fd_ = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::snprintf(a.sun_path, sizeof(a.sun_path), "%s", path.c_str());
    ok_ = fd_ >= 0 && ::bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0;
  }
  ~NotifySocket() {
    if (fd_ >= 0) ::close(fd_);
    ::unlink(path_.c_str());
  }
  bool ok() const { return ok_; }
  // The next message's lines, or empty after `ms` without one.
  std::vector<std::string> Next(int ms) {
    timeval tv{ms / 1000, (ms % 1000) * 1000};
    ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    char buf[4096];
    const ssize_t n = ::recv(fd_, buf, sizeof(buf), 0);
    if (n <= 0) return {};
    return absl::StrSplit(std::string(buf, n), '\n', absl::SkipEmpty());
  }
  // Reads messages for up to `ms` until one has `line`.
  bool WaitFor(const std::string& line, int ms, std::vector<std::string>* seen) {
    const auto end = std::chrono::steady_clock::now() + std::chrono::milliseconds(ms);
    while (std::chrono::steady_clock::now() < end) {
      bool found = false;
      for (const std::string& l : Next(200)) {
        seen->push_back(l);
        found |= l == line;
      }
      if (found) return true;
    }
    return false;
  }

 private:
  std::string path_;
  int fd_ = -1;
  bool ok_ = false;
};

TEST(SystemdTest, ReadyOnlyOnceServingThenWatchdogPingsThenStopping) {
  TempDir dir;
  NotifySocket notify(dir.path() + "/notify");
  ASSERT_TRUE(notify.ok());
  // The environment systemd gives a Type=notify unit with WatchdogSec=0.4.
  ::setenv("NOTIFY_SOCKET", (dir.path() + "/notify").c_str(), 1);
  ::setenv("WATCHDOG_USEC", "400000", 1);
  auto d = DaemonProcess::Start(dir.path(), DaemonProcess::Options{});
  ::unsetenv("NOTIFY_SOCKET");
  ::unsetenv("WATCHDOG_USEC");
  ASSERT_TRUE(d.ok()) << d.status();
  std::vector<std::string> seen;
  ASSERT_TRUE(notify.WaitFor("READY=1", 10000, &seen)) << (*d)->Log();
  // READY came once the daemon serves.
  EXPECT_EQ(Check((*d)->HealthStub().get()), "SERVING");
  bool status_line = false;
  for (const std::string& l : seen) status_line |= l.rfind("STATUS=serving: slot 0", 0) == 0;
  EXPECT_TRUE(status_line) << "READY carries a STATUS= line";
  // Pinged every half interval (200 ms): several within a second.
  int pings = 0;
  const auto end = std::chrono::steady_clock::now() + std::chrono::milliseconds(1000);
  while (std::chrono::steady_clock::now() < end) {
    for (const std::string& l : notify.Next(300)) pings += l == "WATCHDOG=1";
  }
  EXPECT_GE(pings, 3) << (*d)->Log();
  // A stopped daemon does not ping (systemd would restart it).
  ::kill((*d)->pid(), SIGSTOP);
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  while (!notify.Next(50).empty()) {
  }
  EXPECT_TRUE(notify.Next(600).empty()) << "pings from a stopped process";
  ::kill((*d)->pid(), SIGCONT);
  EXPECT_TRUE(notify.WaitFor("WATCHDOG=1", 2000, &seen)) << "pings resume";
  std::thread term([&] { (*d)->Terminate(); });
  EXPECT_TRUE(notify.WaitFor("STOPPING=1", 5000, &seen));
  term.join();
}

}  // namespace
}  // namespace ecsnap
