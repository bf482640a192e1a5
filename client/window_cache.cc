#include "client/window_cache.h"

#include <sys/mman.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <tuple>

#include "absl/strings/str_format.h"
#include "client/data_channel.h"
#include "common/prefault.h"

namespace ecsnap::client_internal {

WindowCache::WindowCache(std::string address, absl::Duration timeout)
    : address_(std::move(address)), timeout_(timeout) {}

WindowCache::~WindowCache() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  stopping_touch_ = true;
  if (warmer_.joinable()) warmer_.join();
}

absl::StatusOr<std::shared_ptr<MappedWindow>> WindowCache::Get(uint64_t file,
                                                               const std::string& token,
                                                               uint64_t need, bool writable) {
  {
    absl::MutexLock lock(&mu_);
    // A window being made ready in the background is the one to use: wait
    // for its mapping (not for its first stores).
    auto ready = [this, file]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return warming_.count(file) == 0;
    };
    mu_.AwaitWithTimeout(absl::Condition(&ready), timeout_);
    for (auto it = windows_.begin(); it != windows_.end();) {
      struct stat st {};
      const bool gone = ::fstat(it->second.window->fd.get(), &st) != 0 || st.st_nlink == 0;
      it = gone ? windows_.erase(it) : std::next(it);
    }
    auto it = windows_.find(file);
    if (it != windows_.end() && (it->second.window->writable || !writable) &&
        it->second.window->map.size() >= need) {
      it->second.last_use = ++uses_;
      return it->second.window;
    }
  }
  auto w = Map(token, need, writable);
  if (!w.ok()) return w.status();
  Remember(file, *w);
  return w;
}

absl::StatusOr<std::shared_ptr<MappedWindow>> WindowCache::Map(const std::string& token,
                                                               uint64_t need, bool writable) {
  auto fetched = FetchWindow(address_, token, timeout_);
  if (!fetched.ok()) return fetched.status();
  if (fetched->bytes < need) {
    return absl::DataLossError(absl::StrFormat(
        "ecsnapd sent a window of %d bytes for %d bytes of data", fetched->bytes, need));
  }
  const int prot = writable ? PROT_READ | PROT_WRITE : PROT_READ;
  void* addr = ::mmap(nullptr, fetched->bytes, prot, MAP_SHARED | (writable ? 0 : MAP_POPULATE),
                      fetched->fd.get(), 0);
  if (addr == MAP_FAILED) {
    return absl::UnavailableError(
        absl::StrFormat("cannot map a window of the daemon: %s", std::strerror(errno)));
  }
  auto w = std::make_shared<MappedWindow>();
  w->fd = std::move(fetched->fd);
  w->map = Mapping(addr, fetched->bytes);
  w->writable = writable;
  // Populated for writing now, so that the copy does not stop at each page
  // (see common/prefault.h); a rank's next steps reuse the mapping.
  if (writable) {
    if (const int err = PopulateForWrite(addr, fetched->bytes); err != 0) {
      return absl::ResourceExhaustedError(
          absl::StrFormat("cannot populate a window of the daemon: %s", std::strerror(err)));
    }
  }
  return w;
}

void WindowCache::Remember(uint64_t file, std::shared_ptr<MappedWindow> w) {
  absl::MutexLock lock(&mu_);
  windows_[file] = Cached{std::move(w), ++uses_};
  while (windows_.size() > kMaxMapped) {
    auto oldest = std::min_element(windows_.begin(), windows_.end(),
                                   [](const auto& a, const auto& b) {
                                     return a.second.last_use < b.second.last_use;
                                   });
    windows_.erase(oldest);
  }
}

void WindowCache::Warm(uint64_t file, std::string token) {
  absl::MutexLock lock(&mu_);
  if (stopping_ || windows_.count(file) != 0 || warming_.count(file) != 0) return;
  warming_.insert(file);
  queue_.emplace_back(file, std::move(token));
  if (!warmer_.joinable()) warmer_ = std::thread([this] { WarmLoop(); });
}

// Maps each queued window and writes each of its pages once (see
// common/prefault.h), pausing while a snapshot or restore copies.
void WindowCache::WarmLoop() {
  while (true) {
    uint64_t file;
    std::string token;
    {
      absl::MutexLock lock(&mu_);
      auto has_work = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return stopping_ || !queue_.empty();
      };
      mu_.Await(absl::Condition(&has_work));
      if (stopping_) return;
      std::tie(file, token) = std::move(queue_.front());
      queue_.pop_front();
    }
    auto w = Map(token, 0, /*writable=*/true);
    if (w.ok()) Remember(file, *w);
    {
      absl::MutexLock lock(&mu_);
      warming_.erase(file);
    }
    if (w.ok()) TouchForWrite((*w)->map.data(), (*w)->map.size(), &stopping_touch_, &copying_);
  }
}

}  // namespace ecsnap::client_internal
