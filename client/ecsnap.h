// libecsnap: snapshot a trainer rank's state into its node's ecsnapd, and
// restore it.
//
//   ecsnap::ClientOptions options;
//   options.job_id = "gpt-7b";
//   options.rank = rank;
//   options.local_ranks = {0, 1, 2, 3, 4, 5, 6, 7};
//   auto client = ecsnap::Client::Connect(options);          // once per process
//   ...
//   auto handle = (*client)->Snapshot(step, tensors);        // returns at once
//   forward_backward();                                      // copies run meanwhile
//   handle->Wait();                                          // before optimizer.step()
//   ...                                                      // the daemon verifies meanwhile
//   ...
//   auto state = (*client)->Restore(ecsnap::kLatestStep);    // after a restart
//
// On the daemon's node the client maps each window of shared memory the
// daemon grants it (its own rank's, and nothing else) and copies tensors
// straight into it: one copy, no bytes through sockets. A rank's windows are
// reused from step to step, so their mappings stay warm.
// Elsewhere (or with Transport::kGrpc) it streams the same bytes over gRPC.
// Both paths give the same results. Tensors in CUDA device memory (built
// with --config=cuda) are copied by the GPU's copy engine straight into the
// window, asynchronously, ordered after the tensor's stream.
//
// Thread safety: a Client may be used from several threads; snapshots run
// one at a time, in the order they were started. Errors are absl::Status
// values carrying the daemon's message (codes as in DESIGN.md §8).
#ifndef ECSNAP_CLIENT_ECSNAP_H_
#define ECSNAP_CLIENT_ECSNAP_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace ecsnap {

// Same numbering as proto/snapshot.proto.
enum class TensorKind : int { kParam = 1, kOptimizer = 2, kRng = 3, kExtra = 4 };

enum class DType : int {
  kBytes = 1,  // opaque bytes: pickled extras, RNG state
  kFloat32 = 2,
  kFloat64 = 3,
  kFloat16 = 4,
  kBFloat16 = 5,
  kInt8 = 6,
  kUInt8 = 7,
  kInt16 = 8,
  kInt32 = 9,
  kInt64 = 10,
  kBool = 11,
  kFloat8E4M3 = 12,
  kFloat8E5M2 = 13,
};

// One tensor to snapshot. The bytes are borrowed: they must stay valid and
// unmodified until the snapshot's Wait() returns.
struct Tensor {
  std::string name;  // unique within the rank, 1 to 4096 bytes
  TensorKind kind = TensorKind::kParam;
  DType dtype = DType::kBytes;
  std::vector<int64_t> shape;  // elements x dtype size must equal `bytes`
  const void* data = nullptr;
  uint64_t bytes = 0;
  // Where `data` lives: -1, host memory; otherwise the CUDA device ordinal
  // of device memory (a libecsnap built with --config=cuda copies it
  // straight into the daemon's window; one built without refuses it).
  // Default: -1.
  int device = -1;
  // For a device tensor: the cudaStream_t on which the work that produces
  // the tensor is queued (torch: torch.cuda.current_stream().cuda_stream).
  // The copy starts once that work is done, and holds up nothing queued on
  // it later. nullptr: the legacy default stream. Default: nullptr.
  void* cuda_stream = nullptr;
};

// A restored tensor. `data` points into the RestoredState that returned it.
struct RestoredTensor {
  std::string name;
  TensorKind kind = TensorKind::kParam;
  DType dtype = DType::kBytes;
  std::vector<int64_t> shape;
  absl::Span<const uint8_t> data;
};

// A rank's state for one step, owning its bytes.
struct RestoredState {
  uint64_t step = 0;
  std::vector<RestoredTensor> tensors;
  std::shared_ptr<uint8_t> buffer;  // backs every tensor's data
};

// Where Restore() writes a tensor: a caller buffer of exactly its size.
struct TensorDestination {
  std::string name;
  void* data = nullptr;
  uint64_t bytes = 0;
  // As for Tensor: -1 host memory, else the CUDA device of `data`; work
  // queued on `cuda_stream` after the restore sees the restored bytes.
  int device = -1;
  void* cuda_stream = nullptr;
};

enum class StepState { kReceiving = 1, kLocal = 2, kProtected = 3, kRebuilding = 4 };

struct RestorableStep {
  uint64_t step = 0;
  StepState state = StepState::kLocal;
  uint64_t bytes = 0;
};

inline constexpr uint64_t kLatestStep = 0;

// True when this libecsnap was built with CUDA (bazel build --config=cuda)
// and so takes device tensors (Tensor::device >= 0).
bool BuiltWithCuda();

enum class Transport {
  kAuto,          // shared memory when the daemon grants windows, else gRPC
  kSharedMemory,  // shared memory or fail
  kGrpc,          // always stream over gRPC
};

struct ClientOptions {
  // The daemon: a Unix socket path, or "host:port" for TCP.
  // Default: /run/ecsnap/ecsnapd.sock.
  std::string daemon_address = "/run/ecsnap/ecsnapd.sock";
  std::string job_id;
  uint32_t rank = 0;
  // Every rank of the job on this node, this one included. Default: {rank}.
  std::vector<uint32_t> local_ranks;
  // Default: kAuto.
  Transport transport = Transport::kAuto;
  // Threads copying (and checksumming) tensors. Default: 2.
  int copy_threads = 2;
  // Check every restored tensor's CRC-32C. Default: true.
  bool verify_restore = true;
  // Deadline of each control call to the daemon, in ms. Default: 30000.
  int rpc_timeout_ms = 30000;
  // After this long without a byte from the daemon, in ms, the client pings
  // it (a daemon that takes pings: every one of this release), and waits as
  // long again for the answer; and a snapshot or restore stream that moves
  // no byte for twice this ends the connection (a ping cannot pass bytes a
  // stopped daemon does not read). Either way every call in flight, Wait()
  // included, fails with UNAVAILABLE where it would otherwise wait forever,
  // and this Client is done: connect again. Keep it well above any pause of
  // the daemon. 0: never; else at least 1000. Default: 10000. Over the
  // Unix socket the client pings only a daemon whose hello says it takes
  // pings; over TCP there is no hello to ask, so with a daemon of an
  // earlier release, which closes a connection that pings while idle
  // (too_many_pings), set 0.
  int keepalive_ms = 10000;
  // TCP only. The daemon's TLS: the cluster CA file and the name in the
  // daemon's certificate ("slot-N.ecsnap"). Without them the connection is
  // plaintext, which a daemon serves on loopback only.
  std::string ca_file;
  std::string tls_name;
  // TCP only: the job's token (`ecsnapctl job-token --job=ID` on the
  // daemon's node prints it). A Unix-socket client needs none: the daemon
  // knows it by its uid.
  std::string job_token;
};

// A snapshot in progress. Copyable; every copy refers to the same snapshot.
//
// A snapshot has two moments: the tensors are copied into the daemon's memory
// (after which the trainer may modify them: Wait), and the daemon has checked
// every checksum and published the rank (WaitCommitted). The daemon's check
// reads its own memory, so it overlaps the trainer's next computation.
class SnapshotHandle {
 public:
  // Blocks until the tensors are no longer needed: copied into the daemon's
  // memory, or the snapshot failed before that. Returns that outcome. Call it
  // before the optimizer modifies the tensors.
  absl::Status Wait() const;
  // Blocks until the daemon has verified and committed the rank (or refused
  // it). Returns the snapshot's final outcome; the same on every call.
  absl::Status WaitCommitted() const;
  // True once WaitCommitted() would not block.
  bool done() const;
  uint64_t step() const;
  // Bytes copied so far, of bytes_total().
  uint64_t bytes_copied() const;
  uint64_t bytes_total() const;

  struct State;
  explicit SnapshotHandle(std::shared_ptr<State> state) : state_(std::move(state)) {}

 private:
  std::shared_ptr<State> state_;
};

class Client {
 public:
  // Connects to the daemon and opens this rank's session (the session ends,
  // and uncommitted data is discarded, when the Client is destroyed or the
  // process dies). UNAVAILABLE if the daemon does not answer.
  static absl::StatusOr<std::unique_ptr<Client>> Connect(const ClientOptions& options);

  virtual ~Client() = default;

  // Starts snapshotting `tensors` as `step` and returns at once. Steps must
  // grow. The tensors' bytes are borrowed until the handle's Wait() returns.
  // Argument errors are returned here; transfer errors by Wait(), commit
  // errors by WaitCommitted(). Snapshots run one after the other: a step's
  // copy starts once the previous step is committed.
  virtual absl::StatusOr<SnapshotHandle> Snapshot(uint64_t step, std::vector<Tensor> tensors) = 0;

  // Optional, once, before the first Snapshot: asks the daemon for the
  // windows of the first steps (the daemon's retain + 2) of the size
  // `tensors` need (only their sizes are read) and maps each in the
  // background, so that the first snapshots of the same size do not pay for
  // fresh memory (see common/prefault.h). Later steps get the same from the
  // daemon without asking, and a restore before the first snapshot asks for
  // windows of the restored step's size. A no-op over gRPC.
  virtual absl::Status Prepare(const std::vector<Tensor>& tensors) = 0;

  // This rank's restorable steps, newest first.
  virtual absl::StatusOr<std::vector<RestorableStep>> ListRestorable() = 0;

  // Restores `step` (kLatestStep: the newest) into buffers it allocates.
  virtual absl::StatusOr<RestoredState> Restore(uint64_t step) = 0;

  // Restores `step` into caller buffers, each tensor by name, each of its
  // exact size. A destination that names no tensor of the step is an error.
  // Tensors without a destination are returned in `rest` (owning their
  // bytes) when it is given, and are an error when it is not. Returns the step.
  virtual absl::StatusOr<uint64_t> RestoreInto(uint64_t step,
                                               absl::Span<const TensorDestination> into,
                                               RestoredState* rest = nullptr) = 0;

  // True when snapshots and restores go through windows of shared memory.
  virtual bool shared_memory() const = 0;
};

}  // namespace ecsnap

#endif  // ECSNAP_CLIENT_ECSNAP_H_
