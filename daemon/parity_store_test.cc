#include "daemon/parity_store.h"

#include <filesystem>
#include <cstdlib>
#include <random>

#include "ec/crc32c.h"
#include "gtest/gtest.h"

namespace ecsnap::daemon {
namespace {

class ParityStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::string(std::getenv("TEST_TMPDIR") ? std::getenv("TEST_TMPDIR") : "/tmp") +
           "/parity_" + ::testing::UnitTest::GetInstance()->current_test_info()->name();
    std::filesystem::remove_all(dir_);
    Arena::Options o;
    o.dir = dir_;
    o.bytes = 8 << 20;
    o.index_entries = 16;
    arena_ = *Arena::Open(o);
    codec_ = *ec::Codec::Create(3, 2);
  }

  // Pushes `data` as `position` of `stripe` in pieces of `piece` bytes.
  absl::StatusOr<std::optional<peer::StripeProtected>> Push(ParityStore& store, int stripe,
                                                            int position,
                                                            const std::vector<uint8_t>& data,
                                                            size_t piece = 100) {
    auto fold = store.BeginFold("job", 7, stripe, position, data.size(), ec::Crc32c(data));
    if (!fold.ok()) return fold.status();
    if (*fold == nullptr) return std::optional<peer::StripeProtected>();
    for (size_t at = 0; at < data.size(); at += piece) {
      auto st = store.FoldPiece(**fold, absl::MakeConstSpan(data).subspan(at, piece));
      if (!st.ok()) return st;
    }
    return store.EndFold(**fold);
  }

  std::string dir_;
  std::unique_ptr<Arena> arena_;
  std::unique_ptr<ec::Codec> codec_;
};

TEST_F(ParityStoreTest, FoldsInAnyOrderToTheEncodedRowAndAnnouncesIt) {
  const ec::Layout layout = *ec::Layout::Create(3, 2);
  // Slot 1 keeps row 0 of stripe 1 and row 1 of stripe 0.
  ParityStore store(arena_.get(), layout, codec_.get(), 1);
  std::mt19937_64 rng(3);
  std::vector<std::vector<uint8_t>> data(3);
  for (int p = 0; p < 3; ++p) {
    data[p].resize(300 + 400 * p);  // unequal: the row grows as they come
    for (auto& b : data[p]) b = static_cast<uint8_t>(rng());
  }
  std::vector<std::vector<uint8_t>> parity(2, std::vector<uint8_t>(1100));
  std::vector<ec::ConstBytes> in(data.begin(), data.end());
  std::vector<ec::MutableBytes> out = {absl::MakeSpan(parity[0]), absl::MakeSpan(parity[1])};
  ASSERT_TRUE(codec_->Encode(in, out).ok());

  std::optional<peer::StripeProtected> notice;
  for (int p : {0, 2, 1}) {
    EXPECT_FALSE(notice.has_value());
    auto r = Push(store, 0, p, data[p]);
    ASSERT_TRUE(r.ok()) << r.status();
    notice = *r;
  }
  ASSERT_TRUE(notice.has_value());
  EXPECT_EQ(notice->row(), 1u);
  EXPECT_EQ(notice->holder_slot(), 1u);
  EXPECT_EQ(notice->parity_bytes(), 1100u);
  auto row = *store.Row("job", 7, 0);
  EXPECT_EQ(std::vector<uint8_t>(row.bytes.begin(), row.bytes.end()), parity[1]);
  EXPECT_EQ(row.crc32c, ec::Crc32c(parity[1]));

  // A repeated push is acknowledged and not folded again.
  auto again = Push(store, 0, 1, data[1]);
  ASSERT_TRUE(again.ok());
  EXPECT_FALSE(again->has_value());
  EXPECT_EQ(std::vector<uint8_t>(row.bytes.begin(), row.bytes.end()), parity[1]);

  // Stripe 2's parity lives on slots 2 and 3, not here.
  EXPECT_EQ(Push(store, 2, 0, data[0]).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(ParityStoreTest, ABadCrcPoisonsTheRow) {
  ParityStore store(arena_.get(), *ec::Layout::Create(3, 2), codec_.get(), 1);
  std::vector<uint8_t> data(500, 7);
  auto fold = *store.BeginFold("job", 7, 1, 0, data.size(), ec::Crc32c(data) ^ 1);
  ASSERT_TRUE(store.FoldPiece(*fold, data).ok());
  auto end = store.EndFold(*fold);
  EXPECT_EQ(end.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(Push(store, 1, 1, data).status().code(), absl::StatusCode::kAborted);
  EXPECT_EQ(store.Row("job", 7, 1).status().code(), absl::StatusCode::kNotFound);
}

TEST_F(ParityStoreTest, KnowledgeAndDropping) {
  ParityStore store(arena_.get(), *ec::Layout::Create(3, 2), codec_.get(), 0);
  peer::SlotStep slot;
  slot.set_slot(2);
  slot.set_payload_bytes(99);
  store.RecordSlot("job", 7, slot);
  peer::StripeProtected row;
  row.set_job_id("job");
  row.set_step(7);
  row.set_stripe(3);
  row.set_row(1);
  EXPECT_EQ(store.RecordRow(row), 1);
  EXPECT_EQ(store.RecordRow(row), 1);
  row.set_row(0);
  EXPECT_EQ(store.RecordRow(row), 2);
  ASSERT_TRUE(store.InstallRow("job", 7, 0, std::vector<uint8_t>(5000, 1)).ok());
  auto k = store.Knowledge();
  ASSERT_EQ(k.size(), 1u);
  EXPECT_EQ(k.begin()->second.slots.at(2).payload_bytes(), 99u);
  EXPECT_EQ(k.begin()->second.complete_stripes, std::vector<int>{0});
  const uint64_t free_before = arena_->free_bytes();
  store.DropBelow("job", 8);
  EXPECT_TRUE(store.Knowledge().empty());
  EXPECT_EQ(arena_->free_bytes(), free_before + 8192);
}

}  // namespace
}  // namespace ecsnap::daemon
