// The windows of the daemon's arena that a client has mapped (DESIGN.md §9:
// each window is a file of its own, fetched by a single-use token over the
// data socket). A rank cycles through a few windows; their mappings are kept
// between steps (up to kMaxMapped), so that the pages stay warm, and a window
// the daemon makes ready ahead is mapped and written once in the background.
//
// Thread-safe. Mappings are shared: one in use survives its eviction.
#ifndef ECSNAP_CLIENT_WINDOW_CACHE_H_
#define ECSNAP_CLIENT_WINDOW_CACHE_H_

#include <atomic>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/unique_fd.h"

namespace ecsnap::client_internal {

// A window file, mapped.
struct MappedWindow {
  UniqueFd fd;
  Mapping map;
  bool writable = false;
  // Its registration with CUDA (client/cuda), dropped before the mapping
  // goes (members are destroyed last to first).
  std::shared_ptr<void> pinned;
};

class WindowCache {
 public:
  static constexpr size_t kMaxMapped = 16;

  // `address`: the daemon's data socket; `timeout` bounds each fetch.
  WindowCache(std::string address, absl::Duration timeout);
  // Stops the background work (at its next page) and joins it.
  ~WindowCache();
  WindowCache(const WindowCache&) = delete;
  WindowCache& operator=(const WindowCache&) = delete;

  // The mapping of window file `file`, of at least `need` bytes: the one
  // held from an earlier step, or the file fetched with `token` (which a
  // grant carries each time) and mapped. Files the daemon has let go of
  // (unlinked) are unmapped here, so their memory is not held.
  absl::StatusOr<std::shared_ptr<MappedWindow>> Get(uint64_t file, const std::string& token,
                                                    uint64_t need, bool writable);

  // Queues window `file` (granted under `token`) to be mapped and written
  // once in the background, unless it is held or queued already.
  void Warm(uint64_t file, std::string token);

  // Copies in progress: the background writes pause while it is not zero.
  std::atomic<int>& copying() { return copying_; }

 private:
  struct Cached {
    std::shared_ptr<MappedWindow> window;
    uint64_t last_use = 0;
  };

  absl::StatusOr<std::shared_ptr<MappedWindow>> Map(const std::string& token, uint64_t need,
                                                    bool writable);
  void Remember(uint64_t file, std::shared_ptr<MappedWindow> w);
  void WarmLoop();

  const std::string address_;
  const absl::Duration timeout_;
  std::atomic<int> copying_{0};
  std::atomic<bool> stopping_touch_{false};

  absl::Mutex mu_;
  std::map<uint64_t, Cached> windows_ ABSL_GUARDED_BY(mu_);  // by file id
  uint64_t uses_ ABSL_GUARDED_BY(mu_) = 0;
  std::deque<std::pair<uint64_t, std::string>> queue_ ABSL_GUARDED_BY(mu_);
  std::set<uint64_t> warming_ ABSL_GUARDED_BY(mu_);  // queued or being mapped
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread warmer_;  // started on the first Warm
};

}  // namespace ecsnap::client_internal

#endif  // ECSNAP_CLIENT_WINDOW_CACHE_H_
