// Hostile peers and callers against real daemons (DESIGN.md §9): an RS(2,1)
// group with mutual TLS on its peer plane, a protected step, and callers
// without a certificate, with a foreign or expired one, with another slot's,
// with forged or out-of-range messages. Each is refused with its status, no
// refused message leaves a trace, the daemons stay up, and the protected
// step still survives a node loss bit for bit.
#include <sys/stat.h>

#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <string>
#include <thread>

#include <grpcpp/grpcpp.h>

#include "absl/strings/str_cat.h"
#include "common/read_file.h"
#include "ec/layout.h"
#include "gtest/gtest.h"
#include "proto/peer.grpc.pb.h"
#include "tests/cluster_fixture.h"

namespace ecsnap {
namespace {

constexpr int kK = 2, kM = 1, kN = kK + kM;

std::string ReadFile(const std::string& path) { return ReadWholeFile(path).value_or(""); }

std::chrono::system_clock::time_point Soon() {
  return std::chrono::system_clock::now() + std::chrono::seconds(5);
}

class HostilePeerTest : public ClusterTest {
 protected:
  void SetUp() override {
    StartCluster(kK, kM);
    Snapshot(1);
    ASSERT_TRUE(WaitProtected(1)) << cluster_->daemon(0).Log();
  }

  // Runs deploy/make_certs.sh into `dir` (reusing a CA already there).
  void MakeCerts(const std::string& dir, int slots, int days = 825) {
    const std::string cmd = absl::StrCat("bash ", testing::RunfilePath("deploy/make_certs.sh"),
                                         " ", dir, " ", slots, " ", days, " >/dev/null 2>&1");
    ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  }

  // A peer stub to daemon `slot` presenting `cert_dir`/`cert`.crt (no
  // client certificate when `cert` is empty) and trusting this cluster's CA.
  std::unique_ptr<peer::Peer::Stub> PeerAs(int slot, const std::string& cert_dir,
                                           const std::string& cert) {
    grpc::SslCredentialsOptions o;
    o.pem_root_certs = ReadFile(cluster_->tls_dir() + "/ca.crt");
    if (!cert.empty()) {
      o.pem_cert_chain = ReadFile(cert_dir + "/" + cert + ".crt");
      o.pem_private_key = ReadFile(cert_dir + "/" + cert + ".key");
    }
    grpc::ChannelArguments args;
    args.SetSslTargetNameOverride(absl::StrCat("slot-", slot, ".ecsnap"));
    return peer::Peer::NewStub(
        grpc::CreateCustomChannel(cluster_->peer_address(slot), grpc::SslCredentials(o), args));
  }
  std::unique_ptr<peer::Peer::Stub> PeerAs(int slot, int as_slot) {
    return PeerAs(slot, cluster_->tls_dir(), absl::StrCat("slot-", as_slot));
  }

  grpc::Status Ping(peer::Peer::Stub* stub) {
    grpc::ClientContext ctx;
    ctx.set_deadline(Soon());
    peer::PingRequest req;
    peer::PingResponse resp;
    return stub->Ping(&ctx, req, &resp);
  }

  grpc::Status Inventory(peer::Peer::Stub* stub, peer::InventoryResponse* resp) {
    grpc::ClientContext ctx;
    ctx.set_deadline(Soon());
    return stub->Inventory(&ctx, peer::InventoryRequest(), resp);
  }

  // Pushes `header` and then `bytes` bytes of zeros (none: a push that ends
  // after its header).
  grpc::Status Push(peer::Peer::Stub* stub, const peer::PushChunkHeader& header,
                    uint64_t bytes = 0) {
    grpc::ClientContext ctx;
    ctx.set_deadline(Soon());
    peer::PushChunkResponse resp;
    auto writer = stub->PushChunk(&ctx, &resp);
    peer::PushChunkMessage msg;
    *msg.mutable_header() = header;
    if (writer->Write(msg) && bytes > 0) {
      peer::PushChunkMessage data;
      data.set_data(std::string(bytes, '\0'));
      writer->Write(data);
    }
    writer->WritesDone();
    return writer->Finish();
  }

  // A well-formed push header of data position 0 of the stripe whose parity
  // row `holder` keeps, from the slot that owns that position.
  peer::PushChunkHeader Header(int holder, const std::string& job, uint64_t step, int* sender) {
    const ec::Layout layout = *ec::Layout::Create(kK, kM);
    int stripe = 0;
    while (layout.SlotOf(stripe, kK) != holder) ++stripe;
    *sender = layout.SlotOf(stripe, 0);
    peer::PushChunkHeader h;
    h.mutable_id()->set_job_id(job);
    h.mutable_id()->set_step(step);
    h.mutable_id()->set_stripe(stripe);
    h.mutable_id()->set_position(0);
    h.mutable_from()->set_slot(*sender);
    h.mutable_from()->set_payload_bytes(uint64_t{1} << 20);
    for (int p = 0; p < kK; ++p) h.mutable_from()->add_chunk_crc32c(0x1234);
    h.set_length(layout.DataChunk(uint64_t{1} << 20, 0).length);
    h.set_crc32c(0x1234);
    return h;
  }

  uint64_t ArenaUsed(int slot) {
    auto stub = cluster_->daemon(slot).AdminStub();
    grpc::ClientContext ctx;
    ctx.set_deadline(Soon());
    admin::StatusResponse r;
    EXPECT_TRUE(stub->Status(&ctx, {}, &r).ok());
    return r.arena_used_bytes();
  }
  // Polls daemon `slot`'s arena use until `ok` holds (at most 2 s).
  bool WaitArenaUsed(int slot, const std::function<bool(uint64_t)>& ok) {
    for (int i = 0; i < 100; ++i) {
      if (ok(ArenaUsed(slot))) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return false;
  }

  // Every daemon is up with step 1 PROTECTED; then a node is lost and
  // replaced, and every rank restores step 1 bit for bit.
  void ExpectProtectedStepSurvives() {
    for (int s = 0; s < kN; ++s) {
      ASSERT_TRUE(cluster_->daemon(s).alive()) << "slot " << s << " died:\n"
                                               << cluster_->daemon(s).Log();
      EXPECT_EQ(StateOf(s, 1), v1::PROTECTED) << "slot " << s;
    }
    ASSERT_NO_FATAL_FAILURE(ReplaceNode(1));
    for (int s = 0; s < kN; ++s) EXPECT_EQ(RestoreAndCheck(s), 1u) << "slot " << s;
  }
};

TEST_F(HostilePeerTest, CallersWithoutAValidCertificateOfTheClusterAreRefused) {
  // Control: a slot's own certificate is let in.
  EXPECT_TRUE(Ping(PeerAs(0, 1).get()).ok());
  // Plaintext to a TLS port.
  auto plain = peer::Peer::NewStub(
      grpc::CreateChannel(cluster_->peer_address(0), grpc::InsecureChannelCredentials()));
  EXPECT_EQ(Ping(plain.get()).error_code(), grpc::StatusCode::UNAVAILABLE);
  // TLS without a client certificate.
  EXPECT_EQ(Ping(PeerAs(0, "", "").get()).error_code(), grpc::StatusCode::UNAVAILABLE);
  // A certificate of another CA, naming a slot of this group.
  const std::string foreign = dir_.path() + "/foreign";
  MakeCerts(foreign, kN);
  EXPECT_EQ(Ping(PeerAs(0, foreign, "slot-1").get()).error_code(),
            grpc::StatusCode::UNAVAILABLE);
  // An expired certificate of this cluster's CA.
  const std::string expired = dir_.path() + "/expired";
  ::mkdir(expired.c_str(), 0700);
  std::ofstream(expired + "/ca.crt") << ReadFile(cluster_->tls_dir() + "/ca.crt");
  std::ofstream(expired + "/ca.key") << ReadFile(cluster_->tls_dir() + "/ca.key");
  MakeCerts(expired, kN, -1);
  EXPECT_EQ(Ping(PeerAs(0, expired, "slot-1").get()).error_code(),
            grpc::StatusCode::UNAVAILABLE);
  // The data is not readable without a certificate either.
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(Soon());
    peer::GetChunkRequest req;
    req.mutable_id()->set_job_id("job");
    req.mutable_id()->set_step(1);
    auto reader = plain->GetChunk(&ctx, req);
    peer::GetChunkMessage msg;
    EXPECT_FALSE(reader->Read(&msg));
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::UNAVAILABLE);
  }
  ExpectProtectedStepSurvives();
}

TEST_F(HostilePeerTest, ACertificateSpeaksOnlyForItsOwnSlot) {
  const ec::Layout layout = *ec::Layout::Create(kK, kM);
  const int target = 2;
  // A row announcement naming a holder other than the caller.
  int stripe = 0;
  while (layout.SlotOf(stripe, kK) == 0) ++stripe;  // a row slot 0 does not hold
  peer::StripeProtected row;
  row.set_job_id("job");
  row.set_step(2);
  row.set_stripe(stripe);
  row.set_row(0);
  row.set_holder_slot(layout.SlotOf(stripe, kK));
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(Soon());
    peer::StripeProtectedResponse resp;
    const grpc::Status st = PeerAs(row.holder_slot() == 1 ? 2 : 1, 0)
                                ->NotifyStripeProtected(&ctx, row, &resp);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::PERMISSION_DENIED) << st.error_message();
  }
  // A job notice in another slot's name.
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(Soon());
    peer::JobNotice notice;
    notice.set_job_id("job");
    notice.set_slot(1);
    notice.set_rewound_to(0);
    peer::JobNoticeResponse resp;
    const grpc::Status st = PeerAs(target, 0)->NotifyJob(&ctx, notice, &resp);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::PERMISSION_DENIED) << st.error_message();
  }
  // A push of another slot's chunk.
  int sender = 0;
  const peer::PushChunkHeader h = Header(target, "job", 2, &sender);
  const int impostor = (sender + 1) % kN == target ? (sender + 2) % kN : (sender + 1) % kN;
  EXPECT_EQ(Push(PeerAs(target, impostor).get(), h).error_code(),
            grpc::StatusCode::PERMISSION_DENIED);
  // A certificate of this CA for a slot outside the group reads nothing.
  MakeCerts(cluster_->tls_dir(), kN + 1);
  peer::InventoryResponse inv;
  EXPECT_EQ(Inventory(PeerAs(target, kN).get(), &inv).error_code(),
            grpc::StatusCode::PERMISSION_DENIED);
  // A member of the group may read.
  EXPECT_TRUE(Inventory(PeerAs(target, 0).get(), &inv).ok());
  ExpectProtectedStepSurvives();
}

TEST_F(HostilePeerTest, ForgedAndOutOfRangeMessagesAreRefusedAndLeaveNoTrace) {
  const int target = 2;
  int sender = 0;
  const peer::PushChunkHeader good = Header(target, "job", 5, &sender);
  auto as_sender = PeerAs(target, sender);
  const uint64_t used_before = ArenaUsed(target);

  peer::PushChunkHeader h = good;
  h.mutable_from()->set_slot(9);
  EXPECT_EQ(Push(as_sender.get(), h).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  h = good;
  h.mutable_id()->set_job_id(std::string(10 << 10, 'j'));
  EXPECT_EQ(Push(as_sender.get(), h).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  h = good;
  h.mutable_id()->set_step(UINT64_MAX);
  EXPECT_EQ(Push(as_sender.get(), h).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  h = good;
  h.set_length(uint64_t{1} << 60);  // more than the announced payload gives
  EXPECT_EQ(Push(as_sender.get(), h).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  h = good;
  h.mutable_id()->set_stripe(1000);
  EXPECT_EQ(Push(as_sender.get(), h).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  // A payload announced larger than any arena: the row is refused for
  // space, nothing is kept.
  h = good;
  h.mutable_from()->set_payload_bytes(uint64_t{1} << 60);
  h.set_length(ec::Layout::Create(kK, kM)->DataChunk(uint64_t{1} << 60, 0).length);
  EXPECT_EQ(Push(as_sender.get(), h).error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  // Forged row announcements with impossible stripes and rows.
  for (uint32_t stripe = 1000; stripe < 1008; ++stripe) {
    grpc::ClientContext ctx;
    ctx.set_deadline(Soon());
    peer::StripeProtected row;
    row.set_job_id("job");
    row.set_step(2);
    row.set_stripe(stripe);
    row.set_holder_slot(sender);
    peer::StripeProtectedResponse resp;
    EXPECT_EQ(as_sender->NotifyStripeProtected(&ctx, row, &resp).error_code(),
              grpc::StatusCode::INVALID_ARGUMENT);
  }
  // Fifty pushes that end after their header: their reservations go back.
  for (uint64_t step = 100; step < 150; ++step) {
    h = good;
    h.mutable_id()->set_step(step);
    EXPECT_FALSE(Push(as_sender.get(), h).ok());
  }
  // And one cut halfway.
  h = good;
  EXPECT_FALSE(Push(as_sender.get(), h, h.length() / 2).ok());
  EXPECT_EQ(ArenaUsed(target), used_before);
  // No refused message left a job, a step or a slot behind.
  peer::InventoryResponse inv;
  ASSERT_TRUE(Inventory(PeerAs(target, sender).get(), &inv).ok());
  for (const auto& s : inv.steps()) {
    EXPECT_EQ(s.job_id(), "job");
    if (s.step() == 1) continue;
    EXPECT_EQ(s.rows_size(), 0) << "step " << s.step();
    for (const auto& slot : s.slots()) EXPECT_LT(slot.slot(), static_cast<uint32_t>(kN));
    // A push whose bytes never arrived taught nothing of its sender's step.
    if (s.step() >= 100) {
      EXPECT_EQ(s.slots_size(), 0) << "step " << s.step();
    }
  }
  // Job notices naming impossible steps.
  for (uint64_t step : {uint64_t{0}, UINT64_MAX}) {
    grpc::ClientContext ctx;
    ctx.set_deadline(Soon());
    peer::JobNotice notice;
    notice.set_job_id("job");
    notice.set_slot(sender);
    notice.set_protected_step(step);
    peer::JobNoticeResponse resp;
    EXPECT_EQ(as_sender->NotifyJob(&ctx, notice, &resp).error_code(),
              grpc::StatusCode::INVALID_ARGUMENT)
        << "protected_step " << step;
  }
  ExpectProtectedStepSurvives();
}

// A sender that stops sending mid-push (hung, SIGSTOPped, hostile) but keeps
// its stream open is cut after the peer timeout: the row's reservation comes
// back and the holder's thread is free, while the stream is still open.
TEST_F(HostilePeerTest, APushThatStallsWithItsStreamOpenIsCut) {
  const int target = 2;
  int sender = 0;
  const peer::PushChunkHeader h = Header(target, "job", 7, &sender);
  auto as_sender = PeerAs(target, sender);
  const uint64_t used_before = ArenaUsed(target);
  peer::PushChunkResponse resp;
  peer::PushChunkMessage msg;
  *msg.mutable_header() = h;
  peer::PushChunkMessage data;
  data.set_data(std::string(h.length() / 2, '\0'));
  // Starts a push of half the row on `call` and waits until the holder has
  // reserved and folded it.
  auto half_push = [&](grpc::ClientContext* call) {
    call->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    auto writer = as_sender->PushChunk(call, &resp);
    EXPECT_TRUE(writer->Write(msg));
    EXPECT_TRUE(writer->Write(data));
    EXPECT_TRUE(WaitArenaUsed(target, [&](uint64_t used) { return used > used_before; }));
    return writer;
  };
  {
    // Then nothing more is sent: the holder ends the call within about 1.25
    // peer timeouts (2 s here).
    grpc::ClientContext ctx;
    auto writer = half_push(&ctx);
    const grpc::Status st = writer->Finish();
    EXPECT_EQ(st.error_code(), grpc::StatusCode::CANCELLED) << st.error_message();
    EXPECT_EQ(ArenaUsed(target), used_before);
  }
  {
    // A sender that cancels its own push halfway: given up as broken too.
    grpc::ClientContext ctx;
    auto writer = half_push(&ctx);
    ctx.TryCancel();
    EXPECT_EQ(writer->Finish().error_code(), grpc::StatusCode::CANCELLED);
    EXPECT_TRUE(WaitArenaUsed(target, [&](uint64_t used) { return used == used_before; }));
  }
  ExpectProtectedStepSurvives();
}

// A replaced node decodes its parity rows straight into arena rows reserved
// for the rebuild. A push into such a row (a peer that still holds the step
// LOCAL, or a hostile owner of a data position) is refused, so it can
// neither fold into bytes being decoded nor free them under the decoder; the
// rebuilt row is then what a later loss decodes from, bit for bit.
class RebuildingPeerTest : public HostilePeerTest {
 protected:
  void SetUp() override {
    StartCluster(kK, kM, "rebuild_bytes_per_sec: 20000");
    Snapshot(1);
    ASSERT_TRUE(WaitProtected(1)) << cluster_->daemon(0).Log();
  }
};

TEST_F(RebuildingPeerTest, APushIntoARowBeingRebuiltIsRefusedAndTheRowStaysRight) {
  const int target = 2;
  ASSERT_NO_FATAL_FAILURE(ReplaceNode(target, /*reconnect=*/false));
  // Every stripe reserves its row as the rebuild starts; under the cap the
  // first slice of any stripe ends a couple of seconds later. Caught before
  // any slice has ended, the parity row is still being decoded (a row
  // already rebuilt takes pushes again, which is not what is tested here).
  ASSERT_TRUE(WaitRebuild(target, [](const admin::RebuildStatus& r) {
    return r.active() && r.job_id() == "job" && r.step() == 1 && r.bytes_total() > 0 &&
           r.bytes_done() == 0;
  })) << cluster_->daemon(target).Log();
  std::this_thread::sleep_for(std::chrono::milliseconds(200));  // the stripes' threads start
  ASSERT_TRUE(RebuildStatusOf(target).active());
  ASSERT_EQ(RebuildStatusOf(target).bytes_done(), 0u) << "the cap let a slice end early";
  int sender = 0;
  const peer::PushChunkHeader h = Header(target, "job", 1, &sender);
  auto as_sender = PeerAs(target, sender);
  // Cut halfway: before, its reset freed the row the rebuild was writing.
  EXPECT_EQ(Push(as_sender.get(), h, h.length() / 2).error_code(), grpc::StatusCode::ABORTED);
  EXPECT_EQ(Push(as_sender.get(), h).error_code(), grpc::StatusCode::ABORTED);
  ASSERT_TRUE(WaitRebuild(target, [](const admin::RebuildStatus& r) { return !r.active(); }));
  EXPECT_EQ(RebuildStatusOf(target).last_error(), "") << cluster_->daemon(target).Log();
  ASSERT_TRUE(WaitProtected(1)) << cluster_->daemon(target).Log();
  // The sender's node is lost now: its data comes back through the rebuilt
  // parity row.
  ASSERT_NO_FATAL_FAILURE(ReplaceNode(sender));
  Reconnect(target);
  for (int s = 0; s < kN; ++s) EXPECT_EQ(RestoreAndCheck(s), 1u) << "slot " << s;
}

TEST_F(HostilePeerTest, AdminCallsNeedTheDaemonsToken) {
  DaemonProcess& d = cluster_->daemon(0);
  struct stat st {};
  ASSERT_EQ(::stat(d.admin_token_file().c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u) << "the token file must be readable by its owner only";
  auto call = [&](const std::string& token) {
    auto stub = admin::Admin::NewStub(grpc::CreateChannel(
        d.admin_address(), grpc::experimental::LocalCredentials(UDS)));
    grpc::ClientContext ctx;
    ctx.set_deadline(Soon());
    if (!token.empty()) ctx.AddMetadata("authorization", "Bearer " + token);
    admin::DropRequest req;
    req.set_job_id("job");
    admin::DropResponse resp;
    return stub->Drop(&ctx, req, &resp);
  };
  EXPECT_EQ(call("").error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(call(std::string(64, '0')).error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(call("x").error_code(), grpc::StatusCode::UNAUTHENTICATED);
  // Nothing was dropped.
  ExpectProtectedStepSurvives();
}

}  // namespace
}  // namespace ecsnap
