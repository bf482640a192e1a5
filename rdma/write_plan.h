// RC-write work, without a device: how a chunk's bytes become RDMA write work
// requests, how the send queue's completions are accounted for, and the
// credit ring by which a holder lends its registered staging slots to a
// sender.
//
//   sender                                       holder
//   ------                                       ------
//   SlotRing::Acquire() -> seq, slot             posts a receive per slot
//   PlanWrites(pieces -> slot's window, imm=seq)
//   post; SendLedger accounts completions        recv CQ: imm = seq
//                                                ReceiveOrder::Accept(seq)
//                                                folds the slot's bytes
//   SlotRing::Release(up to seq)  <- credit ---  returns the slot
//
// RC delivers in order, so a signalled completion retires every unsignalled
// request posted before it; after an error every outstanding request
// completes with IBV_WC_WR_FLUSH_ERR and the first error is the one reported.
// None of these classes is thread-safe: each belongs to one connection's
// poller.
#ifndef ECSNAP_RDMA_WRITE_PLAN_H_
#define ECSNAP_RDMA_WRITE_PLAN_H_

#include <infiniband/verbs.h>

#include <cstdint>
#include <deque>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace ecsnap::rdma {

// Bytes in registered local memory.
struct LocalRange {
  uint64_t addr = 0;
  uint64_t length = 0;
  uint32_t lkey = 0;
};

// A registered window on the remote side that it lets this side write.
struct RemoteWindow {
  uint64_t addr = 0;
  uint64_t length = 0;
  uint32_t rkey = 0;
};

struct WriteLimits {
  // Bytes one work request moves (the device's max_msg_sz bounds it; smaller
  // requests let completions report progress). Default: 1 MiB.
  uint32_t max_request_bytes = 1u << 20;
  // Scatter entries per request (the device's max_sge). Default: 4.
  int max_sge = 4;
  // Requests posted and not yet completed (the send queue's depth). Default: 128.
  int max_outstanding = 128;
  // One request in this many is signalled (and the last of a plan always);
  // at most max_outstanding, or the queue could fill with requests that never
  // complete visibly. Default: 16.
  int signal_every = 16;
};
absl::Status CheckLimits(const WriteLimits& limits);

// One RDMA write: local scatter list -> one contiguous remote range.
struct WriteRequest {
  uint64_t wr_id = 0;
  uint64_t remote_addr = 0;
  uint32_t rkey = 0;
  uint32_t length = 0;
  std::vector<ibv_sge> sges;
  bool signaled = false;
  // The last request of a plan is a write with immediate when set: the
  // holder's receive completes with `imm` once every byte has landed.
  bool with_imm = false;
  uint32_t imm = 0;
};

// Plans the writes that copy `pieces`, in order, to [offset, offset + total)
// of `remote`. Requests get ids first_wr_id, first_wr_id + 1, ...; the last
// is signalled, and carries `imm` when `imm` is set. INVALID_ARGUMENT when
// the bytes do not fit the window (overflow-safe), a piece is empty, or a
// piece's end wraps.
absl::StatusOr<std::vector<WriteRequest>> PlanWrites(absl::Span<const LocalRange> pieces,
                                                     const RemoteWindow& remote, uint64_t offset,
                                                     const WriteLimits& limits,
                                                     uint64_t first_wr_id,
                                                     const uint32_t* imm = nullptr);

// The send queue's books: what was posted, what completed, room left.
class SendLedger {
 public:
  explicit SendLedger(int depth) : depth_(depth) {}

  // Requests that may be posted now.
  int room() const { return failed() ? 0 : depth_ - static_cast<int>(posted_.size()); }
  int outstanding() const { return static_cast<int>(posted_.size()); }
  bool failed() const { return !first_error_.ok(); }
  // The first completion error, or OK.
  const absl::Status& status() const { return first_error_; }
  // True when request `wr_id` (ids are posted in increasing order) is no
  // longer outstanding: it completed, or was never posted. The memory a
  // write reads may be reused only then (a retransmission reads it again).
  bool Retired(uint64_t wr_id) const { return posted_.empty() || posted_.front().wr_id > wr_id; }

  // Records a posted request. FAILED_PRECONDITION when there is no room.
  absl::Status Posted(uint64_t wr_id, bool signaled);
  // A completion from the send CQ. A success must name a signalled request
  // (it retires that one and all posted before it); after an error any
  // posted request may complete (flushed). INTERNAL for a completion of a
  // request never posted, or out of order.
  absl::Status Complete(uint64_t wr_id, ibv_wc_status status, uint32_t vendor_err = 0);

 private:
  struct Entry {
    uint64_t wr_id;
    bool signaled;
  };
  const int depth_;
  std::deque<Entry> posted_;
  absl::Status first_error_;
};

// The sender's view of the holder's staging slots: `slots` slots lent, each
// written under a 32-bit sequence number (slots taken in turn) and released
// when the holder says it has consumed every sequence up to one.
class SlotRing {
 public:
  // Sequence numbers start at `first_seq` (both sides agree on it at set-up).
  explicit SlotRing(uint32_t slots, uint32_t first_seq = 0)
      : slots_(slots == 0 ? 1 : slots), next_(first_seq), released_(first_seq) {}
  struct Lease {
    uint32_t seq;
    uint32_t slot;
  };
  // The next slot to write, or none while every slot is in use.
  bool Acquire(Lease* lease);
  // The holder consumed every sequence number < `next`. INVALID_ARGUMENT
  // for a credit that goes back, or past what was acquired (a hostile or
  // confused holder).
  absl::Status Release(uint32_t next);
  uint32_t in_use() const { return next_ - released_; }

 private:
  const uint32_t slots_;
  uint32_t next_;            // sequence of the next Acquire (wraps)
  uint32_t next_slot_ = 0;  // its slot (counted apart: slots need not divide 2^32)
  uint32_t released_;       // every sequence before this is free
};

// The holder's check that writes arrive as the ring lends them: each
// immediate must be the next sequence number. (How many bytes a slot holds
// is not in the completion: its byte_len counts only the last write of a
// plan. The holder knows it from the chunk's length, sent over the control
// plane.)
class ReceiveOrder {
 public:
  explicit ReceiveOrder(uint32_t slots, uint32_t first_seq = 0)
      : slots_(slots == 0 ? 1 : slots), next_(first_seq) {}
  // The slot that sequence `imm` landed in. DATA_LOSS when it is not the
  // next one.
  absl::StatusOr<uint32_t> Accept(uint32_t imm);
  uint32_t next() const { return next_; }

 private:
  const uint32_t slots_;
  uint32_t next_;
  uint32_t next_slot_ = 0;
};

}  // namespace ecsnap::rdma

#endif  // ECSNAP_RDMA_WRITE_PLAN_H_
