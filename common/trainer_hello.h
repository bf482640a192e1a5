// The first bytes on a trainer's Unix-socket connection to ecsnapd, before
// any gRPC: the daemon's answer to who the connecting process is, and the
// trainer's answer to what the connection is for.
//
//   daemon                                   trainer
//   accept(); SO_PEERCRED -> pid, uid, gid
//   allowed?  ---- Hello{ok, windows} ---->
//                                  <---- Role{grpc}: HTTP/2 (gRPC) follows
//                                  <---- Role{window, token}
//             ---- Hello{ok, bytes} + SCM_RIGHTS(window fd) --->  maps it
//                  (or Hello{refused, "why"}), then close
//   refused?  ---- Hello{refused, "why"} ---> close               reports it
//
// A trainer receives the descriptor of each window it was granted, on a
// connection of its own, by presenting the single-use token the grant came
// with: the window files stay 0600 and owned by the daemon, and a process
// reaches shared memory only through an admitted connection, never by
// opening a path, and only the windows granted to it.
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

// Bytes of a window token.
inline constexpr size_t kWindowTokenBytes = 16;

struct TrainerHello {
  bool admitted = false;
  // Why the connection (or the window asked for) was refused; empty otherwise.
  std::string message;
  // First hello: the daemon hands out windows (else trainers stream over
  // gRPC).
  bool windows = false;
  // First hello: the daemon takes a trainer's keepalive pings (as often as
  // every second, common/data_plane_http2.h). A daemon of an earlier release
  // sends no such flag, and would close a connection that pings it often.
  bool pings = false;
  // A window reply: the size of the file behind `fd`.
  uint64_t fd_bytes = 0;
  // A window reply: the window's file, read-write or read-only.
  UniqueFd fd;
};

// Sends `hello` on the connected socket `sock` (blocking, at most `timeout`).
// With `fd` >= 0 and an admitted hello, the descriptor travels with it.
absl::Status SendTrainerHello(int sock, const TrainerHello& hello, int fd,
                              absl::Duration timeout);

// Reads exactly one hello from `sock`, no byte more, waiting at most
// `timeout`. UNAVAILABLE when the daemon sent nothing or closed the socket;
// DATA_LOSS when the bytes are not a hello of this version (not an ecsnapd,
// or a different release).
absl::StatusOr<TrainerHello> ReceiveTrainerHello(int sock, absl::Duration timeout);

// What a trainer's connection is for, sent right after the daemon's hello.
struct TrainerRole {
  enum class Kind : uint32_t { kGrpc = 1, kWindow = 2 };
  Kind kind = Kind::kGrpc;
  std::string token;  // kWindow: the grant's kWindowTokenBytes bytes
};

// Bytes of a role on the wire.
inline constexpr size_t kTrainerRoleBytes = 32;

// Sends `role` (blocking, at most `timeout`).
absl::Status SendTrainerRole(int sock, const TrainerRole& role, absl::Duration timeout);
// Parses exactly kTrainerRoleBytes bytes; DATA_LOSS when they are not a role.
absl::StatusOr<TrainerRole> ParseTrainerRole(const char* bytes);

}  // namespace ecsnap

#endif  // ECSNAP_COMMON_TRAINER_HELLO_H_
