// libecsnap's implementation: the public API of client/ecsnap.h over the
// data-plane gRPC service, with windows of shared memory for the bytes.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <deque>
#include <map>
#include <set>
#include <thread>
#include <tuple>

#include <grpcpp/grpcpp.h>

#include "absl/base/thread_annotations.h"
#include "absl/cleanup/cleanup.h"
#include "absl/strings/match.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "client/copy.h"
#include "client/cuda/device_copy.h"
#include "client/data_channel.h"
#include "client/raw_call.h"
#include "client/restore_plan.h"
#include "client/window_cache.h"
#include "client/ecsnap.h"
#include "common/bulk_message.h"
#include "common/data_plane_http2.h"
#include "common/grpc_status.h"
#include "common/log.h"
#include "common/status_macros.h"
#include "common/prefault.h"
#include "common/unique_fd.h"
#include "ec/crc32c.h"
#include "proto/snapshot.grpc.pb.h"

namespace ecsnap {

using client_internal::CopyAll;
using client_internal::CopyTask;
using client_internal::DeviceCopier;
using client_internal::DeviceCopyTask;
using client_internal::MappedWindow;
using client_internal::WindowCache;
using client_internal::PlanRestore;
using client_internal::RawCall;
using client_internal::StallGuard;
using client_internal::RestorePlan;

// Tensors start on this boundary inside a rank's window.
constexpr uint64_t kTensorAlignBytes = 64;
// Payload bytes per WriteRank message (the daemon takes messages of up to
// kMaxMessageBytes).
constexpr uint64_t kStreamChunkBytes = 4 << 20;
// The bulk methods, called with raw byte buffers (common/bulk_message.h).
const std::string kWriteRankMethod =
    absl::StrCat("/", v1::Snapshot::service_full_name(), "/WriteRank");
const std::string kReadRankMethod =
    absl::StrCat("/", v1::Snapshot::service_full_name(), "/ReadRank");
constexpr WireField kReadRankChunk[] = {{v1::ReadRankChunk::kOffsetFieldNumber, WireField::kVarint},
                                        {v1::ReadRankChunk::kDataFieldNumber, WireField::kBytes}};
// Snapshots queued behind the one in progress.
constexpr size_t kMaxQueuedSnapshots = 4;
constexpr int kMaxMessageBytes = 64 << 20;

struct SnapshotHandle::State {
  uint64_t step = 0;
  uint64_t total = 0;
  std::vector<Tensor> tensors;
  std::vector<uint64_t> offsets;  // of each tensor in the window
  // Of each device tensor: the point of its stream marked at Snapshot().
  std::vector<std::shared_ptr<void>> after;
  std::atomic<uint64_t> copied{0};

  absl::Mutex mu;
  bool released ABSL_GUARDED_BY(mu) = false;  // the trainer's tensors are free
  absl::Status copy_status ABSL_GUARDED_BY(mu);
  bool done ABSL_GUARDED_BY(mu) = false;  // committed or failed
  absl::Status status ABSL_GUARDED_BY(mu);

  void Copied(absl::Status s) {
    absl::MutexLock lock(&mu);
    copy_status = std::move(s);
    released = true;
  }
  void Finish(absl::Status s) {
    absl::MutexLock lock(&mu);
    if (!released) {
      copy_status = s;
      released = true;
    }
    status = std::move(s);
    done = true;
  }
};

absl::Status SnapshotHandle::Wait() const {
  absl::MutexLock lock(&state_->mu);
  state_->mu.Await(absl::Condition(&state_->released));
  return state_->copy_status;
}

absl::Status SnapshotHandle::WaitCommitted() const {
  absl::MutexLock lock(&state_->mu);
  state_->mu.Await(absl::Condition(&state_->done));
  return state_->status;
}

bool SnapshotHandle::done() const {
  absl::MutexLock lock(&state_->mu);
  return state_->done;
}

uint64_t SnapshotHandle::step() const { return state_->step; }
uint64_t SnapshotHandle::bytes_copied() const { return state_->copied.load(); }
uint64_t SnapshotHandle::bytes_total() const { return state_->total; }

namespace {

absl::Status Annotate(const absl::Status& s, const std::string& what) {
  if (s.ok()) return s;
  return absl::Status(s.code(), absl::StrCat(what, ": ", s.message()));
}

class ClientImpl final : public Client {
 public:
  explicit ClientImpl(ClientOptions options) : options_(std::move(options)) {}

  ~ClientImpl() override {
    {
      absl::MutexLock lock(&mu_);
      stopping_ = true;
    }
    if (worker_.joinable()) worker_.join();
    attach_context_.TryCancel();
    if (attach_reader_thread_.joinable()) attach_reader_thread_.join();
    windows_.reset();  // after the reader, which hands it windows to warm
  }

  absl::Status Init() {
    if (options_.local_ranks.empty()) options_.local_ranks.push_back(options_.rank);
    DataChannelOptions dco;
    dco.address = options_.daemon_address;
    dco.ca_file = options_.ca_file;
    dco.tls_name = options_.tls_name;
    dco.args.SetMaxReceiveMessageSize(kMaxMessageBytes);
    for (const Http2Setting& s : kDataPlaneHttp2) dco.args.SetInt(s.key, s.value);
    dco.args.SetMaxSendMessageSize(kMaxMessageBytes);
    if (options_.keepalive_ms < 0 ||
        (options_.keepalive_ms != 0 && options_.keepalive_ms < kMinKeepaliveMs)) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "keepalive_ms %d is below the %d ms the daemon allows between pings (0 turns pings off)",
          options_.keepalive_ms, kMinKeepaliveMs));
    }
    dco.keepalive_ms = options_.keepalive_ms;
    dco.timeout = absl::Milliseconds(options_.rpc_timeout_ms);
    auto data = OpenDataChannel(std::move(dco));
    if (!data.ok()) return data.status();
    channel_ = data->channel;
    socket_ = data->socket;
    stub_ = v1::Snapshot::NewStub(channel_);

    v1::AttachRequest req;
    req.set_job_id(options_.job_id);
    req.set_rank(options_.rank);
    for (uint32_t r : options_.local_ranks) req.add_local_ranks(r);
    windows_enabled_ = data->windows && options_.transport != Transport::kGrpc;
    req.set_windows(windows_enabled_);
    if (windows_enabled_) {
      windows_ = std::make_unique<WindowCache>(options_.daemon_address,
                                               absl::Milliseconds(options_.rpc_timeout_ms));
    }
    if (!options_.job_token.empty()) {
      attach_context_.AddMetadata("authorization", "Bearer " + options_.job_token);
    }
    attach_reader_ = stub_->Attach(&attach_context_, req);
    v1::AttachEvent first;
    if (!attach_reader_->Read(&first)) {
      absl::Status st = FromGrpc(attach_reader_->Finish());
      if (st.code() == absl::StatusCode::kUnavailable) {
        st = absl::UnavailableError(absl::StrFormat(
            "no ecsnapd answers at %s (%s); is the daemon running?", options_.daemon_address,
            st.message()));
      }
      return st;
    }
    session_ = first.session_id();
    // Drains the session stream; it ends when the daemon or this client
    // goes. Windows the daemon made ready ahead are mapped in the background.
    attach_reader_thread_ = std::thread([this] {
      v1::AttachEvent ev;
      while (attach_reader_->Read(&ev)) {
        if (UseWindow(ev.ready_token())) windows_->Warm(ev.ready_file(), ev.ready_token());
      }
      attach_reader_->Finish();
    });

    if (options_.transport != Transport::kGrpc) {
      if (!windows_enabled_ && options_.transport == Transport::kSharedMemory) {
        return absl::UnavailableError(absl::StrFormat(
            "ecsnapd at %s shares no memory with this process (a TCP address, or a daemon "
            "without an arena): use Transport::kGrpc or kAuto",
            options_.daemon_address));
      }
    }
    worker_ = std::thread([this] { WorkerLoop(); });
    return absl::OkStatus();
  }

  bool shared_memory() const override { return windows_enabled_; }

  // Whether the bytes of a grant go through shared memory: only when this
  // client asked for it and the daemon granted a window.
  bool UseWindow(const std::string& token) const { return windows_enabled_ && !token.empty(); }

  // Where each tensor goes in the rank's window; returns the window's bytes.
  static uint64_t Layout(const std::vector<Tensor>& tensors, std::vector<uint64_t>* offsets) {
    uint64_t offset = 0;
    for (const Tensor& t : tensors) {
      offset = (offset + kTensorAlignBytes - 1) / kTensorAlignBytes * kTensorAlignBytes;
      if (offsets != nullptr) offsets->push_back(offset);
      offset += t.bytes;
    }
    return offset;
  }

  absl::Status Prepare(const std::vector<Tensor>& tensors) override {
    if (!windows_enabled_) return absl::OkStatus();
    return PrepareBytes(Layout(tensors, nullptr));
  }

  // Asks for a window of `bytes` ahead of the first snapshot; the window is
  // offered on the Attach stream once it exists. One round trip: the daemon
  // makes it in the background. (An asynchronous call could outlive this
  // client and its channel.)
  absl::Status PrepareBytes(uint64_t bytes) {
    grpc::ClientContext ctx;
    SetDeadline(ctx);
    v1::PrepareRankRequest req;
    req.set_session_id(session_);
    req.set_bytes(bytes);
    v1::PrepareRankResponse resp;
    return FromGrpc(stub_->PrepareRank(&ctx, req, &resp));
  }

  absl::StatusOr<SnapshotHandle> Snapshot(uint64_t step, std::vector<Tensor> tensors) override {
    snapshotted_.store(true, std::memory_order_relaxed);
    auto state = std::make_shared<SnapshotHandle::State>();
    state->step = step;
    for (const Tensor& t : tensors) {
      if (t.bytes > 0 && t.data == nullptr) {
        return absl::InvalidArgumentError(
            absl::StrFormat("tensor '%s' has %d bytes but no data", t.name, t.bytes));
      }
      if (t.device < -1) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "tensor '%s': device %d is neither -1 (host) nor a CUDA device", t.name, t.device));
      }
      if (t.device >= 0) {
        if (absl::StatusOr<DeviceCopier*> c = Copier(); !c.ok()) {
          return Annotate(c.status(), absl::StrFormat("tensor '%s' is on CUDA device %d", t.name,
                                                      t.device));
        }
      }
    }
    state->total = Layout(tensors, &state->offsets);
    // Device tensors: the copy waits for what the trainer queued on each
    // tensor's stream before this call, and for nothing queued after it.
    state->after.resize(tensors.size());
    std::map<std::pair<int, void*>, std::shared_ptr<void>> marks;
    for (size_t i = 0; i < tensors.size(); ++i) {
      const Tensor& t = tensors[i];
      if (t.device < 0) continue;
      std::shared_ptr<void>& mark = marks[{t.device, t.cuda_stream}];
      if (mark == nullptr) {
        ASSIGN_OR_RETURN(DeviceCopier * copier, Copier());
        ASSIGN_OR_RETURN(mark, copier->Mark(t.device, t.cuda_stream));
      }
      state->after[i] = mark;
    }
    state->tensors = std::move(tensors);
    absl::MutexLock lock(&mu_);
    if (queue_.size() >= kMaxQueuedSnapshots) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "%d snapshots are already waiting; Wait() for one before starting step %d",
          queue_.size(), step));
    }
    queue_.push_back(state);
    return SnapshotHandle(state);
  }

  absl::StatusOr<std::vector<RestorableStep>> ListRestorable() override {
    grpc::ClientContext ctx;
    SetDeadline(ctx);
    v1::ListRestorableRequest req;
    req.set_session_id(session_);
    v1::ListRestorableResponse resp;
    absl::Status st = FromGrpc(stub_->ListRestorable(&ctx, req, &resp));
    if (!st.ok()) return st;
    std::vector<RestorableStep> out;
    for (const auto& s : resp.steps()) {
      out.push_back({s.step(), static_cast<StepState>(s.state()), s.bytes()});
    }
    return out;
  }

  absl::StatusOr<RestoredState> Restore(uint64_t step) override {
    // No destinations: every tensor comes back in buffers of its own.
    RestoredState out;
    auto got = RestoreInto(step, {}, &out);
    if (!got.ok()) return got.status();
    return out;
  }

  absl::StatusOr<uint64_t> RestoreInto(uint64_t step, absl::Span<const TensorDestination> into,
                                       RestoredState* rest) override {
    auto lease = Lease(step);
    if (!lease.ok()) return lease.status();
    const v1::RestoreResponse& r = *lease;
    absl::StatusOr<RestorePlan> plan = PlanRestore(r.manifest(), r.step(), into, rest != nullptr);
    absl::Status st = plan.status();
    for (const TensorDestination& d : into) {
      if (!st.ok() || d.device < 0) continue;
      st = Annotate(Copier().status(),
                    absl::StrFormat("destination '%s' is on CUDA device %d", d.name, d.device));
    }
    std::shared_ptr<uint8_t> buffer;
    std::vector<CopyTask> tasks;
    if (st.ok()) {
      buffer = std::shared_ptr<uint8_t>(new uint8_t[std::max<uint64_t>(plan->rest_bytes, 1)],
                                        std::default_delete<uint8_t[]>());
      for (int i = 0; i < r.manifest().tensors_size(); ++i) {
        const TensorDestination* d = plan->dests[i];
        uint8_t* dst = d == nullptr ? buffer.get() + plan->rest_offset[i]
                                    : static_cast<uint8_t*>(d->data);
        tasks.push_back({dst, nullptr, r.manifest().tensors(i).length(), 0});
      }
      st = Fetch(r, plan->dests, tasks);
    }
    ReleaseLease(r.lease_id());
    if (!st.ok()) return st;
    // A trainer that restores before its first snapshot (a restart) will
    // most likely snapshot the same tensors next: the window for that is
    // made and warmed now, while it gets back to training, as Prepare
    // would (after a daemon restart or a node's rebuild there is none).
    if (windows_enabled_ && r.window_bytes() > 0 && !snapshotted_.load(std::memory_order_relaxed) &&
        !restore_prepared_.exchange(true)) {
      PrepareBytes(r.window_bytes()).IgnoreError();  // a head start only
    }
    if (rest != nullptr) {
      rest->step = r.step();
      rest->buffer = buffer;
      rest->tensors.clear();
      for (int i = 0; i < r.manifest().tensors_size(); ++i) {
        if (plan->rest_offset[i] == RestorePlan::kNone) continue;
        const auto& t = r.manifest().tensors(i);
        RestoredTensor rt;
        rt.name = t.name();
        rt.kind = static_cast<TensorKind>(t.kind());
        rt.dtype = static_cast<DType>(t.dtype());
        rt.shape.assign(t.shape().begin(), t.shape().end());
        rt.data = absl::Span<const uint8_t>(buffer.get() + plan->rest_offset[i], t.length());
        rest->tensors.push_back(std::move(rt));
      }
    }
    return r.step();
  }

 private:
  void SetDeadline(grpc::ClientContext& ctx) const {
    ctx.set_deadline(std::chrono::system_clock::now() +
                     std::chrono::milliseconds(options_.rpc_timeout_ms));
  }

  // The CUDA copier, made when the first device tensor comes; its error
  // (built without CUDA, no device) is kept and returned each time.
  absl::StatusOr<DeviceCopier*> Copier() {
    absl::MutexLock lock(&copier_mu_);
    if (copier_ == nullptr && copier_error_.ok()) {
      absl::StatusOr<std::unique_ptr<DeviceCopier>> c = DeviceCopier::Create();
      if (c.ok()) {
        copier_ = *std::move(c);
      } else {
        copier_error_ = c.status();
      }
    }
    if (!copier_error_.ok()) return copier_error_;
    return copier_.get();
  }

  // Registers a window's mapping for DMA, once for the mapping's life (for
  // every device: the registration is portable).
  absl::Status Pin(MappedWindow& w, int device, bool caller_thread) {
    ASSIGN_OR_RETURN(DeviceCopier * copier, Copier());
    absl::MutexLock lock(&pin_mu_);
    if (w.pinned != nullptr) return absl::OkStatus();
    RETURN_IF_ERROR(
        copier->Register(w.map.data(), w.map.size(), !w.writable, device, caller_thread));
    w.pinned = std::shared_ptr<void>(w.map.data(), [copier](void* p) { copier->Unregister(p); });
    return absl::OkStatus();
  }

  void WorkerLoop() {
    while (true) {
      std::shared_ptr<SnapshotHandle::State> s;
      {
        absl::MutexLock lock(&mu_);
        mu_.Await(absl::Condition(
            +[](ClientImpl* c) ABSL_EXCLUSIVE_LOCKS_REQUIRED(c->mu_) {
              return c->stopping_ || !c->queue_.empty();
            },
            this));
        if (queue_.empty()) return;  // stopping, nothing left
        s = queue_.front();
        queue_.pop_front();
      }
      s->Finish(Annotate(RunSnapshot(*s), absl::StrFormat("snapshot of step %d", s->step)));
    }
  }

  absl::Status RunSnapshot(SnapshotHandle::State& s) {
    v1::BeginRankResponse window;
    {
      grpc::ClientContext ctx;
      SetDeadline(ctx);
      v1::BeginRankRequest req;
      req.set_session_id(session_);
      req.set_step(s.step);
      req.set_bytes(s.total);
      absl::Status st = FromGrpc(stub_->BeginRank(&ctx, req, &window));
      if (!st.ok()) return st;
    }
    v1::CommitRankRequest commit;
    commit.set_session_id(session_);
    commit.set_step(s.step);
    absl::Status st = UseWindow(window.window_token()) ? CopyIn(s, window, commit.mutable_manifest())
                                                       : StreamIn(s, commit.mutable_manifest());
    if (st.ok()) {
      // The bytes are in the daemon's memory: the trainer may go on while
      // the daemon checks them.
      s.Copied(absl::OkStatus());
      grpc::ClientContext ctx;
      SetDeadline(ctx);
      v1::CommitRankResponse resp;
      st = FromGrpc(stub_->CommitRank(&ctx, commit, &resp));
      if (st.ok()) return st;
    }
    grpc::ClientContext ctx;
    SetDeadline(ctx);
    v1::AbortRankRequest abort;
    abort.set_session_id(session_);
    abort.set_step(s.step);
    v1::AbortRankResponse ignored;
    stub_->AbortRank(&ctx, abort, &ignored);
    return st;
  }

  static v1::TensorEntry* AddEntry(const Tensor& t, uint64_t offset, v1::Manifest* manifest) {
    v1::TensorEntry* e = manifest->add_tensors();
    e->set_name(t.name);
    e->set_kind(static_cast<v1::TensorKind>(t.kind));
    e->set_dtype(static_cast<v1::DType>(t.dtype));
    for (int64_t d : t.shape) e->add_shape(d);
    e->set_offset(offset);
    e->set_length(t.bytes);
    return e;
  }

  // Shared memory: one copy from the trainer's tensors into the window.
  absl::Status CopyIn(SnapshotHandle::State& s, const v1::BeginRankResponse& window,
                      v1::Manifest* manifest) {
    if (s.total > window.window_bytes()) {
      return absl::InternalError("the daemon granted a window smaller than the step");
    }
    auto mapped = windows_->Get(window.window_file(), window.window_token(), s.total, true);
    if (!mapped.ok()) return mapped.status();
    uint8_t* base = (*mapped)->map.data();
    // Host tensors are copied by CopyAll's threads, device tensors by the
    // GPU's copy engine into the registered window; each with its CRC.
    std::vector<CopyTask> tasks;
    std::vector<DeviceCopyTask> device_tasks;
    for (size_t i = 0; i < s.tensors.size(); ++i) {
      const Tensor& t = s.tensors[i];
      if (t.device >= 0) {
        device_tasks.push_back({t.name, t.device, t.cuda_stream, const_cast<void*>(t.data),
                                base + s.offsets[i], t.bytes, s.after[i], 0});
      } else {
        tasks.push_back({base + s.offsets[i], static_cast<const uint8_t*>(t.data), t.bytes, 0});
      }
    }
    ++windows_->copying();  // the background first stores wait meanwhile
    absl::Cleanup done = [this] { --windows_->copying(); };
    if (!device_tasks.empty()) {
      ASSIGN_OR_RETURN(DeviceCopier * copier, Copier());
      RETURN_IF_ERROR(Pin(**mapped, device_tasks.front().device, /*caller_thread=*/false));
      RETURN_IF_ERROR(copier->ToHost(absl::MakeSpan(device_tasks), &s.copied));
    }
    CopyAll(tasks, options_.copy_threads, &s.copied);
    for (size_t i = 0, h = 0, d = 0; i < s.tensors.size(); ++i) {
      const uint32_t crc = s.tensors[i].device >= 0 ? device_tasks[d++].crc : tasks[h++].crc;
      AddEntry(s.tensors[i], s.offsets[i], manifest)->set_crc32c(crc);
    }
    return absl::OkStatus();
  }

  // gRPC: the same bytes, streamed in chunks whose payloads gRPC reads
  // straight from the tensors (borrowed slices), so the stall is the
  // socket's, not copies'. The tensors are the caller's until Wait(), so the
  // stream returns only once gRPC has let go of every slice.
  absl::Status StreamIn(SnapshotHandle::State& s, v1::Manifest* manifest) {
    DeviceCopier* copier = nullptr;
    for (const Tensor& t : s.tensors) {
      if (t.device >= 0 && copier == nullptr) {
        ASSIGN_OR_RETURN(copier, Copier());
      }
    }
    auto returned = std::make_shared<absl::Notification>();
    std::shared_ptr<void> lent(nullptr, [returned](void*) { returned->Notify(); });
    // The tensors may change once Wait() returns, so this waits as long as
    // gRPC reads them (a connection that stopped draining holds them until
    // gRPC tears it down), saying so every minute.
    absl::Cleanup await_slices = [&lent, returned] {
      lent.reset();
      for (int minutes = 1; !returned->WaitForNotificationWithTimeout(absl::Minutes(1));
           ++minutes) {
        Log("libecsnap: gRPC still holds tensor memory %d min after a snapshot stream ended",
            minutes);
      }
    };
    grpc::ClientContext ctx;
    RawCall call(channel_, &ctx, kWriteRankMethod, StreamGuard());
    bool first = true;
    // One message: the chunk's fields, then its payload as its own slice.
    auto send = [&](uint64_t offset, grpc::Slice payload) {
      WireWriter w;
      if (first) {
        w.Bytes(v1::WriteRankChunk::kSessionIdFieldNumber, session_);
        w.Varint(v1::WriteRankChunk::kStepFieldNumber, s.step);
        first = false;
      }
      w.Varint(v1::WriteRankChunk::kOffsetFieldNumber, offset);
      w.BytesHeader(v1::WriteRankChunk::kDataFieldNumber, payload.size());
      grpc::Slice parts[] = {w.TakeSlice(), std::move(payload)};
      return call.Write(grpc::ByteBuffer(parts, 2));
    };
    bool ok = true;
    absl::Status copy_error;
    for (size_t i = 0; i < s.tensors.size() && ok; ++i) {
      const Tensor& t = s.tensors[i];
      const uint8_t* src = static_cast<const uint8_t*>(t.data);
      uint32_t crc = 0;
      for (uint64_t done = 0; done < t.bytes && ok; done += kStreamChunkBytes) {
        const uint64_t n = std::min(kStreamChunkBytes, t.bytes - done);
        grpc::Slice payload;
        if (t.device >= 0) {
          // A piece of device memory comes into a slice of its own, a piece
          // at a time: host memory stays bounded whatever the tensors weigh.
          payload = grpc::Slice(n);
          uint8_t* host = const_cast<uint8_t*>(payload.begin());
          DeviceCopyTask task{t.name, t.device, t.cuda_stream, const_cast<uint8_t*>(src + done),
                              host, n, s.after[i], 0};
          copy_error = copier->ToHost(absl::MakeSpan(&task, 1), nullptr);
          if (!copy_error.ok()) {
            ctx.TryCancel();  // the step is then aborted (AbortRank)
            ok = false;
            break;
          }
          crc = ec::Crc32c(absl::Span<const uint8_t>(host, n), crc);
        } else {
          crc = ec::Crc32c(absl::Span<const uint8_t>(src + done, n), crc);
          payload = BorrowedSlice(src + done, n, lent);
        }
        ok = send(s.offsets[i] + done, std::move(payload));
        s.copied.fetch_add(n, std::memory_order_relaxed);
      }
      AddEntry(t, s.offsets[i], manifest)->set_crc32c(crc);
    }
    // An empty rank still opens the stream once, so the daemon sees the step.
    if (ok && first) ok = send(0, grpc::Slice());
    if (ok) ok = call.WritesDone();
    grpc::ByteBuffer response;
    if (ok) call.Read(&response);
    absl::Status st = FromGrpc(call.Finish());
    if (!copy_error.ok()) return copy_error;
    if (st.ok() && !ok) st = absl::UnavailableError("the daemon closed the write stream early");
    return st;
  }

  // A bulk stream whose next message neither goes nor comes for twice the
  // keepalive ends the connection (over the Unix socket; over TCP, gRPC's
  // keepalive and TCP_USER_TIMEOUT do): every call fails UNAVAILABLE, and
  // gRPC lets go of the tensors it borrowed.
  StallGuard StreamGuard() const {
    if (socket_ == nullptr || options_.keepalive_ms <= 0) return {};
    const absl::Duration limit = absl::Milliseconds(options_.keepalive_ms) * 2;
    return {limit, [socket = socket_, limit] {
              Log("libecsnap: the daemon moved no bytes of a stream for %s; closing the "
                  "connection (this Client is done: connect again once the daemon answers)",
                  absl::FormatDuration(limit));
              ::shutdown(socket->get(), SHUT_RDWR);
            }};
  }

  absl::StatusOr<v1::RestoreResponse> Lease(uint64_t step) {
    grpc::ClientContext ctx;
    SetDeadline(ctx);
    v1::RestoreRequest req;
    req.set_session_id(session_);
    req.set_step(step);
    v1::RestoreResponse resp;
    absl::Status st = FromGrpc(stub_->Restore(&ctx, req, &resp));
    if (!st.ok()) return st;
    return resp;
  }

  void ReleaseLease(uint64_t lease_id) {
    grpc::ClientContext ctx;
    SetDeadline(ctx);
    v1::ReleaseRestoreRequest req;
    req.set_session_id(session_);
    req.set_lease_id(lease_id);
    v1::ReleaseRestoreResponse resp;
    stub_->ReleaseRestore(&ctx, req, &resp);
  }

  // Fills every task's dst from the leased window (tasks in manifest order,
  // src unset; a task whose destination is on a device has its device
  // memory as dst), computing each task's CRC-32C, then checks them.
  absl::Status Fetch(const v1::RestoreResponse& r,
                     const std::vector<const TensorDestination*>& dests,
                     std::vector<CopyTask>& tasks) {
    for (const auto& t : r.manifest().tensors()) {
      if (t.offset() > r.window_bytes() || t.length() > r.window_bytes() - t.offset()) {
        return absl::DataLossError(
            absl::StrFormat("tensor '%s' lies outside its step's window", t.name()));
      }
    }
    auto on_device = [&](int i) { return dests[i] != nullptr && dests[i]->device >= 0; };
    if (!UseWindow(r.window_token())) {
      // Streamed: each piece goes to its tensor as it arrives (device ones
      // by the copier, a piece at a time).
      RETURN_IF_ERROR(StreamOut(r, dests, tasks));
    } else {
      ASSIGN_OR_RETURN(std::shared_ptr<MappedWindow> window,
                       windows_->Get(r.window_file(), r.window_token(), r.window_bytes(), false));
      // Host destinations by CopyAll's threads; device ones by one copy each
      // from the (registered) window.
      std::vector<CopyTask> host_tasks;
      std::vector<DeviceCopyTask> device_tasks;
      for (int i = 0; i < r.manifest().tensors_size(); ++i) {
        uint8_t* src = window->map.data() + r.manifest().tensors(i).offset();
        tasks[i].src = src;
        if (on_device(i)) {
          const TensorDestination& d = *dests[i];
          device_tasks.push_back({d.name, d.device, d.cuda_stream, d.data, src, tasks[i].bytes,
                                  nullptr, 0});
        } else {
          host_tasks.push_back(tasks[i]);
        }
      }
      ++windows_->copying();
      CopyAll(host_tasks, options_.copy_threads, nullptr);
      --windows_->copying();
      if (!device_tasks.empty()) {
        ASSIGN_OR_RETURN(DeviceCopier * copier, Copier());
        RETURN_IF_ERROR(Pin(*window, device_tasks.front().device, /*caller_thread=*/true));
        RETURN_IF_ERROR(copier->ToDevice(absl::MakeSpan(device_tasks)));
      }
      for (int i = 0, h = 0, d = 0; i < r.manifest().tensors_size(); ++i) {
        tasks[i].crc = on_device(i) ? device_tasks[d++].crc : host_tasks[h++].crc;
      }
    }
    if (!options_.verify_restore) return absl::OkStatus();
    for (int i = 0; i < r.manifest().tensors_size(); ++i) {
      const auto& t = r.manifest().tensors(i);
      if (tasks[i].crc != t.crc32c()) {
        return absl::DataLossError(absl::StrFormat(
            "tensor '%s' of step %d fails its checksum (0x%08x, expected 0x%08x)", t.name(),
            r.step(), tasks[i].crc, t.crc32c()));
      }
    }
    return absl::OkStatus();
  }

  // gRPC: reads the window in order and scatters each chunk straight into
  // the tensors it overlaps, from where gRPC received it (no message copy),
  // checksumming each piece as it lands.
  absl::Status StreamOut(const v1::RestoreResponse& r,
                         const std::vector<const TensorDestination*>& dests,
                         std::vector<CopyTask>& tasks) {
    const auto& tensors = r.manifest().tensors();
    std::vector<int> order(tensors.size());
    for (int i = 0; i < tensors.size(); ++i) order[i] = i;
    std::sort(order.begin(), order.end(),
              [&](int a, int b) { return tensors[a].offset() < tensors[b].offset(); });
    size_t first = 0;  // in `order`: tensors before it end before the bytes at hand
    // Bytes [a, a + n) of the window, at `data`.
    auto scatter = [&](uint64_t a, const uint8_t* data, uint64_t n) -> absl::Status {
      const uint64_t b = a + n;
      while (first < order.size() &&
             tensors[order[first]].offset() + tensors[order[first]].length() <= a) {
        ++first;
      }
      for (size_t k = first; k < order.size() && tensors[order[k]].offset() < b; ++k) {
        const auto& t = tensors[order[k]];
        const uint64_t lo = std::max(a, t.offset()), hi = std::min(b, t.offset() + t.length());
        if (lo >= hi) continue;
        CopyTask& task = tasks[order[k]];
        const TensorDestination* d = dests[order[k]];
        uint8_t* dst = task.dst + (lo - t.offset());
        const uint8_t* piece = data + (lo - a);
        if (d != nullptr && d->device >= 0) {
          DeviceCopyTask copy{d->name, d->device, d->cuda_stream, dst, const_cast<uint8_t*>(piece),
                              hi - lo, nullptr, 0};
          ASSIGN_OR_RETURN(DeviceCopier * copier, Copier());
          RETURN_IF_ERROR(copier->ToDevice(absl::MakeSpan(&copy, 1)));
          task.crc = ec::Crc32c(absl::Span<const uint8_t>(piece, hi - lo), task.crc);
          continue;
        }
        std::memcpy(dst, piece, hi - lo);
        task.crc = ec::Crc32c(absl::Span<const uint8_t>(dst, hi - lo), task.crc);
      }
      return absl::OkStatus();
    };
    grpc::ClientContext ctx;
    RawCall call(channel_, &ctx, kReadRankMethod, StreamGuard());
    v1::ReadRankRequest req;
    req.set_session_id(session_);
    req.set_lease_id(r.lease_id());
    req.set_offset(0);
    req.set_length(r.window_bytes());
    grpc::Slice request(req.SerializeAsString());
    bool ok = call.Write(grpc::ByteBuffer(&request, 1)) && call.WritesDone();
    uint64_t next = 0;
    grpc::ByteBuffer buffer;
    absl::Status failed;
    while (ok && failed.ok() && call.Read(&buffer)) {
      absl::StatusOr<BulkMessage> chunk = BulkMessage::Parse(buffer, kReadRankChunk);
      if (!chunk.ok()) {
        failed = absl::DataLossError(absl::StrCat("the daemon sent a ReadRank message that is not one: ",
                                                  chunk.status().message()));
        break;
      }
      const uint64_t a = chunk->Varint(v1::ReadRankChunk::kOffsetFieldNumber);
      const uint64_t n = chunk->BytesLength(v1::ReadRankChunk::kDataFieldNumber);
      if (a != next || n == 0 || n > r.window_bytes() - a) {
        failed = absl::DataLossError(absl::StrFormat(
            "the daemon sent bytes [%d, %d) where [%d, ...) of %d was due", a, a + n, next,
            r.window_bytes()));
        break;
      }
      for (absl::Span<const uint8_t> piece : chunk->Bytes(v1::ReadRankChunk::kDataFieldNumber)) {
        failed = scatter(next, piece.data(), piece.size());
        if (!failed.ok()) break;
        next += piece.size();
      }
    }
    if (!failed.ok()) {
      ctx.TryCancel();
      call.Finish();
      return failed;
    }
    absl::Status st = FromGrpc(call.Finish());
    if (st.ok() && next != r.window_bytes()) {
      st = absl::DataLossError(absl::StrFormat("received %d of %d bytes", next, r.window_bytes()));
    }
    return st;
  }

  ClientOptions options_;
  std::atomic<bool> snapshotted_{false};       // Snapshot was called
  std::atomic<bool> restore_prepared_{false};  // a restore asked for a window
  std::shared_ptr<grpc::Channel> channel_;
  std::shared_ptr<const UniqueFd> socket_;  // under channel_, over a Unix socket
  std::unique_ptr<v1::Snapshot::Stub> stub_;
  grpc::ClientContext attach_context_;
  std::unique_ptr<grpc::ClientReader<v1::AttachEvent>> attach_reader_;
  std::thread attach_reader_thread_;
  std::string session_;  // the daemon's random id, valid on this channel only
  bool windows_enabled_ = false;  // the daemon hands out windows

  // Declared before the windows, so that it outlives them: a window drops
  // its CUDA registration through it.
  absl::Mutex copier_mu_;
  std::unique_ptr<DeviceCopier> copier_ ABSL_GUARDED_BY(copier_mu_);
  absl::Status copier_error_ ABSL_GUARDED_BY(copier_mu_);
  absl::Mutex pin_mu_;  // MappedWindow::pinned
  std::unique_ptr<WindowCache> windows_;  // with windows_enabled_

  absl::Mutex mu_;
  std::deque<std::shared_ptr<SnapshotHandle::State>> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread worker_;
};

}  // namespace

bool BuiltWithCuda() { return DeviceCopier::Built(); }

absl::StatusOr<std::unique_ptr<Client>> Client::Connect(const ClientOptions& options) {
  auto client = std::make_unique<ClientImpl>(options);
  absl::Status st = client->Init();
  if (!st.ok()) return st;
  return std::unique_ptr<Client>(std::move(client));
}

}  // namespace ecsnap
