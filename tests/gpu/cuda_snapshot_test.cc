// The CUDA data path against a real ecsnapd: device tensors snapshotted
// straight into the daemon's window (and over gRPC), ordered after the
// caller's stream, restored into device memory, bit-exact; mixed with host
// tensors in one step.
//
// What runs where:
//   - everywhere: a device tensor given to a library that cannot copy it
//     (built without CUDA, or no GPU) is refused with a sentence, and the
//     same client goes on snapshotting host tensors;
//   - built with --config=cuda on a host with a GPU: the device tests;
//     elsewhere they skip, saying why.
#include <atomic>
#include <chrono>
#include <cstdio>
#include <thread>
#include <cstring>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include "client/cuda/device_copy.h"
#include "client/ecsnap.h"
#include "tests/harness.h"

#if ECSNAP_CUDA
#include <cuda_runtime_api.h>
#endif

namespace ecsnap {
namespace {

using testing::DaemonProcess;
using testing::TempDir;

class CudaPathTest : public ::testing::TestWithParam<Transport> {
 protected:
  void SetUp() override {
    DaemonProcess::Options o;
    o.arena_bytes = 256 << 20;
    auto d = DaemonProcess::Start(dir_.path(), o);
    ASSERT_TRUE(d.ok()) << d.status();
    daemon_ = *std::move(d);
    ClientOptions co;
    co.daemon_address = daemon_->socket();
    co.job_id = "gpu";
    co.transport = GetParam();
    auto c = Client::Connect(co);
    ASSERT_TRUE(c.ok()) << c.status();
    client_ = *std::move(c);
  }

  TempDir dir_;
  std::unique_ptr<DaemonProcess> daemon_;
  std::unique_ptr<Client> client_;
};

TEST_P(CudaPathTest, ADeviceTensorTheLibraryCannotCopyIsRefusedInASentence) {
  const bool built = client_internal::DeviceCopier::Built();
  auto copier = client_internal::DeviceCopier::Create();
  if (copier.ok()) GTEST_SKIP() << "this host has a usable GPU: the device tests cover it";
  std::vector<uint8_t> host(4096, 7);
  Tensor t{"weights", TensorKind::kParam, DType::kUInt8, {4096}, host.data(), host.size()};
  t.device = 0;
  absl::StatusOr<SnapshotHandle> h = client_->Snapshot(1, {t});
  ASSERT_FALSE(h.ok());
  if (built) {
    EXPECT_EQ(h.status().code(), absl::StatusCode::kFailedPrecondition) << h.status();
    EXPECT_NE(h.status().message().find("CUDA device"), absl::string_view::npos) << h.status();
  } else {
    EXPECT_EQ(h.status().code(), absl::StatusCode::kUnimplemented) << h.status();
    EXPECT_NE(h.status().message().find("--config=cuda"), absl::string_view::npos) << h.status();
  }
  t.device = -2;
  EXPECT_EQ(client_->Snapshot(1, {t}).status().code(), absl::StatusCode::kInvalidArgument);
  // A restore into device memory is refused the same way, before any byte.
  t.device = -1;
  auto ok = client_->Snapshot(1, {t});
  ASSERT_TRUE(ok.ok()) << ok.status();
  ASSERT_TRUE(ok->WaitCommitted().ok());
  std::vector<uint8_t> back(4096, 0);
  TensorDestination d{"weights", back.data(), back.size()};
  d.device = 0;
  EXPECT_EQ(client_->RestoreInto(1, {d}).status().code(), h.status().code());
  d.device = -1;
  auto got = client_->RestoreInto(1, {d});
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(back, host);
}

#if ECSNAP_CUDA

// Evaluates `call` once: a failing call is not made again for its message.
#define CUDA_OK(call)                                                         \
  do {                                                                        \
    const cudaError_t cuda_ok_error_ = (call);                                \
    ASSERT_EQ(cuda_ok_error_, cudaSuccess) << #call << ": "                   \
                                           << cudaGetErrorString(cuda_ok_error_); \
  } while (0)

class CudaDeviceTest : public CudaPathTest {
 protected:
  void SetUp() override {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
      GTEST_SKIP() << "needs a CUDA GPU: cudaGetDeviceCount found none";
    }
    CudaPathTest::SetUp();
  }
};

TEST_P(CudaDeviceTest, MixedDeviceAndHostTensorsRoundTripBitExactInStreamOrder) {
  const uint32_t seed = std::random_device{}();
  std::printf("seed %u\n", seed);
  std::mt19937 rng(seed);
  const size_t big = (40 << 20) + 123, small = 4099;  // several pieces; an odd size
  std::vector<uint8_t> a(big), b(big), c(small), host(1 << 20);
  for (auto* v : {&a, &b, &c, &host}) for (auto& x : *v) x = static_cast<uint8_t>(rng());
  void *dev_big = nullptr, *dev_src = nullptr, *dev_small = nullptr;
  CUDA_OK(cudaMalloc(&dev_big, big));
  CUDA_OK(cudaMalloc(&dev_src, big));
  CUDA_OK(cudaMalloc(&dev_small, small));
  CUDA_OK(cudaMemcpy(dev_big, a.data(), big, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(dev_src, b.data(), big, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(dev_small, c.data(), small, cudaMemcpyHostToDevice));
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  // "The backward pass": queued on the caller's stream behind a gate that
  // holds the stream for 300 ms after Snapshot() returns, then writes b over
  // a. A copy not ordered after the stream would capture a.
  static std::atomic<bool> gate{false};
  gate = false;
  CUDA_OK(cudaLaunchHostFunc(
      stream,
      [](void*) {
        for (int i = 0; i < 10000 && !gate.load(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(1));
      },
      nullptr));
  CUDA_OK(cudaMemcpyAsync(dev_big, dev_src, big, cudaMemcpyDeviceToDevice, stream));
  std::thread opener([] {
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    gate = true;
  });

  Tensor t1{"param.big", TensorKind::kParam, DType::kUInt8, {int64_t(big)}, dev_big, big};
  t1.device = 0;
  t1.cuda_stream = stream;
  Tensor t2{"optim.small", TensorKind::kOptimizer, DType::kUInt8, {int64_t(small)}, dev_small,
            small};
  t2.device = 0;
  t2.cuda_stream = stream;
  Tensor t3{"rng", TensorKind::kRng, DType::kBytes, {}, host.data(), host.size()};
  auto h = client_->Snapshot(5, {t1, t3, t2});
  opener.join();
  ASSERT_TRUE(h.ok()) << h.status();
  ASSERT_TRUE(h->Wait().ok());
  ASSERT_TRUE(h->WaitCommitted().ok()) << h->WaitCommitted();
  EXPECT_EQ(h->bytes_copied(), h->bytes_total());

  // The host view of the step: what the device held after the stream's work.
  auto state = client_->Restore(5);
  ASSERT_TRUE(state.ok()) << state.status();
  for (const RestoredTensor& t : state->tensors) {
    const std::vector<uint8_t>& want = t.name == "param.big" ? b : t.name == "rng" ? host : c;
    ASSERT_EQ(t.data.size(), want.size()) << t.name;
    EXPECT_EQ(0, std::memcmp(t.data.data(), want.data(), want.size())) << t.name;
  }

  // Into device memory: zeroed first, restored, read back.
  CUDA_OK(cudaMemsetAsync(dev_big, 0, big, stream));
  CUDA_OK(cudaMemsetAsync(dev_small, 0, small, stream));
  TensorDestination d1{"param.big", dev_big, big};
  d1.device = 0;
  d1.cuda_stream = stream;
  TensorDestination d2{"optim.small", dev_small, small};
  d2.device = 0;
  d2.cuda_stream = stream;
  std::vector<uint8_t> host_back(host.size());
  TensorDestination d3{"rng", host_back.data(), host_back.size()};
  int before = -1, after = -1;
  CUDA_OK(cudaGetDevice(&before));
  auto got = client_->RestoreInto(5, {d1, d2, d3});
  ASSERT_TRUE(got.ok()) << got.status();
  CUDA_OK(cudaGetDevice(&after));
  EXPECT_EQ(after, before) << "a restore must leave the caller on its device";
  CUDA_OK(cudaStreamSynchronize(stream));
  std::vector<uint8_t> big_back(big), small_back(small);
  CUDA_OK(cudaMemcpy(big_back.data(), dev_big, big, cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(small_back.data(), dev_small, small, cudaMemcpyDeviceToHost));
  EXPECT_EQ(big_back, b);
  EXPECT_EQ(small_back, c);
  EXPECT_EQ(host_back, host);
  cudaFree(dev_big);
  cudaFree(dev_src);
  cudaFree(dev_small);
  cudaStreamDestroy(stream);
}

TEST_P(CudaDeviceTest, AHostPointerCalledDeviceMemoryIsRefusedAndTheClientGoesOn) {
  std::vector<uint8_t> host(1 << 16, 3);
  Tensor t{"liar", TensorKind::kParam, DType::kUInt8, {1 << 16}, host.data(), host.size()};
  t.device = 0;
  auto h = client_->Snapshot(1, {t});
  ASSERT_TRUE(h.ok()) << h.status();
  absl::Status st = h->Wait();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_NE(st.message().find("not device memory"), absl::string_view::npos) << st;
  t.device = -1;
  auto again = client_->Snapshot(2, {t});
  ASSERT_TRUE(again.ok());
  EXPECT_TRUE(again->WaitCommitted().ok()) << again->WaitCommitted();
}

INSTANTIATE_TEST_SUITE_P(Transports, CudaDeviceTest,
                         ::testing::Values(Transport::kSharedMemory, Transport::kGrpc));

#else  // !ECSNAP_CUDA

TEST(CudaDeviceTest, NeedsTheCudaBuild) {
  GTEST_SKIP() << "built without CUDA: bazel test --config=cuda //tests/gpu/...";
}

#endif

INSTANTIATE_TEST_SUITE_P(Transports, CudaPathTest,
                         ::testing::Values(Transport::kSharedMemory, Transport::kGrpc));

}  // namespace
}  // namespace ecsnap
