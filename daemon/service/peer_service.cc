#include "daemon/service/peer_service.h"

#include <algorithm>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/grpc_status.h"
#include "daemon/store/manifest_check.h"
#include "daemon/peer/grpc_transport.h"
#include "daemon/peer/payload_chunks.h"
#include "daemon/peer/peer_checks.h"
#include "daemon/service/tls.h"

namespace ecsnap::daemon {

namespace {

grpc::Status Stalled() {
  return grpc::Status(grpc::StatusCode::CANCELLED,
                      "the push stalled (no bytes within the peer timeout, or the daemon is "
                      "stopping); its row was dropped");
}

// UNIMPLEMENTED: the caller falls back to the gRPC streams.
grpc::Status NoBulk() {
  return grpc::Status(grpc::StatusCode::UNIMPLEMENTED,
                      "this daemon takes chunk bytes inside the gRPC streams only "
                      "(cluster.bulk_transport BULK_GRPC, or peer addresses that are not "
                      "host:port)");
}

}  // namespace

PeerService::PeerService(StepStore* store, ParityStore* parity, Protector* protector,
                         ChunkIntake* intake, BulkServer* bulk, bool authenticated)
    : store_(store),
      parity_(parity),
      protector_(protector),
      intake_(intake),
      bulk_(bulk),
      authenticated_(authenticated) {}

grpc::Status PeerService::Admit(const grpc::ServerContext& context, int position) const {
  if (!authenticated_) return grpc::Status::OK;  // plaintext: loopback only (config check)
  const Group& group = protector_->group();
  const std::optional<uint32_t> caller = CallerSlot(context);
  const std::string named = caller ? absl::StrCat("slot ", *caller) : "no single slot";
  if (position >= 0) {
    const uint32_t want = group.slots[position];
    if (caller == want) return grpc::Status::OK;
    return grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                        absl::StrFormat("a message about slot %d must come from slot %d's "
                                        "certificate; this caller's names %s",
                                        want, want, named));
  }
  if (caller && *caller != group.slots[group.self] &&
      std::find(group.slots.begin(), group.slots.end(), *caller) != group.slots.end()) {
    return grpc::Status::OK;
  }
  return grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                      absl::StrFormat("only the peers of group %d (slots {%s}) may call this; "
                                      "the caller's certificate names %s",
                                      group.id, absl::StrJoin(group.slots, ", "), named));
}

grpc::Status PeerService::CheckPush(const grpc::ServerContext& context,
                                    const peer::PushChunkHeader& h) const {
  // Everything is checked before anything is recorded or reserved: a refused
  // push leaves no trace. The sender must be the slot that owns this data
  // position, and the length the one its announced payload gives.
  const ec::Layout& layout = protector_->layout();
  if (absl::Status st = CheckPushShape(layout, h); !st.ok()) return ToGrpc(st);
  if (grpc::Status st = Admit(context, static_cast<int>(h.from().slot())); !st.ok()) return st;
  return ToGrpc(CheckPushContent(layout, h));
}

grpc::Status PeerService::PushChunk(grpc::ServerContext* context,
                                    grpc::ServerReader<peer::PushChunkMessage>* reader,
                                    peer::PushChunkResponse* response) {
  // A sender that stops sending (hung, SIGSTOPped, hostile) is cut after
  // the peer timeout without progress: it would hold this thread and the
  // row's reservation for as long as its connection lives.
  auto watch = protector_->watchdog()->Start(context);
  peer::PushChunkMessage msg;
  if (!reader->Read(&msg) || !msg.has_header()) {
    if (watch->cancelled()) return Stalled();
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        "a chunk push must start with its header");
  }
  watch->Progress();
  const peer::PushChunkHeader h = msg.header();
  if (grpc::Status st = CheckPush(*context, h); !st.ok()) return st;
  auto sink = intake_->BeginPush(h);
  if (!sink.ok()) return ToGrpc(sink.status());
  if (*sink == nullptr) return grpc::Status::OK;  // folded before: the sender stops sending
  while (reader->Read(&msg)) {
    watch->Progress();
    absl::Status st = (*sink)->Piece(absl::Span<const uint8_t>(
        reinterpret_cast<const uint8_t*>(msg.data().data()), msg.data().size()));
    if (!st.ok()) return ToGrpc(st);
  }
  // The stream ended without the sender's WritesDone (cut by the watchdog,
  // cancelled by the sender, its connection gone): whatever arrived is
  // given up as a broken push, never checked as a complete one.
  if (watch->cancelled() || context->IsCancelled()) {
    (*sink)->Abort();
    return watch->cancelled() ? Stalled()
                              : grpc::Status(grpc::StatusCode::CANCELLED,
                                             "the push ended before its last byte");
  }
  auto complete = (*sink)->End();
  if (!complete.ok()) return ToGrpc(complete.status());
  response->set_stripe_complete(*complete);
  return grpc::Status::OK;
}

grpc::Status PeerService::OpenPush(grpc::ServerContext* context,
                                   const peer::PushChunkHeader* request,
                                   peer::BulkTicket* response) {
  if (bulk_ == nullptr) return NoBulk();
  if (grpc::Status st = CheckPush(*context, *request); !st.ok()) return st;
  // The same sender opening the same push again could not use its last
  // ticket: that fold goes, so that this one can begin.
  const std::string key = absl::StrCat(request->id().job_id(), "/", request->id().step(), "/",
                                       request->id().stripe(), "/", request->id().position());
  bulk_->Revoke(key);
  auto sink = intake_->BeginPush(*request);
  if (!sink.ok()) return ToGrpc(sink.status());
  if (*sink == nullptr) {
    response->set_folded(true);
    return grpc::Status::OK;
  }
  auto token = bulk_->IssuePush(key, request->length(), std::move(*sink));
  if (!token.ok()) return ToGrpc(token.status());
  response->set_token(*token);
  response->set_port(bulk_->port());
  return grpc::Status::OK;
}

grpc::Status PeerService::NotifyStripeProtected(grpc::ServerContext* context,
                                                const peer::StripeProtected* request,
                                                peer::StripeProtectedResponse*) {
  if (absl::Status st = CheckRowNotice(protector_->layout(), *request); !st.ok()) {
    return ToGrpc(st);
  }
  if (grpc::Status st = Admit(*context, static_cast<int>(request->holder_slot())); !st.ok()) {
    return st;
  }
  if (absl::Status st = CheckPeerStep(request->job_id(), request->step()); !st.ok()) {
    return ToGrpc(st);
  }
  protector_->OnRowComplete(*request);
  return grpc::Status::OK;
}

grpc::Status PeerService::NotifyJob(grpc::ServerContext* context, const peer::JobNotice* request,
                                    peer::JobNoticeResponse*) {
  uint64_t step = 1;  // the step the notice names (a rewind may name 0: nothing kept)
  if (absl::Status st = CheckJobNotice(protector_->layout(), *request, &step); !st.ok()) {
    return ToGrpc(st);
  }
  if (grpc::Status st = Admit(*context, static_cast<int>(request->slot())); !st.ok()) return st;
  if (absl::Status st = CheckPeerStep(request->job_id(), step); !st.ok()) return ToGrpc(st);
  return ToGrpc(protector_->OnJobNotice(*request));
}

absl::StatusOr<PinnedChunk> PeerService::PinChunk(const peer::ChunkId& id) const {
  const int self = protector_->group().self;
  if (absl::Status st = CheckGetChunk(protector_->layout(), self, id); !st.ok()) return st;
  return intake_->Pin(id);
}

grpc::Status PeerService::GetChunk(grpc::ServerContext* context,
                                   const peer::GetChunkRequest* request,
                                   grpc::ServerWriter<peer::GetChunkMessage>* writer) {
  if (grpc::Status st = Admit(*context, -1); !st.ok()) return st;
  auto chunk = PinChunk(request->id());
  if (!chunk.ok()) return ToGrpc(chunk.status());
  const auto [offset, want] = GetChunkRange(chunk->length, request->offset(), request->length());
  peer::GetChunkMessage msg;
  msg.mutable_header()->mutable_id()->CopyFrom(request->id());
  msg.mutable_header()->set_length(chunk->length);
  msg.mutable_header()->set_crc32c(chunk->crc32c);
  if (!writer->Write(msg)) return grpc::Status::CANCELLED;
  bool ok = true;
  chunk->read(offset, want, [&](absl::Span<const uint8_t> piece) {
    for (uint64_t at = 0; ok && at < piece.size(); at += kPeerChunkBytes) {
      const uint64_t n = std::min<uint64_t>(kPeerChunkBytes, piece.size() - at);
      msg.set_data(piece.data() + at, n);
      ok = !context->IsCancelled() && writer->Write(msg);
    }
    return ok;
  });
  return ok ? grpc::Status::OK : grpc::Status::CANCELLED;
}

grpc::Status PeerService::OpenRead(grpc::ServerContext* context,
                                   const peer::GetChunkRequest* request,
                                   peer::BulkTicket* response) {
  if (bulk_ == nullptr) return NoBulk();
  if (grpc::Status st = Admit(*context, -1); !st.ok()) return st;
  auto chunk = PinChunk(request->id());
  if (!chunk.ok()) return ToGrpc(chunk.status());
  const auto [offset, want] = GetChunkRange(chunk->length, request->offset(), request->length());
  response->mutable_header()->mutable_id()->CopyFrom(request->id());
  response->mutable_header()->set_length(chunk->length);
  response->mutable_header()->set_crc32c(chunk->crc32c);
  auto token = bulk_->IssueRead(std::move(*chunk), offset, want);
  if (!token.ok()) return ToGrpc(token.status());
  response->set_token(*token);
  response->set_port(bulk_->port());
  return grpc::Status::OK;
}

grpc::Status PeerService::RdmaTransfer(
    grpc::ServerContext* context,
    grpc::ServerReaderWriter<peer::RdmaMessage, peer::RdmaMessage>* stream) {
  if (grpc::Status st = Admit(*context, -1); !st.ok()) return st;
  return ServeRdmaTransfer(rdma_, bulk_, protector_->watchdog(), context, stream);
}

grpc::Status PeerService::Inventory(grpc::ServerContext* context,
                                    const peer::InventoryRequest* request,
                                    peer::InventoryResponse* response) {
  if (grpc::Status st = Admit(*context, -1); !st.ok()) return st;
  const ec::Layout& layout = protector_->layout();
  const int self = protector_->group().self;
  const int n = layout.n();
  response->set_slot(self);
  std::map<std::pair<std::string, uint64_t>, peer::StepInventory> steps;
  auto entry = [&](const std::string& job, uint64_t step) -> peer::StepInventory& {
    peer::StepInventory& inv = steps[{job, step}];
    inv.set_job_id(job);
    inv.set_step(step);
    return inv;
  };
  for (const StepSummary& held : store_->ListSteps(request->job_id())) {
    // A REBUILDING step holds only the ranks served so far: not its chunks.
    if (held.state != v1::LOCAL && held.state != v1::PROTECTED) continue;
    peer::StepInventory& inv = entry(held.job_id, held.step);
    inv.set_state(held.state);
    for (int p = 0; p < layout.k(); ++p) inv.add_chunks(layout.StripeOfDataChunk(self, p) * n + p);
  }
  for (const auto& [key, k] : parity_->Knowledge()) {
    if (!request->job_id().empty() && key.first != request->job_id()) continue;
    peer::StepInventory& inv = entry(key.first, key.second);
    for (int stripe : k.complete_stripes) {
      inv.add_chunks(stripe * n + layout.PositionOf(stripe, self));
    }
    for (const auto& [slot, s] : k.slots) *inv.add_slots() = s;
    for (const auto& [sr, row] : k.rows) *inv.add_rows() = row;
  }
  for (auto& [key, inv] : steps) *response->add_steps() = std::move(inv);
  return grpc::Status::OK;
}

grpc::Status PeerService::Ping(grpc::ServerContext* context, const peer::PingRequest*,
                               peer::PingResponse* response) {
  if (grpc::Status st = Admit(*context, -1); !st.ok()) return st;
  response->set_slot(protector_->group().slots[protector_->group().self]);
  for (const auto& [job, step] : protector_->NewestProtected()) {
    peer::PingResponse::JobProtected* p = response->add_protected_steps();
    p->set_job_id(job);
    p->set_step(step);
  }
  response->set_uptime_ms(std::chrono::duration_cast<std::chrono::milliseconds>(
                              std::chrono::steady_clock::now() - started_)
                              .count());
  return grpc::Status::OK;
}

}  // namespace ecsnap::daemon
