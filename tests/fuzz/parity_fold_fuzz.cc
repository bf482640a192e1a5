// Fuzzes the parity store as the peer plane's push, announce and rebuild
// handlers drive it (DESIGN.md §9): any sequence of folds begun, fed, ended
// and broken off, rows announced (or announced lost), member shapes recorded,
// rows reserved and completed by a rebuild, steps abandoned, rewound and
// retired, with hostile values in every field.
//
// Input: one byte choosing RS(k, m) and this slot's group position, then
// operations of 8 bytes each (op, job, step, stripe, position, three bytes of
// length). After every operation the arena must be consistent (no extent
// handed out twice, none lost) and the store may hold no more than the arena;
// at the end, with every fold broken off and every step retired, every byte
// of the arena must be free again.
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "daemon/peer/parity_store.h"
#include "ec/crc32c.h"
#include "tests/fuzz/parity_fixture.h"

namespace {

using namespace ecsnap;
using namespace ecsnap::daemon;

void Check(bool ok, const char* what) { fuzz::Check(ok, "parity_fold_fuzz", what); }

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  auto group = fuzz::Group::FromByte(data[0]);
  if (!group) return 0;
  const ec::Layout* layout = group->layout.get();
  const int k = layout->k();
  fuzz::ScratchArena arena("parity_fold_fuzz");
  {
    ParityStore store(arena.get(), *layout, group->codec.get(), group->self);
    const char* jobs[] = {"a", "b", "", "j\xff"};
    std::map<int, std::shared_ptr<ParityStore::Fold>> folds;  // by position
    std::vector<uint8_t> bytes(1 << 16);
    for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<uint8_t>(i * 131);
    for (size_t at = 1; at + 8 <= size; at += 8) {
      const uint8_t* op = data + at;
      const std::string job = jobs[op[1] % 4];
      // Steps as the handlers let them through (PeerService::CheckStep: 1 to
      // 2^64-2), the largest included.
      const uint64_t step = op[2] < 250 ? 1 + op[2] % 4 : UINT64_MAX - 1;
      const int stripe = static_cast<int8_t>(op[3]) % (layout->stripes() + 2);
      const int position = static_cast<int8_t>(op[4]) % (layout->n() + 2);
      uint64_t length = op[5] | (op[6] << 8) | (uint64_t{op[7]} << 16);
      if (op[7] == 0xff) length = uint64_t{1} << (40 + op[6] % 24);  // hostile lengths
      switch (op[0] % 12) {
        case 0: {  // a push's header
          auto fold = store.BeginFold(job, step, stripe, position, length,
                                      ec::Crc32c(absl::MakeConstSpan(bytes).first(
                                          std::min<uint64_t>(length, bytes.size()))));
          if (fold.ok() && *fold != nullptr) folds[position] = *fold;
          break;
        }
        case 1: {  // a push's next piece
          auto it = folds.find(position);
          if (it == folds.end()) break;
          const size_t n = std::min<uint64_t>(length % 5000, bytes.size());
          if (!store.FoldPiece(*it->second, absl::MakeConstSpan(bytes).first(n)).ok()) {
            store.AbortFold(*it->second);
            folds.erase(it);
          }
          break;
        }
        case 2: {  // a push's end
          auto it = folds.find(position);
          if (it == folds.end()) break;
          (void)store.EndFold(*it->second);
          folds.erase(it);
          break;
        }
        case 3: {  // a push cut off
          auto it = folds.find(position);
          if (it == folds.end()) break;
          store.AbortFold(*it->second);
          folds.erase(it);
          break;
        }
        case 4: {  // a member's shape, from a push header
          peer::SlotStep slot;
          slot.set_slot(static_cast<uint32_t>(position));
          slot.set_payload_bytes(length);
          for (int p = 0; p < op[5] % (k + 2); ++p) slot.add_chunk_crc32c(op[6] + p);
          store.RecordSlot(job, step, slot);
          break;
        }
        case 5: {  // a row announced complete, or lost
          peer::StripeProtected row;
          row.set_job_id(job);
          row.set_step(step);
          row.set_stripe(static_cast<uint32_t>(stripe));
          row.set_row(static_cast<uint32_t>(position));
          row.set_holder_slot(op[5]);
          row.set_parity_bytes(length);
          row.set_lost(op[6] & 1);
          store.RecordRow(row);
          break;
        }
        case 6: {  // a rebuild decoding a row straight into the arena
          auto span = store.ReserveRow(job, step, stripe, length);
          if (span.ok()) {
            std::memset(span->bytes.data(), op[6], span->bytes.size());
            if (op[6] & 1) {
              (void)store.CompleteRow(job, step, stripe, {}, &*span);
            } else {
              store.DiscardIncompleteRow(job, step, stripe);
            }
          }
          break;
        }
        case 7:  // a rebuilt row installed whole
          (void)store.InstallRow(job, step, stripe,
                                 absl::MakeConstSpan(bytes).first(
                                     std::min<uint64_t>(length, bytes.size())));
          break;
        case 8:
          if (op[6] & 1) {
            store.TryAbandon(job, step);
          } else {
            store.MarkAbandoned(job, step);
          }
          break;
        case 9:
          store.DropBelow(job, step);
          break;
        case 10:
          store.DropAbove(job, step);
          break;
        case 11: {  // readers: serve a row, list what is known
          auto row = store.Row(job, step, stripe);
          if (row.ok()) Check(ec::Crc32c(row->bytes) == row->crc32c, "a served row fails its crc");
          store.Knowledge();
          store.MissingRows(job, step);
          store.CompleteNotice(job, step, stripe);
          break;
        }
      }
      Check(arena->CheckConsistency().ok(), "the arena's free list is inconsistent");
      Check(store.bytes() <= arena->size(), "the store holds more than the arena");
    }
    for (auto& [pos, fold] : folds) store.AbortFold(*fold);
    for (const char* job : jobs) store.DropBelow(job, UINT64_MAX);
    Check(arena->CheckConsistency().ok(), "the arena's free list is inconsistent at the end");
    Check(store.bytes() == 0, "rows left after every step was retired");
  }
  Check(arena.AllFree(), "arena bytes leaked");
  return 0;
}
