// ChunkIntake: what a holder does with a chunk pushed to it, and how it finds
// the bytes of a chunk it is asked for, whatever carries the bytes (the gRPC
// peer streams, a TCP bulk connection). The callers check each message first
// (peer_checks.h, and the caller's slot); nothing here trusts a peer more.
#ifndef ECSNAP_DAEMON_PEER_CHUNK_INTAKE_H_
#define ECSNAP_DAEMON_PEER_CHUNK_INTAKE_H_

#include <memory>

#include "absl/status/statusor.h"
#include "daemon/peer/parity_store.h"
#include "daemon/peer/protector.h"
#include "daemon/peer/transport.h"
#include "daemon/store/step_store.h"
#include "proto/peer.pb.h"

namespace ecsnap::daemon {

class ChunkIntake {
 public:
  // Every pointer outlives the intake.
  ChunkIntake(StepStore* store, ParityStore* parity, Protector* protector);

  // Begins folding a push whose header passed every check. nullptr when its
  // bytes were folded before: what the sender says of its step is learned,
  // and the row announced again if it is complete (the first notice may have
  // died with a restart of this daemon before every peer heard it).
  absl::StatusOr<std::unique_ptr<ChunkSink>> BeginPush(const peer::PushChunkHeader& header);

  // The bytes of a chunk this slot keeps: a data chunk of a step it holds,
  // or a complete parity row.
  absl::StatusOr<PinnedChunk> Pin(const peer::ChunkId& id);

 private:
  class Fold;
  // What the sender says of its step counts once its bytes did.
  void Learn(const peer::PushChunkHeader& header);

  StepStore* const store_;
  ParityStore* const parity_;
  Protector* const protector_;
};

}  // namespace ecsnap::daemon

#endif  // ECSNAP_DAEMON_PEER_CHUNK_INTAKE_H_
