#include "client/raw_call.h"

namespace ecsnap::client_internal {

RawCall::RawCall(const std::shared_ptr<grpc::Channel>& channel, grpc::ClientContext* context,
                 const std::string& method, StallGuard guard)
    : context_(context),
      stub_(channel),
      stall_limit_(guard.limit),
      on_stall_(std::move(guard.on_stall)) {
  call_ = stub_.PrepareCall(context_, method, &cq_);
  if (call_ != nullptr) {
    call_->StartCall(this);
    started_ = Await();
  }
}

RawCall::~RawCall() {
  if (call_ != nullptr && !finished_) {
    context_->TryCancel();
    Finish();
  }
  cq_.Shutdown();
  void* tag;
  bool ok;
  while (cq_.Next(&tag, &ok)) {
  }
}

bool RawCall::Await() {
  void* tag;
  bool ok = false;
  // Each operation completes (with ok false when the call broke) before the
  // next is started, so the next event is its own.
  if (on_stall_ != nullptr && stall_limit_ != absl::InfiniteDuration()) {
    const auto status = cq_.AsyncNext(&tag, &ok, absl::ToChronoTime(absl::Now() + stall_limit_));
    if (status == grpc::CompletionQueue::GOT_EVENT) return ok;
    if (status == grpc::CompletionQueue::SHUTDOWN) return false;
    // Once more, briefly: a process that was itself stopped past the limit
    // finds the completion waiting, not a stalled peer.
    const auto again = cq_.AsyncNext(&tag, &ok, absl::ToChronoTime(absl::Now() + absl::Milliseconds(100)));
    if (again == grpc::CompletionQueue::GOT_EVENT) return ok;
    if (again == grpc::CompletionQueue::SHUTDOWN) return false;
    on_stall_();
    on_stall_ = nullptr;  // once: the connection is gone
  }
  return cq_.Next(&tag, &ok) && ok;
}

bool RawCall::Write(const grpc::ByteBuffer& message) {
  if (!started_) return false;
  call_->Write(message, this);
  return Await();
}

bool RawCall::WritesDone() {
  if (!started_) return false;
  call_->WritesDone(this);
  return Await();
}

bool RawCall::Read(grpc::ByteBuffer* message) {
  if (!started_) return false;
  call_->Read(message, this);
  return Await();
}

grpc::Status RawCall::Finish() {
  if (finished_) return status_;
  finished_ = true;
  if (call_ == nullptr) {
    status_ = grpc::Status(grpc::StatusCode::INTERNAL, "the data-plane call could not be created");
    return status_;
  }
  call_->Finish(&status_, this);
  Await();
  return status_;
}

}  // namespace ecsnap::client_internal
