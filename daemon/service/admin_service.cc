#include "daemon/service/admin_service.h"

#include <cstdint>

#include "absl/strings/str_format.h"
#include "common/grpc_status.h"
#include "common/log.h"

namespace ecsnap::daemon {

AdminService::AdminService(StepStore* store, const Arena* arena, AdminInfo info,
                           ParityStore* parity, const Protector* protector,
                           Rebuilder* rebuilder)
    : store_(store),
      arena_(arena),
      info_(std::move(info)),
      parity_(parity),
      protector_(protector),
      rebuilder_(rebuilder) {}

grpc::Status AdminService::Status(grpc::ServerContext* context, const admin::StatusRequest*,
                                  admin::StatusResponse* response) {
  response->set_slot(info_.slot);
  response->set_group(info_.group);
  response->set_k(info_.k);
  response->set_m(info_.m);
  response->set_arena_bytes(arena_->data_bytes());
  response->set_arena_used_bytes(arena_->data_bytes() - arena_->free_bytes());
  response->set_uptime_ms(std::chrono::duration_cast<std::chrono::milliseconds>(
                              std::chrono::steady_clock::now() - started_)
                              .count());
  response->set_arena_prefault_ms(static_cast<uint64_t>(arena_->prefault_seconds() * 1000));
  response->set_arena_first_writes_done(arena_->first_writes_done());
  response->set_arena_page_bytes(arena_->pages().page_bytes);
  response->set_arena_pages(arena_->pages().how);
  response->set_sessions(store_->sessions());
  response->set_jobs(store_->jobs());
  response->set_version(info_.version);
  if (protector_ != nullptr) {
    for (const PeerState& p : protector_->Peers()) {
      admin::PeerStatus* ps = response->add_peers();
      ps->set_slot(p.slot);
      ps->set_address(p.address);
      ps->set_reachable(p.reachable);
      ps->set_last_seen_ms_ago(p.last_seen_ms_ago < 0 ? 0 : p.last_seen_ms_ago);
      ps->set_last_error(p.last_error);
    }
  }
  if (rebuilder_ != nullptr) *response->mutable_rebuild() = rebuilder_->status();
  return grpc::Status::OK;
}

grpc::Status AdminService::ListSteps(grpc::ServerContext* context,
                                     const admin::ListStepsRequest* request,
                                     admin::ListStepsResponse* response) {
  for (const StepSummary& s : store_->ListSteps(request->job_id())) {
    admin::StepInfo* info = response->add_steps();
    info->set_job_id(s.job_id);
    info->set_step(s.step);
    info->set_state(s.state);
    info->set_bytes(s.bytes);
    info->set_ranks_committed(s.ranks_committed);
    info->set_ranks_expected(s.ranks_expected);
    if (protector_ != nullptr && s.state == v1::LOCAL) {
      const StepExplanation why = protector_->Explain(s.job_id, s.step);
      for (const std::string& p : why.pushes) info->add_not_protected_because(p);
      for (const std::string& r : why.missing_rows) {
        info->add_not_protected_because("no word yet of " + r);
      }
    }
  }
  return grpc::Status::OK;
}

grpc::Status AdminService::Drop(grpc::ServerContext* context, const admin::DropRequest* request,
                                admin::DropResponse* response) {
  auto dropped = store_->Drop(request->job_id(), request->step());
  if (!dropped.ok()) return ToGrpc(dropped.status());
  // A whole job takes its parity rows with it. The rows of one dropped step
  // stay until retention frees them with the step's older neighbours (when a
  // newer step is protected), as every retired step's rows are.
  if (parity_ != nullptr && request->step() == 0) {
    parity_->DropBelow(request->job_id(), UINT64_MAX);
  }
  Log("admin: dropped %d step(s) of job %s (%d bytes)", dropped->first, request->job_id(),
      dropped->second);
  response->set_steps_dropped(dropped->first);
  response->set_bytes_freed(dropped->second);
  return grpc::Status::OK;
}

grpc::Status AdminService::Verify(grpc::ServerContext* context,
                                  const admin::VerifyRequest* request,
                                  admin::VerifyResponse* response) {
  auto report = store_->Verify(request->job_id(), request->step());
  if (!report.ok()) return ToGrpc(report.status());
  response->set_tensors_checked(report->tensors_checked);
  response->set_bytes_checked(report->bytes_checked);
  for (const auto& e : report->errors) response->add_errors(e);
  const absl::Status arena = arena_->CheckConsistency();
  response->set_arena_consistent(arena.ok());
  response->set_arena_error(std::string(arena.message()));
  if (!arena.ok()) Log("admin verify: %s", arena.message());
  return grpc::Status::OK;
}

grpc::Status AdminService::Rebuild(grpc::ServerContext* context,
                                   const admin::RebuildRequest* request,
                                   admin::RebuildResponse* response) {
  if (rebuilder_ == nullptr) {
    return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                        "this daemon has no peers (m = 0): there is nothing to rebuild from");
  }
  Log("admin: rebuild requested%s", request->job_id().empty() ? "" : " for job " + request->job_id());
  absl::Status st = rebuilder_->Run(request->job_id());
  *response->mutable_rebuild() = rebuilder_->status();
  return ToGrpc(st);
}

}  // namespace ecsnap::daemon
