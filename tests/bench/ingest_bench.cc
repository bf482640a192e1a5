// ingest_bench: what a trainer waits for, against memcpy, in the same run.
//
// Starts a real ecsnapd (arena in /dev/shm) and, for a rank state of --bytes
// in --tensors tensors, times (best of --reps):
//   memcpy   the same bytes into pre-faulted memory: the physical limit
//   shm      Snapshot + Wait through the shared-memory arena
//   socket   the same bytes through a Unix socket pair into pre-faulted
//            memory: the limit of the gRPC data plane
//   grpc     Snapshot + Wait streamed over gRPC on the Unix socket
//   restore  Restore into pre-faulted caller buffers, through the arena
//            and over gRPC
// Ratios are times relative to memcpy (1.0 = as fast as memcpy) or to the
// socket; the first snapshot after connecting, the first after Prepare, the
// first after a daemon restart and a restore, and the first gRPC restore
// are reported apart from the steady state. Last line:
//   RESULT shm_stall_vs_memcpy=<x> grpc_stall_vs_memcpy=<y> restore_vs_memcpy=<z>
//          first_vs_steady=<f> ... grpc_restore_vs_memcpy=<r> grpc_vs_socket=<s> ...
//
// --retain_heap (default on) raises glibc's mmap and trim thresholds in this
// process, the trainer's, as GLIBC_TUNABLES=glibc.malloc.mmap_threshold=
// 33554432:glibc.malloc.trim_threshold=4294967296 does for a trainer
// started with it: gRPC's receive buffers are then reused instead of being
// fresh pages each message (the daemon does the same for its own).
//
//   bazel run -c opt //tests/bench:ingest_bench -- --bytes=1073741824 --tensors=64
#include <malloc.h>
#include <sys/socket.h>

#include <filesystem>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <unistd.h>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "client/ecsnap.h"
#include "tests/bench/bench_util.h"
#include "tests/harness.h"

ABSL_FLAG(std::string, arena_pages, "huge",
          "huge: the daemons' arenas on a tmpfs mounted huge=within_size (in a mount namespace "
          "of the bench's own; needs root), as deploy/dev-shm-ecsnap.mount sets up; base: on "
          "/dev/shm as it is (4 KiB pages here).");
ABSL_FLAG(uint64_t, bytes, uint64_t{1} << 30, "Bytes of the rank's state.");
ABSL_FLAG(int, tensors, 64, "Tensors the state is cut into.");
ABSL_FLAG(int, reps, 3, "Repetitions; the best is reported.");
ABSL_FLAG(int, copy_threads, 2, "Client copy threads.");
ABSL_FLAG(int, prepare_gap_ms, 3000,
          "Time between Prepare and the first snapshot (a first training step).");
ABSL_FLAG(bool, retain_heap, true,
          "Raise glibc's mmap and trim thresholds in this (the trainer's) process.");
ABSL_FLAG(int, max_seconds, 300,
          "Wall-clock bound of the whole run: past it SIGALRM ends the bench, and the daemon "
          "and its arena go with it.");

namespace {

using ecsnap::bench::Best;
using ecsnap::bench::Seconds;

void Check(const absl::Status& st, const char* what) {
  ecsnap::bench::CheckOk(st, "ingest_bench", what);
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const uint64_t bytes = absl::GetFlag(FLAGS_bytes);
  const int count = std::max(1, absl::GetFlag(FLAGS_tensors));
  const int reps = std::max(1, absl::GetFlag(FLAGS_reps));
  const uint64_t per = bytes / count / 64 * 64;

  if (absl::GetFlag(FLAGS_retain_heap)) {
    ::mallopt(M_MMAP_THRESHOLD, 32 << 20);
    ::mallopt(M_TRIM_THRESHOLD, 1 << 30);
  }
  // The arena (8.5x, below) and the bench's own source and destination.
  ecsnap::bench::RefuseUnlessMemoryFor(11 * bytes + (uint64_t{256} << 20), "ingest_bench");
  ::alarm(static_cast<unsigned>(absl::GetFlag(FLAGS_max_seconds)));

  // The trainer's tensors and a pre-faulted destination of the same shape.
  std::vector<std::vector<uint8_t>> src(count), dst(count);
  std::mt19937_64 rng(1);
  for (int i = 0; i < count; ++i) {
    src[i].resize(per);
    dst[i].assign(per, 0);
    uint64_t* w = reinterpret_cast<uint64_t*>(src[i].data());
    for (uint64_t j = 0; j < per / 8; ++j) w[j] = rng();
  }
  std::vector<ecsnap::Tensor> tensors;
  std::vector<ecsnap::TensorDestination> into;
  for (int i = 0; i < count; ++i) {
    ecsnap::Tensor t;
    t.name = absl::StrCat("layer", i, ".weight");
    t.dtype = ecsnap::DType::kFloat32;
    t.shape = {static_cast<int64_t>(per / 4)};
    t.data = src[i].data();
    t.bytes = per;
    tensors.push_back(t);
    into.push_back({t.name, dst[i].data(), per});
  }
  const double total = static_cast<double>(per) * count;

  char dir_template[] = "/dev/shm/ecsnap-bench-XXXXXX";
  const std::string dir = ::mkdtemp(dir_template);
  ecsnap::bench::RemoveWhenGone(dir);
  ecsnap::bench::PutArenasOn(absl::GetFlag(FLAGS_arena_pages), dir);
  ecsnap::testing::DaemonProcess::Options dopts;
  // Three jobs, each with its retained step, one in flight and one made
  // ready ahead (retain + 2 windows, each at most 1/16 larger than the
  // state); the gRPC job streams into one retained step and one in flight.
  const uint64_t window = static_cast<uint64_t>(total) / 16 * 17 + (1 << 20);
  dopts.arena_bytes = (8 * window + (64 << 20)) / 4096 * 4096;
  auto daemon = ecsnap::testing::DaemonProcess::Start(dir, dopts);
  Check(daemon.status(), "starting ecsnapd");
  // A daemon writes each page of its arena once in the background after it
  // starts (at idle priority). Deployed, that is long over by a job's first
  // snapshot; here it is waited for, and the time it took is printed.
  const absl::Duration warm_limit = absl::Seconds(absl::GetFlag(FLAGS_max_seconds) / 3.0);
  auto warm_up = (*daemon)->WaitArenaFirstWrites(warm_limit);
  Check(warm_up.status(), "waiting for the arena's first writes");

  auto connect = [&](ecsnap::Transport transport, const char* job) {
    ecsnap::ClientOptions o;
    o.daemon_address = (*daemon)->socket();
    o.job_id = job;
    o.transport = transport;
    o.copy_threads = absl::GetFlag(FLAGS_copy_threads);
    auto c = ecsnap::Client::Connect(o);
    Check(c.status(), "connecting");
    return std::move(*c);
  };
  const auto tc = std::chrono::steady_clock::now();
  auto shm = connect(ecsnap::Transport::kSharedMemory, "bench-shm");
  const double t_connect = std::chrono::duration<double>(std::chrono::steady_clock::now() - tc).count();
  auto grpc = connect(ecsnap::Transport::kGrpc, "bench-grpc");
  // A trainer that asks for its first window ahead (Client::Prepare), then
  // trains for a while (--prepare_gap_ms) before its first snapshot.
  auto prepared = connect(ecsnap::Transport::kSharedMemory, "bench-prepared");
  const auto tp = std::chrono::steady_clock::now();
  Check(prepared->Prepare(tensors), "prepare");
  const double t_prepare =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - tp).count();
  std::this_thread::sleep_for(std::chrono::milliseconds(absl::GetFlag(FLAGS_prepare_gap_ms)));

  // Memory bandwidth drifts on a shared machine: memcpy is timed before and
  // after the other stages, and the best of both counts.
  auto memcpy_all = [&] {
    for (int i = 0; i < count; ++i) std::memcpy(dst[i].data(), src[i].data(), per);
  };
  double t_memcpy = Best(reps, memcpy_all);
  // The Unix socket's limit: the same tensors written in 4 MiB pieces (as
  // the data plane's messages) and read into pre-faulted memory.
  auto socket_all = [&] {
    int fds[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) {
      Check(absl::ErrnoToStatus(errno, "socketpair"), "socket baseline");
    }
    // A short write or read would make the baseline look faster than the
    // socket is: the bench stops instead.
    std::thread writer([&] {
      for (int i = 0; i < count; ++i) {
        for (uint64_t at = 0; at < per;) {
          const ssize_t n = ::write(fds[0], src[i].data() + at, std::min<uint64_t>(4 << 20, per - at));
          if (n <= 0) Check(absl::ErrnoToStatus(n == 0 ? EPIPE : errno, "write"), "socket baseline");
          at += n;
        }
      }
    });
    for (int i = 0; i < count; ++i) {
      for (uint64_t at = 0; at < per;) {
        const ssize_t n = ::read(fds[1], dst[i].data() + at, per - at);
        if (n <= 0) Check(absl::ErrnoToStatus(n == 0 ? EPIPE : errno, "read"), "socket baseline");
        at += n;
      }
    }
    writer.join();
    ::close(fds[0]);
    ::close(fds[1]);
  };
  const double t_socket = Best(reps, socket_all);
  // The stall is Snapshot + Wait: until the tensors may be modified. The
  // daemon's verification and commit follow (WaitCommitted), off the clock
  // of the stall but timed on their own.
  // First snapshot after connecting, then the best of the rest: a first
  // step that pays for page faults or lazy set-up shows apart from the
  // steady state.
  struct Stall {
    double first = 0, steady = 1e30, committed = 1e30;
  };
  auto stall = [&](ecsnap::Client& client, uint64_t& step) {
    Stall out;
    for (int i = 0; i < std::max(reps, 2); ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      auto h = client.Snapshot(++step, tensors);
      Check(h.status(), "snapshot");
      Check(h->Wait(), "snapshot wait");
      const auto t1 = std::chrono::steady_clock::now();
      Check(h->WaitCommitted(), "snapshot commit");
      const auto t2 = std::chrono::steady_clock::now();
      const double wait = std::chrono::duration<double>(t1 - t0).count();
      if (i == 0) {
        out.first = wait;
      } else {
        out.steady = std::min(out.steady, wait);
      }
      out.committed = std::min(out.committed, std::chrono::duration<double>(t2 - t0).count());
    }
    return out;
  };
  uint64_t step = 0, grpc_step = 0, prepared_step = 0;
  const Stall s_prepared = stall(*prepared, prepared_step);
  prepared.reset();
  const Stall s_shm = stall(*shm, step);
  const Stall s_grpc = stall(*grpc, grpc_step);
  const double t_shm = s_shm.steady, t_grpc = s_grpc.steady;
  const double c_shm = s_shm.committed, c_grpc = s_grpc.committed;
  const double t_restore = Best(reps, [&] { Check(shm->RestoreInto(0, into).status(), "restore"); });
  for (int i = 0; i < count; ++i) {
    if (dst[i] != src[i]) {
      std::fprintf(stderr, "ingest_bench: restored tensor %d differs\n", i);
      return 1;
    }
  }
  const double t_grpc_restore_first =
      Best(1, [&] { Check(grpc->RestoreInto(0, into).status(), "restore"); });
  const double t_grpc_restore =
      Best(reps, [&] { Check(grpc->RestoreInto(0, into).status(), "restore"); });
  // A restart: the daemon goes and comes back (re-adopting the steps, with
  // no spare windows), the trainer restores, trains for --prepare_gap_ms and
  // snapshots: the window of that first snapshot was asked for by the
  // restore.
  shm.reset();
  grpc.reset();
  (*daemon)->Kill();
  Check((*daemon)->Restart(), "restarting ecsnapd");
  Check((*daemon)->WaitArenaFirstWrites(warm_limit).status(),
        "waiting for the restarted arena's first writes");
  shm = connect(ecsnap::Transport::kSharedMemory, "bench-shm");
  Check(shm->RestoreInto(0, into).status(), "restore after the restart");
  std::this_thread::sleep_for(std::chrono::milliseconds(absl::GetFlag(FLAGS_prepare_gap_ms)));
  const Stall s_restarted = stall(*shm, step);
  t_memcpy = std::min(t_memcpy, Best(reps, memcpy_all));
  // The same memcpy into its warm destination after the same pause as the
  // prepared trainer's (--prepare_gap_ms): on a virtual machine whose host
  // takes back idle guest memory, the first stores after a pause cost more
  // than steady ones whoever makes them (seen here: 1.0-2.8x after 6-10 s),
  // a limit of its own for a first snapshot after a pause.
  std::this_thread::sleep_for(std::chrono::milliseconds(absl::GetFlag(FLAGS_prepare_gap_ms)));
  const double t_memcpy_after_gap = Best(1, memcpy_all);

  std::printf("ingest_bench: %.2f GiB in %d tensors, %d copy threads, best of %d\n",
              total / (1 << 30), count, absl::GetFlag(FLAGS_copy_threads), reps);
  auto row = [&](const char* what, double t) {
    std::printf("%-34s %8.1f ms %8.2f GB/s %7.3fx memcpy\n", what, t * 1e3, total / t / 1e9,
                t / t_memcpy);
  };
  row("memcpy into pre-faulted memory", t_memcpy);
  row("the same after --prepare_gap_ms idle", t_memcpy_after_gap);
  row("Unix socket into pre-faulted mem", t_socket);
  std::printf("%-34s %8.1f ms\n", "arena first writes, after start",
              absl::ToDoubleMilliseconds(*warm_up));
  std::printf("%-34s %8.1f ms\n", "Connect", t_connect * 1e3);
  row("first Snapshot+Wait, shared memory", s_shm.first);
  row("Snapshot+Wait, shared memory", t_shm);
  std::printf("%-34s %8.1f ms\n", "Prepare (asks; maps in background)", t_prepare * 1e3);
  row("first Snapshot+Wait, prepared", s_prepared.first);
  row("Snapshot+Wait, prepared", s_prepared.steady);
  row("first Snapshot+Wait, restart+restore", s_restarted.first);
  row("Snapshot+Wait, restart+restore", s_restarted.steady);
  row("first Snapshot+Wait, gRPC", s_grpc.first);
  row("Snapshot+Wait, gRPC (Unix socket)", t_grpc);
  row("Snapshot to committed, shared mem", c_shm);
  row("Snapshot to committed, gRPC", c_grpc);
  row("Restore, shared memory", t_restore);
  row("first Restore, gRPC", t_grpc_restore_first);
  row("Restore, gRPC (Unix socket)", t_grpc_restore);
  std::printf(
      "RESULT shm_stall_vs_memcpy=%.3f grpc_stall_vs_memcpy=%.3f restore_vs_memcpy=%.3f "
      "first_vs_steady=%.3f prepared_first_vs_steady=%.3f grpc_first_vs_steady=%.3f "
      "grpc_restore_vs_memcpy=%.3f grpc_restore_first_vs_steady=%.3f socket_vs_memcpy=%.3f "
      "grpc_vs_socket=%.3f grpc_restore_vs_socket=%.3f restored_first_vs_steady=%.3f "
      "memcpy_after_gap_vs_memcpy=%.3f\n",
      t_shm / t_memcpy, t_grpc / t_memcpy, t_restore / t_memcpy, s_shm.first / t_shm,
      s_prepared.first / s_prepared.steady, s_grpc.first / t_grpc, t_grpc_restore / t_memcpy,
      t_grpc_restore_first / t_grpc_restore, t_socket / t_memcpy, t_grpc / t_socket,
      t_grpc_restore / t_socket, s_restarted.first / s_restarted.steady,
      t_memcpy_after_gap / t_memcpy);
  shm.reset();
  daemon->reset();
  // What is in it; the directory itself, a mount point with --arena_pages=huge,
  // goes once the bench has exited (RemoveWhenGone).
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    std::filesystem::remove_all(entry.path());
  }
  return 0;
}
