#include "client/copy.h"

#include <algorithm>
#include <cstring>
#include <numeric>
#include <thread>

#include "absl/types/span.h"
#include "ec/crc32c.h"

namespace ecsnap::client_internal {
namespace {

// Small enough that a copied block is still in L2 when it is checksummed.
constexpr uint64_t kBlockBytes = 256 << 10;

void CopyOne(CopyTask& t, std::atomic<uint64_t>* progress) {
  uint32_t crc = 0;
  for (uint64_t done = 0; done < t.bytes; done += kBlockBytes) {
    const uint64_t n = std::min(kBlockBytes, t.bytes - done);
    std::memcpy(t.dst + done, t.src + done, n);
    crc = ec::Crc32c(absl::Span<const uint8_t>(t.dst + done, n), crc);
    if (progress) progress->fetch_add(n, std::memory_order_relaxed);
  }
  t.crc = crc;
}

}  // namespace

void CopyAll(std::vector<CopyTask>& tasks, int threads, std::atomic<uint64_t>* progress) {
  threads = std::max(1, std::min<int>(threads, static_cast<int>(tasks.size())));
  if (threads == 1) {
    for (CopyTask& t : tasks) CopyOne(t, progress);
    return;
  }
  // Largest first onto the least loaded thread.
  std::vector<size_t> order(tasks.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(),
            [&](size_t a, size_t b) { return tasks[a].bytes > tasks[b].bytes; });
  std::vector<std::vector<size_t>> share(threads);
  std::vector<uint64_t> load(threads, 0);
  for (size_t i : order) {
    const int t = static_cast<int>(std::min_element(load.begin(), load.end()) - load.begin());
    share[t].push_back(i);
    load[t] += tasks[i].bytes;
  }
  auto run = [&](int t) {
    for (size_t i : share[t]) CopyOne(tasks[i], progress);
  };
  std::vector<std::thread> helpers;
  for (int t = 1; t < threads; ++t) helpers.emplace_back(run, t);
  run(0);
  for (auto& h : helpers) h.join();
}

}  // namespace ecsnap::client_internal
