// Runs work items of known sizes on a few threads, each item whole on one
// thread: largest first onto the least loaded thread. For copying and
// checksumming tensors, where an item cannot be split (its CRC-32C is one
// running value) but items vary a thousandfold in size.
#ifndef ECSNAP_COMMON_BALANCED_FOR_H_
#define ECSNAP_COMMON_BALANCED_FOR_H_

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <thread>
#include <vector>

#include "absl/types/span.h"

namespace ecsnap {

// Calls fn(i) once for every i in [0, bytes.size()), on up to `threads`
// threads (the caller's among them); returns when all calls have returned.
// fn must be safe to call from several threads for different i.
template <typename Fn>
void BalancedFor(absl::Span<const uint64_t> bytes, int threads, Fn&& fn) {
  const size_t n = bytes.size();
  threads = std::max(1, std::min<int>(threads, static_cast<int>(n)));
  if (threads == 1) {
    for (size_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return bytes[a] > bytes[b]; });
  std::vector<std::vector<size_t>> share(threads);
  std::vector<uint64_t> load(threads, 0);
  for (size_t i : order) {
    const size_t t = std::min_element(load.begin(), load.end()) - load.begin();
    share[t].push_back(i);
    load[t] += bytes[i];
  }
  auto run = [&](int t) {
    for (size_t i : share[t]) fn(i);
  };
  std::vector<std::thread> helpers;
  for (int t = 1; t < threads; ++t) helpers.emplace_back(run, t);
  run(0);
  for (auto& h : helpers) h.join();
}

}  // namespace ecsnap

#endif  // ECSNAP_COMMON_BALANCED_FOR_H_
