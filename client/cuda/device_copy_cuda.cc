// The CUDA copier (--config=cuda): cudaMemcpyAsync between device memory and
// registered windows, on one non-blocking stream per device, pipelined in
// pieces so that each piece is checksummed while the next is in flight.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <deque>
#include <map>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "client/cuda/device_copy.h"
#include "ec/crc32c.h"

namespace ecsnap::client_internal {
namespace {

// A piece is copied, then checksummed on the host while later ones are in
// flight. 8 MiB pieces keep the copy engine busy between events; at most
// kDepth pieces are in flight (64 MiB per device).
constexpr uint64_t kPieceBytes = 8 << 20;
constexpr int kDepth = 8;

absl::StatusCode CodeOf(cudaError_t e) {
  switch (e) {
    case cudaErrorInvalidValue:
    case cudaErrorInvalidDevicePointer:
    case cudaErrorInvalidDevice:
      return absl::StatusCode::kInvalidArgument;
    case cudaErrorMemoryAllocation:
      return absl::StatusCode::kResourceExhausted;
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
    case cudaErrorDevicesUnavailable:
    case cudaErrorNotSupported:
      return absl::StatusCode::kFailedPrecondition;
    default:
      return absl::StatusCode::kInternal;
  }
}

// The status of a CUDA call: OK, or the call's name with CUDA's own words.
absl::Status Check(cudaError_t e, const char* call) {
  if (e == cudaSuccess) return absl::OkStatus();
  (void)cudaGetLastError();  // clears a non-sticky error for the next call
  return absl::Status(CodeOf(e), absl::StrFormat("%s failed: %s (%s)", call,
                                                 cudaGetErrorString(e), cudaGetErrorName(e)));
}

#define CUDA_RETURN_IF_ERROR(call)                                            \
  do {                                                                        \
    if (absl::Status cuda_status_ = Check((call), #call); !cuda_status_.ok()) \
      return cuda_status_;                                                    \
  } while (0)

// Makes a device current for a scope. On a trainer's thread (`give_back`)
// the previous device is made current again at the end: a restore must not
// leave the trainer on another GPU. The client's own thread keeps the last
// device it used instead: setting a device creates its context, and a thread
// that never used CUDA would otherwise get one on device 0 (hundreds of MiB
// of GPU 0 per rank).
class DeviceScope {
 public:
  explicit DeviceScope(bool give_back) : give_back_(give_back) {
    if (cudaGetDevice(&previous_) != cudaSuccess) {
      (void)cudaGetLastError();
      previous_ = -1;
    }
  }
  ~DeviceScope() {
    if (give_back_ && changed_ && previous_ >= 0) (void)cudaSetDevice(previous_);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

  absl::Status Set(int device) {
    if (device == previous_ && !changed_) return absl::OkStatus();
    changed_ = true;
    return Check(cudaSetDevice(device), "cudaSetDevice");
  }

 private:
  const bool give_back_;
  int previous_ = -1;
  bool changed_ = false;
};

class CudaCopier final : public DeviceCopier {
 public:
  ~CudaCopier() override {
    absl::MutexLock lock(&mu_);
    DeviceScope scope(/*give_back=*/true);
    for (auto& [device, d] : devices_) {
      if (!scope.Set(device).ok()) continue;
      for (cudaEvent_t e : d.ring) cudaEventDestroy(e);
      cudaStreamDestroy(d.stream);
    }
    for (void* host : registered_) cudaHostUnregister(host);
  }

  absl::StatusOr<std::shared_ptr<void>> Mark(int device, void* stream) override {
    DeviceScope scope(/*give_back=*/true);
    if (absl::Status s = scope.Set(device); !s.ok()) return s;
    cudaEvent_t event = nullptr;
    CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
    if (absl::Status s = Check(cudaEventRecord(event, static_cast<cudaStream_t>(stream)),
                               "cudaEventRecord");
        !s.ok()) {
      cudaEventDestroy(event);
      return s;
    }
    return std::shared_ptr<void>(event, [](void* e) { cudaEventDestroy(static_cast<cudaEvent_t>(e)); });
  }

  absl::Status Register(void* host, uint64_t bytes, bool read_only, int device,
                        bool caller_thread) override {
    absl::MutexLock lock(&mu_);
    DeviceScope scope(caller_thread);
    if (absl::Status s = scope.Set(device); !s.ok()) return s;
    unsigned int flags = cudaHostRegisterPortable;
    if (read_only) {
      int supported = 0;
      if (cudaDeviceGetAttribute(&supported, cudaDevAttrHostRegisterReadOnlySupported, device) !=
              cudaSuccess ||
          supported == 0) {
        (void)cudaGetLastError();
        return absl::OkStatus();  // left pageable: the driver stages the copy
      }
      flags |= cudaHostRegisterReadOnly;
    }
    const cudaError_t e = cudaHostRegister(host, bytes, flags);
    if (e == cudaErrorHostMemoryAlreadyRegistered) {
      (void)cudaGetLastError();
      return absl::OkStatus();
    }
    CUDA_RETURN_IF_ERROR(e);
    registered_.push_back(host);
    return absl::OkStatus();
  }

  void Unregister(void* host) override {
    absl::MutexLock lock(&mu_);
    auto it = std::find(registered_.begin(), registered_.end(), host);
    if (it == registered_.end()) return;
    cudaHostUnregister(host);
    registered_.erase(it);
  }

  absl::Status ToHost(absl::Span<DeviceCopyTask> tasks,
                      std::atomic<uint64_t>* progress) override {
    absl::MutexLock lock(&mu_);
    DeviceScope scope(/*give_back=*/false);  // the client's worker
    for (DeviceCopyTask& t : tasks) {
      if (absl::Status s = scope.Set(t.device); !s.ok()) return s;
      if (absl::Status s = CheckDevicePointer(t); !s.ok()) return s;
      auto d = DeviceLocked(t.device);
      if (!d.ok()) return d.status();
      if (absl::Status s = ToHostOne(**d, t, progress); !s.ok()) return Drain(**d, s);
    }
    return absl::OkStatus();
  }

  absl::Status ToDevice(absl::Span<DeviceCopyTask> tasks) override {
    absl::MutexLock lock(&mu_);
    DeviceScope scope(/*give_back=*/true);  // the trainer's thread
    for (DeviceCopyTask& t : tasks) {
      if (absl::Status s = scope.Set(t.device); !s.ok()) return s;
      if (absl::Status s = CheckDevicePointer(t); !s.ok()) return s;
      auto d = DeviceLocked(t.device);
      if (!d.ok()) return d.status();
      if (absl::Status s = ToDeviceOne(**d, t); !s.ok()) return Drain(**d, s);
    }
    return absl::OkStatus();
  }

 private:
  struct PerDevice {
    cudaStream_t stream = nullptr;
    cudaEvent_t ring[kDepth] = {};
  };

  // One tensor device -> host, in pieces: each piece is checksummed once
  // its event says it landed, while up to kDepth - 1 later ones are in flight.
  static absl::Status ToHostOne(PerDevice& dev, DeviceCopyTask& t,
                                std::atomic<uint64_t>* progress) {
    if (t.after != nullptr) {
      // The point of the caller's stream marked when the snapshot was asked for.
      CUDA_RETURN_IF_ERROR(
          cudaStreamWaitEvent(dev.stream, static_cast<cudaEvent_t>(t.after.get()), 0));
    } else {
      CUDA_RETURN_IF_ERROR(cudaEventRecord(dev.ring[0], static_cast<cudaStream_t>(t.stream)));
      CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(dev.stream, dev.ring[0], 0));
    }
    struct Piece {
      uint64_t offset, bytes;
      int slot;
    };
    std::deque<Piece> in_flight;
    uint32_t crc = 0;
    auto land_oldest = [&]() -> absl::Status {
      const Piece p = in_flight.front();
      in_flight.pop_front();
      CUDA_RETURN_IF_ERROR(cudaEventSynchronize(dev.ring[p.slot]));
      crc = ec::Crc32c(absl::Span<const uint8_t>(t.host + p.offset, p.bytes), crc);
      if (progress != nullptr) progress->fetch_add(p.bytes, std::memory_order_relaxed);
      return absl::OkStatus();
    };
    const auto* src = static_cast<const uint8_t*>(t.device_ptr);
    int slot = 0;
    for (uint64_t off = 0; off < t.bytes; off += kPieceBytes) {
      if (static_cast<int>(in_flight.size()) == kDepth) {
        if (absl::Status s = land_oldest(); !s.ok()) return s;
      }
      const uint64_t n = std::min(kPieceBytes, t.bytes - off);
      CUDA_RETURN_IF_ERROR(
          cudaMemcpyAsync(t.host + off, src + off, n, cudaMemcpyDeviceToHost, dev.stream));
      CUDA_RETURN_IF_ERROR(cudaEventRecord(dev.ring[slot], dev.stream));
      in_flight.push_back(Piece{off, n, slot});
      slot = (slot + 1) % kDepth;
    }
    while (!in_flight.empty()) {
      if (absl::Status s = land_oldest(); !s.ok()) return s;
    }
    t.crc = crc;
    return absl::OkStatus();
  }

  // One tensor host -> device: whatever the caller queued that still uses
  // the destination runs first, then the copy, then the caller's later work.
  static absl::Status ToDeviceOne(PerDevice& dev, DeviceCopyTask& t) {
    auto caller = static_cast<cudaStream_t>(t.stream);
    CUDA_RETURN_IF_ERROR(cudaEventRecord(dev.ring[0], caller));
    CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(dev.stream, dev.ring[0], 0));
    if (t.bytes > 0) {
      CUDA_RETURN_IF_ERROR(
          cudaMemcpyAsync(t.device_ptr, t.host, t.bytes, cudaMemcpyHostToDevice, dev.stream));
    }
    // The host bytes are checksummed while the copy engine reads them.
    t.crc = ec::Crc32c(absl::Span<const uint8_t>(t.host, t.bytes));
    CUDA_RETURN_IF_ERROR(cudaEventRecord(dev.ring[1], dev.stream));
    CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(caller, dev.ring[1], 0));
    return Check(cudaEventSynchronize(dev.ring[1]), "cudaEventSynchronize");
  }

  // The task's pointer must be memory of the task's device (made current).
  static absl::Status CheckDevicePointer(const DeviceCopyTask& t) {
    if (t.bytes == 0) return absl::OkStatus();
    cudaPointerAttributes a{};
    const cudaError_t e = cudaPointerGetAttributes(&a, t.device_ptr);
    if (e != cudaSuccess) (void)cudaGetLastError();
    if (e != cudaSuccess ||
        (a.type != cudaMemoryTypeDevice && a.type != cudaMemoryTypeManaged)) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "tensor '%s' is said to be on CUDA device %d, but %p is not device memory", t.name,
          t.device, t.device_ptr));
    }
    if (a.device != t.device) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "tensor '%s' is said to be on CUDA device %d, but its memory is on device %d", t.name,
          t.device, a.device));
    }
    return absl::OkStatus();
  }

  // The stream and events of `device` (current), made on first use.
  absl::StatusOr<PerDevice*> DeviceLocked(int device) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    auto it = devices_.find(device);
    if (it != devices_.end()) return &it->second;
    PerDevice d;
    CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&d.stream, cudaStreamNonBlocking));
    for (cudaEvent_t& e : d.ring) {
      // Blocking: the thread waiting for a piece sleeps instead of spinning.
      CUDA_RETURN_IF_ERROR(
          cudaEventCreateWithFlags(&e, cudaEventDisableTiming | cudaEventBlockingSync));
    }
    return &devices_.emplace(device, d).first->second;
  }

  // After an error mid-pipeline: lets the copies in flight finish (they
  // write into memory the caller may free once this returns).
  static absl::Status Drain(PerDevice& dev, absl::Status error) {
    (void)cudaStreamSynchronize(dev.stream);
    return error;
  }

  absl::Mutex mu_;
  std::map<int, PerDevice> devices_ ABSL_GUARDED_BY(mu_);
  std::vector<void*> registered_ ABSL_GUARDED_BY(mu_);
};

}  // namespace

bool DeviceCopier::Built() { return true; }

absl::StatusOr<std::unique_ptr<DeviceCopier>> DeviceCopier::Create() {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    return absl::FailedPreconditionError(absl::StrFormat(
        "no usable CUDA device: cudaGetDeviceCount: %s (%s)", cudaGetErrorString(e),
        cudaGetErrorName(e)));
  }
  if (count == 0) return absl::FailedPreconditionError("no CUDA device on this host");
  return std::unique_ptr<DeviceCopier>(new CudaCopier());
}

}  // namespace ecsnap::client_internal
