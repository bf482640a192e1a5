// Fuzzes the peer service's handlers as far as a message's content goes
// (daemon/peer/peer_checks.h, the checks PeerService runs before anything
// changes), then what a message that passes them does to a real parity
// store: a push's header followed by its bytes, a row notice, a job
// notice, a chunk read's byte range.
//
// Input: one byte choosing RS(k, m) and this slot's position, one byte
// choosing the message kind, then a serialized ecsnap.peer message of that
// kind (PushChunkHeader, StripeProtected, JobNotice, GetChunkRequest). A
// message that passes must be in range everywhere it is used as an index or
// a length, and what it does must leave the arena consistent; at the end,
// with every step retired, every byte of the arena is free again.
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "daemon/peer/parity_store.h"
#include "daemon/peer/peer_checks.h"
#include "tests/fuzz/parity_fixture.h"

namespace {

using namespace ecsnap;
using namespace ecsnap::daemon;

void Check(bool ok, const char* what) { fuzz::Check(ok, "peer_message_fuzz", what); }

// Pushes the bytes a header announces (a pattern; its CRC is what decides
// whether the fold ends well) into `store`, when they fit the arena.
void Push(ParityStore& store, const peer::PushChunkHeader& h, uint64_t arena_bytes) {
  if (h.length() > arena_bytes / 4) return;
  std::vector<uint8_t> bytes(h.length());
  for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<uint8_t>(i * 7);
  auto fold = store.BeginFold(h.id().job_id(), h.id().step(), static_cast<int>(h.id().stripe()),
                              static_cast<int>(h.id().position()), h.length(), h.crc32c());
  if (!fold.ok() || *fold == nullptr) return;
  for (size_t at = 0; at < bytes.size(); at += 4096) {
    const size_t n = std::min<size_t>(4096, bytes.size() - at);
    if (!store.FoldPiece(**fold, absl::MakeConstSpan(bytes).subspan(at, n)).ok()) {
      store.AbortFold(**fold);
      return;
    }
  }
  (void)store.EndFold(**fold);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  auto group = fuzz::Group::FromByte(data[0]);
  if (!group) return 0;
  const ec::Layout* layout = group->layout.get();
  const int k = layout->k(), m = layout->m(), n = layout->n(), self = group->self;
  const uint8_t* body = data + 2;
  const int body_size = static_cast<int>(size - 2);
  fuzz::ScratchArena arena("peer_message_fuzz");
  std::string job;
  {
    ParityStore store(arena.get(), *layout, group->codec.get(), self);
    switch (data[1] % 4) {
      case 0: {
        peer::PushChunkHeader h;
        if (!h.ParseFromArray(body, body_size)) break;
        if (!CheckPushShape(*layout, h).ok()) break;
        Check(h.id().stripe() < static_cast<uint32_t>(layout->stripes()) &&
                  h.id().position() < static_cast<uint32_t>(k) &&
                  h.from().slot() < static_cast<uint32_t>(n) && h.from().chunk_crc32c_size() == k,
              "a push's shape passed out of range");
        if (!CheckPushContent(*layout, h).ok()) break;
        Check(h.length() == layout->DataChunk(h.from().payload_bytes(), h.id().position()).length,
              "a push passed with a length its payload does not give");
        Check(h.id().step() != 0 && h.id().step() != UINT64_MAX && !h.id().job_id().empty(),
              "a push passed with a step or job that cannot be");
        job = h.id().job_id();
        Push(store, h, arena->size());
        break;
      }
      case 1: {
        peer::StripeProtected row;
        if (!row.ParseFromArray(body, body_size)) break;
        if (!CheckRowNotice(*layout, row).ok() || !CheckPeerStep(row.job_id(), row.step()).ok()) {
          break;
        }
        Check(row.stripe() < static_cast<uint32_t>(n) && row.row() < static_cast<uint32_t>(m) &&
                  static_cast<int>(row.holder_slot()) ==
                      layout->SlotOf(static_cast<int>(row.stripe()), k + row.row()),
              "a row notice passed out of range");
        job = row.job_id();
        store.RecordRow(row);
        break;
      }
      case 2: {
        peer::JobNotice notice;
        if (!notice.ParseFromArray(body, body_size)) break;
        uint64_t step = 0;
        if (!CheckJobNotice(*layout, notice, &step).ok()) break;
        Check(notice.slot() < static_cast<uint32_t>(n), "a job notice passed out of range");
        if (!CheckPeerStep(notice.job_id(), step).ok()) break;
        Check(step != 0 && step != UINT64_MAX, "a job notice passed with a step that cannot be");
        job = notice.job_id();
        if (notice.has_rewound_to()) store.DropAbove(job, notice.rewound_to());
        if (notice.has_abandoned_step()) store.MarkAbandoned(job, step);
        break;
      }
      case 3: {
        peer::GetChunkRequest req;
        if (!req.ParseFromArray(body, body_size)) break;
        if (!CheckGetChunk(*layout, self, req.id()).ok()) break;
        Check(req.id().stripe() < static_cast<uint32_t>(layout->stripes()) &&
                  req.id().position() < static_cast<uint32_t>(n) &&
                  layout->SlotOf(req.id().stripe(), req.id().position()) == self,
              "a chunk read passed for a chunk this slot does not hold");
        for (uint64_t chunk : {uint64_t{0}, uint64_t{1}, uint64_t{4096}, req.offset(),
                               req.length(), UINT64_MAX}) {
          const auto [from, want] = GetChunkRange(chunk, req.offset(), req.length());
          Check(from <= chunk && want <= chunk - from, "a chunk read's range passes its end");
        }
        break;
      }
    }
    Check(arena->CheckConsistency().ok(), "the arena's free list is inconsistent");
    if (!job.empty()) store.DropBelow(job, UINT64_MAX);
    Check(store.bytes() == 0, "rows left after every step was retired");
  }
  Check(arena.AllFree(), "arena bytes leaked");
  return 0;
}
