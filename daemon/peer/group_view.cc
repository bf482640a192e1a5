#include "daemon/peer/group_view.h"

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"

namespace ecsnap::daemon {

int GroupView::Merge(int from, const peer::InventoryResponse& inventory) {
  const uint32_t n = static_cast<uint32_t>(layout_.n()), m = static_cast<uint32_t>(layout_.m());
  answered_.insert(from);
  int bad = 0;
  for (const auto& inv : inventory.steps()) {
    StepView& v = steps_[{inv.job_id(), inv.step()}];
    for (const auto& s : inv.slots()) {
      if (s.slot() >= n) {
        ++bad;
        continue;
      }
      v.slots[static_cast<int>(s.slot())] = s;
    }
    for (const auto& r : inv.rows()) {
      if (r.stripe() >= n || r.row() >= m || r.holder_slot() >= n || r.job_id() != inv.job_id() ||
          r.step() != inv.step()) {
        ++bad;
        continue;
      }
      v.rows[{static_cast<int>(r.stripe()), static_cast<int>(r.row())}] = r;
    }
    for (uint32_t c : inv.chunks()) {
      // A peer vouches for the chunks it holds itself, no other.
      if (c >= n * n || layout_.PositionOf(static_cast<int>(c / n), from) !=
                            static_cast<int>(c % n)) {
        ++bad;
        continue;
      }
      v.held[{static_cast<int>(c / n), static_cast<int>(c % n)}].insert(from);
    }
  }
  return bad;
}

void GroupView::AddKnownEmptyChunks() {
  const int n = layout_.n();
  for (auto& [key, v] : steps_) {
    if (static_cast<int>(v.slots.size()) != n) continue;
    std::vector<uint64_t> lens(n);
    for (const auto& [pos, slot] : v.slots) lens[pos] = slot.payload_bytes();
    for (int s = 0; s < n; ++s) {
      for (int q = 0; q < n; ++q) {
        if (layout_.ChunkLength(lens, s, q) == 0) v.held[{s, q}].insert(kKnownEmpty);
      }
    }
  }
}

std::vector<int> MissingPositions(const Holders& held, int n, int s) {
  std::vector<int> missing;
  for (int q = 0; q < n; ++q) {
    auto it = held.find({s, q});
    if (it == held.end() || it->second.empty()) missing.push_back(q);
  }
  return missing;
}

std::string StripeLoss(const ec::Layout& layout, const Group& group, const Holders& held, int s) {
  const std::vector<int> missing = MissingPositions(held, layout.n(), s);
  std::vector<uint32_t> slots;
  for (int q : missing) slots.push_back(group.slots[layout.SlotOf(s, q)]);
  return absl::StrFormat(
      "stripe %d has %d of the %d intact chunks it needs (positions {%s}, on slots {%s}, are "
      "lost)",
      s, layout.n() - static_cast<int>(missing.size()), layout.k(), absl::StrJoin(missing, ", "),
      absl::StrJoin(slots, ", "));
}

}  // namespace ecsnap::daemon
