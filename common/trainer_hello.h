// The first bytes on a trainer's Unix-socket connection to ecsnapd, before
// any gRPC: the daemon's answer to who the connecting process is.
//
//   daemon                                   trainer
//   accept(); SO_PEERCRED -> pid, uid, gid
//   allowed?  ---- Hello{ok, arena bytes} + SCM_RIGHTS(arena fd) --->  maps the arena
//             ---- Hello{refused, "why"} ---> close                    reports "why"
//   then HTTP/2 (gRPC) on the same socket, both sides.
//
// Passing the arena's descriptor means the arena file itself stays 0600 and
// owned by the daemon: a process reaches the trainers' shared memory only
// through an admitted connection, never by opening a path.
#ifndef ECSNAP_COMMON_TRAINER_HELLO_H_
#define ECSNAP_COMMON_TRAINER_HELLO_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/unique_fd.h"

namespace ecsnap {

// Longest refusal text sent; longer ones are cut.
inline constexpr size_t kHelloMaxMessageBytes = 1024;

struct TrainerHello {
  bool admitted = false;
  // Why the connection was refused (admitted == false); empty otherwise.
  std::string message;
  // Size of the arena behind `arena_fd`; 0 when the daemon shares none.
  uint64_t arena_bytes = 0;
  // The arena's shared-memory file, read-write; invalid when none is shared.
  UniqueFd arena_fd;
};

// Sends `hello` on the connected socket `sock` (blocking, at most `timeout`).
// With `arena_fd` >= 0 and an admitted hello, the descriptor travels with it.
absl::Status SendTrainerHello(int sock, const TrainerHello& hello, int arena_fd,
                              absl::Duration timeout);

// Reads exactly one hello from `sock`, no byte more, waiting at most
// `timeout`. UNAVAILABLE when the daemon sent nothing or closed the socket;
// DATA_LOSS when the bytes are not a hello of this version (not an ecsnapd,
// or a different release).
absl::StatusOr<TrainerHello> ReceiveTrainerHello(int sock, absl::Duration timeout);

}  // namespace ecsnap

#endif  // ECSNAP_COMMON_TRAINER_HELLO_H_
