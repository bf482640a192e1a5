#include "daemon/peer/chunk_intake.h"

#include "daemon/peer/payload_chunks.h"

namespace ecsnap::daemon {

// A push being folded into its parity row.
class ChunkIntake::Fold final : public ChunkSink {
 public:
  Fold(ChunkIntake* intake, peer::PushChunkHeader header,
       std::shared_ptr<ParityStore::Fold> fold)
      : intake_(intake), header_(std::move(header)), fold_(std::move(fold)) {}
  ~Fold() override {
    if (!ended_) intake_->parity_->AbortFold(*fold_);
  }

  absl::Status Piece(absl::Span<const uint8_t> data) override {
    absl::Status st = intake_->parity_->FoldPiece(*fold_, data);
    if (!st.ok()) Abort();
    return st;
  }

  absl::StatusOr<bool> End() override {
    ended_ = true;
    auto notice = intake_->parity_->EndFold(*fold_);
    if (!notice.ok()) return notice.status();
    intake_->Learn(header_);
    if (!notice->has_value()) return false;
    intake_->protector_->Announce(**notice);
    return true;
  }

  void Abort() override {
    if (ended_) return;
    ended_ = true;
    intake_->parity_->AbortFold(*fold_);
  }

 private:
  ChunkIntake* const intake_;
  const peer::PushChunkHeader header_;
  const std::shared_ptr<ParityStore::Fold> fold_;
  bool ended_ = false;
};

ChunkIntake::ChunkIntake(StepStore* store, ParityStore* parity, Protector* protector)
    : store_(store), parity_(parity), protector_(protector) {}

void ChunkIntake::Learn(const peer::PushChunkHeader& h) {
  parity_->RecordSlot(h.id().job_id(), h.id().step(), h.from());
  protector_->OnPeerStep(h.id().job_id(), h.id().step());
}

absl::StatusOr<std::unique_ptr<ChunkSink>> ChunkIntake::BeginPush(const peer::PushChunkHeader& h) {
  auto fold = parity_->BeginFold(h.id().job_id(), h.id().step(), h.id().stripe(),
                                 h.id().position(), h.length(), h.crc32c());
  if (!fold.ok()) return fold.status();
  if (*fold == nullptr) {
    Learn(h);
    auto notice = parity_->CompleteNotice(h.id().job_id(), h.id().step(), h.id().stripe());
    if (notice.has_value()) protector_->Announce(*notice);
    return std::unique_ptr<ChunkSink>();
  }
  return std::unique_ptr<ChunkSink>(std::make_unique<Fold>(this, h, std::move(*fold)));
}

absl::StatusOr<PinnedChunk> ChunkIntake::Pin(const peer::ChunkId& id) {
  const ec::Layout& layout = protector_->layout();
  PinnedChunk chunk;
  if (id.position() < static_cast<uint32_t>(layout.k())) {
    auto p = store_->PinPayload(id.job_id(), id.step());
    if (!p.ok()) return p.status();
    auto payload = std::make_shared<Payload>(std::move(*p));
    const ec::Extent e = PayloadChunks(layout, protector_->group().self, payload->RankBytes())
                             .Chunk(static_cast<int>(id.position()));
    chunk.length = e.length;
    chunk.read = [payload, e](uint64_t off, uint64_t len,
                              const std::function<bool(absl::Span<const uint8_t>)>& piece) {
      bool more = true;
      payload->ForEachPiece(e.offset + off, len, [&](absl::Span<const uint8_t> bytes) {
        if (more) more = piece(bytes);
      });
    };
    return chunk;
  }
  auto r = parity_->Row(id.job_id(), id.step(), id.stripe());
  if (!r.ok()) return r.status();
  auto row = std::make_shared<ParityStore::PinnedRow>(std::move(*r));
  chunk.length = row->bytes.size();
  chunk.crc32c = row->crc32c;
  chunk.read = [row](uint64_t off, uint64_t len,
                     const std::function<bool(absl::Span<const uint8_t>)>& piece) {
    piece(row->bytes.subspan(off, len));
  };
  return chunk;
}

}  // namespace ecsnap::daemon
