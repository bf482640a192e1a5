// Test helpers of the bulk transports' tests: a chunk sink that records
// what it is fed and how it ended, and seeded random bytes.
#ifndef ECSNAP_DAEMON_PEER_TESTING_SINK_H_
#define ECSNAP_DAEMON_PEER_TESTING_SINK_H_

#include <atomic>
#include <random>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "daemon/peer/transport.h"

namespace ecsnap::daemon::testing {

// A sink that keeps what it is fed, and how it ended.
struct Record {
  absl::Mutex mu;
  std::string bytes_ ABSL_GUARDED_BY(mu);
  std::string bytes() {
    absl::MutexLock lock(&mu);
    return bytes_;
  }
  std::atomic<int> ended{0};
  std::atomic<int> aborted{0};
  absl::Status refuse_at_piece;  // returned from the second piece on
};

class RecordingSink final : public ChunkSink {
 public:
  explicit RecordingSink(Record* r) : r_(r) {}
  ~RecordingSink() override {
    if (!done_) ++r_->aborted;
  }
  absl::Status Piece(absl::Span<const uint8_t> data) override {
    absl::MutexLock lock(&r_->mu);
    if (!r_->refuse_at_piece.ok() && !r_->bytes_.empty()) {
      Abort();
      return r_->refuse_at_piece;
    }
    r_->bytes_.append(reinterpret_cast<const char*>(data.data()), data.size());
    return absl::OkStatus();
  }
  absl::StatusOr<bool> End() override {
    done_ = true;
    ++r_->ended;
    return true;
  }
  void Abort() override {
    if (done_) return;
    done_ = true;
    ++r_->aborted;
  }

 private:
  Record* const r_;
  bool done_ = false;
};

inline std::string RandomBytes(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::string s(n, '\0');
  for (char& c : s) c = static_cast<char>(rng());
  return s;
}

}  // namespace ecsnap::daemon::testing

#endif  // ECSNAP_DAEMON_PEER_TESTING_SINK_H_
