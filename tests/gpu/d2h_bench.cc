// d2h_bench: a GPU rank's snapshot against the copy engine's own limit,
// measured in the same run.
//
// Starts a real ecsnapd (arena in /dev/shm), puts --bytes of tensors in
// device memory, and times (best of --reps after the first):
//   cudamemcpy  cudaMemcpy of the same bytes into cudaHostAlloc'd (pinned)
//               memory: the physical limit of device -> host
//   snapshot    Snapshot + Wait of the device tensors through the arena
//               (cudaMemcpyAsync into the registered window, CRC on landing)
//   stall       what a trainer waits for when its backward pass (here
//               --backward_ms of host time) overlaps the copy: the time in
//               Snapshot() plus the time in Wait() after the backward
// The first snapshot (registration of the window included) is reported
// apart. Last line:
//   RESULT d2h_vs_cudamemcpy=<bandwidth ratio, goal >= 0.9>
//          first_vs_steady=<x> stall_ms=<y> backward_ms=<z>
//
//   bazel run --config=cuda //tests/gpu:d2h_bench -- --bytes=1073741824
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "client/ecsnap.h"
#include "tests/bench/bench_util.h"
#include "tests/harness.h"

#if ECSNAP_CUDA
#include <cuda_runtime_api.h>
#endif

ABSL_FLAG(uint64_t, bytes, uint64_t{1} << 30, "Bytes of the rank's device state.");
ABSL_FLAG(int, tensors, 16, "Tensors the state is cut into.");
ABSL_FLAG(int, reps, 3, "Repetitions after the first; the best is reported.");
ABSL_FLAG(int, backward_ms, 200, "Host time the simulated backward pass takes.");
ABSL_FLAG(int, max_seconds, 300,
          "Wall-clock bound of the whole run: past it SIGALRM ends the bench, and the daemon "
          "and its arena go with it.");

#if ECSNAP_CUDA
namespace {

void Check(const absl::Status& st, const char* what) {
  ecsnap::bench::CheckOk(st, "d2h_bench", what);
}

void CheckCuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "d2h_bench: %s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}

using ecsnap::bench::Seconds;

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const uint64_t bytes = absl::GetFlag(FLAGS_bytes);
  const int count = std::max(1, absl::GetFlag(FLAGS_tensors));
  const int reps = std::max(1, absl::GetFlag(FLAGS_reps));
  const uint64_t per = bytes / count / 64 * 64;
  const double total = static_cast<double>(per) * count;

  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("d2h_bench: no CUDA GPU on this host; nothing to measure\n");
    return 0;
  }
  // The arena (retain 1: three windows of the state) and the pinned baseline.
  ecsnap::bench::RefuseUnlessMemoryFor(4 * bytes + (uint64_t{256} << 20), "d2h_bench");
  ::alarm(static_cast<unsigned>(absl::GetFlag(FLAGS_max_seconds)));

  std::vector<void*> dev(count);
  for (void*& p : dev) {
    CheckCuda(cudaMalloc(&p, per), "cudaMalloc");
    CheckCuda(cudaMemset(p, 0x5a, per), "cudaMemset");
  }
  void* pinned = nullptr;
  CheckCuda(cudaHostAlloc(&pinned, per * count, cudaHostAllocDefault), "cudaHostAlloc");
  cudaStream_t stream;
  CheckCuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");

  // The limit: the same bytes device -> pinned host, plain cudaMemcpy.
  const double t_limit = ecsnap::bench::Best(reps + 1, [&] {
    for (int i = 0; i < count; ++i) {
      CheckCuda(cudaMemcpy(static_cast<uint8_t*>(pinned) + i * per, dev[i], per,
                           cudaMemcpyDeviceToHost),
                "cudaMemcpy");
    }
  });

  char dir_template[] = "/dev/shm/ecsnap-bench-XXXXXX";
  const std::string dir = ::mkdtemp(dir_template);
  ecsnap::bench::RemoveWhenGone(dir);
  ecsnap::testing::DaemonProcess::Options dopts;
  const uint64_t window = static_cast<uint64_t>(total) / 16 * 17 + (1 << 20);
  dopts.arena_bytes = (3 * window + (64 << 20)) / 4096 * 4096;
  auto daemon = ecsnap::testing::DaemonProcess::Start(dir, dopts);
  Check(daemon.status(), "starting ecsnapd");
  ecsnap::ClientOptions o;
  o.daemon_address = (*daemon)->socket();
  o.job_id = "bench-gpu";
  o.transport = ecsnap::Transport::kSharedMemory;
  auto client = ecsnap::Client::Connect(o);
  Check(client.status(), "connecting");

  std::vector<ecsnap::Tensor> tensors;
  for (int i = 0; i < count; ++i) {
    ecsnap::Tensor t;
    t.name = absl::StrCat("layer", i, ".weight");
    t.dtype = ecsnap::DType::kBFloat16;
    t.shape = {static_cast<int64_t>(per / 2)};
    t.data = dev[i];
    t.bytes = per;
    t.device = 0;
    t.cuda_stream = stream;
    tensors.push_back(t);
  }
  uint64_t step = 0;
  auto snapshot = [&] {
    auto h = (*client)->Snapshot(++step, tensors);
    Check(h.status(), "snapshot");
    Check(h->Wait(), "snapshot copy");
    Check(h->WaitCommitted(), "snapshot commit");
  };
  const double t_first = Seconds(snapshot);
  const double t_steady = ecsnap::bench::Best(reps, snapshot);

  // The stall: the copy runs while the trainer computes its backward pass.
  const int backward_ms = absl::GetFlag(FLAGS_backward_ms);
  double stall = 1e30;
  for (int r = 0; r < reps; ++r) {
    double in_calls = 0;
    ecsnap::SnapshotHandle* held = nullptr;
    absl::StatusOr<ecsnap::SnapshotHandle> h;
    in_calls += Seconds([&] { h = (*client)->Snapshot(++step, tensors); });
    Check(h.status(), "snapshot");
    held = &*h;
    std::this_thread::sleep_for(std::chrono::milliseconds(backward_ms));
    in_calls += Seconds([&] { Check(held->Wait(), "snapshot copy"); });
    Check(held->WaitCommitted(), "snapshot commit");
    stall = std::min(stall, in_calls);
  }

  std::printf("state %.0f MiB in %d tensors on GPU 0\n", total / (1 << 20), count);
  std::printf("cudaMemcpy D2H pinned  %8.3f s  %6.2f GB/s\n", t_limit, total / t_limit / 1e9);
  std::printf("snapshot first         %8.3f s  %6.2f GB/s\n", t_first, total / t_first / 1e9);
  std::printf("snapshot steady        %8.3f s  %6.2f GB/s\n", t_steady, total / t_steady / 1e9);
  std::printf("stall with %d ms backward: %.1f ms\n", backward_ms, stall * 1e3);
  std::printf("RESULT d2h_vs_cudamemcpy=%.3f first_vs_steady=%.3f stall_ms=%.1f backward_ms=%d\n",
              t_limit / t_steady, t_first / t_steady, stall * 1e3, backward_ms);
  client->reset();
  (*daemon)->Terminate();
  for (void* p : dev) cudaFree(p);
  cudaFreeHost(pinned);
  return 0;
}

#else  // !ECSNAP_CUDA

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  std::printf("d2h_bench: built without CUDA; run bazel run --config=cuda //tests/gpu:d2h_bench\n");
  return 2;
}

#endif
