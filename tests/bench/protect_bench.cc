// protect_bench: the peer plane against raw TCP on loopback, same run.
//
// Starts n = k + m daemons (one group on 127.0.0.1), one rank per node with
// --bytes of state, and times
//   protect  from every node LOCAL to every node PROTECTED: each node sends
//            m x payload and folds m x payload, n x m x payload in all
//   rebuild  one node SIGKILLed and replaced empty: it fetches k chunks for
//            each of its n stripes, n x payload, decodes and verifies (the
//            checksums and the decoding alone, on one core, are timed too:
//            rebuild_vs_tcp_plus_compute)
// against streaming the same number of bytes through one plain TCP socket
// pair on 127.0.0.1. Ratios are times relative to TCP (1.0 = at its limit).
// The same bytes are also streamed over as many TCP connections at once as
// each phase uses (protect_vs_tcp_streams, rebuild_vs_tcp_streams). A rebuild
// also writes its share into memory the replacement never touched; the first
// stores into fresh shared memory of that many bytes are timed too, and the
// rebuild compared with TCP plus them (rebuild_vs_tcp_plus_fresh_memory).
// Protection is timed once every daemon's background first writes are done
// (the steady state a deployed daemon is in by a job's first snapshot).
// Last line: RESULT protect_vs_tcp=<x> rebuild_vs_tcp=<y> ...
//
//   bazel run -c opt //tests/bench:protect_bench [-- --bytes=1073741824 --k=2 --m=2]
//
// Then --latency_steps small steps (--latency_bytes per rank) are protected
// one at a time: LOCAL -> PROTECTED p50 and p99, the latency a trainer that
// snapshots every step waits for. Last line:
//   RESULT protect_vs_tcp=... rebuild_vs_tcp=... protect_p50_ms=... protect_p99_ms=...
//
// It refuses a --bytes the machine's memory cannot hold, fails loudly past
// --max_seconds, and leaves no daemon or arena behind on any exit.
#include <filesystem>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <map>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <regex>
#include <sstream>
#include <string>
#include <thread>

#include <grpcpp/grpcpp.h>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "client/ecsnap.h"
#include "ec/codec.h"
#include "ec/crc32c.h"
#include "tests/bench/bench_util.h"
#include "tests/harness.h"

ABSL_FLAG(std::string, arena_pages, "huge",
          "huge: the daemons' arenas on a tmpfs mounted huge=within_size (in a mount namespace "
          "of the bench's own; needs root), as deploy/dev-shm-ecsnap.mount sets up; base: on "
          "/dev/shm as it is (4 KiB pages here).");
ABSL_FLAG(uint64_t, bytes, uint64_t{1} << 30, "State bytes per node (one rank per node).");
ABSL_FLAG(int, k, 2, "Data chunks per stripe.");
ABSL_FLAG(bool, tls, false,
          "Mutual TLS on the peer plane (as deployed off loopback); default plaintext, so that "
          "the figures compare with the TCP baseline, which is plaintext too.");
ABSL_FLAG(std::string, bulk, "tcp",
          "How chunk bytes travel between daemons: tcp (cluster.bulk_transport BULK_TCP, the "
          "default) or grpc (BULK_GRPC, inside the peer streams).");
ABSL_FLAG(int, m, 2, "Parity chunks per stripe.");
ABSL_FLAG(int, protect_steps, 4,
          "Full-size steps protected one after another: the first is reported apart (fresh "
          "windows), the last is the steady state; the newest is then rebuilt.");
ABSL_FLAG(int, latency_steps, 20,
          "Small steps snapshotted after the rebuild, one at a time, to time LOCAL -> PROTECTED "
          "(p50, p99); 0 skips them.");
ABSL_FLAG(uint64_t, latency_bytes, 16 << 20, "Bytes per rank of each small step.");
ABSL_FLAG(int, max_seconds, 600,
          "Wall-clock bound of the whole run: past it the bench fails loudly.");

namespace {

using Clock = std::chrono::steady_clock;

double Since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

void Check(const absl::Status& st, const char* what) {
  ecsnap::bench::CheckOk(st, "protect_bench", what);
}

// Seconds to stream `bytes` over `streams` TCP connections on 127.0.0.1 at
// once (each carrying its share), connections made before the clock starts.
double TcpSeconds(uint64_t bytes, int streams = 1) {
  const int listener = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  socklen_t len = sizeof(addr);
  ::getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &len);
  ::listen(listener, streams);
  constexpr size_t kBuf = 1 << 20;
  std::vector<int> senders, receivers;
  for (int i = 0; i < streams; ++i) {
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
    senders.push_back(fd);
    receivers.push_back(::accept(listener, nullptr, nullptr));
  }
  std::vector<std::thread> threads;
  const auto t0 = Clock::now();
  for (int i = 0; i < streams; ++i) {
    const uint64_t share = bytes / streams + (i == 0 ? bytes % streams : 0);
    threads.emplace_back([fd = receivers[i], share] {
      std::vector<char> buf(kBuf);
      for (uint64_t got = 0; got < share;) {
        const ssize_t n = ::read(fd, buf.data(), buf.size());
        if (n <= 0) break;
        got += n;
      }
    });
    threads.emplace_back([fd = senders[i], share] {
      std::vector<char> buf(kBuf, 'x');
      for (uint64_t sent = 0; sent < share;) {
        const ssize_t n = ::write(fd, buf.data(), std::min<uint64_t>(buf.size(), share - sent));
        if (n <= 0) break;
        sent += n;
      }
      ::shutdown(fd, SHUT_WR);
    });
  }
  for (std::thread& t : threads) t.join();
  const double secs = Since(t0);
  for (int fd : senders) ::close(fd);
  for (int fd : receivers) ::close(fd);
  ::close(listener);
  return secs;
}

// Seconds to copy `bytes` from a warm buffer into a tmpfs file mapped and
// populated for writing just before (MADV_POPULATE_WRITE, as the daemon does
// for a window): the first store into each page of fresh shared memory. A
// rebuild must write the replaced node's whole share into fresh memory; on a
// machine where that costs microseconds a page (a virtual machine's page
// tables) it is a limit of its own, apart from the network's.
double FreshMemorySeconds(const std::string& dir, uint64_t bytes) {
  if (bytes == 0) return 0;
  const std::string path = dir + "/fresh-baseline";
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  auto fail = [&](const char* what) {
    std::fprintf(stderr, "protect_bench: the fresh-memory baseline: %s: %s\n", what,
                 std::strerror(errno));
    ::unlink(path.c_str());
    std::exit(1);
  };
  if (fd < 0) fail("open");
  if (const int rc = ::posix_fallocate(fd, 0, static_cast<off_t>(bytes)); rc != 0) {
    errno = rc;
    fail("posix_fallocate");
  }
  void* map = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  ::close(fd);
  if (map == MAP_FAILED) fail("mmap");
  // As the daemon maps a window: populated for writing first (Linux 5.14).
  if (::madvise(map, bytes, 23 /* MADV_POPULATE_WRITE */) != 0) fail("MADV_POPULATE_WRITE");
  constexpr size_t kBuf = 4 << 20;
  std::vector<uint8_t> src(kBuf, 0x5a);
  const auto t0 = Clock::now();
  for (uint64_t at = 0; at < bytes; at += kBuf) {
    std::memcpy(static_cast<uint8_t*>(map) + at, src.data(), std::min<uint64_t>(kBuf, bytes - at));
  }
  const double secs = Since(t0);
  ::munmap(map, bytes);
  ::unlink(path.c_str());
  return secs;
}

// Seconds one core takes for the work a rebuild of one node does besides
// moving bytes: the CRC-32C of every survivor chunk it reads (k of each of
// its n stripes) and the ISA-L decode of its chunk of each stripe from them,
// `chunk` bytes each, in 4 MiB slices as the rebuild reads them, each slice
// in cache as a slice just received is (the least this work can cost).
struct Compute {
  double crc = 0, decode = 0;
};
Compute RebuildComputeSeconds(int k, int m, uint64_t chunk) {
  auto codec = ecsnap::ec::Codec::Create(k, m);
  ecsnap::bench::CheckOk(codec.status(), "protect_bench", "making the codec");
  const int n = k + m;
  constexpr uint64_t kSlice = 4 << 20;
  std::mt19937_64 rng(7);
  std::vector<std::vector<uint8_t>> in(k, std::vector<uint8_t>(kSlice));
  for (auto& v : in) {
    for (auto& b : v) b = static_cast<uint8_t>(rng());
  }
  std::vector<uint8_t> out(kSlice);
  Compute c;
  uint32_t sink = 0;
  for (int s = 0; s < n; ++s) {
    // The node's position in stripe s, rebuilt from the first k others.
    const int target = (s + 1) % n;
    std::vector<ecsnap::ec::ConstBytes> shards(n);
    uint32_t present = 0;
    for (int q = 0, used = 0; q < n && used < k; ++q) {
      if (q == target) continue;
      shards[q] = in[used++];
      present |= 1u << q;
    }
    const std::vector<int> targets = {target};
    const std::vector<ecsnap::ec::MutableBytes> outs = {absl::MakeSpan(out)};
    for (uint64_t at = 0; at < chunk; at += kSlice) {
      const auto t0 = Clock::now();
      for (int q = 0; q < n; ++q) {
        if (present & (1u << q)) sink ^= ecsnap::ec::Crc32c(shards[q]);
      }
      const auto t1 = Clock::now();
      ecsnap::bench::CheckOk((*codec)->Reconstruct(s, shards, present, targets, outs),
                             "protect_bench", "decoding");
      c.crc += std::chrono::duration<double>(t1 - t0).count();
      c.decode += Since(t1);
    }
  }
  if (sink == 0x12345678) std::printf(" ");  // keeps the checksums
  return c;
}

// The state of `step` on daemon `d`, through an admin stub kept per daemon
// (a fresh channel per poll would cost more than the latencies measured).
ecsnap::v1::StepState StateOf(ecsnap::testing::DaemonProcess& d, uint64_t step) {
  static std::map<ecsnap::testing::DaemonProcess*, std::unique_ptr<ecsnap::admin::Admin::Stub>>
      stubs;
  auto& stub = stubs[&d];
  if (stub == nullptr) stub = d.AdminStub();
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  ecsnap::admin::ListStepsRequest req;
  ecsnap::admin::ListStepsResponse resp;
  if (!stub->ListSteps(&ctx, req, &resp).ok()) {
    stub.reset();  // a replaced daemon has a new token: ask again afresh
    return ecsnap::v1::STEP_STATE_UNSPECIFIED;
  }
  for (const auto& s : resp.steps()) {
    if (s.step() == step) return s.state();
  }
  return ecsnap::v1::STEP_STATE_UNSPECIFIED;
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const uint64_t bytes = absl::GetFlag(FLAGS_bytes) / 4096 * 4096;
  const int k = absl::GetFlag(FLAGS_k), m = absl::GetFlag(FLAGS_m), n = k + m;

  ecsnap::testing::DaemonProcess::Options o;
  o.tls = absl::GetFlag(FLAGS_tls);
  if (absl::GetFlag(FLAGS_bulk) == "grpc") {
    o.cluster_fields = "  bulk_transport: BULK_GRPC\n";
  } else if (absl::GetFlag(FLAGS_bulk) != "tcp") {
    std::fprintf(stderr, "protect_bench: --bulk is tcp or grpc\n");
    return 2;
  }
  std::printf("bulk transport: %s%s\n", absl::GetFlag(FLAGS_bulk).c_str(),
              o.tls ? ", peer plane mutual TLS" : ", plaintext");
  // The step and its parity (m/k), plus the next step's window: slack.
  // Windows of retain (1) + 2 steps, the parity rows of three steps (a
  // step's rows go when the group's floor passes it, which may lag the next
  // step's PROTECTED), slack.
  o.arena_bytes = (3 * bytes + 3 * bytes * m / k + (64 << 20)) / 4096 * 4096;
  // n arenas, the bench's own copy of every node's state, and the TCP
  // baseline's buffers; refuse what the machine cannot hold rather than be
  // killed half way with daemons and arenas left behind.
  // (and the fresh-memory baseline's file, n x payload / k)
  ecsnap::bench::RefuseUnlessMemoryFor(n * (o.arena_bytes + bytes) + n * bytes / k +
                                           (uint64_t{512} << 20),
                                       "protect_bench");
  // The bench bounds its own time: SIGALRM's default action ends it, and
  // RemoveWhenGone and the daemons' death signal clean up after it.
  ::alarm(static_cast<unsigned>(absl::GetFlag(FLAGS_max_seconds)));
  const auto t_start = Clock::now();

  char dir_template[] = "/dev/shm/ecsnap-bench-XXXXXX";
  const std::string dir = ::mkdtemp(dir_template);
  ecsnap::bench::RemoveWhenGone(dir);
  ecsnap::bench::PutArenasOn(absl::GetFlag(FLAGS_arena_pages), dir);
  auto cluster = ecsnap::testing::Cluster::Start(dir, k, m, o);
  Check(cluster.status(), "starting the cluster");

  // A daemon writes each page of its arena once in the background after it
  // starts (at idle priority). Deployed, that is long over by a job's first
  // snapshot; here it is waited for, so that protection is timed in the
  // steady state, and the time it took is printed.
  double warm_up = 0;
  for (int s = 0; s < n; ++s) {
    auto waited = (*cluster)->daemon(s).WaitArenaFirstWrites(
        absl::Seconds(absl::GetFlag(FLAGS_max_seconds) / 4.0));
    Check(waited.status(), "waiting for the arenas' first writes");
    warm_up += absl::ToDoubleSeconds(*waited);
  }
  std::printf("arenas' background first writes finished %.2f s after the cluster was up\n",
              warm_up);

  // One rank per node, each with its own state.
  std::vector<std::vector<uint8_t>> state(n);
  std::vector<std::unique_ptr<ecsnap::Client>> clients;
  std::mt19937_64 rng(1);
  for (int s = 0; s < n; ++s) {
    state[s].resize(bytes);
    uint64_t* w = reinterpret_cast<uint64_t*>(state[s].data());
    for (uint64_t i = 0; i < bytes / 8; ++i) w[i] = rng();
    ecsnap::ClientOptions co;
    co.daemon_address = (*cluster)->daemon(s).socket();
    co.job_id = "bench";
    co.rank = s;
    auto c = ecsnap::Client::Connect(co);
    Check(c.status(), "connecting");
    clients.push_back(std::move(*c));
  }
  auto tensors_of = [&](int s) {
    ecsnap::Tensor t;
    t.name = "state";
    t.dtype = ecsnap::DType::kUInt8;
    t.shape = {static_cast<int64_t>(bytes)};
    t.data = state[s].data();
    t.bytes = bytes;
    return std::vector<ecsnap::Tensor>{t};
  };
  // Step 1 is every rank's first: its windows are fresh files, so the copy
  // in pays the first store of every page, and the nodes push while the
  // others still copy. Later steps reuse windows (a rank keeps retain + 2),
  // as a training job does after its first few steps: the last of
  // --protect_steps is the steady state.
  // Polls until `step` is PROTECTED on every node (false past --max_seconds).
  auto wait_protected = [&](uint64_t step, std::chrono::milliseconds poll) {
    while (Since(t_start) < absl::GetFlag(FLAGS_max_seconds)) {
      bool all = true;
      for (int s = 0; s < n && all; ++s) {
        all = StateOf((*cluster)->daemon(s), step) == ecsnap::v1::PROTECTED;
      }
      if (all) return true;
      std::this_thread::sleep_for(poll);
    }
    return false;
  };
  const int protect_steps = std::max(1, absl::GetFlag(FLAGS_protect_steps));
  double t_protect = 0, t_protect_after_last = 0, t_protect_first = 0;
  for (int step = 1; step <= protect_steps; ++step) {
    std::vector<ecsnap::SnapshotHandle> handles;
    for (int s = 0; s < n; ++s) {
      auto h = clients[s]->Snapshot(step, tensors_of(s));
      Check(h.status(), "snapshot");
      handles.push_back(*h);
    }
    // A node starts pushing as soon as it is LOCAL, while the others may still
    // be copying their state in: timed from the first node LOCAL (what a
    // trainer waits for, and an upper bound on the transfer), and from the last
    // (a lower bound, once pushes overlap the others' copies).
    Clock::time_point t_first_local;
    for (size_t i = 0; i < handles.size(); ++i) {
      Check(handles[i].WaitCommitted(), "snapshot");
      if (i == 0) t_first_local = Clock::now();
    }
    const auto t_local = Clock::now();  // every node LOCAL
    const bool all = wait_protected(step, std::chrono::milliseconds(5));
    t_protect = Since(t_first_local);
    t_protect_after_last = Since(t_local);
    if (step == 1) t_protect_first = t_protect;
    if (!all) {
      std::fprintf(stderr, "protect_bench: step %d not PROTECTED on every node after %.0f s\n%s",
                   step, t_protect, (*cluster)->daemon(0).Log().c_str());
      return 1;
    }
  }

  // Lose node 1 and replace it empty; the daemon times its own rebuild.
  clients[1].reset();
  Check((*cluster)->daemon(1).Replace(), "replacing node 1");
  double t_rebuild = 0;
  const std::regex decoded("decoded in ([0-9.]+) s");
  while (t_rebuild == 0 && Since(t_start) < absl::GetFlag(FLAGS_max_seconds)) {
    std::smatch match;
    const std::string log = (*cluster)->daemon(1).Log();
    if (std::regex_search(log, match, decoded)) t_rebuild = std::stod(match[1]);
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  if (t_rebuild == 0) {
    std::fprintf(stderr, "protect_bench: no rebuild\n%s", (*cluster)->daemon(1).Log().c_str());
    return 1;
  }

  // Protection latency of small steps, as a trainer snapshotting every step
  // sees it: every rank commits step s, then the time until every node holds
  // it PROTECTED (polled every millisecond).
  std::vector<double> latencies;
  {
    auto c = ecsnap::Client::Connect([&] {
      ecsnap::ClientOptions co;
      co.daemon_address = (*cluster)->daemon(1).socket();
      co.job_id = "bench";
      co.rank = 1;
      return co;
    }());
    Check(c.status(), "reconnecting to the replaced node");
    clients[1] = std::move(*c);
  }
  const uint64_t small = std::min<uint64_t>(absl::GetFlag(FLAGS_latency_bytes), bytes);
  auto small_tensors = [&](int s) {
    std::vector<ecsnap::Tensor> t = tensors_of(s);
    t[0].shape = {static_cast<int64_t>(small)};
    t[0].bytes = small;
    return t;
  };
  for (int i = 0; i < absl::GetFlag(FLAGS_latency_steps); ++i) {
    const uint64_t step = protect_steps + 1 + i;
    std::vector<ecsnap::SnapshotHandle> small_handles;
    for (int s = 0; s < n; ++s) {
      auto h = clients[s]->Snapshot(step, small_tensors(s));
      Check(h.status(), "small snapshot");
      small_handles.push_back(*h);
    }
    for (auto& h : small_handles) Check(h.WaitCommitted(), "small snapshot");
    // From the moment every rank's commit has returned (the step is LOCAL
    // everywhere; protection of the first ranks' chunks may have begun).
    const auto t0 = Clock::now();
    if (!wait_protected(step, std::chrono::milliseconds(1))) {
      std::fprintf(stderr, "protect_bench: small step %llu not PROTECTED\n",
                   static_cast<unsigned long long>(step));
      return 1;
    }
    latencies.push_back(Since(t0) * 1e3);
  }
  // The first small step is every rank's first of that size: it makes the
  // windows and parity rows of the new size (the first-step cost, timed
  // apart). The percentiles are of the steps after it, as a job that
  // snapshots every step sees them.
  const double first_latency = latencies.empty() ? 0.0 : latencies.front();
  if (!latencies.empty()) latencies.erase(latencies.begin());
  std::sort(latencies.begin(), latencies.end());
  auto percentile = [&](double q) {
    return latencies.empty() ? std::nan("")
                             : latencies[std::min(latencies.size() - 1,
                                                  static_cast<size_t>(q * latencies.size()))];
  };

  const uint64_t protect_bytes = static_cast<uint64_t>(n) * m * bytes;
  const uint64_t rebuild_bytes = static_cast<uint64_t>(n) * bytes;
  const double tcp_protect = TcpSeconds(protect_bytes);
  const double tcp_rebuild = TcpSeconds(rebuild_bytes);
  // What a rebuild writes into memory the replacement never touched: its
  // ranks' windows (fresh files) and its parity rows, n x payload / k in all.
  const uint64_t fresh_bytes = rebuild_bytes / k;
  const double fresh = FreshMemorySeconds(dir, fresh_bytes);
  const Compute compute = RebuildComputeSeconds(k, m, bytes / k);
  std::printf("protect_bench: RS(%d,%d), %d nodes on 127.0.0.1, %.2f GiB per node\n", k, m, n,
              bytes / double(1 << 30));
  // As many streams as each phase runs at once: every node pushes to each
  // other node (its pusher per holder); a rebuild reads k survivors of each of
  // its n stripes.
  const int protect_streams = n * (n - 1), rebuild_streams = n * k;
  const double tcp_protect_many = TcpSeconds(protect_bytes, protect_streams);
  const double tcp_rebuild_many = TcpSeconds(rebuild_bytes, rebuild_streams);
  auto row = [](const char* what, uint64_t b, double t, double tcp, int streams, double many) {
    std::printf("%-40s %7.2f GiB %8.3f s %7.2f GB/s  (raw TCP %.3f s) %6.2fx  "
                "(%d TCP streams %.3f s) %6.2fx\n",
                what, b / double(1 << 30), t, b / t / 1e9, tcp, t / tcp, streams, many,
                t / many);
  };
  row("LOCAL -> PROTECTED, first step", protect_bytes, t_protect_first, tcp_protect,
      protect_streams, tcp_protect_many);
  row("LOCAL -> PROTECTED, steady state", protect_bytes, t_protect, tcp_protect, protect_streams,
      tcp_protect_many);
  std::printf("  (from the first node LOCAL; from the last: %.3f s)\n", t_protect_after_last);
  row("rebuild of one lost node", rebuild_bytes, t_rebuild, tcp_rebuild, rebuild_streams,
      tcp_rebuild_many);
  std::printf("  a rebuild writes %.2f GiB into fresh memory: first stores alone take %.3f s here; "
              "limit TCP + that = %.3f s, rebuild %.2fx it\n",
              fresh_bytes / double(1 << 30), fresh, tcp_rebuild + fresh,
              t_rebuild / (tcp_rebuild + fresh));
  std::printf("  besides moving bytes a rebuild checks and decodes them: CRC-32C of %.2f GiB "
              "%.3f s, ISA-L decode %.3f s (one core, slices in cache); TCP + that = %.3f s, "
              "rebuild %.2fx it\n",
              rebuild_bytes / double(1 << 30), compute.crc, compute.decode,
              tcp_rebuild + compute.crc + compute.decode,
              t_rebuild / (tcp_rebuild + compute.crc + compute.decode));
  if (latencies.empty() && absl::GetFlag(FLAGS_latency_steps) > 0) {
    std::printf("LOCAL -> PROTECTED, one step of %.0f MiB/rank: %.1f ms (more steps for "
                "percentiles: --latency_steps)\n",
                small / double(1 << 20), first_latency);
  }
  if (!latencies.empty()) {
    std::printf("LOCAL -> PROTECTED, %zu steps of %.0f MiB/rank after the first: p50 %.1f ms, "
                "p99 %.1f ms (the first %.1f ms; raw TCP moves a step's parity traffic in "
                "%.1f ms)\n",
                latencies.size(), small / double(1 << 20), percentile(0.5), percentile(0.99),
                first_latency, TcpSeconds(static_cast<uint64_t>(n) * m * small) * 1e3);
  }
  std::printf("RESULT protect_vs_tcp=%.3f rebuild_vs_tcp=%.3f protect_vs_tcp_streams=%.3f "
              "rebuild_vs_tcp_streams=%.3f rebuild_vs_tcp_plus_fresh_memory=%.3f "
              "rebuild_vs_tcp_plus_compute=%.3f protect_first_vs_tcp=%.3f protect_p50_ms=%.1f "
              "protect_p99_ms=%.1f protect_first_small_ms=%.1f\n",
              t_protect / tcp_protect, t_rebuild / tcp_rebuild, t_protect / tcp_protect_many,
              t_rebuild / tcp_rebuild_many, t_rebuild / (tcp_rebuild + fresh),
              t_rebuild / (tcp_rebuild + compute.crc + compute.decode),
              t_protect_first / tcp_protect, percentile(0.5),
              percentile(0.99), first_latency);
  clients.clear();
  cluster->reset();
  // What is in it; the directory itself, a mount point with --arena_pages=huge,
  // goes once the bench has exited (RemoveWhenGone).
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    std::filesystem::remove_all(entry.path());
  }
  return 0;
}
