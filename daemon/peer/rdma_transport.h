// The RDMA bulk transport (cluster.bulk_transport BULK_RDMA; DESIGN.md §4):
// chunk bytes as RC writes into registered staging slots that the receiving
// side lends, built from rdma/ (verbs RAII, the queue-pair state machine,
// write plans, the send ledger and slot credits).
//
// A transfer is opened exactly as for TCP (Peer.OpenPush / Peer.OpenRead on
// the authenticated control channel answer a one-time token), and the token
// is then presented on a Peer.RdmaTransfer stream, which carries the set-up
// (queue-pair endpoints, the lent slots), the credits and the outcome (see
// proto/peer.proto). Each transfer has its own queue pair and its own
// staging, leased from a pool registered once at start (a staging's region,
// and so its rkey, is the same for every transfer that leases it). A queue
// pair lives as long as its transfer, so no write of an ended transfer can
// land in a later one's memory; a peer that remembered another staging's
// rkey could still write it through a queue pair of a transfer of its own
// (the group's daemons are trusted, on a trusted fabric, as with BULK_TCP).
// Memory windows bound to each transfer's queue pair would close that.
//
//   sender (a push's caller, a read's holder)      receiver
//   the next bytes are copied into the local      a receive is posted per slot
//   slot with the same number (registered
//   bounce memory), then written to the
//   receiver's slot, the last write carrying      the receive completes with
//   the slot's sequence number                    imm = seq (ReceiveOrder)
//                                                 the slot's bytes are folded
//                                                 (a push) or read out (a
//                                                 read); the slot is handed
//   SlotRing::Release(next)  <------- credit ---  back on the stream
//
// Every slot but a transfer's last is full, so the receiver knows each
// slot's length from the transfer's length, which the ticket fixed.
//
// A daemon without an active device answers RdmaTransfer with UNIMPLEMENTED
// (as one that predates it does) before taking the ticket, and one whose
// staging is all in use RESOURCE_EXHAUSTED; the caller then presents the
// same token to the TCP bulk port, and sends a holder without a device
// everything over TCP for a while (TcpTransport). No later error of a
// transfer has either code.
//
// What has run on an RDMA device: nothing yet (see rdma/README.md). The
// device-free parts (the checks of what a peer lends, the slot arithmetic,
// the fallback to TCP) are tested here; the loopback tests skip without a
// device.
#ifndef ECSNAP_DAEMON_PEER_RDMA_TRANSPORT_H_
#define ECSNAP_DAEMON_PEER_RDMA_TRANSPORT_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "daemon/peer/call_watchdog.h"
#include "daemon/peer/transport.h"
#include "proto/peer.grpc.pb.h"
#include "rdma/verbs.h"

namespace ecsnap::daemon {

class BulkServer;

struct RdmaFabricOptions {
  rdma::DeviceOptions device;
  // Staging per transfer: `slots` slots of `slot_bytes` (the receiving side's
  // lent slots; the sending side's bounce memory). Default: 4 x 1 MiB.
  uint32_t slot_bytes = 1u << 20;
  uint32_t slots = 4;
  // Transfers at once, each side counted (the pool is registered at start:
  // transfers x slots x slot_bytes of pinned memory). Past it a transfer is
  // refused RESOURCE_EXHAUSTED and retried. Default: 32.
  uint32_t transfers = 32;
  rdma::QpOptions qp;
  rdma::WriteLimits limits;
};

// The limits within which a peer's lent slots are accepted.
inline constexpr uint32_t kMinRdmaSlotBytes = 4096;
inline constexpr uint32_t kMaxRdmaSlotBytes = 64u << 20;
inline constexpr uint32_t kMaxRdmaSlots = 256;

// Checks the slots a peer lends (hostile input): a count and size within the
// limits above, and an address range that does not wrap. INVALID_ARGUMENT
// naming the field.
absl::Status CheckLentSlots(const peer::RdmaSlots& slots);

// Slot `seq`'s share of a transfer of `length` bytes in slots of
// `slot_bytes`: every slot but the last is full. 0 past the end.
uint64_t SlotShare(uint64_t length, uint32_t slot_bytes, uint64_t index);

// The device, its protection domain and the staging pool.
class RdmaFabric {
 public:
  // NOT_FOUND (with the reason) on a host without an active RDMA device;
  // UNAVAILABLE when the pool cannot be registered (RLIMIT_MEMLOCK).
  static absl::StatusOr<std::unique_ptr<RdmaFabric>> Open(RdmaFabricOptions options);
  ~RdmaFabric();
  RdmaFabric(const RdmaFabric&) = delete;
  RdmaFabric& operator=(const RdmaFabric&) = delete;

  const RdmaFabricOptions& options() const { return options_; }
  const std::string& device_name() const { return device_->name(); }

  // One transfer's staging (options().slots x slot_bytes, its own memory
  // region), back to the pool when destroyed.
  class Staging {
   public:
    ~Staging();
    rdma::MemoryRegion& region() const { return *region_; }
    uint8_t* slot(uint32_t i) const { return region_->data() + uint64_t{i} * slot_bytes_; }

   private:
    friend class RdmaFabric;
    Staging(RdmaFabric* fabric, size_t index, rdma::MemoryRegion* region, uint32_t slot_bytes)
        : fabric_(fabric), index_(index), region_(region), slot_bytes_(slot_bytes) {}
    RdmaFabric* const fabric_;
    const size_t index_;
    rdma::MemoryRegion* const region_;
    const uint32_t slot_bytes_;
  };
  // RESOURCE_EXHAUSTED while every staging is leased.
  absl::StatusOr<std::unique_ptr<Staging>> Lease();
  // A queue pair for one transfer, in RESET.
  absl::StatusOr<std::unique_ptr<rdma::QueuePair>> NewQueuePair();

 private:
  RdmaFabric(RdmaFabricOptions options, std::unique_ptr<rdma::Device> device,
             std::unique_ptr<rdma::ProtectionDomain> pd, uint8_t* pool, size_t pool_bytes);
  void Return(size_t index);

  const RdmaFabricOptions options_;
  std::unique_ptr<rdma::Device> device_;
  std::unique_ptr<rdma::ProtectionDomain> pd_;
  uint8_t* const pool_;
  const size_t pool_bytes_;
  std::vector<std::unique_ptr<rdma::MemoryRegion>> regions_;  // one per staging
  absl::Mutex mu_;
  std::vector<size_t> free_ ABSL_GUARDED_BY(mu_);
};

// The holder's half: serves one RdmaTransfer stream (the PeerService handler
// calls it after admitting the caller). `fabric` null: UNIMPLEMENTED,
// before the ticket is touched.
grpc::Status ServeRdmaTransfer(RdmaFabric* fabric, BulkServer* bulk, CallWatchdog* watchdog,
                               grpc::ServerContext* context,
                               grpc::ServerReaderWriter<peer::RdmaMessage, peer::RdmaMessage>* stream);

// What the caller does next when an RDMA transfer did not get as far as the
// holder taking its ticket (the ticket is then untouched).
enum class RdmaFallback {
  kNone,          // the ticket was taken, or the transfer broke: retry it
  kThisTransfer,  // no staging free (on either side): this one over TCP
  kThisHolder,    // the holder takes no RDMA: TCP to it
};

// How an RDMA transfer ended, for the caller's choice of RDMA or TCP next.
struct RdmaEnd {
  RdmaFallback fallback = RdmaFallback::kNone;
  // The data path failed after the set-up (not the holder refusing).
  bool broke = false;
};

// Trailing metadata of a holder's refusal made before it took the ticket
// (no staging free): the caller may present that ticket to TCP.
inline constexpr char kTicketUntouchedKey[] = "ecsnap-ticket-untouched";

// The caller's half, used by TcpTransport for holders that take RDMA.
// Errors of the transfer itself are UNAVAILABLE (DEADLINE_EXCEEDED when it
// stalled); only the holder's outcome of a push carries its own code.
class RdmaCarrier {
 public:
  // `fabric` and `watchdog` outlive the carrier.
  RdmaCarrier(RdmaFabric* fabric, CallWatchdog* watchdog) : fabric_(fabric), watchdog_(watchdog) {}

  // Moves a push's bytes under `ticket` (from OpenPush), as
  // PeerTransport::Push; `end` says how it ended (on an error, whether the
  // ticket is untouched and where to send it).
  absl::StatusOr<bool> Push(peer::Peer::Stub* stub, const peer::BulkTicket& ticket,
                            uint64_t length, const ChunkBytes& bytes, const std::string& what,
                            RdmaEnd* end);
  // Opens a read of `length` bytes under `ticket` (from OpenRead), as
  // PeerTransport::OpenRead; `end` as for Push, for the opening. The reader
  // calls `ended` once, with how the read itself ended (all read, or broken),
  // if it gets that far.
  absl::StatusOr<std::unique_ptr<ChunkReader>> OpenRead(
      peer::Peer::Stub* stub, const peer::BulkTicket& ticket, uint64_t length,
      const std::string& what, RdmaEnd* end, std::function<void(const RdmaEnd&)> ended);

 private:
  struct Leased {
    std::unique_ptr<RdmaFabric::Staging> staging;
    std::unique_ptr<rdma::QueuePair> qp;
  };
  // A transfer's staging and queue pair; kThisTransfer when none is free.
  absl::StatusOr<Leased> Lease(RdmaEnd* end);

  RdmaFabric* const fabric_;
  CallWatchdog* const watchdog_;
};

}  // namespace ecsnap::daemon

#endif  // ECSNAP_DAEMON_PEER_RDMA_TRANSPORT_H_
