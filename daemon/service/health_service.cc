#include "daemon/service/health_service.h"

#include <string>

#include "absl/strings/str_format.h"
#include "absl/time/time.h"

namespace ecsnap::daemon {
namespace {

using grpc::health::v1::HealthCheckResponse;

bool Known(const std::string& service) {
  return service.empty() || service == "ecsnap.v1.Snapshot" || service == "ecsnap.admin.Admin" ||
         service == "ecsnap.peer.Peer" || service == "grpc.health.v1.Health";
}

HealthCheckResponse::ServingStatus StatusOf(bool serving) {
  return serving ? HealthCheckResponse::SERVING : HealthCheckResponse::NOT_SERVING;
}

}  // namespace

void HealthState::SetServing(bool serving) {
  absl::MutexLock lock(&mu_);
  if (shut_down_ || serving_ == serving) return;
  serving_ = serving;
  ++version_;
}

void HealthState::Shutdown() {
  absl::MutexLock lock(&mu_);
  shut_down_ = true;
  serving_ = false;
  ++version_;
}

bool HealthState::serving() const {
  absl::MutexLock lock(&mu_);
  return serving_;
}

grpc::Status HealthService::Check(grpc::ServerContext*,
                                  const grpc::health::v1::HealthCheckRequest* request,
                                  grpc::health::v1::HealthCheckResponse* response) {
  if (!Known(request->service())) {
    return grpc::Status(grpc::StatusCode::NOT_FOUND,
                        absl::StrFormat("ecsnapd serves no service named '%s'", request->service()));
  }
  response->set_status(StatusOf(state_->serving()));
  return grpc::Status::OK;
}

grpc::Status HealthService::Watch(
    grpc::ServerContext* context, const grpc::health::v1::HealthCheckRequest* request,
    grpc::ServerWriter<grpc::health::v1::HealthCheckResponse>* writer) {
  HealthState& s = *state_;
  {
    absl::MutexLock lock(&s.mu_);
    if (s.watches_ >= HealthState::kMaxWatches) {
      return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                          absl::StrFormat("%d health watches are open already; use Check",
                                          HealthState::kMaxWatches));
    }
    ++s.watches_;
  }
  const bool known = Known(request->service());
  uint64_t sent = ~uint64_t{0};
  while (true) {
    bool serving = false, shut_down = false;
    {
      absl::MutexLock lock(&s.mu_);
      // Woken by a change; otherwise looks at the client once a second.
      auto changed = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu_) { return s.version_ != sent; };
      s.mu_.AwaitWithTimeout(absl::Condition(&changed), absl::Seconds(1));
      if (s.version_ != sent) {
        sent = s.version_;
        serving = s.serving_;
        shut_down = s.shut_down_;
      } else {
        shut_down = s.shut_down_;
        if (!shut_down && !context->IsCancelled()) continue;
      }
    }
    if (context->IsCancelled()) break;
    HealthCheckResponse r;
    r.set_status(known ? StatusOf(serving) : HealthCheckResponse::SERVICE_UNKNOWN);
    if (!writer->Write(r) || shut_down) break;
  }
  absl::MutexLock lock(&s.mu_);
  --s.watches_;
  return grpc::Status::OK;
}

}  // namespace ecsnap::daemon
