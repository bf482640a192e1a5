#include "daemon/peer/grpc_transport.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_format.h"
#include "common/grpc_status.h"
#include "daemon/peer/peer_checks.h"

namespace ecsnap::daemon {

absl::Status TransferError(absl::Status st, bool stalled, absl::Duration stall,
                           const std::string& what) {
  if (stalled) {
    st = absl::DeadlineExceededError(absl::StrFormat(
        "no progress for %d ms (peer stopped, or stopping)", absl::ToInt64Milliseconds(stall)));
  }
  return absl::Status(st.code(), absl::StrCat(what, ": ", st.message()));
}

std::string PushName(const peer::PushChunkHeader& header, uint32_t slot) {
  return absl::StrFormat("push of job %s step %d chunk %d to slot %d", header.id().job_id(),
                         header.id().step(), header.id().position(), slot);
}

std::string ReadName(const peer::GetChunkRequest& request, uint32_t slot) {
  return absl::StrFormat("read of job %s step %d stripe %d position %d from slot %d",
                         request.id().job_id(), request.id().step(), request.id().stripe(),
                         request.id().position(), slot);
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
                       PushName(header, slots_[holder]));
}

namespace {

// GetChunk's stream, read a range at a time: what a message holds beyond the
// current read waits for the next.
class GrpcChunkReader final : public ChunkReader {
 public:
  GrpcChunkReader(CallWatchdog* watchdog, std::string what)
      : watchdog_(watchdog), what_(std::move(what)) {}
  ~GrpcChunkReader() override {
    if (reader_ != nullptr && !finished_) {
      ctx_.TryCancel();
      reader_->Finish().ok();
    }
  }

  // Starts the call and reads the header. The watch lasts only this call.
  absl::Status Open(peer::Peer::Stub* stub, const peer::GetChunkRequest& request) {
    auto watch = watchdog_->Start(&ctx_);
    reader_ = stub->GetChunk(&ctx_, request);
    peer::GetChunkMessage msg;
    if (!reader_->Read(&msg) || !msg.has_header()) return Fail(watch->cancelled());
    remaining_ = GetChunkRange(msg.header().length(), request.offset(), request.length()).second;
    return absl::OkStatus();
  }

  absl::Status Read(absl::Span<uint8_t> into) override {
    if (into.size() > remaining_) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s: %d bytes asked, %d left in the range", what_, into.size(), remaining_));
    }
    auto watch = watchdog_->Start(&ctx_);
    size_t filled = 0;
    while (filled < into.size()) {
      if (at_ == held_.size()) {
        peer::GetChunkMessage msg;
        if (!reader_->Read(&msg)) return Fail(watch->cancelled());
        watch->Progress();
        if (msg.has_header()) continue;
        held_ = std::move(*msg.mutable_data());
        at_ = 0;
      }
      const size_t n = std::min(held_.size() - at_, into.size() - filled);
      std::memcpy(into.data() + filled, held_.data() + at_, n);
      at_ += n;
      filled += n;
    }
    remaining_ -= into.size();
    return absl::OkStatus();
  }

  uint64_t remaining() const override { return remaining_; }

 private:
  absl::Status Fail(bool stalled) {
    finished_ = true;
    absl::Status st = FromGrpc(reader_->Finish());
    if (st.ok()) st = absl::DataLossError("short chunk: the stream ended early");
    remaining_ = 0;
    return TransferError(st, stalled, watchdog_->stall(), what_);
  }

  CallWatchdog* const watchdog_;
  const std::string what_;
  grpc::ClientContext ctx_;
  std::unique_ptr<grpc::ClientReader<peer::GetChunkMessage>> reader_;
  bool finished_ = false;
  uint64_t remaining_ = 0;
  std::string held_;
  size_t at_ = 0;
};

}  // namespace

absl::StatusOr<std::unique_ptr<ChunkReader>> GrpcTransport::OpenRead(
    int holder, const peer::GetChunkRequest& request) {
  auto reader = std::make_unique<GrpcChunkReader>(watchdog_, ReadName(request, slots_[holder]));
  absl::Status st = reader->Open(stubs_[holder], request);
  if (!st.ok()) return st;
  return std::unique_ptr<ChunkReader>(std::move(reader));
}

}  // namespace ecsnap::daemon
