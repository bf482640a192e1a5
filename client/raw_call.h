// A gRPC call whose messages are raw byte buffers (common/bulk_message.h),
// each operation driven to its completion on the call's own completion
// queue: the synchronous API's shape over the generic stub, for the data
// plane's bulk streams, whose payloads must not be copied into messages.
#ifndef ECSNAP_CLIENT_RAW_CALL_H_
#define ECSNAP_CLIENT_RAW_CALL_H_

#include <functional>
#include <memory>
#include <string>

#include <grpcpp/channel.h>
#include <grpcpp/client_context.h>
#include <grpcpp/completion_queue.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/support/byte_buffer.h>

#include "absl/time/time.h"

namespace ecsnap::client_internal {

// When an operation of a RawCall has not completed within `limit`,
// `on_stall` is called once (it must end the connection under the call: a
// peer that stopped reading otherwise holds a write forever) and the
// operation is waited for on. Null `on_stall`: no limit.
struct StallGuard {
  absl::Duration limit = absl::InfiniteDuration();
  std::function<void()> on_stall;
};

class RawCall {
 public:
  // Starts `method` ("/package.Service/Method") on `channel`, the start
  // itself under `guard`; `context` must outlive the call. A call that could
  // not start fails its first operation and Finish says why.
  RawCall(const std::shared_ptr<grpc::Channel>& channel, grpc::ClientContext* context,
          const std::string& method, StallGuard guard = {});
  // Cancels a call that was not finished and waits for gRPC to let go of it.
  ~RawCall();
  RawCall(const RawCall&) = delete;
  RawCall& operator=(const RawCall&) = delete;

  // Each false once the stream is broken (Finish has the status).
  bool Write(const grpc::ByteBuffer& message);
  bool WritesDone();
  bool Read(grpc::ByteBuffer* message);
  // The call's status, after the last Read or Write (later calls return it
  // again).
  grpc::Status Finish();

 private:
  bool Await();

  grpc::ClientContext* context_;
  grpc::CompletionQueue cq_;
  grpc::GenericStub stub_;
  std::unique_ptr<grpc::GenericClientAsyncReaderWriter> call_;
  bool started_ = false;
  bool finished_ = false;
  grpc::Status status_;
  const absl::Duration stall_limit_;
  std::function<void()> on_stall_;
};

}  // namespace ecsnap::client_internal

#endif  // ECSNAP_CLIENT_RAW_CALL_H_
