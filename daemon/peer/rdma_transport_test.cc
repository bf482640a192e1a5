// The RDMA bulk transport. Everywhere: the checks of the slots a peer lends
// (hostile values), the slot arithmetic both sides rely on, and that a
// holder without a device refuses a transfer before taking its ticket, which
// then still admits the TCP connection the caller falls back to. On a host
// with an RDMA device: a push and a read over loopback through the real
// control stream, byte for byte, and a hostile hello refused.
#include "daemon/peer/rdma_transport.h"

#include <grpcpp/grpcpp.h>

#include <cstdio>
#include <random>
#include <string>

#include "absl/strings/str_cat.h"
#include "daemon/peer/tcp_transport.h"
#include "daemon/peer/testing_sink.h"
#include "gtest/gtest.h"

namespace ecsnap::daemon {
namespace {

using testing::RandomBytes;
using testing::Record;
using testing::RecordingSink;

peer::RdmaSlots Slots(uint64_t addr, uint32_t rkey, uint32_t slot_bytes, uint32_t count) {
  peer::RdmaSlots s;
  s.set_addr(addr);
  s.set_rkey(rkey);
  s.set_slot_bytes(slot_bytes);
  s.set_count(count);
  return s;
}

TEST(LentSlotsTest, OnlySlotsWithinTheLimitsAreAccepted) {
  EXPECT_TRUE(CheckLentSlots(Slots(0x10000, 7, 1 << 20, 4)).ok());
  EXPECT_TRUE(CheckLentSlots(Slots(0x10000, 7, kMinRdmaSlotBytes, kMaxRdmaSlots)).ok());
  const peer::RdmaSlots hostile[] = {
      Slots(0x10000, 7, 1 << 20, 0),                   // no slots
      Slots(0x10000, 7, 1 << 20, kMaxRdmaSlots + 1),   // too many
      Slots(0x10000, 7, kMinRdmaSlotBytes - 1, 4),     // too small to be worth a write
      Slots(0x10000, 7, kMaxRdmaSlotBytes + 1, 4),     // larger than any staging
      Slots(0, 7, 1 << 20, 4),                         // no address
      Slots(~uint64_t{0} - (1 << 20), 7, 1 << 20, 4),  // wraps the address space
  };
  for (const peer::RdmaSlots& s : hostile) {
    absl::Status st = CheckLentSlots(s);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << s.ShortDebugString();
    EXPECT_NE(st.message().find("RDMA slots"), std::string::npos) << st;
  }
}

TEST(SlotShareTest, EverySlotButTheLastIsFullAndTheSharesAddUp) {
  EXPECT_EQ(SlotShare(0, 4096, 0), 0u);
  EXPECT_EQ(SlotShare(4096, 4096, 0), 4096u);
  EXPECT_EQ(SlotShare(4096, 4096, 1), 0u);
  EXPECT_EQ(SlotShare(4097, 4096, 1), 1u);
  EXPECT_EQ(SlotShare(100, 0, 0), 0u);
  const uint64_t seed = std::random_device()();
  std::printf("seed %llu\n", static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  for (int i = 0; i < 300; ++i) {
    const uint64_t length = rng() % (uint64_t{1} << 27);
    const uint32_t slot = kMinRdmaSlotBytes << (rng() % 12);
    uint64_t sum = 0, index = 0;
    for (uint64_t share; (share = SlotShare(length, slot, index)) != 0; ++index) {
      if (SlotShare(length, slot, index + 1) != 0) ASSERT_EQ(share, slot);
      ASSERT_LE(share, slot);
      sum += share;
      ASSERT_LT(index, length / slot + 2);
    }
    EXPECT_EQ(sum, length) << "length " << length << " slot " << slot;
  }
}

TEST(RdmaFabricTest, StagingOutsideTheLimitsIsRefusedSayingWhich) {
  RdmaFabricOptions o;
  o.slots = 0;
  absl::Status st = RdmaFabric::Open(o).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  o.slots = 4;
  o.slot_bytes = 5000;  // not a multiple of 4 KiB
  EXPECT_EQ(RdmaFabric::Open(o).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(RdmaFabricTest, AHostWithoutADeviceIsToldSo) {
  if (!rdma::DeviceNames().empty()) GTEST_SKIP() << "this host has an RDMA device";
  absl::Status st = RdmaFabric::Open(RdmaFabricOptions{}).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kNotFound) << st;
  EXPECT_FALSE(st.message().empty());
}

// The holder's half behind a real gRPC server on 127.0.0.1, with the
// tickets of a real bulk server.
class RdmaPeer final : public peer::Peer::Service {
 public:
  RdmaPeer(RdmaFabric* fabric, BulkServer* bulk, CallWatchdog* watchdog)
      : fabric_(fabric), bulk_(bulk), watchdog_(watchdog) {}
  grpc::Status RdmaTransfer(
      grpc::ServerContext* context,
      grpc::ServerReaderWriter<peer::RdmaMessage, peer::RdmaMessage>* stream) override {
    return ServeRdmaTransfer(fabric_, bulk_, watchdog_, context, stream);
  }

 private:
  RdmaFabric* const fabric_;
  BulkServer* const bulk_;
  CallWatchdog* const watchdog_;
};

class RdmaTransferTest : public ::testing::Test {
 protected:
  RdmaTransferTest() : watchdog_(absl::Seconds(5)) {
    BulkServer::Options o;
    o.workers = 2;
    auto bulk = BulkServer::Listen(o, &watchdog_);
    EXPECT_TRUE(bulk.ok()) << bulk.status();
    bulk_ = std::move(*bulk);
  }
  ~RdmaTransferTest() override {
    if (server_ != nullptr) server_->Shutdown();
    bulk_->Stop();
  }

  // Serves with `fabric` (null: a holder without a device).
  void Serve(RdmaFabric* fabric) {
    service_ = std::make_unique<RdmaPeer>(fabric, bulk_.get(), &watchdog_);
    int port = 0;
    grpc::ServerBuilder b;
    b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    b.RegisterService(service_.get());
    server_ = b.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    stub_ = peer::Peer::NewStub(grpc::CreateChannel(absl::StrCat("127.0.0.1:", port),
                                                    grpc::InsecureChannelCredentials()));
  }

  CallWatchdog watchdog_;
  std::unique_ptr<BulkServer> bulk_;
  std::unique_ptr<RdmaPeer> service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<peer::Peer::Stub> stub_;
};

// The caller falls back to TCP with the same token, so a holder that takes
// no RDMA must refuse before the ticket is used up, and leave its fold alive.
TEST_F(RdmaTransferTest, AHolderWithoutADeviceRefusesAndLeavesTheTicketForTcp) {
  Serve(nullptr);
  Record r;
  auto token = bulk_->IssuePush("k", 4096, std::make_unique<RecordingSink>(&r));
  ASSERT_TRUE(token.ok()) << token.status();
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  auto stream = stub_->RdmaTransfer(&ctx);
  peer::RdmaMessage hello;
  hello.mutable_hello()->set_token(*token);
  hello.mutable_hello()->set_endpoint("not an endpoint");
  stream->Write(hello);
  stream->WritesDone();
  peer::RdmaMessage reply;
  EXPECT_FALSE(stream->Read(&reply));
  grpc::Status st = stream->Finish();
  EXPECT_EQ(st.error_code(), grpc::StatusCode::UNIMPLEMENTED) << st.error_message();
  EXPECT_NE(st.error_message().find("TCP"), std::string::npos) << st.error_message();
  EXPECT_EQ(r.aborted.load(), 0);
  // The ticket still admits its transfer, once.
  auto claimed = bulk_->Claim(*token);
  ASSERT_TRUE(claimed.ok()) << claimed.status();
  EXPECT_NE(claimed->sink, nullptr);
  EXPECT_EQ(claimed->length, 4096u);
  EXPECT_EQ(bulk_->Claim(*token).status().code(), absl::StatusCode::kNotFound);
}

// Needs an RDMA device: both halves on its first active port.
TEST_F(RdmaTransferTest, LoopbackPushAndReadMoveEveryByteAndAHostileHelloIsRefused) {
  RdmaFabricOptions o;
  o.slot_bytes = 64 << 10;  // many slots per transfer: the credits go round
  o.transfers = 4;
  auto holder = RdmaFabric::Open(o);
  if (!holder.ok()) GTEST_SKIP() << "needs an RDMA device: " << holder.status().message();
  auto caller = RdmaFabric::Open(o);
  ASSERT_TRUE(caller.ok()) << caller.status();
  Serve(holder->get());
  RdmaCarrier carrier(caller->get(), &watchdog_);
  const uint64_t seed = std::random_device()();
  std::printf("seed %llu\n", static_cast<unsigned long long>(seed));
  const std::string data = RandomBytes((3 << 20) + 17, seed);

  // A push, fed in uneven pieces.
  Record r;
  auto token = bulk_->IssuePush("k", data.size(), std::make_unique<RecordingSink>(&r));
  ASSERT_TRUE(token.ok()) << token.status();
  peer::BulkTicket ticket;
  ticket.set_token(*token);
  std::mt19937_64 rng(seed);
  RdmaEnd end;
  auto pushed = carrier.Push(
      stub_.get(), ticket, data.size(),
      [&](const std::function<bool(absl::Span<const uint8_t>)>& piece) {
        for (size_t at = 0; at < data.size();) {
          const size_t n = std::min<size_t>(data.size() - at, 1 + rng() % (300 << 10));
          if (!piece(absl::Span<const uint8_t>(
                  reinterpret_cast<const uint8_t*>(data.data()) + at, n))) {
            return;
          }
          at += n;
        }
      },
      "test push", &end);
  ASSERT_TRUE(pushed.ok()) << pushed.status();
  EXPECT_TRUE(*pushed);
  EXPECT_EQ(r.bytes(), data);
  EXPECT_EQ(r.ended.load(), 1);

  // A read of a range of it.
  PinnedChunk chunk;
  chunk.length = data.size();
  chunk.read = [&](uint64_t offset, uint64_t length,
                   const std::function<bool(absl::Span<const uint8_t>)>& piece) {
    piece(absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(data.data()) + offset,
                                    length));
  };
  const uint64_t offset = 12345, length = data.size() - offset - 99;
  auto read_token = bulk_->IssueRead(chunk, offset, length);
  ASSERT_TRUE(read_token.ok()) << read_token.status();
  ticket.set_token(*read_token);
  int read_ends = 0;
  auto reader = carrier.OpenRead(stub_.get(), ticket, length, "test read", &end,
                                 [&](const RdmaEnd& e) {
                                   ++read_ends;
                                   EXPECT_FALSE(e.broke);
                                 });
  ASSERT_TRUE(reader.ok()) << reader.status();
  std::string got(length, '\0');
  for (uint64_t at = 0; at < length;) {
    const uint64_t n = std::min<uint64_t>(length - at, 1 + rng() % (200 << 10));
    ASSERT_TRUE((*reader)->Read(absl::MakeSpan(reinterpret_cast<uint8_t*>(got.data()) + at, n))
                    .ok());
    at += n;
  }
  EXPECT_EQ((*reader)->remaining(), 0u);
  EXPECT_EQ(got, data.substr(offset, length));
  EXPECT_EQ(read_ends, 1);
  reader->reset();

  // A hello whose endpoint does not decode is refused; its ticket stays.
  Record hostile;
  auto hostile_token = bulk_->IssuePush("h", 4096, std::make_unique<RecordingSink>(&hostile));
  ASSERT_TRUE(hostile_token.ok());
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  auto stream = stub_->RdmaTransfer(&ctx);
  peer::RdmaMessage hello;
  hello.mutable_hello()->set_token(*hostile_token);
  hello.mutable_hello()->set_endpoint(std::string(40, '\xff'));
  stream->Write(hello);
  stream->WritesDone();
  peer::RdmaMessage reply;
  EXPECT_FALSE(stream->Read(&reply));
  EXPECT_EQ(stream->Finish().error_code(), grpc::StatusCode::INVALID_ARGUMENT);
}

}  // namespace
}  // namespace ecsnap::daemon
