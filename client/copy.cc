#include "client/copy.h"

#include <algorithm>
#include <cstring>

#include "absl/types/span.h"
#include "common/balanced_for.h"
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
  std::vector<uint64_t> bytes;
  for (const CopyTask& t : tasks) bytes.push_back(t.bytes);
  BalancedFor(bytes, threads, [&](size_t i) { CopyOne(tasks[i], progress); });
}

}  // namespace ecsnap::client_internal
