#include "rdma/qp_setup.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_format.h"

namespace ecsnap::rdma {
namespace {

constexpr char kMagic[4] = {'E', 'C', 'R', 'D'};
constexpr uint8_t kVersion = 1;
constexpr size_t kWireBytes = 40;
constexpr uint32_t kMax24 = (1u << 24) - 1;

void Put16(uint8_t* p, uint16_t v) {
  p[0] = static_cast<uint8_t>(v);
  p[1] = static_cast<uint8_t>(v >> 8);
}
void Put32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
uint16_t Get16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | p[1] << 8); }
uint32_t Get32(const uint8_t* p) {
  return uint32_t{p[0]} | uint32_t{p[1]} << 8 | uint32_t{p[2]} << 16 | uint32_t{p[3]} << 24;
}

bool ZeroGid(const std::array<uint8_t, 16>& gid) {
  return std::all_of(gid.begin(), gid.end(), [](uint8_t b) { return b == 0; });
}

// What a peer's endpoint must satisfy for a QP here to connect to it.
absl::Status CheckRemote(const Endpoint& e) {
  if (e.qp_num == 0 || e.qp_num > kMax24) {
    return absl::InvalidArgumentError(
        absl::StrFormat("RDMA endpoint: QP number %u is not a 24-bit non-zero number", e.qp_num));
  }
  if (e.psn > kMax24) {
    return absl::InvalidArgumentError(
        absl::StrFormat("RDMA endpoint: packet sequence number %u exceeds 24 bits", e.psn));
  }
  if (e.mtu < IBV_MTU_256 || e.mtu > IBV_MTU_4096) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "RDMA endpoint: MTU code %d is not one of 1 (256 bytes) .. 5 (4096 bytes)", e.mtu));
  }
  if (e.port == 0) {
    return absl::InvalidArgumentError("RDMA endpoint: port 0 does not exist (ports count from 1)");
  }
  if (e.global ? ZeroGid(e.gid) : e.lid == 0) {
    return absl::InvalidArgumentError(
        e.global ? "RDMA endpoint: routed by GID but its GID is all zeros"
                 : "RDMA endpoint: routed by LID but its LID is 0 (a RoCE port must route by GID)");
  }
  return absl::OkStatus();
}

}  // namespace

bool Endpoint::operator==(const Endpoint& o) const {
  return qp_num == o.qp_num && psn == o.psn && lid == o.lid && port == o.port &&
         gid_index == o.gid_index && mtu == o.mtu && global == o.global && gid == o.gid;
}

std::string Encode(const Endpoint& e) {
  std::string out(kWireBytes, '\0');
  auto* p = reinterpret_cast<uint8_t*>(out.data());
  std::memcpy(p, kMagic, sizeof(kMagic));
  p[4] = kVersion;
  p[5] = e.global ? 1 : 0;
  p[6] = e.mtu;
  p[7] = e.port;
  Put32(p + 8, e.qp_num);
  Put32(p + 12, e.psn);
  Put16(p + 16, e.lid);
  p[18] = e.gid_index;
  std::memcpy(p + 20, e.gid.data(), e.gid.size());
  return out;
}

absl::StatusOr<Endpoint> Decode(absl::string_view bytes) {
  if (bytes.size() != kWireBytes) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "RDMA endpoint: %d bytes, an endpoint has %d", bytes.size(), kWireBytes));
  }
  const auto* p = reinterpret_cast<const uint8_t*>(bytes.data());
  if (std::memcmp(p, kMagic, sizeof(kMagic)) != 0) {
    return absl::InvalidArgumentError("RDMA endpoint: not an ecsnap endpoint (bad magic)");
  }
  if (p[4] != kVersion) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "RDMA endpoint: version %d; this daemon speaks version %d", p[4], kVersion));
  }
  if ((p[5] & ~1u) != 0 || p[19] != 0 || Get32(p + 36) != 0) {
    return absl::InvalidArgumentError("RDMA endpoint: reserved bits are set");
  }
  Endpoint e;
  e.global = (p[5] & 1) != 0;
  e.mtu = p[6];
  e.port = p[7];
  e.qp_num = Get32(p + 8);
  e.psn = Get32(p + 12);
  e.lid = Get16(p + 16);
  e.gid_index = p[18];
  std::memcpy(e.gid.data(), p + 20, e.gid.size());
  if (absl::Status s = CheckRemote(e); !s.ok()) return s;
  return e;
}

const char* QpStateName(QpState state) {
  switch (state) {
    case QpState::kReset: return "RESET";
    case QpState::kInit: return "INIT";
    case QpState::kReadyToReceive: return "RTR";
    case QpState::kReadyToSend: return "RTS";
    case QpState::kError: return "ERROR";
  }
  return "?";
}

QpStateMachine::QpStateMachine(Endpoint local, QpOptions options)
    : local_(local), options_(options) {}

absl::Status QpStateMachine::Expect(QpState from, QpState to) {
  if (state_ != from || pending_ != from) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "RDMA QP %u: cannot move to %s from %s%s", local_.qp_num, QpStateName(to),
        QpStateName(state_), pending_ != state_ ? " (a transition is not applied yet)" : ""));
  }
  pending_ = to;
  return absl::OkStatus();
}

void QpStateMachine::Applied() {
  if (state_ != QpState::kError) state_ = pending_;
}

absl::StatusOr<QpTransition> QpStateMachine::ToInit() {
  if (absl::Status s = Expect(QpState::kReset, QpState::kInit); !s.ok()) return s;
  QpTransition t;
  t.attr.qp_state = IBV_QPS_INIT;
  t.attr.pkey_index = 0;
  t.attr.port_num = local_.port;
  t.attr.qp_access_flags = options_.access;
  t.mask = IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS;
  return t;
}

absl::StatusOr<QpTransition> QpStateMachine::ToReadyToReceive(const Endpoint& remote) {
  if (state_ != QpState::kInit || pending_ != QpState::kInit) {
    return Expect(QpState::kInit, QpState::kReadyToReceive);  // the error
  }
  if (absl::Status s = CheckRemote(remote); !s.ok()) return s;
  if (remote.global != local_.global) {
    return absl::InvalidArgumentError(
        "RDMA endpoint: one side routes by GID (RoCE) and the other by LID (InfiniBand); "
        "the two ports are on different link layers and cannot connect");
  }
  pending_ = QpState::kReadyToReceive;
  QpTransition t;
  t.attr.qp_state = IBV_QPS_RTR;
  t.attr.path_mtu = static_cast<ibv_mtu>(std::min(local_.mtu, remote.mtu));
  t.attr.dest_qp_num = remote.qp_num;
  t.attr.rq_psn = remote.psn;
  t.attr.max_dest_rd_atomic = options_.max_rd_atomic;
  t.attr.min_rnr_timer = options_.min_rnr_timer;
  t.attr.ah_attr.dlid = remote.lid;
  t.attr.ah_attr.sl = options_.service_level;
  t.attr.ah_attr.port_num = local_.port;
  if (remote.global) {
    t.attr.ah_attr.is_global = 1;
    std::memcpy(t.attr.ah_attr.grh.dgid.raw, remote.gid.data(), remote.gid.size());
    t.attr.ah_attr.grh.sgid_index = local_.gid_index;
    t.attr.ah_attr.grh.hop_limit = options_.hop_limit;
    t.attr.ah_attr.grh.traffic_class = options_.traffic_class;
  }
  t.mask = IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN |
           IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER;
  return t;
}

absl::StatusOr<QpTransition> QpStateMachine::ToReadyToSend() {
  if (absl::Status s = Expect(QpState::kReadyToReceive, QpState::kReadyToSend); !s.ok()) {
    return s;
  }
  QpTransition t;
  t.attr.qp_state = IBV_QPS_RTS;
  t.attr.sq_psn = local_.psn;
  t.attr.timeout = options_.timeout;
  t.attr.retry_cnt = options_.retry_count;
  t.attr.rnr_retry = options_.rnr_retry;
  t.attr.max_rd_atomic = options_.max_rd_atomic;
  t.mask = IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY |
           IBV_QP_SQ_PSN | IBV_QP_MAX_QP_RD_ATOMIC;
  return t;
}

}  // namespace ecsnap::rdma
