// The admin plane (proto/admin.proto) over StepStore, for ecsnapctl. Callers
// are authenticated before any handler runs (daemon/admin_auth.h).
#ifndef ECSNAP_DAEMON_SERVICE_ADMIN_SERVICE_H_
#define ECSNAP_DAEMON_SERVICE_ADMIN_SERVICE_H_

#include <chrono>
#include <functional>
#include <string>

#include "daemon/store/arena.h"
#include "daemon/peer/parity_store.h"
#include "daemon/peer/protector.h"
#include "daemon/peer/rebuilder.h"
#include "daemon/store/step_store.h"
#include "proto/admin.grpc.pb.h"

namespace ecsnap::daemon {

struct AdminInfo {
  uint32_t slot = 0;
  uint32_t group = 0;
  uint32_t k = 1;
  uint32_t m = 0;
  std::string version;
};

class AdminService final : public admin::Admin::Service {
 public:
  // `parity`, `protector` and `rebuilder` are null without peers (m = 0).
  AdminService(StepStore* store, const Arena* arena, AdminInfo info, ParityStore* parity, const Protector* protector, Rebuilder* rebuilder);

  grpc::Status Status(grpc::ServerContext* context, const admin::StatusRequest* request,
                      admin::StatusResponse* response) override;
  grpc::Status ListSteps(grpc::ServerContext* context, const admin::ListStepsRequest* request,
                         admin::ListStepsResponse* response) override;
  grpc::Status Drop(grpc::ServerContext* context, const admin::DropRequest* request,
                    admin::DropResponse* response) override;
  grpc::Status Verify(grpc::ServerContext* context, const admin::VerifyRequest* request,
                      admin::VerifyResponse* response) override;
  grpc::Status Rebuild(grpc::ServerContext* context, const admin::RebuildRequest* request,
                       admin::RebuildResponse* response) override;

 private:

  StepStore* const store_;
  const Arena* const arena_;
  const AdminInfo info_;
  ParityStore* const parity_;
  const Protector* const protector_;
  Rebuilder* const rebuilder_;
  const std::chrono::steady_clock::time_point started_ = std::chrono::steady_clock::now();
};

}  // namespace ecsnap::daemon

#endif  // ECSNAP_DAEMON_SERVICE_ADMIN_SERVICE_H_
