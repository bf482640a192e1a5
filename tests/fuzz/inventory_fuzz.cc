// Fuzzes what a peer's inventory answer reaches: GroupView::Merge, the
// rebuild plan made from the merged view, and the chunk ranges of every
// announced slot payload (what GetChunk and a rebuild read and write).
// Input: one byte choosing RS(k, m), then a serialized
// ecsnap.peer.InventoryResponse, merged as if each group position sent it.
// Everything used as an index must stay in range: a chunk inside its
// payload, each rank piece inside its rank's window.
#include <cstdint>
#include <cstdlib>
#include <set>

#include "daemon/peer/group.h"
#include "daemon/peer/group_view.h"
#include "daemon/peer/payload_chunks.h"
#include "daemon/peer/rebuild_plan.h"
#include "daemon/store/store.pb.h"
#include "ec/layout.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace ecsnap;
  using namespace ecsnap::daemon;
  if (size < 1) return 0;
  auto layout = ec::Layout::Create(1 + data[0] % 4, 1 + (data[0] / 4) % 3);
  if (!layout.ok()) return 0;
  peer::InventoryResponse inventory;
  if (!inventory.ParseFromArray(data + 1, static_cast<int>(size - 1))) return 0;

  Group group;
  for (int p = 0; p < layout->n(); ++p) {
    group.slots.push_back(p);
    group.addresses.push_back("127.0.0.1:1");
  }
  GroupView view(*layout);
  for (int from = 0; from < layout->n(); ++from) view.Merge(from, inventory);
  view.AddKnownEmptyChunks();
  PlanRebuild(*layout, group, view, {});

  for (const auto& [key, step] : view.steps()) {
    for (int s = 0; s < layout->stripes(); ++s) {
      MissingPositions(step.held, layout->n(), s);
      StripeLoss(*layout, group, step.held, s);
    }
    for (const auto& [pos, slot] : step.slots) {
      if (pos < 0 || pos >= layout->n()) std::abort();
      SlotManifest manifest;
      if (!manifest.ParseFromString(slot.manifests())) continue;
      std::vector<uint64_t> rank_bytes;
      for (const auto& r : manifest.ranks()) rank_bytes.push_back(r.bytes());
      PayloadChunks payload(*layout, pos, rank_bytes);
      for (int p = 0; p < layout->k(); ++p) {
        const ec::Extent chunk = payload.Chunk(p);
        if (chunk.offset > payload.bytes() || chunk.length > payload.bytes() - chunk.offset) {
          std::abort();
        }
        const int stripe = payload.StripeOf(p);
        if (stripe < 0 || stripe >= layout->stripes()) std::abort();
        payload.ForEachPiece(chunk.offset, chunk.length,
                             [&](size_t i, uint64_t in_rank, uint64_t, uint64_t bytes) {
                               if (i >= rank_bytes.size() || in_rank > rank_bytes[i] ||
                                   bytes > rank_bytes[i] - in_rank) {
                                 std::abort();
                               }
                             });
      }
    }
  }
  return 0;
}
