#include "daemon/service/health_service.h"

#include <algorithm>
#include <string>

#include "absl/strings/str_format.h"
#include "absl/time/time.h"

namespace ecsnap::daemon {
namespace {

using grpc::health::v1::HealthCheckResponse;

HealthCheckResponse::ServingStatus StatusOf(bool serving) {
  return serving ? HealthCheckResponse::SERVING : HealthCheckResponse::NOT_SERVING;
}

}  // namespace

bool HealthState::Knows(const std::string& service) const {
  return service.empty() || service == kLivenessService ||
         service == grpc::health::v1::Health::service_full_name() ||
         std::find(services_.begin(), services_.end(), service) != services_.end();
}

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

bool HealthState::shut_down() const {
  absl::MutexLock lock(&mu_);
  return shut_down_;
}

grpc::Status HealthService::Check(grpc::ServerContext*,
                                  const grpc::health::v1::HealthCheckRequest* request,
                                  grpc::health::v1::HealthCheckResponse* response) {
  if (!state_->Knows(request->service())) {
    return grpc::Status(grpc::StatusCode::NOT_FOUND,
                        absl::StrFormat("ecsnapd serves no service named '%s'", request->service()));
  }
  response->set_status(StatusOf(request->service() == kLivenessService ? !state_->shut_down()
                                                                         : state_->serving()));
  return grpc::Status::OK;
}

grpc::Status HealthService::Watch(
    grpc::ServerContext* context, const grpc::health::v1::HealthCheckRequest* request,
    grpc::ServerWriter<grpc::health::v1::HealthCheckResponse>* writer) {
  {
    absl::MutexLock lock(&mu_);
    if (watches_ >= max_watches_) {
      return grpc::Status(
          grpc::StatusCode::RESOURCE_EXHAUSTED,
          absl::StrFormat("%d health watches are open on this port already; use Check", watches_));
    }
    ++watches_;
  }
  const bool known = state_->Knows(request->service());
  const bool liveness = request->service() == kLivenessService;
  const absl::Time end = absl::Now() + max_watch_life_;
  HealthState& s = *state_;
  uint64_t sent = ~uint64_t{0};
  while (!context->IsCancelled() && absl::Now() < end) {
    bool serving = false, shut_down = false, changed = false;
    {
      absl::MutexLock lock(&s.mu_);
      // Woken by a change; otherwise looks at the client once a second.
      auto differs = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu_) { return s.version_ != sent; };
      s.mu_.AwaitWithTimeout(absl::Condition(&differs), absl::Seconds(1));
      changed = s.version_ != sent;
      sent = s.version_;
      serving = liveness ? !s.shut_down_ : s.serving_;
      shut_down = s.shut_down_;
    }
    if (!changed) continue;
    HealthCheckResponse r;
    r.set_status(known ? StatusOf(serving) : HealthCheckResponse::SERVICE_UNKNOWN);
    if (!writer->Write(r) || shut_down) break;
  }
  absl::MutexLock lock(&mu_);
  --watches_;
  return grpc::Status::OK;
}

}  // namespace ecsnap::daemon
