// RAII over libibverbs: a device context, protection domain, memory regions,
// and a reliable-connected queue pair with its completion queues. Each C
// resource has one owner and is released exactly once, in the order verbs
// requires (QP before its CQs, MRs before their PD, all before the context).
//
// Set-up (Device::Open .. QueuePair::Connect) may block briefly in the
// driver; Post* and Poll* never block. Objects are not thread-safe: a
// connection is driven by one thread. A Device outlives everything made from
// it; a ProtectionDomain outlives its regions and queue pairs.
//
// On a machine without an RDMA device Device::Open answers NOT_FOUND with a
// sentence saying so; nothing else here can be reached without one.
#ifndef ECSNAP_RDMA_VERBS_H_
#define ECSNAP_RDMA_VERBS_H_

#include <infiniband/verbs.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "rdma/qp_setup.h"
#include "rdma/write_plan.h"

namespace ecsnap::rdma {

struct DeviceOptions {
  // The device to open ("mlx5_0"); empty: the first with an active port.
  // Default: "".
  std::string name;
  // HCA port. Default: 1.
  uint8_t port = 1;
  // GID table index for RoCE (routed by GID). Default: 0; RoCE v2 fabrics
  // usually want the index of the port's IPv4-mapped RoCE v2 GID (often 3).
  uint8_t gid_index = 0;
};

// The names of the RDMA devices this host has; empty when it has none.
std::vector<std::string> DeviceNames();

class ProtectionDomain;

class Device {
 public:
  // NOT_FOUND when the host has no usable RDMA device (none named so, its
  // port not active, or on RoCE no GID at options.gid_index), with the
  // reason for each device passed over.
  static absl::StatusOr<std::unique_ptr<Device>> Open(const DeviceOptions& options);
  ~Device();
  Device(const Device&) = delete;
  Device& operator=(const Device&) = delete;

  const std::string& name() const { return name_; }
  ibv_context* context() const { return context_; }
  const DeviceOptions& options() const { return options_; }
  const ibv_port_attr& port() const { return port_; }
  const ibv_device_attr& attr() const { return attr_; }
  // True on RoCE: connections route by GID.
  bool global() const { return port_.link_layer == IBV_LINK_LAYER_ETHERNET; }
  const ibv_gid& gid() const { return gid_; }

  absl::StatusOr<std::unique_ptr<ProtectionDomain>> AllocateProtectionDomain();

 private:
  Device(std::string name, ibv_context* context, DeviceOptions options)
      : name_(std::move(name)), context_(context), options_(std::move(options)) {}
  const std::string name_;
  ibv_context* const context_;
  const DeviceOptions options_;
  ibv_port_attr port_{};
  ibv_device_attr attr_{};
  ibv_gid gid_{};
};

// Memory registered with a protection domain; deregistered when destroyed.
// The memory must stay mapped (and at the same pages) for the region's life.
class MemoryRegion {
 public:
  ~MemoryRegion();
  MemoryRegion(const MemoryRegion&) = delete;
  MemoryRegion& operator=(const MemoryRegion&) = delete;

  uint8_t* data() const { return static_cast<uint8_t*>(mr_->addr); }
  uint64_t length() const { return mr_->length; }
  uint32_t lkey() const { return mr_->lkey; }
  uint32_t rkey() const { return mr_->rkey; }
  // [offset, offset + length) of the region as a write's source; the range
  // must lie inside it.
  absl::StatusOr<LocalRange> Local(uint64_t offset, uint64_t length) const;
  // The whole region as a window the remote side may write.
  RemoteWindow Remote() const {
    return RemoteWindow{reinterpret_cast<uint64_t>(mr_->addr), mr_->length, mr_->rkey};
  }

 private:
  friend class ProtectionDomain;
  explicit MemoryRegion(ibv_mr* mr) : mr_(mr) {}
  ibv_mr* const mr_;
};

class QueuePair;

class ProtectionDomain {
 public:
  ~ProtectionDomain();
  ProtectionDomain(const ProtectionDomain&) = delete;
  ProtectionDomain& operator=(const ProtectionDomain&) = delete;

  // Registers `memory` with `access` (IBV_ACCESS_LOCAL_WRITE is always
  // added). UNAVAILABLE with the errno (ENOMEM: raise LimitMEMLOCK).
  absl::StatusOr<std::unique_ptr<MemoryRegion>> Register(absl::Span<uint8_t> memory,
                                                         int access);
  // An RC queue pair with its own send and receive completion queues,
  // `send_depth` and `recv_depth` deep, in RESET.
  absl::StatusOr<std::unique_ptr<QueuePair>> CreateQueuePair(int send_depth, int recv_depth,
                                                             int max_sge, QpOptions options);

 private:
  friend class Device;
  ProtectionDomain(Device* device, ibv_pd* pd) : device_(device), pd_(pd) {}
  Device* const device_;
  ibv_pd* const pd_;
};

class QueuePair {
 public:
  ~QueuePair();
  QueuePair(const QueuePair&) = delete;
  QueuePair& operator=(const QueuePair&) = delete;

  // What the other side needs to connect to this one (send it over the
  // control plane).
  const Endpoint& endpoint() const { return machine_.local(); }
  QpState state() const { return machine_.state(); }

  // INIT -> RTR -> RTS toward `remote`. On failure the QP is in ERROR and
  // must be destroyed.
  absl::Status Connect(const Endpoint& remote);

  // Posts as many of `requests` as the ledger has room for, in order, as one
  // chain; returns how many were posted (the rest: post again after
  // completions). The last one posted is always signalled. An error when the
  // device refuses one; those before it are posted and in the ledger.
  absl::StatusOr<size_t> PostWrites(absl::Span<const WriteRequest> requests, SendLedger* ledger);
  // Posts `count` zero-length receives (a write with immediate consumes one).
  absl::Status PostReceives(int count);

  // Completions drained per poll at most.
  static constexpr int kMaxPoll = 32;

  // Drains up to `max` (at most kMaxPoll) send completions into `ledger`;
  // the ledger's status carries a completion error.
  absl::StatusOr<int> PollSend(SendLedger* ledger, int max = 32);
  // Drains up to `max` receive completions, calling `landed(imm, bytes)` for
  // each write with immediate (`bytes` counts that last write only, not the
  // plan it ends); a completion in error is returned as one, and the
  // connection is then to be dropped.
  absl::StatusOr<int> PollReceive(const std::function<absl::Status(uint32_t imm, uint32_t bytes)>& landed,
                                  int max = 32);

 private:
  friend class ProtectionDomain;
  QueuePair(ibv_cq* send_cq, ibv_cq* recv_cq, ibv_qp* qp, QpStateMachine machine)
      : send_cq_(send_cq), recv_cq_(recv_cq), qp_(qp), machine_(std::move(machine)) {}
  absl::Status Apply(absl::StatusOr<QpTransition> transition);

  ibv_cq* const send_cq_;
  ibv_cq* const recv_cq_;
  ibv_qp* const qp_;
  QpStateMachine machine_;
};

}  // namespace ecsnap::rdma

#endif  // ECSNAP_RDMA_VERBS_H_
