// Parallel copies with CRC-32C, for moving tensors in and out of the arena.
#ifndef ECSNAP_CLIENT_COPY_H_
#define ECSNAP_CLIENT_COPY_H_

#include <atomic>
#include <cstdint>
#include <vector>

namespace ecsnap::client_internal {

struct CopyTask {
  uint8_t* dst = nullptr;
  const uint8_t* src = nullptr;
  uint64_t bytes = 0;
  uint32_t crc = 0;  // out: CRC-32C of the bytes copied
};

// Copies every task, computing each task's CRC-32C on the way (block by
// block, while the block is still in cache). Tasks are spread over up to
// `threads` threads, each task whole on one thread. `progress`, if given,
// grows by the bytes copied as they are copied.
void CopyAll(std::vector<CopyTask>& tasks, int threads, std::atomic<uint64_t>* progress);

}  // namespace ecsnap::client_internal

#endif  // ECSNAP_CLIENT_COPY_H_
