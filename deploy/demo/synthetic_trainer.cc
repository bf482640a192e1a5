// A trainer rank with a synthetic state, for the demo: the state of (rank,
// step) is a pure function of both, so any restore can be checked byte for
// byte against a fresh copy.
//
//   synthetic_trainer --socket=S --rank=R --local_ranks=0,1 --steps=4
//       snapshots steps 1..4 (from --from_step), waiting for each to commit
//   ... --die_mid_snapshot_at=4
//       at step 4 kills itself with SIGKILL while the copy is half done
//   ... --restore
//       restores the newest restorable step and checks every byte
#include <signal.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "client/ecsnap.h"

ABSL_FLAG(std::string, socket, "/run/ecsnap/ecsnapd.sock", "ecsnapd's data socket.");
ABSL_FLAG(std::string, job, "demo", "Job id.");
ABSL_FLAG(uint32_t, rank, 0, "This rank.");
ABSL_FLAG(std::vector<std::string>, local_ranks, {}, "Ranks of the job on this node.");
ABSL_FLAG(int, steps, 3, "Snapshot steps from_step..steps.");
ABSL_FLAG(int, from_step, 1, "First step to snapshot.");
ABSL_FLAG(int, die_mid_snapshot_at, 0, "SIGKILL this process mid-snapshot of this step.");
ABSL_FLAG(bool, restore, false, "Restore the newest step and check it.");
ABSL_FLAG(int, mib, 64, "MiB of state.");
ABSL_FLAG(int, copy_threads, 2, "Copy threads of the client.");

namespace {

using Clock = std::chrono::steady_clock;

double Ms(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

// Parameters, two Adam moments, an RNG state and a data-loader position.
struct State {
  std::vector<std::vector<uint8_t>> bytes;
  std::vector<ecsnap::Tensor> tensors;
};

State MakeState(uint32_t rank, uint64_t step, uint64_t mib) {
  struct Part {
    const char* name;
    ecsnap::TensorKind kind;
    ecsnap::DType dtype;
    uint64_t bytes;
  };
  const uint64_t third = mib * (1 << 20) / 3 / 4 * 4;
  const std::vector<Part> parts = {
      {"model.weight", ecsnap::TensorKind::kParam, ecsnap::DType::kFloat32, third},
      {"adam.exp_avg", ecsnap::TensorKind::kOptimizer, ecsnap::DType::kFloat32, third},
      {"adam.exp_avg_sq", ecsnap::TensorKind::kOptimizer, ecsnap::DType::kFloat32, third},
      {"rng.cpu", ecsnap::TensorKind::kRng, ecsnap::DType::kUInt8, 5056},
      {"loader.position", ecsnap::TensorKind::kExtra, ecsnap::DType::kBytes, 13},
  };
  State s;
  uint64_t x = (uint64_t{rank} << 32) ^ step ^ 0x9E3779B97F4A7C15ull;
  for (const Part& p : parts) {
    s.bytes.emplace_back(p.bytes);
    uint8_t* b = s.bytes.back().data();
    for (uint64_t i = 0; i + 8 <= p.bytes; i += 8) {
      x += 0x9E3779B97F4A7C15ull;  // splitmix64
      uint64_t z = x;
      z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
      z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
      z ^= z >> 31;
      std::memcpy(b + i, &z, 8);
    }
    for (uint64_t i = p.bytes / 8 * 8; i < p.bytes; ++i) b[i] = static_cast<uint8_t>(step + i);
  }
  for (size_t i = 0; i < parts.size(); ++i) {
    ecsnap::Tensor t;
    t.name = parts[i].name;
    t.kind = parts[i].kind;
    t.dtype = parts[i].dtype;
    if (parts[i].dtype == ecsnap::DType::kFloat32) t.shape = {static_cast<int64_t>(parts[i].bytes / 4)};
    if (parts[i].dtype == ecsnap::DType::kUInt8) t.shape = {static_cast<int64_t>(parts[i].bytes)};
    t.data = s.bytes[i].data();
    t.bytes = parts[i].bytes;
    s.tensors.push_back(t);
  }
  return s;
}

int Fail(uint32_t rank, const absl::Status& st) {
  std::printf("[rank %u] FAILED: %s\n", rank, std::string(st.message()).c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const uint32_t rank = absl::GetFlag(FLAGS_rank);
  const uint64_t mib = absl::GetFlag(FLAGS_mib);
  std::setvbuf(stdout, nullptr, _IOLBF, 0);

  ecsnap::ClientOptions options;
  options.daemon_address = absl::GetFlag(FLAGS_socket);
  options.job_id = absl::GetFlag(FLAGS_job);
  options.rank = rank;
  options.copy_threads = absl::GetFlag(FLAGS_copy_threads);
  for (const std::string& r : absl::GetFlag(FLAGS_local_ranks)) {
    options.local_ranks.push_back(static_cast<uint32_t>(std::stoul(r)));
  }
  auto client = ecsnap::Client::Connect(options);
  if (!client.ok()) return Fail(rank, client.status());

  if (absl::GetFlag(FLAGS_restore)) {
    auto steps = (*client)->ListRestorable();
    if (!steps.ok()) return Fail(rank, steps.status());
    std::vector<uint64_t> numbers;
    for (const auto& s : *steps) numbers.push_back(s.step);
    const auto t0 = Clock::now();
    auto restored = (*client)->Restore(ecsnap::kLatestStep);
    const auto t1 = Clock::now();
    if (!restored.ok()) return Fail(rank, restored.status());
    const State want = MakeState(rank, restored->step, mib);
    uint64_t checked = 0;
    for (size_t i = 0; i < want.tensors.size(); ++i) {
      const auto& got = restored->tensors.at(i);
      if (got.name != want.tensors[i].name || got.data.size() != want.bytes[i].size() ||
          std::memcmp(got.data.data(), want.bytes[i].data(), got.data.size()) != 0) {
        return Fail(rank, absl::DataLossError(absl::StrFormat(
                              "tensor %s of step %d differs from what was written", got.name,
                              restored->step)));
      }
      checked += got.data.size();
    }
    std::printf(
        "[rank %u] restarted: restorable steps {%s}; restored step %lu (%.1f MiB) in %.1f ms, "
        "byte-identical to what it wrote\n",
        rank, absl::StrJoin(numbers, ", ").c_str(), restored->step, checked / 1048576.0,
        Ms(t0, t1));
    return 0;
  }

  for (int step = absl::GetFlag(FLAGS_from_step); step <= absl::GetFlag(FLAGS_steps); ++step) {
    State state = MakeState(rank, step, mib);
    const auto t0 = Clock::now();
    auto handle = (*client)->Snapshot(step, state.tensors);
    if (!handle.ok()) return Fail(rank, handle.status());
    if (step == absl::GetFlag(FLAGS_die_mid_snapshot_at)) {
      // Wait until the copy is under way but not done, then die hard.
      for (int i = 0; i < 2000000 && handle->bytes_copied() == 0; ++i) std::this_thread::yield();
      const uint64_t copied = handle->bytes_copied();
      std::printf("[rank %u] step %d: SIGKILL in mid-snapshot (%.1f of %.1f MiB copied)\n", rank,
                  step, copied / 1048576.0, handle->bytes_total() / 1048576.0);
      ::kill(::getpid(), SIGKILL);
    }
    absl::Status st = handle->Wait();
    const auto t1 = Clock::now();
    if (st.ok()) st = handle->WaitCommitted();
    const auto t2 = Clock::now();
    if (!st.ok()) return Fail(rank, st);
    std::printf("[rank %u] step %d: snapshot of %.1f MiB, trainer stalled %.1f ms, committed "
                "after %.1f ms\n",
                rank, step, handle->bytes_total() / 1048576.0, Ms(t0, t1), Ms(t0, t2));
  }
  return 0;
}
