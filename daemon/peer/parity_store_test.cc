#include "daemon/peer/parity_store.h"

#include <filesystem>
#include <cstdlib>
#include <cstring>
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

// Slot 1 of RS(3,2) keeps row 0 of stripe 1 and row 1 of stripe 0.
std::vector<uint8_t> Bytes(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<uint8_t> v(n);
  for (auto& b : v) b = static_cast<uint8_t>(rng());
  return v;
}

TEST_F(ParityStoreTest, ABadCrcDiscardsTheRowWhichFoldsAgainFromScratch) {
  const ec::Layout layout = *ec::Layout::Create(3, 2);
  ParityStore store(arena_.get(), layout, codec_.get(), 1);
  std::vector<peer::StripeProtected> lost;
  store.SetRowLostListener([&](const peer::StripeProtected& row) { lost.push_back(row); });
  const std::vector<uint8_t> d0 = Bytes(500, 1), d1 = Bytes(700, 2), d2 = Bytes(300, 3);
  ASSERT_TRUE(Push(store, 1, 0, d0).ok());
  // Position 1 arrives with a CRC its bytes do not have: they are folded in
  // already, so the whole row goes, and position 0 must come again.
  auto fold = *store.BeginFold("job", 7, 1, 1, d1.size(), ec::Crc32c(d1) ^ 1);
  ASSERT_TRUE(store.FoldPiece(*fold, d1).ok());
  EXPECT_EQ(store.EndFold(*fold).status().code(), absl::StatusCode::kDataLoss);
  ASSERT_EQ(lost.size(), 1u);
  EXPECT_TRUE(lost[0].lost());
  EXPECT_EQ(lost[0].stripe(), 1u);
  EXPECT_EQ(lost[0].row(), 0u);
  EXPECT_EQ(store.Row("job", 7, 1).status().code(), absl::StatusCode::kNotFound);
  // Never poisoned: every position folds again and the row is the encoding.
  std::optional<peer::StripeProtected> done;
  for (int p : {2, 1, 0}) {
    auto r = Push(store, 1, p, p == 0 ? d0 : p == 1 ? d1 : d2);
    ASSERT_TRUE(r.ok()) << r.status();
    done = *r;
  }
  ASSERT_TRUE(done.has_value());
  std::vector<std::vector<uint8_t>> parity(2, std::vector<uint8_t>(700));
  std::vector<ec::ConstBytes> in = {d0, d1, d2};
  std::vector<ec::MutableBytes> out = {absl::MakeSpan(parity[0]), absl::MakeSpan(parity[1])};
  ASSERT_TRUE(codec_->Encode(in, out).ok());
  auto row = *store.Row("job", 7, 1);
  EXPECT_EQ(std::vector<uint8_t>(row.bytes.begin(), row.bytes.end()), parity[0]);
}

TEST_F(ParityStoreTest, ABrokenPushDiscardsTheRowAndVoidsFoldsInFlight) {
  ParityStore store(arena_.get(), *ec::Layout::Create(3, 2), codec_.get(), 1);
  int lost = 0;
  store.SetRowLostListener([&](const peer::StripeProtected&) { ++lost; });
  const std::vector<uint8_t> d0 = Bytes(500, 1), d1 = Bytes(500, 2);
  ASSERT_TRUE(Push(store, 1, 0, d0).ok());
  auto a = *store.BeginFold("job", 7, 1, 1, d1.size(), ec::Crc32c(d1));
  auto b = *store.BeginFold("job", 7, 1, 2, d1.size(), ec::Crc32c(d1));
  ASSERT_TRUE(store.FoldPiece(*a, absl::MakeConstSpan(d1).first(100)).ok());
  ASSERT_TRUE(store.FoldPiece(*b, absl::MakeConstSpan(d1).first(100)).ok());
  store.AbortFold(*a);  // the stream broke after 100 bytes
  EXPECT_EQ(lost, 1);
  // The other push in flight folded into bytes that are gone: it is told to
  // push again rather than completing a row that is wrong.
  EXPECT_EQ(store.FoldPiece(*b, absl::MakeConstSpan(d1).subspan(100)).code(),
            absl::StatusCode::kAborted);
  EXPECT_EQ(store.EndFold(*b).status().code(), absl::StatusCode::kAborted);
  // And the positions fold again.
  EXPECT_TRUE(Push(store, 1, 1, d1).ok());
  EXPECT_TRUE(Push(store, 1, 0, d0).ok());
}

TEST_F(ParityStoreTest, OtherBytesUnderAFoldedNameResetTheRow) {
  // A step rewound and written again: same job, step and position, other
  // bytes. Acknowledging it as "already folded" would keep stale parity.
  ParityStore store(arena_.get(), *ec::Layout::Create(3, 2), codec_.get(), 1);
  int lost = 0;
  store.SetRowLostListener([&](const peer::StripeProtected&) { ++lost; });
  const std::vector<uint8_t> d0 = Bytes(500, 1), d1 = Bytes(500, 2), d2 = Bytes(500, 3);
  for (int p : {0, 1, 2}) ASSERT_TRUE(Push(store, 1, p, p == 0 ? d0 : p == 1 ? d1 : d2).ok());
  ASSERT_TRUE(store.Row("job", 7, 1).ok());
  const std::vector<uint8_t> d1b = Bytes(500, 22);
  auto r = Push(store, 1, 1, d1b);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(lost, 1);
  EXPECT_EQ(store.Row("job", 7, 1).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store.MissingRows("job", 7), (std::vector<int>{0, 1}));
}

TEST_F(ParityStoreTest, CompleteRowsAreReadoptedAfterARestartAndCorruptOnesDropped) {
  const ec::Layout layout = *ec::Layout::Create(3, 2);
  const std::vector<uint8_t> d0 = Bytes(5000, 1), d1 = Bytes(7000, 2), d2 = Bytes(3000, 3);
  std::vector<uint8_t> row1;
  // A daemon killed with complete rows: its store is never destroyed (so it
  // is leaked on purpose), only its arena file remains.
  auto* killed = new ParityStore(arena_.get(), layout, codec_.get(), 1);
  for (int stripe : {0, 1}) {
    for (int p : {0, 1, 2}) {
      ASSERT_TRUE(Push(*killed, stripe, p, p == 0 ? d0 : p == 1 ? d1 : d2).ok());
    }
  }
  auto r0 = *killed->Row("job", 7, 0);
  auto r1 = *killed->Row("job", 7, 1);
  row1.assign(r1.bytes.begin(), r1.bytes.end());
  const_cast<uint8_t*>(r0.bytes.data())[17] ^= 0x40;  // a flipped bit in memory
  r0.pin.reset();
  r1.pin.reset();
  arena_.reset();

  Arena::Options o;
  o.dir = dir_;
  o.bytes = 8 << 20;
  o.index_entries = 16;
  arena_ = *Arena::Open(o);
  ParityStore store(arena_.get(), layout, codec_.get(), 1);
  ParityStore::AdoptReport report = store.Adopt();
  EXPECT_EQ(report.rows_adopted, 1u);
  EXPECT_EQ(report.rows_dropped, 1u);
  ASSERT_EQ(report.notes.size(), 1u);
  EXPECT_NE(report.notes[0].find("stripe 0 parity row 1: its bytes fail their crc32c"),
            std::string::npos)
      << report.notes[0];
  auto adopted = store.Row("job", 7, 1);
  ASSERT_TRUE(adopted.ok()) << adopted.status();
  EXPECT_EQ(std::vector<uint8_t>(adopted->bytes.begin(), adopted->bytes.end()), row1);
  EXPECT_EQ(store.MissingRows("job", 7), std::vector<int>{0});
  // The adopted row still knows its positions: a repeat is acknowledged.
  auto again = Push(store, 1, 2, d2);
  ASSERT_TRUE(again.ok());
  EXPECT_FALSE(again->has_value());
  EXPECT_TRUE(store.Row("job", 7, 1).ok());
}

TEST_F(ParityStoreTest, AStepIsAbandonedOnlyWhileARowOfItIsIncomplete) {
  const ec::Layout layout = *ec::Layout::Create(3, 2);
  ParityStore store(arena_.get(), layout, codec_.get(), 1);
  const std::vector<uint8_t> d = Bytes(400, 9);
  for (int stripe : {0, 1}) {
    for (int p : {0, 1, 2}) ASSERT_TRUE(Push(store, stripe, p, d).ok());
  }
  // Both rows complete: the step may become PROTECTED anywhere; not abandoned.
  EXPECT_FALSE(store.TryAbandon("job", 7));
  EXPECT_FALSE(store.Abandoned("job", 7));
  // Step 8: one position of stripe 0 folded, then a fold in flight.
  auto fold = store.BeginFold("job", 8, 0, 0, d.size(), ec::Crc32c(d));
  ASSERT_TRUE(fold.ok());
  EXPECT_TRUE(store.TryAbandon("job", 8));
  EXPECT_TRUE(store.Abandoned("job", 8));
  // The fold in flight can never complete the sealed row, and no new push
  // of the step is taken.
  EXPECT_FALSE(store.FoldPiece(**fold, d).ok());
  EXPECT_FALSE(store.EndFold(**fold).ok());
  EXPECT_EQ(store.BeginFold("job", 8, 1, 0, d.size(), ec::Crc32c(d)).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST_F(ParityStoreTest, OwnRowsCountOnlyWhileHeldAndRetiredStepsAreRefused) {
  const ec::Layout layout = *ec::Layout::Create(3, 2);
  ParityStore store(arena_.get(), layout, codec_.get(), 1);
  peer::StripeProtected mine;
  mine.set_job_id("job");
  mine.set_step(7);
  mine.set_stripe(1);
  mine.set_row(0);
  mine.set_holder_slot(1);
  // The group says this slot completed the row, but it does not hold it.
  EXPECT_EQ(store.RecordRow(mine), 0);
  peer::StripeProtected other = mine;
  other.set_stripe(3);
  other.set_row(1);
  other.set_holder_slot(4);
  EXPECT_EQ(store.RecordRow(other), 1);
  other.set_lost(true);
  EXPECT_EQ(store.RecordRow(other), 0);
  store.DropBelow("job", 8);
  EXPECT_EQ(Push(store, 1, 0, Bytes(10, 1)).status().code(),
            absl::StatusCode::kFailedPrecondition);
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
  row.set_holder_slot(4);
  EXPECT_EQ(store.RecordRow(row), 1);
  EXPECT_EQ(store.RecordRow(row), 1);
  row.set_row(0);
  row.set_holder_slot(3);
  EXPECT_EQ(store.RecordRow(row), 2);
  ASSERT_TRUE(store.InstallRow("job", 7, 0, std::vector<uint8_t>(5000, 1)).ok());
  auto k = store.Knowledge();
  ASSERT_EQ(k.size(), 1u);
  EXPECT_EQ(k.begin()->second.slots.at(2).payload_bytes(), 99u);
  EXPECT_EQ(k.begin()->second.complete_stripes, std::vector<int>{0});
  const uint64_t free_before = arena_->free_bytes();
  store.DropBelow("job", 8);
  EXPECT_TRUE(store.Knowledge().empty());
  // The row's extent and its index record's page.
  EXPECT_EQ(arena_->free_bytes(), free_before + 8192 + 4096);
}

// Retention (or a rewind, or an abandoned step) may drop a row while a
// rebuild decodes into it: its memory stays the rebuild's until the
// reservation goes (never handed to another allocation under the decode),
// and completing it is refused.
TEST_F(ParityStoreTest, ARowDroppedWhileDecodedKeepsItsMemoryUntilTheReservationGoes) {
  ParityStore store(arena_.get(), *ec::Layout::Create(3, 2), codec_.get(), 1);
  const uint64_t free_before = arena_->free_bytes();
  auto reserved = store.ReserveRow("job", 7, 0, 5000);
  ASSERT_TRUE(reserved.ok());
  const uint64_t free_reserved = arena_->free_bytes();
  EXPECT_LT(free_reserved, free_before);
  store.DropBelow("job", 8);
  // Still the rebuild's: writing all of it is safe, and nothing else got it.
  EXPECT_EQ(arena_->free_bytes(), free_reserved);
  std::memset(reserved->bytes.data(), 0xcd, reserved->bytes.size());
  // A later reservation of the same row (another pass) is a different row.
  auto again = store.ReserveRow("job", 7, 0, 5000);
  if (again.ok()) {
    EXPECT_NE(again->bytes.data(), reserved->bytes.data());
    EXPECT_EQ(store.CompleteRow("job", 7, 0, {}, &*reserved).code(), absl::StatusCode::kAborted);
    again->hold.reset();
    store.DiscardIncompleteRow("job", 7, 0);
  } else {
    EXPECT_EQ(store.CompleteRow("job", 7, 0, {}, &*reserved).code(),
              absl::StatusCode::kNotFound);
  }
  reserved->hold.reset();
  EXPECT_EQ(arena_->free_bytes(), free_before);
}

TEST_F(ParityStoreTest, ARowReservedByAFailedRebuildIsDiscardedACompleteOneIsNot) {
  ParityStore store(arena_.get(), *ec::Layout::Create(3, 2), codec_.get(), 1);
  const uint64_t free_before = arena_->free_bytes();
  auto half = store.ReserveRow("job", 7, 0, 5000);
  ASSERT_TRUE(half.ok());
  std::memset(half->bytes.data(), 0xab, half->bytes.size());  // half-decoded bytes
  ASSERT_TRUE(store.InstallRow("job", 7, 1, std::vector<uint8_t>(100, 1)).ok());
  // A rebuild never replaces a row this slot holds complete.
  EXPECT_EQ(store.ReserveRow("job", 7, 1, 100).status().code(),
            absl::StatusCode::kFailedPrecondition);
  store.DiscardIncompleteRow("job", 7, 0);
  store.DiscardIncompleteRow("job", 7, 1);
  half->hold.reset();  // the failed rebuild lets go of the row it decoded into
  EXPECT_EQ(store.MissingRows("job", 7), std::vector<int>{0});
  EXPECT_TRUE(store.Row("job", 7, 1).ok());
  // Stripe 0's extent is back; stripe 1's row and its index record remain.
  EXPECT_EQ(arena_->free_bytes(), free_before - 4096 - 4096);
  // A push into stripe 0 starts from zeros, not from the leftover bytes.
  const std::vector<uint8_t> d = Bytes(64, 5);
  for (int p : {0, 1, 2}) ASSERT_TRUE(Push(store, 0, p, d).ok());
  std::vector<std::vector<uint8_t>> parity(2, std::vector<uint8_t>(64));
  std::vector<ec::ConstBytes> in = {d, d, d};
  std::vector<ec::MutableBytes> out = {absl::MakeSpan(parity[0]), absl::MakeSpan(parity[1])};
  ASSERT_TRUE(codec_->Encode(in, out).ok());
  auto row = *store.Row("job", 7, 0);
  EXPECT_EQ(std::vector<uint8_t>(row.bytes.begin(), row.bytes.end()), parity[1]);
}

}  // namespace
}  // namespace ecsnap::daemon
