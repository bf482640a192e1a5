// Copies between CUDA device memory and the host memory of the daemon's
// windows (DESIGN.md §4, data plane fast path): the one copy a GPU tensor
// takes on its way into protected memory, and back.
//
// A snapshot's device-to-host copy runs on a stream of the copier's own,
// ordered after the work the caller had queued on the tensor's stream when it
// called Snapshot (Mark records an event there, on the caller's thread): the
// work that produced the tensor finishes first, and the trainer's later work
// (the next forward and backward) runs alongside the copy, not before it. The copy lands in pinned memory (the window, registered once with
// cudaHostRegister), so it runs at DMA speed, and each piece is checksummed
// on the host as soon as it has landed, while the next piece is in flight.
//
// This header has no CUDA types: libecsnap builds without the toolkit, and a
// copier then refuses with UNIMPLEMENTED, saying how to build with it
// (bazel build --config=cuda). Every CUDA error becomes a Status naming the
// call and the CUDA error.
//
// Thread safety: one copier serves one client; its calls may come from
// several threads (they are serialized inside).
#ifndef ECSNAP_CLIENT_CUDA_DEVICE_COPY_H_
#define ECSNAP_CLIENT_CUDA_DEVICE_COPY_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace ecsnap::client_internal {

// One tensor's bytes between a device and host memory.
struct DeviceCopyTask {
  std::string name;  // for messages
  int device = 0;    // CUDA device ordinal of `device_ptr`
  // The caller's cudaStream_t: the copy is ordered after the work queued on
  // it (a snapshot), or that stream waits for the copy (a restore). nullptr:
  // the legacy default stream.
  void* stream = nullptr;
  void* device_ptr = nullptr;  // source of a snapshot, destination of a restore
  uint8_t* host = nullptr;     // destination of a snapshot, source of a restore
  uint64_t bytes = 0;
  // A snapshot: the point of the caller's stream the copy waits for (from
  // Mark, on the caller's thread). Null: the stream as it is when ToHost runs.
  std::shared_ptr<void> after;
  uint32_t crc = 0;  // out: CRC-32C of the bytes (as they are on the host)
};

class DeviceCopier {
 public:
  // True when this library was built with CUDA (--config=cuda).
  static bool Built();
  // UNIMPLEMENTED when built without CUDA; FAILED_PRECONDITION when the
  // host has no usable CUDA device or driver (the CUDA error says which).
  static absl::StatusOr<std::unique_ptr<DeviceCopier>> Create();

  virtual ~DeviceCopier() = default;

  // Records the point the caller's `stream` (a cudaStream_t; nullptr: the
  // legacy default stream) of `device` has reached: call it on the caller's
  // thread when the snapshot is asked for. The caller's current device is
  // left as it was.
  virtual absl::StatusOr<std::shared_ptr<void>> Mark(int device, void* stream) = 0;

  // Pins [host, host + bytes) for DMA (cudaHostRegister) as seen from
  // `device`. `read_only` for a mapping without write access (a restore
  // window); where the device cannot register read-only memory, nothing is
  // pinned and copies go through the driver's staging (slower, as correct).
  // The memory must stay mapped until Unregister(host). `caller_thread`:
  // called on a trainer's thread, whose current device is then left as it
  // was (the client's own thread keeps the device it last used).
  virtual absl::Status Register(void* host, uint64_t bytes, bool read_only, int device,
                                bool caller_thread) = 0;
  virtual void Unregister(void* host) = 0;

  // Snapshot, on the client's own thread: copies every task's device bytes
  // to its host bytes and computes each task's CRC-32C as the pieces land. Returns when every
  // byte is on the host (or on the first error). `progress` grows by the
  // bytes checksummed. INVALID_ARGUMENT when a pointer is not device memory
  // of the task's device.
  virtual absl::Status ToHost(absl::Span<DeviceCopyTask> tasks,
                              std::atomic<uint64_t>* progress) = 0;

  // Restore: copies every task's host bytes to its device bytes, computing
  // each task's CRC-32C of the host bytes meanwhile; the caller's stream
  // waits for the copy. Returns when every copy is done. The calling
  // thread's current device is left as it was.
  virtual absl::Status ToDevice(absl::Span<DeviceCopyTask> tasks) = 0;
};

}  // namespace ecsnap::client_internal

#endif  // ECSNAP_CLIENT_CUDA_DEVICE_COPY_H_
