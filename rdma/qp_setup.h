// Reliable-connected queue-pair set-up, without a device: the endpoint a
// side advertises over the gRPC control plane, its wire form, and the
// attribute sets that walk a QP through RESET -> INIT -> RTR -> RTS.
//
// Both sides of a connection exchange an Endpoint (their QP number, first
// packet sequence number, port, LID and GID); each then moves its own QP to
// INIT, to RTR with the other's endpoint, and to RTS. Everything here is
// computed from values, so that the rules (path MTU is the smaller of the two,
// a RoCE port needs a global route, PSNs are 24 bits, ...) are unit-tested on
// machines without an RDMA device; verbs.h applies the results with
// ibv_modify_qp.
//
// An Endpoint decoded from a peer is hostile input: Decode checks every
// field and never trusts a length.
#ifndef ECSNAP_RDMA_QP_SETUP_H_
#define ECSNAP_RDMA_QP_SETUP_H_

#include <infiniband/verbs.h>

#include <array>
#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace ecsnap::rdma {

// One side of an RC connection, as advertised to the other.
struct Endpoint {
  uint32_t qp_num = 0;       // 24 bits, non-zero
  uint32_t psn = 0;          // first packet sequence number, 24 bits
  uint16_t lid = 0;          // InfiniBand port LID; 0 on RoCE
  uint8_t port = 1;          // the HCA port the QP is bound to
  uint8_t gid_index = 0;     // index of `gid` in the port's GID table
  uint8_t mtu = IBV_MTU_1024;  // the port's active MTU (enum ibv_mtu, 1..5)
  bool global = false;       // route by GID (RoCE, or IB across subnets)
  std::array<uint8_t, 16> gid{};

  bool operator==(const Endpoint& o) const;
};

// The wire form (40 bytes, integers little-endian):
//   "ECRD" | version u8 (1) | flags u8 (bit 0: global) | mtu u8 | port u8 |
//   qp_num u32 | psn u32 | lid u16 | gid_index u8 | reserved u8 (0) |
//   gid[16] | reserved u32 (0)
std::string Encode(const Endpoint& endpoint);
// INVALID_ARGUMENT naming the field when `bytes` is not an endpoint this
// version can connect to.
absl::StatusOr<Endpoint> Decode(absl::string_view bytes);

// Tunables of a connection. Defaults are those of common RC deployments
// (perftest, NCCL): a 4.1 ms * 2^14 ~ 67 ms ACK timeout, 7 retries.
struct QpOptions {
  // IBV_QP_TIMEOUT exponent: 4.096 us * 2^timeout. Default: 14.
  uint8_t timeout = 14;
  // Transport retries before the QP errors out. Default: 7.
  uint8_t retry_count = 7;
  // Receiver-not-ready retries; 7 means infinite. Default: 7.
  uint8_t rnr_retry = 7;
  // Minimum RNR NAK timer code (12 = 0.64 ms). Default: 12.
  uint8_t min_rnr_timer = 12;
  // Service level and traffic class. Default: 0.
  uint8_t service_level = 0;
  uint8_t traffic_class = 0;
  // Hop limit for a global route. Default: 64.
  uint8_t hop_limit = 64;
  // Outstanding RDMA reads/atomics each way; writes need none. Default: 1.
  uint8_t max_rd_atomic = 1;
  // Rights granted to the remote side. Default: remote write (the sender
  // writes into the holder's registered buffers; nothing is read remotely).
  unsigned int access = IBV_ACCESS_REMOTE_WRITE;
};

// One ibv_modify_qp call: the attributes and the mask naming those set.
struct QpTransition {
  ibv_qp_attr attr{};
  int mask = 0;
};

// The states a connection goes through, in order; kError is terminal.
enum class QpState { kReset, kInit, kReadyToReceive, kReadyToSend, kError };
const char* QpStateName(QpState state);

// Walks one QP through the RC set-up, one legal step at a time. Not
// thread-safe (a connection is set up by one thread).
class QpStateMachine {
 public:
  QpStateMachine(Endpoint local, QpOptions options);

  QpState state() const { return state_; }
  const Endpoint& local() const { return local_; }

  // RESET -> INIT.
  absl::StatusOr<QpTransition> ToInit();
  // INIT -> RTR, toward `remote` (checked here: a QP number, PSN, MTU and
  // route it can reach). The path MTU is the smaller of the two ports'.
  absl::StatusOr<QpTransition> ToReadyToReceive(const Endpoint& remote);
  // RTR -> RTS.
  absl::StatusOr<QpTransition> ToReadyToSend();
  // Records that the transition last returned was applied; call after a
  // successful ibv_modify_qp (a failed one: Fail()).
  void Applied();
  // Any state -> kError (a failed modify, a completion in error).
  void Fail() { state_ = QpState::kError; pending_ = QpState::kError; }

 private:
  absl::Status Expect(QpState from, QpState to);

  const Endpoint local_;
  const QpOptions options_;
  QpState state_ = QpState::kReset;
  QpState pending_ = QpState::kReset;  // the state the last transition leads to
};

}  // namespace ecsnap::rdma

#endif  // ECSNAP_RDMA_QP_SETUP_H_
