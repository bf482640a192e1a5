// Daemon: builds every component of ecsnapd from its config and connects
// them, in one place. main() parses flags, calls Start, waits for a signal
// and calls Shutdown.
#ifndef ECSNAP_DAEMON_DAEMON_H_
#define ECSNAP_DAEMON_DAEMON_H_

#include <atomic>
#include <functional>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

#include <grpcpp/server.h>

#include "absl/status/statusor.h"
#include "common/executor.h"
#include "daemon/service/admin_service.h"
#include "daemon/service/health_service.h"
#include "daemon/service/metrics_http.h"
#include "daemon/store/arena.h"
#include "daemon/peer/call_watchdog.h"
#include "daemon/peer/group.h"
#include "daemon/peer/parity_store.h"
#include "daemon/service/peer_service.h"
#include "daemon/peer/protector.h"
#include "daemon/peer/rebuilder.h"
#include "daemon/service/snapshot_service.h"
#include "daemon/service/tls.h"
#include "daemon/service/trainer_listener.h"
#include "daemon/store/window_grants.h"
#include "daemon/store/step_store.h"
#include "proto/config.pb.h"

namespace ecsnap::daemon {

class Daemon {
 public:
  // Opens (or re-adopts) the arena, then serves the data plane on the Unix
  // socket (and TCP address, if any) and the admin plane. `config` must have
  // passed ValidateConfig for `slot`.
  //
  // Every server answers the standard grpc.health.v1 service: NOT_SERVING
  // until the daemon is ready (the arena pre-faulted, which Start does
  // first, and the start-up rebuild done), SERVING then, NOT_SERVING from
  // Shutdown on. `on_ready` is called once at that moment, from any thread.
  static absl::StatusOr<std::unique_ptr<Daemon>> Start(const config::Config& config,
                                                       uint32_t slot,
                                                       std::function<void()> on_ready = {});
  ~Daemon();

  // Stops accepting calls and ends those in progress within a short grace
  // (about 2 s whatever the peers do). Returns false when a call to a peer
  // did not end: the caller must then exit the process without destroying
  // the daemon (committed steps are safe in the arena file either way).
  bool Shutdown();

  // True when the daemon's store answers (its lock can be taken): what the
  // systemd watchdog pings on.
  bool Alive() const;

  // One line for systemd's STATUS= and logs: slot, arena use, sessions.
  std::string Summary() const;

  // /metrics: the daemon's state as gauges, then every counter and histogram.
  std::string RenderMetrics() const;

 private:
  Daemon();

  absl::Status StartPeerPlane(uint32_t slot);
  // A grpc.health.v1 service for one more server, answering from health_.
  HealthService* NewHealthService(int max_watches = 16);
  void BecomeReady();
  // The planes' certificate, key and CA; null without tls (plaintext).
  const TlsMaterial* tls() const { return tls_ ? &*tls_ : nullptr; }

  config::Config config_;
  uint32_t slot_ = 0;
  // Called by BecomeReady, possibly on the rebuild thread: declared before
  // it, so that it outlives the thread.
  std::function<void()> on_ready_;
  // Readiness, and the health service of each server (declared before the
  // servers, so that they outlive them).
  HealthState health_;
  std::vector<std::unique_ptr<HealthService>> health_services_;
  std::optional<TlsMaterial> tls_;  // the planes' certificate, key and CA
  std::unique_ptr<Arena> arena_;
  std::unique_ptr<StepStore> store_;
  // The peer plane, with m > 0 only.
  std::unique_ptr<ec::Codec> codec_;
  std::unique_ptr<ParityStore> parity_;
  // The RDMA device and staging (BULK_RDMA on a host with a device);
  // outlives the protector and the peer service, which move bytes through it.
  std::unique_ptr<RdmaFabric> rdma_fabric_;
  std::unique_ptr<Protector> protector_;
  // Runs the rebuild's survivor fetches (k per slice): a fixed set of threads
  // instead of one started per fetch. Outlives the rebuilder.
  std::unique_ptr<Executor> fetch_executor_;
  std::unique_ptr<Rebuilder> rebuilder_;
  std::unique_ptr<ChunkIntake> chunk_intake_;
  std::unique_ptr<BulkServer> bulk_server_;  // null with cluster.bulk_transport BULK_GRPC
  std::unique_ptr<PeerService> peer_service_;
  std::unique_ptr<grpc::Server> peer_server_;
  std::thread rebuild_thread_;
  std::atomic<bool> rebuild_done_{false};
  // Cuts a trainer connection whose restore stream stalls (outlives the
  // snapshot service, which it watches; ~Daemon ends every call first).
  std::unique_ptr<CallWatchdog> trainer_stall_dog_;
  std::unique_ptr<SnapshotService> snapshot_service_;
  std::unique_ptr<AdminService> admin_service_;
  std::unique_ptr<grpc::Server> data_server_;
  std::unique_ptr<grpc::Server> admin_server_;
  std::unique_ptr<grpc::Server> health_server_;  // daemon.health_address, if set
  std::unique_ptr<MetricsHttpServer> metrics_server_;  // daemon.metrics_address, if set
  // Feeds data_server_: declared after it, so destroyed (stopped) first.
  std::unique_ptr<WindowGrants> window_grants_;
  std::unique_ptr<TrainerListener> trainer_listener_;
};

}  // namespace ecsnap::daemon

#endif  // ECSNAP_DAEMON_DAEMON_H_
