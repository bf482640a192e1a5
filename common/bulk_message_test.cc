#include "common/bulk_message.h"

#include <cstdio>
#include <random>

#include "absl/synchronization/notification.h"
#include "gtest/gtest.h"
#include "proto/snapshot.pb.h"

namespace ecsnap {
namespace {

constexpr WireField kWriteRankChunk[] = {{1, WireField::kBytes},
                                          {2, WireField::kVarint},
                                          {3, WireField::kVarint},
                                          {4, WireField::kBytes}};

// `bytes` cut into slices at random places (some empty).
grpc::ByteBuffer Sliced(const std::string& bytes, std::mt19937_64& rng) {
  std::vector<grpc::Slice> slices;
  size_t at = 0;
  while (at < bytes.size()) {
    const size_t n = std::min<size_t>(bytes.size() - at, rng() % 7 == 0 ? 0 : 1 + rng() % 40);
    slices.emplace_back(bytes.data() + at, n);
    at += n;
  }
  return grpc::ByteBuffer(slices.data(), slices.size());
}

void ExpectSame(const BulkMessage& m, const v1::WriteRankChunk& want) {
  EXPECT_EQ(m.BytesAsString(1), want.session_id());
  EXPECT_EQ(m.Varint(2), want.step());
  EXPECT_EQ(m.Varint(3), want.offset());
  EXPECT_EQ(m.BytesAsString(4), want.data());
  EXPECT_EQ(m.BytesLength(4), want.data().size());
}

TEST(BulkMessageTest, ReadsWhatProtobufWritesInAnySlicing) {
  const uint64_t seed = std::random_device{}();
  std::printf("seed %llu\n", static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  for (int i = 0; i < 2000; ++i) {
    v1::WriteRankChunk c;
    if (rng() % 2) c.set_session_id(std::string(rng() % 20, 'S'));
    c.set_step(rng() % 3 == 0 ? 0 : rng() >> (rng() % 64));
    c.set_offset(rng() >> (rng() % 64));
    std::string data(rng() % 300, '\0');
    for (char& ch : data) ch = static_cast<char>(rng());
    c.set_data(data);
    auto m = BulkMessage::Parse(Sliced(c.SerializeAsString(), rng), kWriteRankChunk);
    ASSERT_TRUE(m.ok()) << m.status();
    ExpectSame(*m, c);
  }
}

TEST(BulkMessageTest, WhatItWritesProtobufReadsAsTheMessage) {
  std::string payload(100000, '\0');
  for (size_t i = 0; i < payload.size(); ++i) payload[i] = static_cast<char>(i * 7);
  WireWriter w;
  w.Bytes(1, "session");
  w.Varint(2, 0);
  w.Varint(3, uint64_t{1} << 40);
  w.BytesHeader(4, payload.size());
  auto keep = std::make_shared<int>(0);
  grpc::Slice slices[] = {w.TakeSlice(), BorrowedSlice(payload.data(), 60000, keep),
                          BorrowedSlice(payload.data() + 60000, 40000, keep)};
  grpc::ByteBuffer buffer(slices, 3);
  grpc::Slice flat;
  ASSERT_TRUE(buffer.DumpToSingleSlice(&flat).ok());
  v1::WriteRankChunk c;
  ASSERT_TRUE(c.ParseFromArray(flat.begin(), static_cast<int>(flat.size())));
  EXPECT_EQ(c.session_id(), "session");
  EXPECT_EQ(c.step(), 0u);
  EXPECT_EQ(c.offset(), uint64_t{1} << 40);
  EXPECT_EQ(c.data(), payload);

  // And the payload is read where it lies, not copied.
  auto m = BulkMessage::Parse(buffer, kWriteRankChunk);
  ASSERT_TRUE(m.ok()) << m.status();
  ASSERT_EQ(m->Bytes(4).size(), 2u);
  EXPECT_EQ(m->Bytes(4)[0].data(), reinterpret_cast<const uint8_t*>(payload.data()));
}

TEST(BulkMessageTest, ABorrowedSliceHoldsItsOwnerUntilGrpcLetsGo) {
  auto released = std::make_shared<absl::Notification>();
  std::string bytes = "borrowed";
  {
    std::shared_ptr<void> keep(nullptr, [released](void*) { released->Notify(); });
    grpc::Slice s = BorrowedSlice(bytes.data(), bytes.size(), keep);
    keep.reset();
    grpc::ByteBuffer b(&s, 1);
    EXPECT_FALSE(released->HasBeenNotified());
  }
  EXPECT_TRUE(released->HasBeenNotified());
}

TEST(BulkMessageTest, HostileBytesAreRefusedOrReadAsProtobufReadsThem) {
  const uint64_t seed = std::random_device{}();
  std::printf("seed %llu\n", static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  v1::WriteRankChunk base;
  base.set_session_id("0123456789abcdef");
  base.set_step(77);
  base.set_offset(1 << 20);
  base.set_data(std::string(64, 'd'));
  const std::string good = base.SerializeAsString();
  int refused = 0;
  for (int i = 0; i < 20000; ++i) {
    std::string bytes = good;
    switch (rng() % 3) {
      case 0:
        bytes.resize(rng() % bytes.size());
        break;
      case 1:
        for (int k = 0; k < 1 + static_cast<int>(rng() % 4); ++k) {
          bytes[rng() % bytes.size()] = static_cast<char>(rng());
        }
        break;
      default:
        bytes.insert(rng() % bytes.size(), std::string(1 + rng() % 12, static_cast<char>(rng())));
    }
    auto m = BulkMessage::Parse(Sliced(bytes, rng), kWriteRankChunk);
    v1::WriteRankChunk want;
    const bool protobuf_ok = want.ParseFromString(bytes);
    if (!m.ok()) {
      EXPECT_EQ(m.status().code(), absl::StatusCode::kDataLoss);
      ++refused;
      continue;
    }
    // Whatever it accepts, protobuf accepts, with the same fields.
    ASSERT_TRUE(protobuf_ok) << "accepted bytes protobuf refuses, case " << i;
    ExpectSame(*m, want);
  }
  EXPECT_GT(refused, 0);
}

TEST(BulkMessageTest, AFieldOfTheWrongTypeIsRefusedByName) {
  WireWriter w;
  w.Bytes(3, "not a varint");
  grpc::Slice s = w.TakeSlice();
  auto m = BulkMessage::Parse(grpc::ByteBuffer(&s, 1), kWriteRankChunk);
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(m.status().message().find("field 3"), std::string::npos) << m.status();
}

}  // namespace
}  // namespace ecsnap
