#include "daemon/store/window_grants.h"

#include <openssl/rand.h>

#include <algorithm>

#include "absl/strings/str_format.h"
#include "common/trainer_hello.h"

namespace ecsnap::daemon {

absl::StatusOr<WindowGrants::Grant> WindowGrants::Issue(const ArenaExtent& extent, bool writable,
                                                        uid_t uid, bool spare) {
  absl::StatusOr<uint64_t> file_id = arena_->WindowFileId(extent, spare);
  if (!file_id.ok()) return file_id.status();
  Grant g;
  g.file_id = *file_id;
  g.token.resize(kWindowTokenBytes);
  if (RAND_bytes(reinterpret_cast<unsigned char*>(g.token.data()), kWindowTokenBytes) != 1) {
    return absl::InternalError("the system's random generator failed");
  }
  absl::MutexLock lock(&mu_);
  const absl::Time now = absl::Now();
  ExpireLocked(now);
  std::map<uid_t, size_t> per_uid;
  for (const auto& [token, e] : grants_) ++per_uid[e.uid];
  while (per_uid[uid] >= kMaxOutstandingGrantsPerUid || grants_.size() >= kMaxOutstandingGrants) {
    uid_t victim = uid;
    if (per_uid[uid] < kMaxOutstandingGrantsPerUid) {
      victim = std::max_element(per_uid.begin(), per_uid.end(), [](const auto& a, const auto& b) {
                 return a.second < b.second;
               })->first;
    }
    auto oldest = grants_.end();
    for (auto it = grants_.begin(); it != grants_.end(); ++it) {
      if (it->second.uid == victim && (oldest == grants_.end() || it->second.order < oldest->second.order)) {
        oldest = it;
      }
    }
    if (oldest == grants_.end()) break;
    grants_.erase(oldest);
    --per_uid[victim];
  }
  grants_[g.token] = Entry{extent, g.file_id, writable, spare, uid, now + ttl_, next_order_++};
  return g;
}

absl::StatusOr<Arena::WindowFile> WindowGrants::Fetch(const std::string& token, uid_t uid) {
  Entry e;
  {
    absl::MutexLock lock(&mu_);
    ExpireLocked(absl::Now());
    auto it = grants_.find(token);
    if (it == grants_.end()) {
      return absl::NotFoundError(
          "no window is granted under this token (unknown, used, or older than a minute)");
    }
    if (it->second.uid != uid) {
      return absl::PermissionDeniedError(absl::StrFormat(
          "this window was granted to uid %d, not to uid %d", it->second.uid, uid));
    }
    e = it->second;
    grants_.erase(it);
  }
  return arena_->OpenWindow(e.extent, e.file_id, e.writable, e.spare);
}

size_t WindowGrants::outstanding() const {
  absl::MutexLock lock(&mu_);
  return grants_.size();
}

void WindowGrants::ExpireLocked(absl::Time now) {
  for (auto it = grants_.begin(); it != grants_.end();) {
    it = it->second.expires <= now ? grants_.erase(it) : std::next(it);
  }
}

}  // namespace ecsnap::daemon
