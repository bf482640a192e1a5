#include "daemon/peer/rdma_transport.h"

#include <sys/mman.h>

#include <atomic>
#include <cstring>
#include <limits>
#include <optional>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "common/grpc_status.h"
#include "daemon/peer/grpc_transport.h"
#include "daemon/peer/tcp_transport.h"

namespace ecsnap::daemon {
namespace {

using rdma::QueuePair;

// True once the other side has ended the transfer's control stream.
using Gone = std::function<bool()>;

// Polls `step` until it reports done, fails, the other side is `gone`, or
// the transfer's watch is cancelled (no progress for the peer timeout, or
// the daemon stopping). Spins first (a slot lands in microseconds on a live
// link), then sleeps 50 us between polls.
template <typename Step>
absl::Status PollUntil(CallWatchdog::Watch* watch, const Gone& gone, Step&& step) {
  for (int polls = 0;; ++polls) {
    absl::StatusOr<bool> done = step();
    if (!done.ok()) return done.status();
    if (*done) return absl::OkStatus();
    if (watch->cancelled()) {
      return absl::UnavailableError(
          "the RDMA transfer made no progress for the peer timeout, or the daemon is stopping");
    }
    if (gone()) {
      // What landed before the other side went still counts.
      absl::StatusOr<bool> last = step();
      if (!last.ok()) return last.status();
      if (*last) return absl::OkStatus();
      return absl::UnavailableError("the other side ended the RDMA transfer");
    }
    if (polls > 2000) absl::SleepFor(absl::Microseconds(50));
  }
}

// Errors of the transfer itself (the link, the stream, the other side's
// set-up) are UNAVAILABLE, whatever code they came with: the seam's callers
// take FAILED_PRECONDITION, NOT_FOUND and INVALID_ARGUMENT as the holder's
// final word on the step, and only the holder's outcome may say that.
absl::Status Transient(const absl::Status& st) {
  if (st.ok() || st.code() == absl::StatusCode::kUnavailable ||
      st.code() == absl::StatusCode::kDeadlineExceeded) {
    return st;
  }
  return absl::UnavailableError(st.message());
}

// For the sender's waits: its End() flag is checked by the step itself.
bool NeverGone() { return false; }

// The sending side of a transfer: bytes are gathered into a local bounce
// slot (taken in turn, of the receiver's slot size), and each full slot is
// written to the receiver's next slot (SlotRing, in the order the receiver's
// ReceiveOrder expects) with its sequence number as the last write's
// immediate. Credits and the end of the stream arrive on another thread
// (Credit, End); everything else is the sending thread's.
class SlotSender {
 public:
  // `remote` was checked (CheckLentSlots); `bounce_slots` of its slot size
  // fit the bounce memory (BounceSlots > 0).
  SlotSender(QueuePair* qp, RdmaFabric::Staging* bounce, uint32_t bounce_slots,
             const peer::RdmaSlots& remote, const rdma::WriteLimits& limits,
             CallWatchdog::Watch* watch)
      : qp_(qp),
        bounce_(bounce),
        remote_(remote),
        limits_(limits),
        watch_(watch),
        bounce_slots_(bounce_slots),
        ring_(remote.count()),
        ledger_(limits.max_outstanding),
        last_wr_(bounce_slots, 0) {}

  // Every sequence number below `next` was consumed (the receiver's credit).
  void Credit(uint32_t next) { credited_.store(next, std::memory_order_release); }
  // The receiver ended the transfer (its stream closed): no more credits.
  void End() { ended_.store(true, std::memory_order_release); }

  absl::Status Add(absl::Span<const uint8_t> data) {
    while (!data.empty()) {
      if (!open_.has_value()) {
        if (absl::Status st = Acquire(); !st.ok()) return st;
      }
      const uint64_t n = std::min<uint64_t>(data.size(), remote_.slot_bytes() - filled_);
      std::memcpy(bounce_->region().data() + uint64_t{open_bounce_} * remote_.slot_bytes() +
                      filled_,
                  data.data(), n);
      filled_ += n;
      data.remove_prefix(n);
      if (filled_ == remote_.slot_bytes()) {
        if (absl::Status st = WriteOpenSlot(); !st.ok()) return st;
      }
    }
    return absl::OkStatus();
  }

  // Writes the last, partly filled slot and waits until every write has
  // completed on this side.
  absl::Status Finish() {
    if (open_.has_value() && filled_ > 0) {
      if (absl::Status st = WriteOpenSlot(); !st.ok()) return st;
    }
    return PollUntil(watch_, NeverGone, [&]() -> absl::StatusOr<bool> {
      if (absl::StatusOr<int> n = qp_->PollSend(&ledger_); !n.ok()) return n.status();
      if (ledger_.failed()) return ledger_.status();
      return ledger_.outstanding() == 0;
    });
  }

  static absl::Status EndedEarly() {
    return absl::AbortedError("the receiving side ended the RDMA transfer before its last byte");
  }

 private:
  // Waits for a slot the receiver has handed back, and for the last write
  // from the next bounce slot to have completed here (a retransmission would
  // read its memory again).
  absl::Status Acquire() {
    absl::Status st = PollUntil(watch_, NeverGone, [&]() -> absl::StatusOr<bool> {
      if (ended_.load(std::memory_order_acquire)) return EndedEarly();
      const uint32_t next = credited_.load(std::memory_order_acquire);
      if (next != released_) {
        if (absl::Status s = ring_.Release(next); !s.ok()) return s;  // a confused receiver
        released_ = next;
        watch_->Progress();
      }
      if (absl::StatusOr<int> n = qp_->PollSend(&ledger_); !n.ok()) return n.status();
      if (ledger_.failed()) return ledger_.status();  // a write failed: the rest flushed
      if (!pending_.has_value()) {
        rdma::SlotRing::Lease lease;
        if (!ring_.Acquire(&lease)) return false;
        pending_ = lease;
      }
      return ledger_.Retired(last_wr_[next_bounce_]);
    });
    if (!st.ok()) return st;
    open_ = pending_;
    pending_.reset();
    open_bounce_ = next_bounce_;
    next_bounce_ = next_bounce_ + 1 == bounce_slots_ ? 0 : next_bounce_ + 1;
    filled_ = 0;
    return absl::OkStatus();
  }

  absl::Status WriteOpenSlot() {
    absl::StatusOr<rdma::LocalRange> local =
        bounce_->region().Local(uint64_t{open_bounce_} * remote_.slot_bytes(), filled_);
    if (!local.ok()) return local.status();
    const rdma::RemoteWindow window{remote_.addr(),
                                    uint64_t{remote_.count()} * remote_.slot_bytes(),
                                    remote_.rkey()};
    const uint32_t imm = open_->seq;
    absl::StatusOr<std::vector<rdma::WriteRequest>> plan =
        rdma::PlanWrites(absl::MakeConstSpan(&*local, 1), window,
                         uint64_t{open_->slot} * remote_.slot_bytes(), limits_, next_wr_, &imm);
    if (!plan.ok()) return plan.status();
    next_wr_ += plan->size();
    last_wr_[open_bounce_] = plan->back().wr_id;
    absl::Span<const rdma::WriteRequest> rest(*plan);
    absl::Status st = PollUntil(watch_, NeverGone, [&]() -> absl::StatusOr<bool> {
      if (ended_.load(std::memory_order_acquire)) return EndedEarly();
      absl::StatusOr<size_t> posted = qp_->PostWrites(rest, &ledger_);
      if (!posted.ok()) return posted.status();
      rest.remove_prefix(*posted);
      if (rest.empty()) return true;
      if (absl::StatusOr<int> n = qp_->PollSend(&ledger_); !n.ok()) return n.status();
      return false;
    });
    open_.reset();
    filled_ = 0;
    return st;
  }

  QueuePair* const qp_;
  RdmaFabric::Staging* const bounce_;
  const peer::RdmaSlots remote_;
  const rdma::WriteLimits limits_;
  CallWatchdog::Watch* const watch_;
  const uint32_t bounce_slots_;
  rdma::SlotRing ring_;  // the receiver's slots
  rdma::SendLedger ledger_;
  std::vector<uint64_t> last_wr_;  // per bounce slot: the wr_id of its last write
  uint64_t next_wr_ = 1;
  std::atomic<uint32_t> credited_{0};
  std::atomic<bool> ended_{false};
  uint32_t released_ = 0;
  std::optional<rdma::SlotRing::Lease> open_;     // the receiver's slot being filled
  std::optional<rdma::SlotRing::Lease> pending_;  // lent, the next bounce slot still busy
  uint32_t open_bounce_ = 0;  // the bounce slot being filled
  uint32_t next_bounce_ = 0;
  uint64_t filled_ = 0;
};

// The receiving side: the slots it lends, each consumed in turn as its last
// write's immediate arrives.
class SlotReceiver {
 public:
  SlotReceiver(QueuePair* qp, RdmaFabric::Staging* staging, uint32_t slots, uint32_t slot_bytes,
               uint64_t length)
      : qp_(qp), staging_(staging), slot_bytes_(slot_bytes), length_(length), order_(slots) {}

  // The next slot's bytes, once they have all landed; valid until Done().
  // `watch`: the wait's; `gone`: the sender ended the transfer.
  absl::StatusOr<absl::Span<const uint8_t>> Next(CallWatchdog::Watch* watch, const Gone& gone) {
    std::optional<uint32_t> slot;
    absl::Status st = PollUntil(watch, gone, [&]() -> absl::StatusOr<bool> {
      absl::StatusOr<int> n = qp_->PollReceive(
          [&](uint32_t imm, uint32_t) -> absl::Status {
            absl::StatusOr<uint32_t> s = order_.Accept(imm);
            if (!s.ok()) return s.status();
            slot = *s;
            return absl::OkStatus();
          },
          /*max=*/1);
      if (!n.ok()) return n.status();
      return slot.has_value();
    });
    if (!st.ok()) return st;
    const uint64_t share = SlotShare(length_, slot_bytes_, received_);
    if (share == 0) {
      return absl::DataLossError(absl::StrFormat(
          "RDMA: slot %d arrived after the transfer's %d bytes", received_, length_));
    }
    ++received_;
    watch->Progress();
    return absl::Span<const uint8_t>(staging_->slot(*slot), share);
  }

  // The slot last returned by Next() may be written again: its receive is
  // posted anew. Returns the credit to send (every sequence below it done).
  absl::StatusOr<uint32_t> Done() {
    if (absl::Status st = qp_->PostReceives(1); !st.ok()) return st;
    return order_.next();
  }

 private:
  QueuePair* const qp_;
  RdmaFabric::Staging* const staging_;
  const uint32_t slot_bytes_;
  const uint64_t length_;
  rdma::ReceiveOrder order_;
  uint64_t received_ = 0;
};

// How many bounce slots of the `remote` slots' size a sender with
// `bounce_bytes` of bounce memory cycles through (at most one per remote
// slot); 0 when not even one fits.
uint32_t BounceSlots(const peer::RdmaSlots& remote, uint64_t bounce_bytes) {
  return static_cast<uint32_t>(
      std::min<uint64_t>(remote.count(), bounce_bytes / std::max<uint32_t>(1, remote.slot_bytes())));
}

peer::RdmaSlots LendSlots(const RdmaFabric& fabric, const RdmaFabric::Staging& staging) {
  peer::RdmaSlots s;
  s.set_addr(reinterpret_cast<uint64_t>(staging.region().data()));
  s.set_rkey(staging.region().rkey());
  s.set_slot_bytes(fabric.options().slot_bytes);
  s.set_count(fabric.options().slots);
  return s;
}

peer::RdmaMessage CreditMessage(uint32_t next) {
  peer::RdmaMessage m;
  m.mutable_credit()->set_next(next);
  return m;
}

absl::Status OutcomeStatus(const peer::RdmaOutcome& o) {
  if (o.code() > static_cast<uint32_t>(absl::StatusCode::kUnauthenticated)) {
    return absl::InternalError("the holder answered a status code out of range");
  }
  return absl::Status(static_cast<absl::StatusCode>(o.code()), o.message());
}

}  // namespace

absl::Status CheckLentSlots(const peer::RdmaSlots& slots) {
  if (slots.count() == 0 || slots.count() > kMaxRdmaSlots) {
    return absl::InvalidArgumentError(
        absl::StrFormat("RDMA slots: %d slots lent; from 1 to %d", slots.count(), kMaxRdmaSlots));
  }
  if (slots.slot_bytes() < kMinRdmaSlotBytes || slots.slot_bytes() > kMaxRdmaSlotBytes) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "RDMA slots: %d bytes a slot; from %d to %d", slots.slot_bytes(), kMinRdmaSlotBytes,
        kMaxRdmaSlotBytes));
  }
  const uint64_t bytes = uint64_t{slots.count()} * slots.slot_bytes();
  if (slots.addr() == 0 || slots.addr() > std::numeric_limits<uint64_t>::max() - bytes) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "RDMA slots: %d bytes at 0x%x wrap the address space", bytes, slots.addr()));
  }
  return absl::OkStatus();
}

uint64_t SlotShare(uint64_t length, uint32_t slot_bytes, uint64_t index) {
  if (slot_bytes == 0) return 0;
  const uint64_t slots = length / slot_bytes + (length % slot_bytes != 0 ? 1 : 0);
  if (index >= slots) return 0;
  return index + 1 < slots ? slot_bytes : length - index * slot_bytes;
}

// ---------------------------------------------------------------------------
// RdmaFabric

absl::StatusOr<std::unique_ptr<RdmaFabric>> RdmaFabric::Open(RdmaFabricOptions options) {
  if (absl::Status st = rdma::CheckLimits(options.limits); !st.ok()) return st;
  if (options.slots == 0 || options.slots > kMaxRdmaSlots ||
      options.slot_bytes < kMinRdmaSlotBytes || options.slot_bytes > kMaxRdmaSlotBytes ||
      options.slot_bytes % 4096 != 0 || options.transfers == 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "RDMA staging of %d transfers x %d slots x %d bytes: slots from 1 to %d, a slot a "
        "multiple of 4 KiB from %d to %d bytes",
        options.transfers, options.slots, options.slot_bytes, kMaxRdmaSlots, kMinRdmaSlotBytes,
        kMaxRdmaSlotBytes));
  }
  absl::StatusOr<std::unique_ptr<rdma::Device>> device = rdma::Device::Open(options.device);
  if (!device.ok()) return device.status();
  absl::StatusOr<std::unique_ptr<rdma::ProtectionDomain>> pd =
      (*device)->AllocateProtectionDomain();
  if (!pd.ok()) return pd.status();
  const size_t staging_bytes = size_t{options.slots} * options.slot_bytes;
  const size_t pool_bytes = staging_bytes * options.transfers;
  void* pool = ::mmap(nullptr, pool_bytes, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  if (pool == MAP_FAILED) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "RDMA staging: cannot map %d bytes: %s", pool_bytes, std::strerror(errno)));
  }
  std::unique_ptr<RdmaFabric> fabric(new RdmaFabric(std::move(options), *std::move(device),
                                                    *std::move(pd), static_cast<uint8_t*>(pool),
                                                    pool_bytes));
  for (uint32_t i = 0; i < fabric->options_.transfers; ++i) {
    absl::StatusOr<std::unique_ptr<rdma::MemoryRegion>> region = fabric->pd_->Register(
        absl::MakeSpan(fabric->pool_ + i * staging_bytes, staging_bytes),
        IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE);
    if (!region.ok()) return region.status();
    fabric->regions_.push_back(*std::move(region));
  }
  {
    absl::MutexLock lock(&fabric->mu_);
    for (size_t i = fabric->regions_.size(); i > 0; --i) fabric->free_.push_back(i - 1);
  }
  return fabric;
}

RdmaFabric::RdmaFabric(RdmaFabricOptions options, std::unique_ptr<rdma::Device> device,
                       std::unique_ptr<rdma::ProtectionDomain> pd, uint8_t* pool,
                       size_t pool_bytes)
    : options_(std::move(options)),
      device_(std::move(device)),
      pd_(std::move(pd)),
      pool_(pool),
      pool_bytes_(pool_bytes) {}

RdmaFabric::~RdmaFabric() {
  regions_.clear();  // deregistered before the memory goes, and before the PD
  ::munmap(pool_, pool_bytes_);
}

RdmaFabric::Staging::~Staging() { fabric_->Return(index_); }

void RdmaFabric::Return(size_t index) {
  absl::MutexLock lock(&mu_);
  free_.push_back(index);
}

absl::StatusOr<std::unique_ptr<RdmaFabric::Staging>> RdmaFabric::Lease() {
  absl::MutexLock lock(&mu_);
  if (free_.empty()) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "RDMA: all %d transfers' staging is in use; the transfer is retried", regions_.size()));
  }
  const size_t i = free_.back();
  free_.pop_back();
  return std::unique_ptr<Staging>(new Staging(this, i, regions_[i].get(), options_.slot_bytes));
}

absl::StatusOr<std::unique_ptr<QueuePair>> RdmaFabric::NewQueuePair() {
  return pd_->CreateQueuePair(options_.limits.max_outstanding,
                              static_cast<int>(options_.slots) + 1, options_.limits.max_sge,
                              options_.qp);
}

// ---------------------------------------------------------------------------
// The holder's half

grpc::Status ServeRdmaTransfer(
    RdmaFabric* fabric, BulkServer* bulk, CallWatchdog* watchdog, grpc::ServerContext* context,
    grpc::ServerReaderWriter<peer::RdmaMessage, peer::RdmaMessage>* stream) {
  if (fabric == nullptr || bulk == nullptr) {
    // UNIMPLEMENTED, as from a daemon that predates this transport: the
    // caller's one sign that the ticket is untouched and goes to TCP. Nothing
    // past this point answers it.
    return grpc::Status(grpc::StatusCode::UNIMPLEMENTED,
                        "this daemon has no RDMA device; send to its TCP bulk port");
  }
  auto watch = watchdog->Start(context);
  peer::RdmaMessage first;
  if (!stream->Read(&first)) {
    return grpc::Status(grpc::StatusCode::CANCELLED, "the RDMA transfer ended before its hello");
  }
  if (!first.has_hello()) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        "an RDMA transfer begins with a hello");
  }
  const peer::RdmaHello& hello = first.hello();
  absl::StatusOr<rdma::Endpoint> remote = rdma::Decode(hello.endpoint());
  if (!remote.ok()) return ToGrpc(remote.status());
  absl::StatusOr<std::unique_ptr<RdmaFabric::Staging>> staging = fabric->Lease();
  if (!staging.ok()) {
    // The one refusal the caller may take to TCP with the same ticket.
    context->AddTrailingMetadata(kTicketUntouchedKey, "1");
    return ToGrpc(staging.status());
  }
  absl::StatusOr<std::unique_ptr<QueuePair>> qp = fabric->NewQueuePair();
  if (!qp.ok()) return ToGrpc(Transient(qp.status()));
  absl::StatusOr<BulkServer::Claimed> claimed = bulk->Claim(hello.token());
  if (!claimed.ok()) return ToGrpc(claimed.status());

  if (claimed->sink != nullptr) {
    // A push: the caller writes into the slots lent here; each is folded
    // straight from them.
    std::unique_ptr<ChunkSink> sink = std::move(claimed->sink);
    const uint32_t slots = fabric->options().slots;
    // Connected (a QP takes receives from INIT on), a receive posted per
    // slot, and only then the slots lent: no write can arrive before its
    // receive.
    absl::Status st = (*qp)->Connect(*remote);
    if (st.ok()) st = (*qp)->PostReceives(static_cast<int>(slots));
    peer::RdmaMessage accept;
    accept.mutable_accept()->set_endpoint(rdma::Encode((*qp)->endpoint()));
    *accept.mutable_accept()->mutable_slots() = LendSlots(*fabric, **staging);
    if (!st.ok() || !stream->Write(accept)) {
      sink->Abort();
      return ToGrpc(st.ok() ? absl::UnavailableError("the caller went before the accept") : st);
    }
    SlotReceiver receiver(qp->get(), staging->get(), slots, fabric->options().slot_bytes,
                          claimed->length);
    const Gone caller_gone = [context] { return context->IsCancelled(); };
    absl::Status fold;
    for (uint64_t left = claimed->length; left > 0 && fold.ok();) {
      absl::StatusOr<absl::Span<const uint8_t>> piece = receiver.Next(watch.get(), caller_gone);
      if (!piece.ok()) {
        sink->Abort();  // cut, stalled, or a write out of turn
        return ToGrpc(piece.status());
      }
      fold = sink->Piece(*piece);
      left -= piece->size();
      absl::StatusOr<uint32_t> credit = receiver.Done();
      if (!credit.ok()) {
        sink->Abort();
        return ToGrpc(credit.status());
      }
      if (fold.ok() && left > 0 && !stream->Write(CreditMessage(*credit))) {
        sink->Abort();
        return grpc::Status(grpc::StatusCode::CANCELLED, "the caller went during the push");
      }
    }
    peer::RdmaMessage outcome;
    if (fold.ok()) {
      absl::StatusOr<bool> end = sink->End();
      fold = end.status();
      outcome.mutable_outcome()->set_stripe_complete(end.ok() && *end);
    }
    outcome.mutable_outcome()->set_code(static_cast<uint32_t>(fold.code()));
    outcome.mutable_outcome()->set_message(std::string(fold.message()));
    stream->Write(outcome);
    return grpc::Status::OK;
  }

  // A read: written from the pinned chunk, through this side's bounce
  // slots, into the slots the caller lent.
  if (absl::Status st = CheckLentSlots(hello.slots()); !st.ok()) return ToGrpc(st);
  const uint32_t slots = BounceSlots(
      hello.slots(), uint64_t{fabric->options().slots} * fabric->options().slot_bytes);
  if (slots == 0) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        absl::StrFormat("RDMA slots of %d bytes are larger than this daemon's "
                                        "staging; lend smaller ones",
                                        hello.slots().slot_bytes()));
  }
  peer::RdmaMessage accept;
  accept.mutable_accept()->set_endpoint(rdma::Encode((*qp)->endpoint()));
  if (absl::Status st = (*qp)->Connect(*remote); !st.ok()) return ToGrpc(st);
  if (!stream->Write(accept)) {
    return grpc::Status(grpc::StatusCode::CANCELLED, "the caller went before the accept");
  }
  // The caller's queue pair takes writes only once it is connected: it says
  // so with a first credit of 0.
  peer::RdmaMessage ready;
  if (!stream->Read(&ready) || !ready.has_credit() || ready.credit().next() != 0) {
    return grpc::Status(grpc::StatusCode::CANCELLED,
                        "the caller did not say its queue pair is ready");
  }
  SlotSender sender(qp->get(), staging->get(), slots, hello.slots(), fabric->options().limits,
                    watch.get());
  // Credits come on the stream until the caller has read everything and
  // closes its side (or the watchdog cuts the call).
  std::thread credits([&] {
    peer::RdmaMessage m;
    while (stream->Read(&m)) {
      if (m.has_credit()) sender.Credit(m.credit().next());
    }
    sender.End();
  });
  absl::Status st;
  claimed->chunk.read(claimed->offset, claimed->length,
                      [&](absl::Span<const uint8_t> piece) {
                        st = sender.Add(piece);
                        return st.ok();
                      });
  if (st.ok()) st = sender.Finish();
  if (!st.ok()) context->TryCancel();  // ends the caller's read, and the credit reader
  credits.join();
  return ToGrpc(st);
}

// ---------------------------------------------------------------------------
// The caller's half

namespace {

// Sends `hello` and reads the holder's accept. UNIMPLEMENTED when the holder
// takes no RDMA (no device, or a daemon that predates it), RESOURCE_EXHAUSTED
// when its staging is all in use and it says so (kTicketUntouchedKey): both
// answered before it took the ticket. Any other error is UNAVAILABLE. The
// stream is then finished.
absl::StatusOr<peer::RdmaAccept> Handshake(
    grpc::ClientContext* ctx,
    grpc::ClientReaderWriter<peer::RdmaMessage, peer::RdmaMessage>* stream,
    const peer::RdmaMessage& hello) {
  peer::RdmaMessage reply;
  if (!stream->Write(hello) || !stream->Read(&reply)) {
    absl::Status st = FromGrpc(stream->Finish());
    if (st.code() == absl::StatusCode::kUnimplemented) return st;
    if (st.code() == absl::StatusCode::kResourceExhausted &&
        ctx->GetServerTrailingMetadata().count(kTicketUntouchedKey) != 0) {
      return st;
    }
    return Transient(st.ok() ? absl::UnavailableError(
                                   "the holder ended the RDMA transfer before its accept")
                             : st);
  }
  if (!reply.has_accept()) {
    return absl::UnavailableError("the holder answered the RDMA hello with something else");
  }
  return reply.accept();
}

// What the caller does when the handshake did not get as far as the holder
// taking the ticket.
RdmaFallback FallbackOf(const absl::Status& st) {
  if (st.code() == absl::StatusCode::kUnimplemented) return RdmaFallback::kThisHolder;
  if (st.code() == absl::StatusCode::kResourceExhausted) return RdmaFallback::kThisTransfer;
  return RdmaFallback::kNone;
}

// A read's bytes as they land in the slots lent to the holder.
class RdmaChunkReader final : public ChunkReader {
 public:
  // `lent`: `staging`'s slots (LendSlots), as the holder is told of them.
  RdmaChunkReader(std::unique_ptr<RdmaFabric::Staging> staging, peer::RdmaSlots lent,
                  uint64_t length, CallWatchdog* watchdog, std::string what,
                  std::function<void(const RdmaEnd&)> ended)
      : staging_(std::move(staging)),
        lent_(std::move(lent)),
        left_(length),
        watchdog_(watchdog),
        what_(std::move(what)),
        ended_callback_(std::move(ended)) {}
  ~RdmaChunkReader() override {
    if (stream_ == nullptr) return;
    // The bytes read are here, and the holder's answer to a read says
    // nothing more: the call is cut rather than waited for (a holder gone
    // silent after its last slot would hold this thread).
    if (left_ == 0 && !broken_ && !writes_done_) {
      writes_done_ = true;
      stream_->WritesDone();
    }
    ctx_.TryCancel();
    if (ends_.joinable()) ends_.join();
    stream_->Finish().IgnoreError();
  }

  // Lends the slots, sends the hello and connects. UNIMPLEMENTED or
  // RESOURCE_EXHAUSTED as Handshake; other errors UNAVAILABLE.
  absl::Status Start(peer::Peer::Stub* stub, const std::string& token,
                     std::unique_ptr<QueuePair> qp) {
    qp_ = std::move(qp);
    auto watch = watchdog_->Start(&ctx_);
    stream_ = stub->RdmaTransfer(&ctx_);
    peer::RdmaMessage hello;
    hello.mutable_hello()->set_token(token);
    hello.mutable_hello()->set_endpoint(rdma::Encode(qp_->endpoint()));
    *hello.mutable_hello()->mutable_slots() = lent_;
    absl::StatusOr<peer::RdmaAccept> accept = Handshake(&ctx_, stream_.get(), hello);
    if (!accept.ok()) {
      stream_.reset();  // finished by Handshake
      return accept.status();
    }
    absl::StatusOr<rdma::Endpoint> remote = rdma::Decode(accept->endpoint());
    absl::Status st = remote.ok() ? qp_->Connect(*remote) : remote.status();
    // A receive per slot, then ready: the holder writes only after this.
    if (st.ok()) st = qp_->PostReceives(static_cast<int>(lent_.count()));
    if (st.ok() && !stream_->Write(CreditMessage(0))) {
      st = absl::UnavailableError("the holder went before the read began");
    }
    if (!st.ok()) {
      broken_ = true;
      return Transient(st);
    }
    receiver_.emplace(qp_.get(), staging_.get(), lent_.count(), lent_.slot_bytes(), left_);
    // The holder sends nothing more; its stream ends when it is done or gone.
    ends_ = std::thread([this] {
      peer::RdmaMessage m;
      while (stream_->Read(&m)) {
      }
      ended_.store(true, std::memory_order_release);
    });
    return absl::OkStatus();
  }

  absl::Status Read(absl::Span<uint8_t> into) override {
    if (into.size() > left_) {
      return absl::InvalidArgumentError(absl::StrFormat("%s: %d bytes asked, %d left in the range",
                                                        what_, into.size(), left_));
    }
    if (into.empty()) return absl::OkStatus();
    // Watched only while reading: between reads nothing cuts the stream here
    // (the holder cuts one its reader leaves full for the peer timeout).
    auto watch = watchdog_->Start(&ctx_);
    const Gone holder_gone = [this] { return ended_.load(std::memory_order_acquire); };
    while (!into.empty()) {
      if (current_.empty()) {
        absl::StatusOr<absl::Span<const uint8_t>> next = receiver_->Next(watch.get(), holder_gone);
        if (!next.ok()) return Broken(next.status(), watch->cancelled());
        current_ = *next;
      }
      const size_t n = std::min(into.size(), current_.size());
      std::memcpy(into.data(), current_.data(), n);
      into.remove_prefix(n);
      current_.remove_prefix(n);
      left_ -= n;
      if (current_.empty()) {
        absl::StatusOr<uint32_t> credit = receiver_->Done();
        if (!credit.ok()) return Broken(credit.status(), false);
        if (left_ > 0 && !stream_->Write(CreditMessage(*credit))) {
          return Broken(absl::UnavailableError("the holder went during the read"), false);
        }
      }
    }
    if (left_ == 0 && !writes_done_) {
      writes_done_ = true;
      stream_->WritesDone();
      Report(RdmaEnd{});
    }
    return absl::OkStatus();
  }
  uint64_t remaining() const override { return left_; }
  // The set-up broke after the holder's accept.
  bool broken() const { return broken_; }

 private:
  // Tells the transport how the read ended, once.
  void Report(const RdmaEnd& end) {
    if (ended_callback_) std::exchange(ended_callback_, nullptr)(end);
  }

  // The reader is spent: as TcpChunkReader, DATA_LOSS for a transfer that
  // ended early (DEADLINE_EXCEEDED when it stalled).
  absl::Status Broken(const absl::Status& st, bool stalled) {
    left_ = 0;
    broken_ = true;
    ctx_.TryCancel();
    Report(RdmaEnd{RdmaFallback::kNone, /*broke=*/true});
    return TransferError(absl::DataLossError(absl::StrCat("the RDMA read ended early: ",
                                                          st.message())),
                         stalled, watchdog_->stall(), what_);
  }

  // Destroyed last to first: the thread is joined in the destructor, the
  // queue pair goes before the staging it writes into goes back to the pool,
  // and the context after the stream.
  std::unique_ptr<RdmaFabric::Staging> staging_;
  const peer::RdmaSlots lent_;
  uint64_t left_;
  CallWatchdog* const watchdog_;
  const std::string what_;
  std::function<void(const RdmaEnd&)> ended_callback_;
  grpc::ClientContext ctx_;
  std::unique_ptr<grpc::ClientReaderWriter<peer::RdmaMessage, peer::RdmaMessage>> stream_;
  std::unique_ptr<QueuePair> qp_;
  std::optional<SlotReceiver> receiver_;
  absl::Span<const uint8_t> current_;
  std::thread ends_;
  std::atomic<bool> ended_{false};
  bool writes_done_ = false;
  bool broken_ = false;
};

}  // namespace

absl::StatusOr<RdmaCarrier::Leased> RdmaCarrier::Lease(RdmaEnd* end) {
  *end = RdmaEnd{};
  Leased l;
  absl::StatusOr<std::unique_ptr<RdmaFabric::Staging>> staging = fabric_->Lease();
  absl::StatusOr<std::unique_ptr<QueuePair>> qp =
      staging.ok() ? fabric_->NewQueuePair() : staging.status();
  if (!qp.ok()) {
    end->fallback = RdmaFallback::kThisTransfer;  // nothing presented: the ticket goes to TCP
    return qp.status();
  }
  l.staging = *std::move(staging);
  l.qp = *std::move(qp);
  return l;
}

absl::StatusOr<bool> RdmaCarrier::Push(peer::Peer::Stub* stub, const peer::BulkTicket& ticket,
                                       uint64_t length, const ChunkBytes& bytes,
                                       const std::string& what, RdmaEnd* end) {
  absl::StatusOr<Leased> leased = Lease(end);
  if (!leased.ok()) return leased.status();
  // Destroyed last to first: the queue pair before its staging.
  std::unique_ptr<RdmaFabric::Staging> bounce = std::move(leased->staging);
  std::unique_ptr<QueuePair> qp = std::move(leased->qp);
  grpc::ClientContext ctx;
  auto watch = watchdog_->Start(&ctx);
  auto stream = stub->RdmaTransfer(&ctx);
  peer::RdmaMessage hello;
  hello.mutable_hello()->set_token(ticket.token());
  hello.mutable_hello()->set_endpoint(rdma::Encode(qp->endpoint()));
  absl::StatusOr<peer::RdmaAccept> accept = Handshake(&ctx, stream.get(), hello);
  if (!accept.ok()) {
    end->fallback = FallbackOf(accept.status());
    return TransferError(accept.status(), watch->cancelled(), watchdog_->stall(), what);
  }
  // The holder reads nothing more from this side.
  stream->WritesDone();
  auto fail = [&](const absl::Status& st) -> absl::Status {
    ctx.TryCancel();
    stream->Finish().IgnoreError();
    end->broke = true;
    return TransferError(Transient(st), false, watchdog_->stall(), what);
  };
  absl::StatusOr<rdma::Endpoint> remote = rdma::Decode(accept->endpoint());
  if (!remote.ok()) return fail(remote.status());
  if (absl::Status st = CheckLentSlots(accept->slots()); !st.ok()) return fail(st);
  const uint32_t bounce_slots = BounceSlots(
      accept->slots(), uint64_t{fabric_->options().slots} * fabric_->options().slot_bytes);
  if (bounce_slots == 0) {
    return fail(absl::InvalidArgumentError(absl::StrFormat(
        "the holder lends RDMA slots of %d bytes, larger than this daemon's staging",
        accept->slots().slot_bytes())));
  }
  if (absl::Status st = qp->Connect(*remote); !st.ok()) return fail(st);

  SlotSender sender(qp.get(), bounce.get(), bounce_slots, accept->slots(),
                    fabric_->options().limits, watch.get());
  std::optional<peer::RdmaOutcome> outcome;
  std::thread replies([&] {
    peer::RdmaMessage m;
    while (stream->Read(&m)) {
      if (m.has_credit()) sender.Credit(m.credit().next());
      if (m.has_outcome()) outcome = m.outcome();
    }
    sender.End();
  });
  absl::Status st;
  uint64_t sent = 0;
  bytes([&](absl::Span<const uint8_t> piece) {
    sent += piece.size();
    st = sent <= length ? sender.Add(piece)
                        : absl::InternalError("the chunk has more bytes than its header says");
    return st.ok();
  });
  if (st.ok() && sent != length) {
    st = absl::InternalError("the chunk has fewer bytes than its header says");
  }
  if (st.ok()) st = sender.Finish();
  // The holder answers once every slot is folded; a failure here cuts the
  // call, which ends the reader too.
  if (!st.ok()) ctx.TryCancel();
  replies.join();
  absl::Status finished = FromGrpc(stream->Finish());
  const bool cut = watch->cancelled();
  watch.reset();
  // The holder's outcome is its word on the push (a refusal mid-way ends the
  // stream early and leaves this side's sending failed: the outcome says
  // why). Without one, the transfer broke.
  if (outcome.has_value()) {
    // Folded and answered OK: done, whatever this side saw after (a lost
    // acknowledgement of a write the holder has).
    absl::Status said = OutcomeStatus(*outcome);
    if (!said.ok()) return TransferError(said, false, watchdog_->stall(), what);
    return outcome->stripe_complete();
  }
  end->broke = true;
  if (st.ok()) {
    st = finished.ok() ? absl::UnavailableError("the holder ended the push without its outcome")
                       : finished;
  }
  return TransferError(Transient(st), cut, watchdog_->stall(), what);
}

absl::StatusOr<std::unique_ptr<ChunkReader>> RdmaCarrier::OpenRead(
    peer::Peer::Stub* stub, const peer::BulkTicket& ticket, uint64_t length,
    const std::string& what, RdmaEnd* end, std::function<void(const RdmaEnd&)> ended) {
  absl::StatusOr<Leased> leased = Lease(end);
  if (!leased.ok()) return leased.status();
  peer::RdmaSlots lent = LendSlots(*fabric_, *leased->staging);
  auto reader = std::make_unique<RdmaChunkReader>(std::move(leased->staging), std::move(lent),
                                                  length, watchdog_, what, std::move(ended));
  absl::Status st = reader->Start(stub, ticket.token(), std::move(leased->qp));
  if (!st.ok()) {
    end->fallback = FallbackOf(st);
    end->broke = reader->broken();
    return TransferError(st, false, watchdog_->stall(), what);
  }
  return std::unique_ptr<ChunkReader>(std::move(reader));
}

}  // namespace ecsnap::daemon
