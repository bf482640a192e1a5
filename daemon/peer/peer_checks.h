// The rules a peer's message must meet before it may change anything here
// (DESIGN.md §9): pure checks over the group's layout, shared by the peer
// service's handlers and the fuzz target that drives them
// (tests/fuzz/peer_message_fuzz). Who sent a message (its certificate) is
// the service's to check; what it says is checked here. Each returns
// INVALID_ARGUMENT with a sentence naming the offending field.
#ifndef ECSNAP_DAEMON_PEER_PEER_CHECKS_H_
#define ECSNAP_DAEMON_PEER_PEER_CHECKS_H_

#include <cstdint>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "ec/layout.h"
#include "proto/peer.pb.h"

namespace ecsnap::daemon {

// A job id of 1 to `max_job_id_bytes` characters of [A-Za-z0-9._-] and a step
// of 1 to 2^64-2.
absl::Status CheckPeerStep(const std::string& job, uint64_t step);

// A push's header, before its sender is known to be the right one: the
// stripe and data position exist, `from.slot` is the group position that
// owns that data position, and the sender listed one CRC per data chunk.
absl::Status CheckPushShape(const ec::Layout& layout, const peer::PushChunkHeader& h);
// The rest of the header, once the sender is admitted: job and step, and the
// chunk's length and CRC are the ones the sender's announced payload gives.
absl::Status CheckPushContent(const ec::Layout& layout, const peer::PushChunkHeader& h);

// A parity row's completion (or loss) notice: the row exists and
// `holder_slot` is the position that keeps it; job and step as above.
absl::Status CheckRowNotice(const ec::Layout& layout, const peer::StripeProtected& row);

// A job notice: the sender's position exists. `*step` is the step it names
// (a rewind to 0 names 1), to check with CheckPeerStep once the sender is
// admitted.
absl::Status CheckJobNotice(const ec::Layout& layout, const peer::JobNotice& notice,
                            uint64_t* step);

// A chunk read: slot `self` holds the stripe's position. Its byte range is
// GetChunkRange's.
absl::Status CheckGetChunk(const ec::Layout& layout, int self, const peer::ChunkId& id);
// [offset, offset + length) of a chunk of `chunk_bytes`, clipped to it; a
// length of 0 asks for the rest. Never past the chunk's end.
std::pair<uint64_t, uint64_t> GetChunkRange(uint64_t chunk_bytes, uint64_t offset,
                                            uint64_t length);

}  // namespace ecsnap::daemon

#endif  // ECSNAP_DAEMON_PEER_PEER_CHECKS_H_
