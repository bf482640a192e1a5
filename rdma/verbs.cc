#include "rdma/verbs.h"

#include <algorithm>

#include <cerrno>
#include <cstring>
#include <limits>

#include "absl/random/random.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"

namespace ecsnap::rdma {
namespace {

std::string Errno(int err) { return std::strerror(err); }

// The device list, freed when done.
struct DeviceList {
  DeviceList() { devices = ::ibv_get_device_list(&count); err = errno; }
  ~DeviceList() {
    if (devices != nullptr) ::ibv_free_device_list(devices);
  }
  ibv_device** devices = nullptr;
  int count = 0;
  int err = 0;
};

}  // namespace

std::vector<std::string> DeviceNames() {
  DeviceList list;
  std::vector<std::string> names;
  for (int i = 0; list.devices != nullptr && i < list.count; ++i) {
    names.push_back(::ibv_get_device_name(list.devices[i]));
  }
  return names;
}

absl::StatusOr<std::unique_ptr<Device>> Device::Open(const DeviceOptions& options) {
  DeviceList list;
  if (list.devices == nullptr || list.count == 0) {
    return absl::NotFoundError(absl::StrFormat(
        "no RDMA device on this host (ibv_get_device_list: %s); chunk bytes go over TCP",
        list.devices == nullptr ? Errno(list.err) : "none found"));
  }
  std::vector<std::string> tried;
  for (int i = 0; i < list.count; ++i) {
    const std::string name = ::ibv_get_device_name(list.devices[i]);
    if (!options.name.empty() && name != options.name) continue;
    ibv_context* context = ::ibv_open_device(list.devices[i]);
    if (context == nullptr) {
      tried.push_back(absl::StrFormat("%s: cannot open (%s)", name, Errno(errno)));
      continue;
    }
    std::unique_ptr<Device> device(new Device(name, context, options));
    if (int rc = ::ibv_query_port(context, options.port, &device->port_); rc != 0) {
      tried.push_back(absl::StrFormat("%s: port %d cannot be queried (%s)", name, options.port,
                                      Errno(rc)));
      continue;
    }
    if (device->port_.state != IBV_PORT_ACTIVE) {
      tried.push_back(absl::StrFormat("%s: port %d is %s", name, options.port,
                                      ::ibv_port_state_str(device->port_.state)));
      continue;
    }
    if (int rc = ::ibv_query_device(context, &device->attr_); rc != 0) {
      tried.push_back(absl::StrFormat("%s: cannot be queried (%s)", name, Errno(rc)));
      continue;
    }
    if (device->global()) {
      // A RoCE port routes by the GID at the index asked for: a device
      // without one there is passed over (set the index of the fabric's
      // RoCE v2 address).
      if (::ibv_query_gid(context, options.port, options.gid_index, &device->gid_) != 0) {
        tried.push_back(absl::StrFormat("%s: port %d has no GID at index %d (%s)", name,
                                        options.port, options.gid_index, Errno(errno)));
        continue;
      }
      static const ibv_gid kZero{};
      if (std::memcmp(device->gid_.raw, kZero.raw, sizeof(kZero.raw)) == 0) {
        tried.push_back(absl::StrFormat("%s: port %d: the GID at index %d is empty", name,
                                        options.port, options.gid_index));
        continue;
      }
    }
    return device;
  }
  if (options.name.empty() && tried.empty()) {
    return absl::NotFoundError("no RDMA device on this host; chunk bytes go over TCP");
  }
  return absl::NotFoundError(absl::StrFormat(
      "no usable RDMA device%s: %s", options.name.empty() ? "" : " named " + options.name,
      tried.empty() ? "none by that name" : absl::StrJoin(tried, "; ")));
}

Device::~Device() { ::ibv_close_device(context_); }

absl::StatusOr<std::unique_ptr<ProtectionDomain>> Device::AllocateProtectionDomain() {
  ibv_pd* pd = ::ibv_alloc_pd(context_);
  if (pd == nullptr) {
    return absl::UnavailableError(
        absl::StrFormat("RDMA device %s: ibv_alloc_pd: %s", name_, Errno(errno)));
  }
  return std::unique_ptr<ProtectionDomain>(new ProtectionDomain(this, pd));
}

MemoryRegion::~MemoryRegion() { ::ibv_dereg_mr(mr_); }

absl::StatusOr<LocalRange> MemoryRegion::Local(uint64_t offset, uint64_t length) const {
  if (offset > mr_->length || length > mr_->length - offset) {
    return absl::OutOfRangeError(absl::StrFormat(
        "RDMA region of %u bytes: [%u, +%u) is outside it", mr_->length, offset, length));
  }
  return LocalRange{reinterpret_cast<uint64_t>(mr_->addr) + offset, length, mr_->lkey};
}

ProtectionDomain::~ProtectionDomain() { ::ibv_dealloc_pd(pd_); }

absl::StatusOr<std::unique_ptr<MemoryRegion>> ProtectionDomain::Register(
    absl::Span<uint8_t> memory, int access) {
  ibv_mr* mr = ::ibv_reg_mr(pd_, memory.data(), memory.size(), access | IBV_ACCESS_LOCAL_WRITE);
  if (mr == nullptr) {
    const int err = errno;
    return absl::UnavailableError(absl::StrFormat(
        "RDMA: cannot register %u bytes: %s%s", memory.size(), Errno(err),
        err == ENOMEM ? " (the locked-memory limit is too low: raise LimitMEMLOCK / ulimit -l)"
                      : ""));
  }
  return std::unique_ptr<MemoryRegion>(new MemoryRegion(mr));
}

absl::StatusOr<std::unique_ptr<QueuePair>> ProtectionDomain::CreateQueuePair(
    int send_depth, int recv_depth, int max_sge, QpOptions options) {
  ibv_context* context = device_->context();
  ibv_cq* send_cq = ::ibv_create_cq(context, send_depth, nullptr, nullptr, 0);
  if (send_cq == nullptr) {
    return absl::UnavailableError(absl::StrFormat("RDMA: ibv_create_cq(%d): %s", send_depth,
                                                  Errno(errno)));
  }
  ibv_cq* recv_cq = ::ibv_create_cq(context, std::max(1, recv_depth), nullptr, nullptr, 0);
  if (recv_cq == nullptr) {
    const int err = errno;
    ::ibv_destroy_cq(send_cq);
    return absl::UnavailableError(absl::StrFormat("RDMA: ibv_create_cq(%d): %s", recv_depth,
                                                  Errno(err)));
  }
  ibv_qp_init_attr init{};
  init.send_cq = send_cq;
  init.recv_cq = recv_cq;
  init.qp_type = IBV_QPT_RC;
  init.cap.max_send_wr = send_depth;
  init.cap.max_recv_wr = std::max(1, recv_depth);
  init.cap.max_send_sge = max_sge;
  init.cap.max_recv_sge = 1;
  init.sq_sig_all = 0;
  ibv_qp* qp = ::ibv_create_qp(pd_, &init);
  if (qp == nullptr) {
    const int err = errno;
    ::ibv_destroy_cq(recv_cq);
    ::ibv_destroy_cq(send_cq);
    return absl::UnavailableError(absl::StrFormat(
        "RDMA: ibv_create_qp (send %d x %d entries, receive %d): %s", send_depth, max_sge,
        recv_depth, Errno(err)));
  }
  Endpoint local;
  local.qp_num = qp->qp_num;
  local.psn = absl::Uniform<uint32_t>(absl::BitGen(), 0, 1u << 24);
  local.lid = device_->port().lid;
  local.port = device_->options().port;
  local.gid_index = device_->options().gid_index;
  local.mtu = static_cast<uint8_t>(device_->port().active_mtu);
  local.global = device_->global();
  std::memcpy(local.gid.data(), device_->gid().raw, local.gid.size());
  return std::unique_ptr<QueuePair>(
      new QueuePair(send_cq, recv_cq, qp, QpStateMachine(local, options)));
}

QueuePair::~QueuePair() {
  ::ibv_destroy_qp(qp_);
  ::ibv_destroy_cq(recv_cq_);
  ::ibv_destroy_cq(send_cq_);
}

absl::Status QueuePair::Apply(absl::StatusOr<QpTransition> transition) {
  if (!transition.ok()) {
    machine_.Fail();
    return transition.status();
  }
  if (int rc = ::ibv_modify_qp(qp_, &transition->attr, transition->mask); rc != 0) {
    machine_.Fail();
    return absl::UnavailableError(absl::StrFormat(
        "RDMA QP %u: ibv_modify_qp to state %d: %s", qp_->qp_num, transition->attr.qp_state,
        Errno(rc)));
  }
  machine_.Applied();
  return absl::OkStatus();
}

absl::Status QueuePair::Connect(const Endpoint& remote) {
  if (absl::Status s = Apply(machine_.ToInit()); !s.ok()) return s;
  if (absl::Status s = Apply(machine_.ToReadyToReceive(remote)); !s.ok()) return s;
  return Apply(machine_.ToReadyToSend());
}

absl::StatusOr<size_t> QueuePair::PostWrites(absl::Span<const WriteRequest> requests,
                                             SendLedger* ledger) {
  if (machine_.state() != QpState::kReadyToSend) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "RDMA QP %u is %s; writes need RTS", qp_->qp_num, QpStateName(machine_.state())));
  }
  if (!ledger->status().ok()) return ledger->status();
  const size_t n = std::min<size_t>(requests.size(), std::max(0, ledger->room()));
  if (n == 0) return 0;
  std::vector<ibv_send_wr> wrs(n);
  for (size_t i = 0; i < n; ++i) {
    const WriteRequest& r = requests[i];
    ibv_send_wr& wr = wrs[i];
    wr.wr_id = r.wr_id;
    wr.next = i + 1 < n ? &wrs[i + 1] : nullptr;
    wr.sg_list = const_cast<ibv_sge*>(r.sges.data());
    wr.num_sge = static_cast<int>(r.sges.size());
    wr.opcode = r.with_imm ? IBV_WR_RDMA_WRITE_WITH_IMM : IBV_WR_RDMA_WRITE;
    wr.send_flags = r.signaled ? IBV_SEND_SIGNALED : 0;
    wr.imm_data = htobe32(r.imm);
    wr.wr.rdma.remote_addr = r.remote_addr;
    wr.wr.rdma.rkey = r.rkey;
  }
  // A chain of unsignalled requests ending mid-plan: the last one posted
  // here must be signalled, or completions could not free its room.
  wrs[n - 1].send_flags |= IBV_SEND_SIGNALED;
  ibv_send_wr* bad = nullptr;
  const int rc = ::ibv_post_send(qp_, wrs.data(), &bad);
  const size_t posted = rc == 0 ? n : static_cast<size_t>(bad - wrs.data());
  for (size_t i = 0; i < posted; ++i) {
    absl::Status s = ledger->Posted(wrs[i].wr_id, (wrs[i].send_flags & IBV_SEND_SIGNALED) != 0);
    if (!s.ok()) return s;
  }
  if (rc != 0) {
    // The requests before `bad` are posted and in the ledger; the QP is
    // unusable for the rest (a full queue is prevented by the ledger).
    return absl::UnavailableError(absl::StrFormat(
        "RDMA QP %u: ibv_post_send refused request %u of %u: %s", qp_->qp_num, posted + 1, n,
        Errno(rc)));
  }
  return posted;
}

absl::Status QueuePair::PostReceives(int count) {
  for (int i = 0; i < count; ++i) {
    ibv_recv_wr wr{};
    wr.wr_id = i;
    ibv_recv_wr* bad = nullptr;
    if (int rc = ::ibv_post_recv(qp_, &wr, &bad); rc != 0) {
      return absl::UnavailableError(
          absl::StrFormat("RDMA QP %u: ibv_post_recv: %s", qp_->qp_num, Errno(rc)));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<int> QueuePair::PollSend(SendLedger* ledger, int max) {
  ibv_wc wc[kMaxPoll];  // polled often: no allocation per poll
  const int n = ::ibv_poll_cq(send_cq_, std::clamp(max, 1, kMaxPoll), wc);
  if (n < 0) return absl::UnavailableError(absl::StrFormat("RDMA QP %u: ibv_poll_cq failed", qp_->qp_num));
  // Every completion polled is accounted for, even after an error in one.
  absl::Status first;
  for (int i = 0; i < n; ++i) {
    absl::Status s = ledger->Complete(wc[i].wr_id, wc[i].status, wc[i].vendor_err);
    if (first.ok()) first = s;
  }
  if (!first.ok()) return first;
  return n;
}

absl::StatusOr<int> QueuePair::PollReceive(
    const std::function<absl::Status(uint32_t imm, uint32_t bytes)>& landed, int max) {
  ibv_wc wc[kMaxPoll];
  const int n = ::ibv_poll_cq(recv_cq_, std::clamp(max, 1, kMaxPoll), wc);
  if (n < 0) return absl::UnavailableError(absl::StrFormat("RDMA QP %u: ibv_poll_cq failed", qp_->qp_num));
  // The first error is returned; the completions after it are consumed
  // (they cannot be polled again), and the connection is to be dropped.
  for (int i = 0; i < n; ++i) {
    if (wc[i].status != IBV_WC_SUCCESS) {
      return absl::UnavailableError(absl::StrFormat("RDMA receive failed: %s (vendor error 0x%x)",
                                                    ::ibv_wc_status_str(wc[i].status),
                                                    wc[i].vendor_err));
    }
    if (wc[i].opcode != IBV_WC_RECV_RDMA_WITH_IMM || (wc[i].wc_flags & IBV_WC_WITH_IMM) == 0) {
      return absl::DataLossError("RDMA receive: a completion that is not a write with immediate");
    }
    if (absl::Status s = landed(be32toh(wc[i].imm_data), wc[i].byte_len); !s.ok()) return s;
  }
  return n;
}

}  // namespace ecsnap::rdma
