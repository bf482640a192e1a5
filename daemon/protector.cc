#include "daemon/protector.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>

#include "absl/strings/str_format.h"
#include "common/grpc_status.h"
#include "common/log.h"
#include "daemon/store.pb.h"
#include "ec/crc32c.h"

namespace ecsnap::daemon {

Protector::Protector(StepStore* store, ParityStore* parity, Group group, const ec::Layout& layout,
                     Options options)
    : store_(store),
      parity_(parity),
      group_(std::move(group)),
      layout_(layout),
      options_(options) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(64 << 20);
  // Reconnect quickly once a replaced peer comes back.
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 100);
  for (size_t i = 0; i < group_.addresses.size(); ++i) {
    stubs_.push_back(static_cast<int>(i) == group_.self
                         ? nullptr
                         : peer::Peer::NewStub(grpc::CreateCustomChannel(
                               group_.addresses[i], grpc::InsecureChannelCredentials(), args)));
    PeerState p;
    p.position = static_cast<int>(i);
    p.slot = group_.slots[i];
    p.address = group_.addresses[i];
    absl::MutexLock lock(&mu_);
    peers_.push_back(p);
    seen_.push_back(std::chrono::steady_clock::time_point());
  }
}

Protector::~Protector() { Stop(); }

void Protector::Start() {
  threads_.emplace_back([this] { PushLoop(); });
  threads_.emplace_back([this] { AnnounceLoop(); });
  threads_.emplace_back([this] { PingLoop(); });
}

void Protector::Stop() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  for (auto& t : threads_) t.join();
  threads_.clear();
}

std::chrono::system_clock::time_point Protector::Deadline(uint64_t bytes) const {
  return std::chrono::system_clock::now() + std::chrono::milliseconds(options_.peer_timeout_ms) +
         std::chrono::microseconds(bytes / 50);  // 50 MB/s at the slowest
}

void Protector::OnLocal(const std::string& job, uint64_t step) {
  absl::MutexLock lock(&mu_);
  pushes_.emplace_back(job, step);
}

void Protector::Announce(const peer::StripeProtected& row) {
  absl::MutexLock lock(&mu_);
  announcements_.push_back(row);
}

void Protector::OnRowComplete(const peer::StripeProtected& row) {
  const int heard = parity_->RecordRow(row);
  if (heard < layout_.n() * layout_.m()) return;
  absl::Status st = store_->MarkProtected(row.job_id(), row.step());
  if (!st.ok()) return;  // not LOCAL here (yet, or any more)
  uint64_t keep_from = 0;
  {
    absl::MutexLock lock(&mu_);
    auto& steps = protected_[row.job_id()];
    steps.push_back(row.step());
    std::sort(steps.begin(), steps.end());
    while (steps.size() > options_.retain) steps.pop_front();
    keep_from = steps.front();
  }
  parity_->DropBelow(row.job_id(), keep_from);
  Log("job %s step %d PROTECTED across group %d (RS %d+%d)", row.job_id(), row.step(), group_.id,
      layout_.k(), layout_.m());
}

peer::SlotStep Protector::Describe(const Payload& payload, const ec::Layout& layout, int self) {
  SlotManifest sm;
  for (uint32_t r : payload.local_ranks) sm.add_local_ranks(r);
  for (const Payload::Rank& r : payload.ranks) {
    SlotManifest::Rank* out = sm.add_ranks();
    out->set_rank(r.rank);
    out->set_bytes(r.bytes.size());
    *out->mutable_manifest() = *r.manifest;
  }
  peer::SlotStep me;
  me.set_slot(self);
  me.set_payload_bytes(payload.bytes);
  me.set_manifests(sm.SerializeAsString());
  me.set_manifests_crc32c(ec::Crc32c(absl::Span<const uint8_t>(
      reinterpret_cast<const uint8_t*>(me.manifests().data()), me.manifests().size())));
  for (int p = 0; p < layout.k(); ++p) {
    const ec::Extent e = layout.DataChunk(payload.bytes, p);
    uint32_t crc = 0;
    payload.ForEachPiece(e.offset, e.length,
                         [&](absl::Span<const uint8_t> piece) { crc = ec::Crc32c(piece, crc); });
    me.add_chunk_crc32c(crc);
  }
  return me;
}

template <typename T>
bool Protector::Next(std::deque<T>& queue, T* out) {
  absl::MutexLock lock(&mu_);
  auto ready = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stopping_ || !queue.empty(); };
  mu_.Await(absl::Condition(&ready));
  if (stopping_) return false;
  *out = std::move(queue.front());
  queue.pop_front();
  return true;
}

void Protector::PushLoop() {
  std::pair<std::string, uint64_t> next;
  while (Next(pushes_, &next)) PushStep(next.first, next.second);
}

void Protector::PushStep(const std::string& job, uint64_t step) {
  auto payload = store_->PinPayload(job, step);
  if (!payload.ok()) return;                      // retired meanwhile
  if (payload->state == v1::PROTECTED) return;    // a retry that is no longer needed
  const int k = layout_.k(), m = layout_.m(), self = group_.self;
  const peer::SlotStep me = Describe(*payload, layout_, self);
  parity_->RecordSlot(job, step, me);
  // Each holder gets the chunks whose stripe it keeps parity for.
  std::map<int, std::vector<int>> by_holder;
  for (int p = 0; p < k; ++p) {
    const int stripe = layout_.StripeOfDataChunk(self, p);
    for (int r = 0; r < m; ++r) by_holder[layout_.SlotOf(stripe, k + r)].push_back(p);
  }
  std::vector<std::thread> senders;
  for (const auto& [holder, chunks] : by_holder) {
    senders.emplace_back([&, holder = holder, chunks = chunks] {
      NotePeer(holder, PushTo(holder, job, step, *payload, me, chunks));
    });
  }
  for (auto& t : senders) t.join();
}

absl::Status Protector::PushTo(int holder, const std::string& job, uint64_t step,
                               const Payload& payload, const peer::SlotStep& me,
                               const std::vector<int>& chunks) {
  {
    absl::MutexLock lock(&mu_);
    if (!peers_[holder].reachable) {
      return absl::UnavailableError(peers_[holder].last_error);
    }
  }
  for (int p : chunks) {
    const ec::Extent e = layout_.DataChunk(payload.bytes, p);
    grpc::ClientContext ctx;
    ctx.set_deadline(Deadline(e.length));
    ctx.set_wait_for_ready(true);  // a peer still starting: wait, within the deadline
    peer::PushChunkResponse resp;
    auto writer = stubs_[holder]->PushChunk(&ctx, &resp);
    peer::PushChunkMessage msg;
    peer::PushChunkHeader* h = msg.mutable_header();
    h->mutable_id()->set_job_id(job);
    h->mutable_id()->set_step(step);
    h->mutable_id()->set_stripe(layout_.StripeOfDataChunk(group_.self, p));
    h->mutable_id()->set_position(p);
    h->set_length(e.length);
    h->set_crc32c(me.chunk_crc32c(p));
    *h->mutable_from() = me;
    bool ok = writer->Write(msg);
    payload.ForEachPiece(e.offset, e.length, [&](absl::Span<const uint8_t> piece) {
      for (uint64_t at = 0; ok && at < piece.size(); at += kPeerChunkBytes) {
        const uint64_t n = std::min<uint64_t>(kPeerChunkBytes, piece.size() - at);
        msg.set_data(piece.data() + at, n);
        ok = writer->Write(msg);
      }
    });
    writer->WritesDone();
    absl::Status st = FromGrpc(writer->Finish());
    if (!st.ok()) {
      return absl::Status(st.code(), absl::StrFormat("push of job %s step %d chunk %d to slot %d: %s",
                                                     job, step, p, group_.slots[holder],
                                                     st.message()));
    }
  }
  return absl::OkStatus();
}

void Protector::AnnounceLoop() {
  peer::StripeProtected row;
  while (Next(announcements_, &row)) {
    OnRowComplete(row);
    for (int i = 0; i < layout_.n(); ++i) {
      if (i == group_.self) continue;
      grpc::ClientContext ctx;
      ctx.set_deadline(Deadline(0));
      ctx.set_wait_for_ready(true);
      peer::StripeProtectedResponse resp;
      NotePeer(i, FromGrpc(stubs_[i]->NotifyStripeProtected(&ctx, row, &resp)));
    }
  }
}

void Protector::PingLoop() {
  while (true) {
    {
      absl::MutexLock lock(&mu_);
      auto stop = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stopping_; };
      if (mu_.AwaitWithTimeout(absl::Condition(&stop),
                               absl::Milliseconds(options_.ping_interval_ms))) {
        return;
      }
    }
    for (int i = 0; i < layout_.n(); ++i) {
      if (i == group_.self) continue;
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::milliseconds(std::min(options_.peer_timeout_ms, 1000)));
      peer::PingRequest req;
      req.set_from_slot(group_.slots[group_.self]);
      peer::PingResponse resp;
      NotePeer(i, FromGrpc(stubs_[i]->Ping(&ctx, req, &resp)));
    }
  }
}

void Protector::NotePeer(int position, const absl::Status& status) {
  bool back = false;
  {
    absl::MutexLock lock(&mu_);
    back = status.ok() && !peers_[position].reachable;
    NotePeerLocked(position, status);
  }
  if (back) {
    // Steps left LOCAL while the peer was away: push them again. Holders
    // acknowledge what they folded already, so a repeat costs nothing.
    for (const auto& [job, step] : store_->CompleteSteps()) OnLocal(job, step);
  }
}

void Protector::NotePeerLocked(int position, const absl::Status& status) {
  PeerState& p = peers_[position];
  if (status.ok()) {
    if (!p.reachable) Log("peer slot %d (%s) answers again", p.slot, p.address);
    p.reachable = true;
    p.last_error.clear();
    seen_[position] = std::chrono::steady_clock::now();
  } else {
    if (p.reachable) Log("peer slot %d (%s): %s", p.slot, p.address, status.message());
    p.reachable = false;
    p.last_error = std::string(status.message());
  }
}

std::vector<PeerState> Protector::Peers() const {
  absl::MutexLock lock(&mu_);
  std::vector<PeerState> out;
  const auto now = std::chrono::steady_clock::now();
  for (size_t i = 0; i < peers_.size(); ++i) {
    if (static_cast<int>(i) == group_.self) continue;
    PeerState p = peers_[i];
    if (seen_[i] != std::chrono::steady_clock::time_point()) {
      p.last_seen_ms_ago =
          std::chrono::duration_cast<std::chrono::milliseconds>(now - seen_[i]).count();
    }
    out.push_back(p);
  }
  return out;
}

}  // namespace ecsnap::daemon
