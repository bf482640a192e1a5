// The peer plane's gRPC service (proto/peer.proto): thin handlers over
// ParityStore, StepStore and Protector. Sync handlers: folds and chunk reads
// run on gRPC's bounded thread pool, never in a reaction.
#ifndef ECSNAP_DAEMON_SERVICE_PEER_SERVICE_H_
#define ECSNAP_DAEMON_SERVICE_PEER_SERVICE_H_

#include <chrono>
#include <string>

#include "daemon/peer/chunk_intake.h"
#include "daemon/peer/parity_store.h"
#include "daemon/peer/protector.h"
#include "daemon/peer/rdma_transport.h"
#include "daemon/peer/tcp_transport.h"
#include "daemon/store/step_store.h"
#include "proto/peer.grpc.pb.h"

namespace ecsnap::daemon {

class PeerService final : public peer::Peer::Service {
 public:
  // `authenticated`: the peer plane is mutual TLS, and a message about a
  // group position is accepted only from that slot's certificate (reads
  // only from the group's); false: plaintext, loopback only.
  // `bulk` may be null: chunk bytes then travel only inside the gRPC streams
  // (cluster.bulk_transport BULK_GRPC), and OpenPush/OpenRead are refused.
  PeerService(StepStore* store, ParityStore* parity, Protector* protector, ChunkIntake* intake,
              BulkServer* bulk, bool authenticated);

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
  // The TCP bulk transport's control half: the same checks as PushChunk and
  // GetChunk, then a ticket for one bulk connection.
  grpc::Status OpenPush(grpc::ServerContext* context, const peer::PushChunkHeader* request,
                        peer::BulkTicket* response) override;
  grpc::Status OpenRead(grpc::ServerContext* context, const peer::GetChunkRequest* request,
                        peer::BulkTicket* response) override;
  // The RDMA bulk transport's control half (daemon/peer/rdma_transport.h):
  // a ticket from OpenPush/OpenRead presented, then its bytes over RDMA.
  // UNIMPLEMENTED without a device (UseRdma not called).
  grpc::Status RdmaTransfer(
      grpc::ServerContext* context,
      grpc::ServerReaderWriter<peer::RdmaMessage, peer::RdmaMessage>* stream) override;

  // Serves RdmaTransfer through `fabric` (BULK_RDMA on a host with a
  // device); set before the service is started. It outlives the service.
  void UseRdma(RdmaFabric* fabric) { rdma_ = fabric; }

 private:
  // OK when the caller may speak for group position `position` (-1: for
  // any peer of the group); PERMISSION_DENIED otherwise.
  grpc::Status Admit(const grpc::ServerContext& context, int position) const;
  // Every check of a push header, before anything is recorded or reserved.
  grpc::Status CheckPush(const grpc::ServerContext& context, const peer::PushChunkHeader& h) const;
  // The checks of a chunk read (after Admit), then the chunk's bytes pinned.
  absl::StatusOr<PinnedChunk> PinChunk(const peer::ChunkId& id) const;

  StepStore* const store_;
  ParityStore* const parity_;
  Protector* const protector_;
  ChunkIntake* const intake_;
  BulkServer* const bulk_;
  RdmaFabric* rdma_ = nullptr;
  const bool authenticated_;
  const std::chrono::steady_clock::time_point started_ = std::chrono::steady_clock::now();
};

}  // namespace ecsnap::daemon

#endif  // ECSNAP_DAEMON_SERVICE_PEER_SERVICE_H_
