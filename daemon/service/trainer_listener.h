// The data plane's Unix socket: admits trainer processes by their kernel
// credentials, then, by what each connection says it is for, gives it to the
// gRPC server or answers it with the descriptor of a granted window (see
// common/trainer_hello.h).
//
// Admission is SO_PEERCRED: the uid and primary gid the kernel recorded when
// the trainer connected, which the trainer cannot forge. The daemon's own uid
// is always admitted; others only when the config lists them
// (daemon.trainer_uids, daemon.trainer_gids). A refused process gets one
// sentence saying why and is disconnected; it never sees a gRPC byte.
//
// Each admitted connection gets a key that no later connection reuses, so a
// session can be bound to the connection that opened it (SnapshotService).
#ifndef ECSNAP_DAEMON_SERVICE_TRAINER_LISTENER_H_
#define ECSNAP_DAEMON_SERVICE_TRAINER_LISTENER_H_

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <vector>
#include <memory>
#include <set>
#include <string>
#include <thread>

#include <grpcpp/server.h>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/trainer_hello.h"
#include "common/unique_fd.h"
#include "daemon/store/arena.h"

namespace ecsnap::daemon {

struct TrainerPolicy {
  uid_t daemon_uid = 0;    // always admitted
  std::set<uint32_t> uids;  // also admitted
  std::set<uint32_t> gids;  // processes whose primary group is one of these

  // Empty when `uid`/`gid` may connect, else the sentence that says why not.
  std::string Refusal(pid_t pid, uid_t uid, gid_t gid) const;
};

// Connections one uid may hold open at once (a trainer process needs one):
// beyond, a flood from one user could take every descriptor of the daemon.
inline constexpr int kMaxConnectionsPerUid = 512;
// Admitted connections that have not yet said what they are for, and how
// long each may take to say it.
inline constexpr size_t kMaxPendingConnections = 256;
inline constexpr size_t kMaxPendingConnectionsPerUid = 32;
inline constexpr absl::Duration kRoleTimeout = absl::Seconds(2);

// Opens the window a token names for `uid` (WindowGrants::Fetch).
using WindowFetcher = std::function<absl::StatusOr<Arena::WindowFile>(const std::string& token,
                                                                       uid_t uid)>;

class TrainerListener {
 public:
  // Binds `path` (which must be free: see ClaimSocketPath) and listens.
  // `fetch` answers window requests; null shares no memory (trainers
  // stream over gRPC). The socket file is 0600 when only the daemon's uid
  // is admitted, 0666 when the policy names others (SO_PEERCRED is then the
  // gate).
  static absl::StatusOr<std::unique_ptr<TrainerListener>> Listen(const std::string& path,
                                                                 TrainerPolicy policy,
                                                                 WindowFetcher fetch);
  ~TrainerListener();

  // Accepts connections on a thread of its own and adds the admitted ones
  // to `server`, which must outlive Stop().
  void Serve(grpc::Server* server);
  // Stops accepting (at most ~100 ms) and removes the socket file, whether
  // or not Serve ran. Connections already handed to gRPC end with the server.
  void Stop();

  // The key of the connection a call came in on, from the call's peer
  // string: "fd:N" names a connection this listener admitted; any other
  // peer (a TCP data plane) is its own key.
  std::string ConnectionKey(const std::string& peer) const;

  // The uid a call's connection was admitted with, when it came through
  // this socket and is still open.
  std::optional<uint32_t> ConnectionUid(const std::string& peer) const;

  // Shuts down the connection `key` (a ConnectionKey, taken while a call
  // on it was live) names, when that very admission is still the one on its
  // descriptor (same generation, device and inode): gRPC then ends every
  // call on it, and the trainer's session with them. For a trainer that
  // stopped reading a stream: no keepalive ping passes the bytes it leaves
  // unread. False when the key names no such connection (any more), or a
  // connection that did not come through this socket.
  bool Cut(const std::string& key) const;

  // True when a call's peer string names a connection of this socket
  // (admitted by uid), as gRPC names connections it was handed: "fd:N".
  static bool IsSocketPeer(const std::string& peer) { return absl::StartsWith(peer, "fd:"); }

 private:
  // An admitted connection that has not yet said what it is for.
  struct Pending {
    UniqueFd conn;
    pid_t pid;
    uid_t uid;
    absl::Time deadline;
    size_t got = 0;
    char role[kTrainerRoleBytes];
  };

  TrainerListener(std::string path, TrainerPolicy policy, UniqueFd listen_fd, WindowFetcher fetch);
  void AcceptLoop(grpc::Server* server);
  // Sends the hello; an admitted connection joins `pending`.
  void Admit(UniqueFd conn, std::vector<Pending>* pending);
  // Reads what `p` has sent of its role; true when it is done with (handed
  // to gRPC, answered, or dropped).
  bool ReadRole(Pending& p, grpc::Server* server);
  void ServeWindow(Pending& p, const std::string& token);
  // Connections `uid` has open now; forgets the entries gRPC has closed.
  int LiveConnections(uid_t uid) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void LogRefusal(const std::string& why);

  const std::string path_;
  const TrainerPolicy policy_;
  const UniqueFd listen_fd_;
  const WindowFetcher fetch_;
  std::atomic<bool> stop_{false};
  std::thread thread_;

  mutable absl::Mutex mu_;
  struct Admitted {
    uint64_t generation;  // a counter: no two admissions share one
    uid_t uid;
    dev_t device;  // of the socket: with the inode, tells whether the
    ino_t inode;   // number still names it
  };
  // N of a call's peer string "fd:N" (a connection of this socket).
  static std::optional<int> SocketFd(const std::string& peer);
  // The admission of the connection on descriptor `fd`, if any.
  std::optional<Admitted> AdmittedOn(int fd) const;
  // Live connections (and, until noticed, some that gRPC closed), by
  // descriptor number.
  std::map<int, Admitted> admitted_fds_ ABSL_GUARDED_BY(mu_);
  uint64_t next_generation_ ABSL_GUARDED_BY(mu_) = 1;
  // Refusals are logged at most once a second, with a count of the rest.
  absl::Time last_refusal_log_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
  uint64_t refusals_unlogged_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace ecsnap::daemon

#endif  // ECSNAP_DAEMON_SERVICE_TRAINER_LISTENER_H_
