// Fuzzes the decoding of rank records, which a restarted daemon reads back
// from its arena file: bytes that outlived a crash, or that a process with
// access to the file changed. A record that decodes must describe a window
// no larger than its extent, and survive re-encoding.
#include <cstdint>
#include <cstdlib>

#include "daemon/store/rank_record.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace ecsnap::daemon;
  auto record = DecodeRankRecord(absl::Span<const uint8_t>(data, size));
  if (!record.ok()) return 0;
  if (record->window_bytes() > record->window_extent_bytes()) std::abort();
  RankRecordFields f;
  f.job_id = record->job_id();
  f.step = record->step();
  f.rank = record->rank();
  f.local_ranks.assign(record->local_ranks().begin(), record->local_ranks().end());
  f.extent = WindowOf(*record);
  f.bytes = record->window_bytes();
  f.manifest = &record->manifest();
  const std::string again = EncodeRankRecord(f);
  auto reread = DecodeRankRecord(
      absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(again.data()), again.size()));
  if (!reread.ok() || reread->job_id() != record->job_id() || reread->step() != record->step()) {
    std::abort();
  }
  return 0;
}
