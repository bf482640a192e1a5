// The standard gRPC health protocol (grpc.health.v1: Check and Watch) on
// every server of ecsnapd, from one readiness state (DESIGN.md §10).
//
// NOT_SERVING until the daemon is ready (arena pre-faulted, start-up rebuild
// done), SERVING then, NOT_SERVING for good from shutdown on. The service
// names a client may ask for are "" (the daemon) and those of its gRPC
// services; any other is NOT_FOUND, as the protocol says.
//
// One HealthState per daemon; one HealthService per server (a gRPC service
// object serves one server). Watch streams are bounded: past kMaxWatches at
// once a Watch is refused with RESOURCE_EXHAUSTED, so an unauthenticated
// probe port cannot hold every server thread.
#ifndef ECSNAP_DAEMON_SERVICE_HEALTH_SERVICE_H_
#define ECSNAP_DAEMON_SERVICE_HEALTH_SERVICE_H_

#include <grpcpp/grpcpp.h>

#include <cstdint>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "proto/health.grpc.pb.h"

namespace ecsnap::daemon {

class HealthState {
 public:
  static constexpr int kMaxWatches = 16;

  // Thread-safe. After Shutdown() the state stays NOT_SERVING.
  void SetServing(bool serving);
  void Shutdown();
  bool serving() const;

 private:
  friend class HealthService;
  mutable absl::Mutex mu_;
  bool serving_ ABSL_GUARDED_BY(mu_) = false;
  bool shut_down_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t version_ ABSL_GUARDED_BY(mu_) = 0;  // bumped on each change
  int watches_ ABSL_GUARDED_BY(mu_) = 0;
};

class HealthService final : public grpc::health::v1::Health::Service {
 public:
  explicit HealthService(HealthState* state) : state_(state) {}

  grpc::Status Check(grpc::ServerContext* context,
                     const grpc::health::v1::HealthCheckRequest* request,
                     grpc::health::v1::HealthCheckResponse* response) override;
  // Sends the status now and at every change, until the client cancels or
  // the daemon shuts down.
  grpc::Status Watch(grpc::ServerContext* context,
                     const grpc::health::v1::HealthCheckRequest* request,
                     grpc::ServerWriter<grpc::health::v1::HealthCheckResponse>* writer) override;

 private:
  HealthState* const state_;
};

}  // namespace ecsnap::daemon

#endif  // ECSNAP_DAEMON_SERVICE_HEALTH_SERVICE_H_
