#include "rdma/write_plan.h"

#include <algorithm>
#include <limits>

#include "absl/strings/str_format.h"

namespace ecsnap::rdma {

absl::Status CheckLimits(const WriteLimits& l) {
  if (l.max_request_bytes == 0 || l.max_sge < 1 || l.max_outstanding < 1 ||
      l.signal_every < 1 || l.signal_every > l.max_outstanding) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "RDMA write limits: request bytes %u, scatter entries %d, outstanding %d and "
        "signal-every %d must be positive, with signal-every <= outstanding",
        l.max_request_bytes, l.max_sge, l.max_outstanding, l.signal_every));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<WriteRequest>> PlanWrites(absl::Span<const LocalRange> pieces,
                                                     const RemoteWindow& remote, uint64_t offset,
                                                     const WriteLimits& limits,
                                                     uint64_t first_wr_id, const uint32_t* imm) {
  if (absl::Status s = CheckLimits(limits); !s.ok()) return s;
  uint64_t total = 0;
  for (const LocalRange& p : pieces) {
    if (p.length == 0 || p.addr > std::numeric_limits<uint64_t>::max() - p.length) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "RDMA write: a piece at 0x%x of %u bytes is empty or wraps the address space", p.addr,
          p.length));
    }
    if (p.length > std::numeric_limits<uint64_t>::max() - total) {
      return absl::InvalidArgumentError("RDMA write: the pieces' lengths overflow 64 bits");
    }
    total += p.length;
  }
  if (total == 0) return absl::InvalidArgumentError("RDMA write: nothing to write");
  if (offset > remote.length || total > remote.length - offset ||
      remote.addr > std::numeric_limits<uint64_t>::max() - remote.length) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "RDMA write: %u bytes at offset %u do not fit the remote window of %u bytes at 0x%x",
        total, offset, remote.length, remote.addr));
  }
  std::vector<WriteRequest> out;
  WriteRequest cur;
  auto flush = [&] {
    cur.wr_id = first_wr_id + out.size();
    cur.rkey = remote.rkey;
    out.push_back(std::move(cur));
    cur = WriteRequest{};
  };
  uint64_t remote_at = remote.addr + offset;
  for (const LocalRange& p : pieces) {
    uint64_t at = 0;
    while (at < p.length) {
      if (cur.sges.empty()) cur.remote_addr = remote_at;
      const uint64_t n = std::min<uint64_t>(p.length - at, limits.max_request_bytes - cur.length);
      cur.sges.push_back(ibv_sge{p.addr + at, static_cast<uint32_t>(n), p.lkey});
      cur.length += static_cast<uint32_t>(n);
      at += n;
      remote_at += n;
      if (cur.length == limits.max_request_bytes ||
          static_cast<int>(cur.sges.size()) == limits.max_sge) {
        flush();
      }
    }
  }
  if (!cur.sges.empty()) flush();
  for (size_t i = 0; i < out.size(); ++i) {
    out[i].signaled = (i + 1) % limits.signal_every == 0 || i + 1 == out.size();
  }
  if (imm != nullptr) {
    out.back().with_imm = true;
    out.back().imm = *imm;
  }
  return out;
}

absl::Status SendLedger::Posted(uint64_t wr_id, bool signaled) {
  if (room() <= 0) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "RDMA send queue: %d requests outstanding of %d%s", posted_.size(), depth_,
        failed() ? " after an error" : ""));
  }
  posted_.push_back(Entry{wr_id, signaled});
  return absl::OkStatus();
}

absl::Status SendLedger::Complete(uint64_t wr_id, ibv_wc_status status, uint32_t vendor_err) {
  auto it = std::find_if(posted_.begin(), posted_.end(),
                         [&](const Entry& e) { return e.wr_id == wr_id; });
  if (it == posted_.end()) {
    return absl::InternalError(absl::StrFormat(
        "RDMA send queue: a completion for request %u, which is not outstanding", wr_id));
  }
  if (status != IBV_WC_SUCCESS && first_error_.ok()) {
    first_error_ = absl::UnavailableError(absl::StrFormat(
        "RDMA write failed: %s (vendor error 0x%x)", ibv_wc_status_str(status), vendor_err));
  }
  if (!failed() && !it->signaled) {
    return absl::InternalError(absl::StrFormat(
        "RDMA send queue: a successful completion for unsignalled request %u", wr_id));
  }
  if (!failed() && it != posted_.begin()) {
    // In order: everything before a signalled request completed with it.
    for (auto e = posted_.begin(); e != it; ++e) {
      if (e->signaled) {
        return absl::InternalError(absl::StrFormat(
            "RDMA send queue: request %u completed before signalled request %u", wr_id,
            e->wr_id));
      }
    }
  }
  posted_.erase(posted_.begin(), it + 1);
  return absl::OkStatus();
}

bool SlotRing::Acquire(Lease* lease) {
  if (in_use() >= slots_) return false;
  lease->seq = next_;
  lease->slot = next_slot_;
  ++next_;
  next_slot_ = next_slot_ + 1 == slots_ ? 0 : next_slot_ + 1;
  return true;
}

absl::Status SlotRing::Release(uint32_t next) {
  // Modular: `next` must lie in (released_, next_].
  const uint32_t ahead = next - released_;
  if (ahead > in_use()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "RDMA credit: the holder released up to sequence %u, but only %u..%u are written", next,
        released_, next_));
  }
  released_ = next;
  return absl::OkStatus();
}

absl::StatusOr<uint32_t> ReceiveOrder::Accept(uint32_t imm) {
  if (imm != next_) {
    return absl::DataLossError(absl::StrFormat(
        "RDMA receive: write %u arrived where %u was due; the connection is out of step", imm,
        next_));
  }
  const uint32_t slot = next_slot_;
  ++next_;
  next_slot_ = next_slot_ + 1 == slots_ ? 0 : next_slot_ + 1;
  return slot;
}

}  // namespace ecsnap::rdma
