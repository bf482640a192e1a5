// GrpcTransport: chunk bytes inside the gRPC peer streams (PushChunk,
// GetChunk), 1 MiB a message. With the peer plane's mutual TLS they are
// encrypted and authenticated like every control message; the price is
// several copies per byte (protobuf, HTTP/2 framing, TLS). Chosen by
// cluster.bulk_transport BULK_GRPC.
#ifndef ECSNAP_DAEMON_PEER_GRPC_TRANSPORT_H_
#define ECSNAP_DAEMON_PEER_GRPC_TRANSPORT_H_

#include <vector>

#include "daemon/peer/call_watchdog.h"
#include "daemon/peer/transport.h"
#include "proto/peer.grpc.pb.h"

namespace ecsnap::daemon {

// Payload bytes per PushChunk / GetChunk message.
inline constexpr uint64_t kPeerChunkBytes = 1 << 20;

class GrpcTransport final : public PeerTransport {
 public:
  // `stubs` by group position (null for this slot), `slots` the group's slot
  // numbers, for messages. Both outlive the transport, as does `watchdog`.
  GrpcTransport(std::vector<peer::Peer::Stub*> stubs, std::vector<uint32_t> slots,
                CallWatchdog* watchdog);

  const char* name() const override { return "grpc"; }
  absl::StatusOr<bool> Push(int holder, const peer::PushChunkHeader& header,
                            const ChunkBytes& bytes) override;
  absl::StatusOr<std::unique_ptr<ChunkReader>> OpenRead(
      int holder, const peer::GetChunkRequest& request) override;

 private:
  const std::vector<peer::Peer::Stub*> stubs_;
  const std::vector<uint32_t> slots_;
  CallWatchdog* const watchdog_;
};

// A failed transfer's status, named by what it was and for whom; a call the
// watchdog cut says so.
absl::Status TransferError(absl::Status st, bool stalled, absl::Duration stall,
                           const std::string& what);
// What a transfer is, for its errors: "push of job J step S chunk P to slot N",
// "read of job J step S stripe T position P from slot N".
std::string PushName(const peer::PushChunkHeader& header, uint32_t slot);
std::string ReadName(const peer::GetChunkRequest& request, uint32_t slot);

}  // namespace ecsnap::daemon

#endif  // ECSNAP_DAEMON_PEER_GRPC_TRANSPORT_H_
