// The arena index record of a committed rank (daemon/store.proto RankRecord):
// written when a rank commits or a rebuilt rank is installed, read back when
// a restarted daemon re-adopts its arena. The one place that knows its fields.
#ifndef ECSNAP_DAEMON_STORE_RANK_RECORD_H_
#define ECSNAP_DAEMON_STORE_RANK_RECORD_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "daemon/store/arena.h"
#include "daemon/store/store.pb.h"
#include "proto/snapshot.pb.h"

namespace ecsnap::daemon {

struct RankRecordFields {
  std::string job_id;
  uint64_t step = 0;
  uint32_t rank = 0;
  std::vector<uint32_t> local_ranks;
  ArenaExtent extent;  // the rank's window
  uint64_t bytes = 0;  // the rank's bytes in it
  const v1::Manifest* manifest = nullptr;
  std::optional<uint32_t> owner_uid;  // the job's owner on this node, when known
};

// The serialized record, stamped with the current time.
std::string EncodeRankRecord(const RankRecordFields& fields);

// The record in `bytes`, with its window: INVALID_ARGUMENT when it does not
// parse or claims more bytes than its extent. The caller still checks the
// window against the arena (Arena::Reserve) and the manifest against it.
absl::StatusOr<RankRecord> DecodeRankRecord(absl::Span<const uint8_t> bytes);

inline ArenaExtent WindowOf(const RankRecord& r) {
  return ArenaExtent{r.window_offset(), r.window_extent_bytes()};
}

}  // namespace ecsnap::daemon

#endif  // ECSNAP_DAEMON_STORE_RANK_RECORD_H_
