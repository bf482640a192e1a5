// PeerTransport: the one seam through which chunk bytes move between the
// daemons of a group (DESIGN.md §4). Control messages (inventories, row and
// job notices, pings) stay on the gRPC peer plane; what crosses this seam is
// the bulk: a data chunk pushed to a parity holder, and a byte range of a
// chunk read back for a rebuild.
//
// Bytes leave from arena or parity memory and land in the caller's memory
// (a fold, a decode buffer); no implementation copies them through protobuf
// messages except the gRPC one, which exists for the encrypted setting.
//
// Implementations:
//   GrpcTransport (grpc_transport.h)  bytes inside the gRPC peer streams,
//                                     encrypted by the plane's mutual TLS
//   TcpTransport  (tcp_transport.h)   one plain TCP connection per transfer,
//                                     admitted by a one-time token the holder
//                                     issues over the gRPC control channel
//   RDMA  (rdma_transport.h, inside  RC writes into registered slots the
//         TcpTransport)              receiving side lends, opened as for TCP;
//                                    TCP to holders without a device
//
// Calls block the calling thread (the protector's pusher of that holder, a
// rebuild fetch on the daemon's executor) and are cut by the protector's
// CallWatchdog when they stop making progress, or when the daemon stops.
// Thread-safe.
#ifndef ECSNAP_DAEMON_PEER_TRANSPORT_H_
#define ECSNAP_DAEMON_PEER_TRANSPORT_H_

#include <cstdint>
#include <functional>

#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "proto/peer.pb.h"

namespace ecsnap::daemon {

// The bytes of one chunk, in order: calls `piece` with each contiguous span
// (a rank window's part of the chunk), and stops early once it returns false.
using ChunkBytes = std::function<void(const std::function<bool(absl::Span<const uint8_t>)>& piece)>;

// Where a pushed chunk's bytes go on its holder (a fold into a parity row),
// fed in order by whichever transport carries them.
class ChunkSink {
 public:
  virtual ~ChunkSink() = default;
  // The next bytes. An error ends the push (the sink is then aborted).
  virtual absl::Status Piece(absl::Span<const uint8_t> data) = 0;
  // Every byte arrived: checks length and CRC. True when the stripe is
  // complete with this chunk.
  virtual absl::StatusOr<bool> End() = 0;
  // The push broke off before its last byte.
  virtual void Abort() = 0;
};

// A chunk's bytes on the slot that keeps them, pinned for as long as this
// lives (a retired step's memory is not reused under a read).
struct PinnedChunk {
  uint64_t length = 0;
  uint32_t crc32c = 0;  // a parity row's; 0 for a data chunk
  // Calls `piece` with the bytes of [offset, offset + length), in order.
  std::function<void(uint64_t offset, uint64_t length,
                     const std::function<bool(absl::Span<const uint8_t>)>& piece)>
      read;
};

// A byte range of a chunk being read from its holder, in order. Not
// thread-safe; closes its stream when destroyed.
class ChunkReader {
 public:
  virtual ~ChunkReader() = default;
  // Reads exactly `into.size()` bytes (at most remaining()). DATA_LOSS when
  // the stream ends early; the reader is then spent.
  virtual absl::Status Read(absl::Span<uint8_t> into) = 0;
  // Bytes of the range not read yet.
  virtual uint64_t remaining() const = 0;
};

class PeerTransport {
 public:
  virtual ~PeerTransport() = default;

  // Short name for logs and status ("tcp", "grpc").
  virtual const char* name() const = 0;

  // Pushes the chunk `header` names (its length, CRC and the sender's shape
  // included) to group position `holder`, which folds it into its parity
  // row. Returns true when the holder's stripe is complete with it. Errors
  // carry the holder's status: FAILED_PRECONDITION and NOT_FOUND are
  // permanent (the step is retired or abandoned there), the rest are retried.
  virtual absl::StatusOr<bool> Push(int holder, const peer::PushChunkHeader& header,
                                    const ChunkBytes& bytes) = 0;

  // Opens `request`'s byte range of a chunk on group position `holder` (the
  // holder checks and pins it first), to be read in order: a rebuild reads
  // its k survivors in lockstep, a slice of each at a time, over one stream
  // each. Between reads nothing cuts the stream here; the holder cuts one
  // that its reader leaves full for its peer timeout.
  virtual absl::StatusOr<std::unique_ptr<ChunkReader>> OpenRead(
      int holder, const peer::GetChunkRequest& request) = 0;

};

}  // namespace ecsnap::daemon

#endif  // ECSNAP_DAEMON_PEER_TRANSPORT_H_
