// HTTP/2 settings of the gRPC data plane (trainer <-> daemon, for trainers
// that stream their bytes instead of writing the arena). Both sides set the
// same: large frames, so that a 1 MiB chunk is not cut into 16 KiB frames,
// and a 4 MiB stream window and write buffer, so that a stream is not held
// to the default 64 KiB window; no BDP probing, so that the window stays at
// 4 MiB and the bytes a stream buffers stay bounded on both sides. (A 1 GiB
// restore over the Unix socket: 2.2 s with them, 6.2-6.4 s without, same
// machine, before the bulk messages went raw.)
#ifndef ECSNAP_COMMON_DATA_PLANE_HTTP2_H_
#define ECSNAP_COMMON_DATA_PLANE_HTTP2_H_

#include <grpc/grpc.h>

namespace ecsnap {

struct Http2Setting {
  const char* key;
  int value;
};

inline constexpr Http2Setting kDataPlaneHttp2[] = {
    {GRPC_ARG_HTTP2_MAX_FRAME_SIZE, (1 << 24) - 1},
    {GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 4 << 20},
    {GRPC_ARG_HTTP2_WRITE_BUFFER_SIZE, 4 << 20},
    {GRPC_ARG_HTTP2_BDP_PROBE, 0},
};

// A trainer pings a silent daemon (ClientOptions::keepalive_ms) so that a
// daemon that stopped answering (SIGSTOP, a hung host) fails the calls in
// flight instead of holding a snapshot's Wait forever; the daemon accepts
// pings as often as this, with or without calls in flight, and a client
// refuses a keepalive below it (the daemon would close the connection for
// pinging too often).
inline constexpr int kMinKeepaliveMs = 1000;

}  // namespace ecsnap

#endif  // ECSNAP_COMMON_DATA_PLANE_HTTP2_H_
