// libecsnap built without CUDA: device tensors are refused with a sentence
// saying how to build the library that takes them.
#include "client/cuda/device_copy.h"

namespace ecsnap::client_internal {

bool DeviceCopier::Built() { return false; }

absl::StatusOr<std::unique_ptr<DeviceCopier>> DeviceCopier::Create() {
  return absl::UnimplementedError(
      "this libecsnap was built without CUDA, so it cannot copy device tensors; build it with "
      "`bazel build --config=cuda` (needs /usr/local/cuda), or pass host tensors");
}

}  // namespace ecsnap::client_internal
