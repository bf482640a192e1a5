// Single-use tokens by which a trainer fetches the descriptor of a window it
// was granted (common/trainer_hello.h).
//
// BeginRank and Restore answer with a token; the trainer presents it on a
// connection of its own and receives the window's file. A token is valid
// once, for kGrantTtl, for the uid that was granted the window, and only
// while the same file is still the window at that extent: a token kept past
// a retirement, or shown by another user, gets nothing.
#ifndef ECSNAP_DAEMON_STORE_WINDOW_GRANTS_H_
#define ECSNAP_DAEMON_STORE_WINDOW_GRANTS_H_

#include <sys/types.h>

#include <cstdint>
#include <map>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "daemon/store/arena.h"

namespace ecsnap::daemon {

inline constexpr absl::Duration kGrantTtl = absl::Seconds(60);
// Tokens outstanding at once, and per uid; beyond, the oldest of the uid
// that holds the most are forgotten, so one user's churn cannot push out
// another's tokens.
inline constexpr size_t kMaxOutstandingGrants = 4096;
inline constexpr size_t kMaxOutstandingGrantsPerUid = 1024;

class WindowGrants {
 public:
  struct Grant {
    std::string token;  // kWindowTokenBytes random bytes
    uint64_t file_id = 0;
  };

  // `arena` must outlive this object. A token is good for `ttl`.
  explicit WindowGrants(const Arena* arena, absl::Duration ttl = kGrantTtl)
      : arena_(arena), ttl_(ttl) {}

  // A token for `uid` to fetch the window at `extent` once. NOT_FOUND when
  // no window is in use there (with `spare`: no spare, made ahead of its
  // step by Arena::PrepareWindow).
  absl::StatusOr<Grant> Issue(const ArenaExtent& extent, bool writable, uid_t uid,
                              bool spare = false);
  // The window a token names, read-write if it was granted so. Consumes the
  // token. PERMISSION_DENIED for another uid (the token is not consumed);
  // NOT_FOUND for an unknown, used or expired token, or a window retired
  // since.
  absl::StatusOr<Arena::WindowFile> Fetch(const std::string& token, uid_t uid);

  size_t outstanding() const;

 private:
  struct Entry {
    ArenaExtent extent;
    uint64_t file_id;
    bool writable;
    bool spare;
    uid_t uid;
    absl::Time expires;
    uint64_t order;  // issue order, for forgetting the oldest
  };
  void ExpireLocked(absl::Time now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const Arena* const arena_;
  const absl::Duration ttl_;
  mutable absl::Mutex mu_;
  std::map<std::string, Entry> grants_ ABSL_GUARDED_BY(mu_);
  uint64_t next_order_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace ecsnap::daemon

#endif  // ECSNAP_DAEMON_STORE_WINDOW_GRANTS_H_
