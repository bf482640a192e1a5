#include "daemon/peer/grpc_transport.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_format.h"
#include "common/grpc_status.h"

namespace ecsnap::daemon {

absl::Status TransferError(absl::Status st, bool stalled, absl::Duration stall,
                           const std::string& what) {
  if (stalled) {
    st = absl::DeadlineExceededError(absl::StrFormat(
        "no progress for %d ms (peer stopped, or stopping)", absl::ToInt64Milliseconds(stall)));
  }
  return absl::Status(st.code(), absl::StrCat(what, ": ", st.message()));
}

GrpcTransport::GrpcTransport(std::vector<peer::Peer::Stub*> stubs, std::vector<uint32_t> slots,
                             CallWatchdog* watchdog)
    : stubs_(std::move(stubs)), slots_(std::move(slots)), watchdog_(watchdog) {}

absl::StatusOr<bool> GrpcTransport::Push(int holder, const peer::PushChunkHeader& header,
                                         const ChunkBytes& bytes) {
  grpc::ClientContext ctx;
  ctx.set_wait_for_ready(true);  // a peer still starting: wait, while the watchdog allows
  auto watch = watchdog_->Start(&ctx);
  peer::PushChunkResponse resp;
  auto writer = stubs_[holder]->PushChunk(&ctx, &resp);
  peer::PushChunkMessage msg;
  *msg.mutable_header() = header;
  bool ok = writer->Write(msg);
  if (ok) watch->Progress();
  bytes([&](absl::Span<const uint8_t> piece) {
    for (uint64_t at = 0; ok && at < piece.size(); at += kPeerChunkBytes) {
      const uint64_t n = std::min<uint64_t>(kPeerChunkBytes, piece.size() - at);
      msg.set_data(piece.data() + at, n);
      ok = writer->Write(msg);
      if (ok) watch->Progress();
    }
    return ok;
  });
  if (ok) writer->WritesDone();
  absl::Status st = FromGrpc(writer->Finish());
  if (st.ok()) return resp.stripe_complete();
  return TransferError(st, watch->cancelled(), watchdog_->stall(),
                       absl::StrFormat("push of job %s step %d chunk %d to slot %d",
                                       header.id().job_id(), header.id().step(),
                                       header.id().position(), slots_[holder]));
}

absl::Status GrpcTransport::Fetch(int holder, const peer::GetChunkRequest& request,
                                  absl::Span<uint8_t> into) {
  grpc::ClientContext ctx;
  // Cut when it stops moving (or at shutdown), not at a guessed deadline.
  auto watch = watchdog_->Start(&ctx);
  auto reader = stubs_[holder]->GetChunk(&ctx, request);
  peer::GetChunkMessage msg;
  uint64_t filled = 0;
  while (reader->Read(&msg)) {
    watch->Progress();
    if (msg.has_header()) continue;
    const uint64_t n = std::min<uint64_t>(msg.data().size(), into.size() - filled);
    std::memcpy(into.data() + filled, msg.data().data(), n);
    filled += n;
  }
  absl::Status st = FromGrpc(reader->Finish());
  if (st.ok() && filled != into.size()) {
    st = absl::DataLossError(absl::StrFormat("short chunk: %d of %d bytes", filled, into.size()));
  }
  if (st.ok()) return st;
  return TransferError(st, watch->cancelled(), watchdog_->stall(),
                       absl::StrFormat("read of job %s step %d stripe %d position %d from slot %d",
                                       request.id().job_id(), request.id().step(),
                                       request.id().stripe(), request.id().position(),
                                       slots_[holder]));
}

}  // namespace ecsnap::daemon
