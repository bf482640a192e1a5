// The peer plane's gRPC service (proto/peer.proto): thin handlers over
// ParityStore, StepStore and Protector. Sync handlers: folds and chunk reads
// run on gRPC's bounded thread pool, never in a reaction.
#ifndef ECSNAP_DAEMON_SERVICE_PEER_SERVICE_H_
#define ECSNAP_DAEMON_SERVICE_PEER_SERVICE_H_

#include <chrono>
#include <string>

#include "daemon/peer/parity_store.h"
#include "daemon/peer/protector.h"
#include "daemon/store/step_store.h"
#include "proto/peer.grpc.pb.h"

namespace ecsnap::daemon {

class PeerService final : public peer::Peer::Service {
 public:
  // `authenticated`: the peer plane is mutual TLS, and a message about a
  // group position is accepted only from that slot's certificate (reads
  // only from the group's); false: plaintext, loopback only.
  PeerService(StepStore* store, ParityStore* parity, Protector* protector, bool authenticated);

  grpc::Status PushChunk(grpc::ServerContext* context,
                         grpc::ServerReader<peer::PushChunkMessage>* reader,
                         peer::PushChunkResponse* response) override;
  grpc::Status NotifyStripeProtected(grpc::ServerContext*, const peer::StripeProtected* request,
                                     peer::StripeProtectedResponse*) override;
  grpc::Status NotifyJob(grpc::ServerContext*, const peer::JobNotice* request,
                         peer::JobNoticeResponse*) override;
  grpc::Status GetChunk(grpc::ServerContext* context, const peer::GetChunkRequest* request,
                        grpc::ServerWriter<peer::GetChunkMessage>* writer) override;
  grpc::Status Inventory(grpc::ServerContext*, const peer::InventoryRequest* request,
                         peer::InventoryResponse* response) override;
  grpc::Status Ping(grpc::ServerContext*, const peer::PingRequest*,
                    peer::PingResponse* response) override;

 private:
  // OK when the caller may speak for group position `position` (-1: for
  // any peer of the group); PERMISSION_DENIED otherwise.
  grpc::Status Admit(const grpc::ServerContext& context, int position) const;

  StepStore* const store_;
  ParityStore* const parity_;
  Protector* const protector_;
  const bool authenticated_;
  const std::chrono::steady_clock::time_point started_ = std::chrono::steady_clock::now();
};

}  // namespace ecsnap::daemon

#endif  // ECSNAP_DAEMON_SERVICE_PEER_SERVICE_H_
