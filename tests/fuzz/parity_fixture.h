// What the fuzz targets of the peer plane share (parity_fold_fuzz,
// peer_message_fuzz): a group shape chosen by one input byte, an arena of
// their own under TEST_TMPDIR (the fuzz runner's work directory) removed
// when done, and a check that aborts with a sentence.
#ifndef ECSNAP_TESTS_FUZZ_PARITY_FIXTURE_H_
#define ECSNAP_TESTS_FUZZ_PARITY_FIXTURE_H_

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>

#include "daemon/store/arena.h"
#include "ec/codec.h"
#include "ec/layout.h"

namespace ecsnap::fuzz {

inline void Check(bool ok, const char* target, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "%s: %s\n", target, what);
    std::abort();
  }
}

// RS(k, m) and this slot's group position, from one byte: k 1-4, m 1-3.
struct Group {
  std::unique_ptr<ec::Layout> layout;
  std::unique_ptr<ec::Codec> codec;
  int self = 0;

  static std::optional<Group> FromByte(uint8_t b) {
    const int k = 1 + b % 4, m = 1 + (b / 4) % 3;
    auto layout = ec::Layout::Create(k, m);
    auto codec = ec::Codec::Create(k, m);
    if (!layout.ok() || !codec.ok()) return std::nullopt;
    Group g;
    g.layout = std::make_unique<ec::Layout>(*std::move(layout));
    g.codec = *std::move(codec);
    g.self = (b / 16) % g.layout->n();
    return g;
  }
};

// A 2 MiB arena of this input's own, removed with this object.
class ScratchArena {
 public:
  explicit ScratchArena(const char* target) {
    const char* tmp = std::getenv("TEST_TMPDIR");
    dir_ = std::string(tmp != nullptr ? tmp : "/tmp") + "/ecsnap-" + target + "-" +
           std::to_string(::getpid());
    std::filesystem::remove_all(dir_);
    daemon::Arena::Options o;
    o.dir = dir_;
    o.bytes = 2 << 20;
    o.index_entries = 32;
    auto arena = daemon::Arena::Open(o);
    Check(arena.ok(), target, "the arena did not open");
    arena_ = *std::move(arena);
    free_at_start_ = arena_->free_bytes();
  }
  ~ScratchArena() {
    arena_.reset();
    std::filesystem::remove_all(dir_);
  }
  daemon::Arena* get() const { return arena_.get(); }
  daemon::Arena* operator->() const { return arena_.get(); }
  // Every byte free again, as at the start.
  bool AllFree() const { return arena_->free_bytes() == free_at_start_; }

 private:
  std::string dir_;
  std::unique_ptr<daemon::Arena> arena_;
  uint64_t free_at_start_ = 0;
};

}  // namespace ecsnap::fuzz

#endif  // ECSNAP_TESTS_FUZZ_PARITY_FIXTURE_H_
