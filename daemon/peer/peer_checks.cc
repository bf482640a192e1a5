#include "daemon/peer/peer_checks.h"

#include <algorithm>

#include "absl/strings/str_format.h"
#include "daemon/store/manifest_check.h"
#include "daemon/store/step_store.h"

namespace ecsnap::daemon {

absl::Status CheckPeerStep(const std::string& job, uint64_t step) {
  const size_t max_bytes = StoreLimits().max_job_id_bytes;
  if (!ValidJobId(job, max_bytes)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "job id of %d bytes: ids are 1 to %d characters of [A-Za-z0-9._-]", job.size(),
        max_bytes));
  }
  if (step == 0 || step == UINT64_MAX) {
    return absl::InvalidArgumentError(
        absl::StrFormat("step %d of job %s: steps are 1 to 2^64-2", step, job));
  }
  return absl::OkStatus();
}

absl::Status CheckPushShape(const ec::Layout& layout, const peer::PushChunkHeader& h) {
  if (h.id().stripe() >= static_cast<uint32_t>(layout.stripes()) ||
      h.id().position() >= static_cast<uint32_t>(layout.k()) ||
      h.from().slot() != static_cast<uint32_t>(layout.SlotOf(h.id().stripe(), h.id().position())) ||
      h.from().chunk_crc32c_size() != layout.k()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "a push of stripe %d position %d from group position %d does not fit RS(%d,%d)",
        h.id().stripe(), h.id().position(), h.from().slot(), layout.k(), layout.m()));
  }
  return absl::OkStatus();
}

absl::Status CheckPushContent(const ec::Layout& layout, const peer::PushChunkHeader& h) {
  if (absl::Status st = CheckPeerStep(h.id().job_id(), h.id().step()); !st.ok()) return st;
  const uint64_t expected = layout.DataChunk(h.from().payload_bytes(), h.id().position()).length;
  if (h.length() != expected || h.from().chunk_crc32c(h.id().position()) != h.crc32c()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "a push of stripe %d position %d announces %d bytes with crc32c 0x%08x, but the sender's "
        "payload of %d bytes gives a %d-byte chunk with crc32c 0x%08x",
        h.id().stripe(), h.id().position(), h.length(), h.crc32c(), h.from().payload_bytes(),
        expected, h.from().chunk_crc32c(h.id().position())));
  }
  return absl::OkStatus();
}

absl::Status CheckRowNotice(const ec::Layout& layout, const peer::StripeProtected& row) {
  const uint32_t n = static_cast<uint32_t>(layout.n()), m = static_cast<uint32_t>(layout.m());
  // Only a row's holder announces it.
  if (row.stripe() >= n || row.row() >= m ||
      static_cast<int>(row.holder_slot()) !=
          layout.SlotOf(static_cast<int>(row.stripe()), layout.k() + row.row())) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "parity row %d of stripe %d held by group position %d does not fit RS(%d,%d)", row.row(),
        row.stripe(), row.holder_slot(), layout.k(), layout.m()));
  }
  return absl::OkStatus();
}

absl::Status CheckJobNotice(const ec::Layout& layout, const peer::JobNotice& notice,
                            uint64_t* step) {
  if (notice.slot() >= static_cast<uint32_t>(layout.n())) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "a notice from group position %d: the group has %d", notice.slot(), layout.n()));
  }
  *step = 1;
  if (notice.has_protected_step()) *step = notice.protected_step();
  if (notice.has_abandoned_step()) *step = notice.abandoned_step();
  if (notice.has_rewound_to()) *step = std::max<uint64_t>(notice.rewound_to(), 1);
  return absl::OkStatus();
}

absl::Status CheckGetChunk(const ec::Layout& layout, int self, const peer::ChunkId& id) {
  if (id.stripe() >= static_cast<uint32_t>(layout.stripes()) ||
      id.position() >= static_cast<uint32_t>(layout.n()) ||
      layout.SlotOf(id.stripe(), id.position()) != self) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "slot %d does not hold stripe %d position %d", self, id.stripe(), id.position()));
  }
  return absl::OkStatus();
}

std::pair<uint64_t, uint64_t> GetChunkRange(uint64_t chunk_bytes, uint64_t offset,
                                            uint64_t length) {
  const uint64_t from = std::min(offset, chunk_bytes);
  const uint64_t want = length == 0 ? chunk_bytes - from : std::min(length, chunk_bytes - from);
  return {from, want};
}

}  // namespace ecsnap::daemon
