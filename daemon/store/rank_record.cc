#include "daemon/store/rank_record.h"

#include <chrono>

namespace ecsnap::daemon {

std::string EncodeRankRecord(const RankRecordFields& f) {
  RankRecord r;
  r.set_job_id(f.job_id);
  r.set_step(f.step);
  r.set_rank(f.rank);
  for (uint32_t lr : f.local_ranks) r.add_local_ranks(lr);
  r.set_window_offset(f.extent.offset);
  r.set_window_bytes(f.bytes);
  r.set_window_extent_bytes(f.extent.bytes);
  if (f.manifest != nullptr) *r.mutable_manifest() = *f.manifest;
  if (f.owner_uid.has_value()) r.set_owner_uid(*f.owner_uid);
  r.set_committed_unix_ms(std::chrono::duration_cast<std::chrono::milliseconds>(
                              std::chrono::system_clock::now().time_since_epoch())
                              .count());
  return r.SerializeAsString();
}

absl::StatusOr<RankRecord> DecodeRankRecord(absl::Span<const uint8_t> bytes) {
  RankRecord r;
  if (!r.ParseFromArray(bytes.data(), static_cast<int>(bytes.size()))) {
    return absl::InvalidArgumentError("unreadable record");
  }
  if (r.window_bytes() > r.window_extent_bytes()) {
    return absl::InvalidArgumentError("record claims more bytes than its window holds");
  }
  return r;
}

}  // namespace ecsnap::daemon
