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

class RawCall {
 public:
  // Starts `method` ("/package.Service/Method") on `channel`; `context` must
  // outlive the call. A call that could not start fails its first operation
  // and Finish says why.
  RawCall(const std::shared_ptr<grpc::Channel>& channel, grpc::ClientContext* context,
          const std::string& method);
  // Cancels a call that was not finished and waits for gRPC to let go of it.
  ~RawCall();
  RawCall(const RawCall&) = delete;
  RawCall& operator=(const RawCall&) = delete;

  // When an operation has not completed within `limit`, calls `on_stall`
  // once (which must end the connection under the call: a peer that stopped
  // reading otherwise holds a write forever) and waits on for the operation.
  void SetStallLimit(absl::Duration limit, std::function<void()> on_stall) {
    stall_limit_ = limit;
    on_stall_ = std::move(on_stall);
  }

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
  absl::Duration stall_limit_ = absl::InfiniteDuration();
  std::function<void()> on_stall_;
};

}  // namespace ecsnap::client_internal

#endif  // ECSNAP_CLIENT_RAW_CALL_H_
