// The standard gRPC health protocol (grpc.health.v1: Check and Watch) on
// every server of ecsnapd, from one readiness state (DESIGN.md §10).
//
// Readiness ("" and the names of the daemon's gRPC services): NOT_SERVING
// until the daemon is ready (arena pre-faulted, start-up rebuild done),
// SERVING then, NOT_SERVING for good from shutdown on. Liveness
// ("ecsnap.live"): SERVING while the process serves at all, until shutdown,
// for liveness and startup probes that must not kill a daemon during a long
// rebuild. Any other name is NOT_FOUND, as the protocol says.
//
// One HealthState per daemon; one HealthService per server (a gRPC service
// object serves one server), each with its own budget of Watch streams:
// past it a Watch is refused with RESOURCE_EXHAUSTED, and every Watch ends
// after kMaxWatchLife (clients open a new one), so that an unauthenticated
// probe port cannot hold threads, or the other servers' watches, for good.
#ifndef ECSNAP_DAEMON_SERVICE_HEALTH_SERVICE_H_
#define ECSNAP_DAEMON_SERVICE_HEALTH_SERVICE_H_

#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "proto/health.grpc.pb.h"

namespace ecsnap::daemon {

inline constexpr char kLivenessService[] = "ecsnap.live";

class HealthState {
 public:
  // `services`: the gRPC services whose readiness this state answers for
  // (besides "", kLivenessService and the health service itself), as the
  // daemon's wiring registers them.
  explicit HealthState(std::vector<std::string> services) : services_(std::move(services)) {}

  // True for a name a Check or Watch may ask about.
  bool Knows(const std::string& service) const;

  // Thread-safe. After Shutdown() the state stays NOT_SERVING.
  void SetServing(bool serving);
  void Shutdown();
  bool serving() const;
  bool shut_down() const;

 private:
  friend class HealthService;
  const std::vector<std::string> services_;
  mutable absl::Mutex mu_;
  bool serving_ ABSL_GUARDED_BY(mu_) = false;
  bool shut_down_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t version_ ABSL_GUARDED_BY(mu_) = 0;  // bumped on each change
};

class HealthService final : public grpc::health::v1::Health::Service {
 public:
  // Default: 16 watches, each at most 10 minutes.
  HealthService(HealthState* state, int max_watches = 16,
                absl::Duration max_watch_life = absl::Minutes(10))
      : state_(state), max_watches_(max_watches), max_watch_life_(max_watch_life) {}

  grpc::Status Check(grpc::ServerContext* context,
                     const grpc::health::v1::HealthCheckRequest* request,
                     grpc::health::v1::HealthCheckResponse* response) override;
  // Sends the status now and at every change, until the client cancels, the
  // daemon shuts down, or the watch's life is up.
  grpc::Status Watch(grpc::ServerContext* context,
                     const grpc::health::v1::HealthCheckRequest* request,
                     grpc::ServerWriter<grpc::health::v1::HealthCheckResponse>* writer) override;

 private:
  HealthState* const state_;
  const int max_watches_;
  const absl::Duration max_watch_life_;
  absl::Mutex mu_;
  int watches_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace ecsnap::daemon

#endif  // ECSNAP_DAEMON_SERVICE_HEALTH_SERVICE_H_
