#include "ec/codec.h"

#include <isa-l/erasure_code.h>

#include <algorithm>
#include <cstring>
#include <string>

#include "absl/container/inlined_vector.h"
#include "absl/numeric/bits.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "ec/layout.h"

namespace ecsnap::ec {
namespace {

// ec_init_tables() writes 32 bytes per matrix coefficient.
constexpr size_t kTableBytesPerCoefficient = 32;
// Decode patterns kept; a group of 32 has at most a few thousand, and a
// working system sees a handful.
constexpr size_t kMaxCachedDecodePatterns = 1024;

template <typename T>
using SmallVector = absl::InlinedVector<T, kMaxGroupSlots>;

std::vector<uint8_t> InitTables(int cols, int rows, const uint8_t* coefficients) {
  std::vector<uint8_t> tables(kTableBytesPerCoefficient * cols * std::max(rows, 1));
  if (rows > 0) {
    ec_init_tables(cols, rows, const_cast<uint8_t*>(coefficients), tables.data());
  }
  return tables;
}

std::string Positions(uint32_t mask) {
  SmallVector<int> v;
  for (int q = 0; q < 32; ++q) {
    if (mask & (1u << q)) v.push_back(q);
  }
  return absl::StrCat("{", absl::StrJoin(v, ", "), "}");
}

}  // namespace

absl::StatusOr<std::unique_ptr<Codec>> Codec::Create(int k, int m) {
  absl::StatusOr<Layout> layout = Layout::Create(k, m);
  if (!layout.ok()) return layout.status();
  const int n = k + m;
  std::vector<uint8_t> matrix(static_cast<size_t>(n) * k);
  if (k == 1) {
    // Mirroring: every parity row is a copy. Any 1 x 1 sub-matrix of a
    // non-zero column is invertible, so decoding still works unchanged.
    std::fill(matrix.begin(), matrix.end(), 1);
  } else {
    gf_gen_cauchy1_matrix(matrix.data(), n, k);
  }
  std::vector<uint8_t> tables = InitTables(k, m, matrix.data() + k * k);
  return std::unique_ptr<Codec>(new Codec(k, m, std::move(matrix), std::move(tables)));
}

Codec::Codec(int k, int m, std::vector<uint8_t> matrix, std::vector<uint8_t> tables)
    : k_(k), m_(m), matrix_(std::move(matrix)), parity_tables_(std::move(tables)) {}

void Codec::Combine(const uint8_t* tables, absl::Span<const ConstBytes> src,
                    absl::Span<const MutableBytes> dst) {
  const size_t cols = src.size();
  const size_t rows = dst.size();
  // Cut [0, longest output) at every chunk end: inside one segment each source
  // is either wholly present or wholly zero, and each output wholly wanted or
  // not, so one ec_encode_data call per segment does the work in one pass.
  SmallVector<uint64_t> cuts = {0};
  for (const ConstBytes& s : src) cuts.push_back(s.size());
  for (const MutableBytes& d : dst) cuts.push_back(d.size());
  std::sort(cuts.begin(), cuts.end());
  cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());

  SmallVector<uint8_t*> in;
  SmallVector<uint8_t*> out;
  SmallVector<size_t> in_cols;
  SmallVector<size_t> out_rows;
  std::vector<uint8_t> gathered;
  for (size_t c = 0; c + 1 < cuts.size(); ++c) {
    const uint64_t begin = cuts[c];
    const uint64_t end = cuts[c + 1];
    in.clear();
    out.clear();
    in_cols.clear();
    out_rows.clear();
    for (size_t i = 0; i < cols; ++i) {
      if (src[i].size() >= end) {
        in.push_back(const_cast<uint8_t*>(src[i].data()) + begin);
        in_cols.push_back(i);
      }
    }
    for (size_t r = 0; r < rows; ++r) {
      if (dst[r].size() >= end) {
        out.push_back(dst[r].data() + begin);
        out_rows.push_back(r);
      }
    }
    if (out.empty()) continue;
    if (in.empty()) {
      for (uint8_t* o : out) std::memset(o, 0, end - begin);
      continue;
    }
    const uint8_t* segment_tables = tables;
    if (in.size() != cols || out.size() != rows) {
      // Tables are laid out [row][col][32]: keep the rows and columns in play.
      gathered.resize(kTableBytesPerCoefficient * in.size() * out.size());
      uint8_t* g = gathered.data();
      for (size_t r : out_rows) {
        for (size_t i : in_cols) {
          std::memcpy(g, tables + (r * cols + i) * kTableBytesPerCoefficient,
                      kTableBytesPerCoefficient);
          g += kTableBytesPerCoefficient;
        }
      }
      segment_tables = gathered.data();
    }
    // ISA-L takes int lengths; segments of a chunk are far below 2 GiB, but
    // split anyway rather than trust it.
    constexpr uint64_t kMaxPiece = uint64_t{1} << 30;
    for (uint64_t done = 0; done < end - begin; done += kMaxPiece) {
      const int piece = static_cast<int>(std::min<uint64_t>(kMaxPiece, end - begin - done));
      SmallVector<uint8_t*> in_at;
      SmallVector<uint8_t*> out_at;
      for (uint8_t* p : in) in_at.push_back(p + done);
      for (uint8_t* p : out) out_at.push_back(p + done);
      ec_encode_data(piece, static_cast<int>(in.size()), static_cast<int>(out.size()),
                     const_cast<uint8_t*>(segment_tables), in_at.data(), out_at.data());
    }
  }
}

absl::Status Codec::Encode(absl::Span<const ConstBytes> data,
                           absl::Span<const MutableBytes> parity) const {
  if (data.size() != static_cast<size_t>(k_) || parity.size() != static_cast<size_t>(m_)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "RS(%d,%d) encode needs %d data and %d parity chunks, got %d and %d", k_, m_, k_, m_,
        data.size(), parity.size()));
  }
  size_t longest = 0;
  for (const ConstBytes& d : data) longest = std::max(longest, d.size());
  for (int r = 0; r < m_; ++r) {
    if (parity[r].size() < longest) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "parity row %d has %d bytes but the longest data chunk has %d", r,
          parity[r].size(), longest));
    }
  }
  if (m_ == 0) return absl::OkStatus();
  Combine(parity_tables_.data(), data, parity);
  return absl::OkStatus();
}

absl::Status Codec::Fold(int position, ConstBytes data,
                         absl::Span<const MutableBytes> parity) const {
  if (position < 0 || position >= k_) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "data position %d is outside RS(%d,%d)'s 0..%d", position, k_, m_, k_ - 1));
  }
  if (parity.size() != static_cast<size_t>(m_)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("RS(%d,%d) fold needs %d parity rows, got %d", k_, m_, m_, parity.size()));
  }
  for (int r = 0; r < m_; ++r) {
    if (parity[r].size() < data.size()) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "parity row %d has %d bytes, shorter than the %d-byte data chunk %d", r,
          parity[r].size(), data.size(), position));
    }
  }
  if (m_ == 0 || data.empty()) return absl::OkStatus();
  constexpr uint64_t kMaxPiece = uint64_t{1} << 30;
  for (uint64_t done = 0; done < data.size(); done += kMaxPiece) {
    const int piece = static_cast<int>(std::min<uint64_t>(kMaxPiece, data.size() - done));
    SmallVector<uint8_t*> out;
    for (const MutableBytes& p : parity) out.push_back(p.data() + done);
    ec_encode_data_update(piece, k_, m_, position, const_cast<uint8_t*>(parity_tables_.data()),
                          const_cast<uint8_t*>(data.data()) + done, out.data());
  }
  return absl::OkStatus();
}

absl::Status Codec::FoldRow(int row, int position, ConstBytes data, MutableBytes parity) const {
  if (row < 0 || row >= m_ || position < 0 || position >= k_) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "row %d / data position %d is outside RS(%d,%d)", row, position, k_, m_));
  }
  if (parity.size() < data.size()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "parity row %d has %d bytes, shorter than the %d-byte data chunk %d", row, parity.size(),
        data.size(), position));
  }
  // One row's tables are contiguous: [row][col][32].
  uint8_t* tables =
      const_cast<uint8_t*>(parity_tables_.data()) + kTableBytesPerCoefficient * k_ * row;
  constexpr uint64_t kMaxPiece = uint64_t{1} << 30;
  for (uint64_t done = 0; done < data.size(); done += kMaxPiece) {
    const int piece = static_cast<int>(std::min<uint64_t>(kMaxPiece, data.size() - done));
    uint8_t* out = parity.data() + done;
    ec_encode_data_update(piece, k_, 1, position, tables, const_cast<uint8_t*>(data.data()) + done,
                          &out);
  }
  return absl::OkStatus();
}

std::shared_ptr<const std::vector<uint8_t>> Codec::DecodeTables(uint32_t survivor_mask,
                                                                uint32_t target_mask) const {
  const uint64_t key = (uint64_t{survivor_mask} << 32) | target_mask;
  {
    absl::MutexLock lock(&mu_);
    auto it = decode_cache_.find(key);
    if (it != decode_cache_.end()) return it->second;
  }
  // B: the generator rows of the survivors; its inverse maps survivors back
  // to data. A lost data row is a row of B^-1; a lost parity row is its
  // generator row times B^-1.
  const int k = k_;
  std::vector<uint8_t> b(static_cast<size_t>(k) * k);
  std::vector<uint8_t> b_inv(b.size());
  int row = 0;
  for (int q = 0; q < k_ + m_; ++q) {
    if (survivor_mask & (1u << q)) {
      std::memcpy(&b[row * k], &matrix_[q * k], k);
      ++row;
    }
  }
  // A Cauchy generator has no singular k x k sub-matrix; a failure here is a
  // broken invariant of this class, not bad input.
  if (gf_invert_matrix(b.data(), b_inv.data(), k) != 0) std::abort();

  std::vector<uint8_t> rows;
  for (int t = 0; t < k_ + m_; ++t) {
    if (!(target_mask & (1u << t))) continue;
    if (t < k) {
      rows.insert(rows.end(), &b_inv[t * k], &b_inv[t * k] + k);
      continue;
    }
    for (int c = 0; c < k; ++c) {
      uint8_t sum = 0;
      for (int j = 0; j < k; ++j) sum ^= gf_mul(matrix_[t * k + j], b_inv[j * k + c]);
      rows.push_back(sum);
    }
  }
  auto tables = std::make_shared<const std::vector<uint8_t>>(
      InitTables(k, absl::popcount(target_mask), rows.data()));

  absl::MutexLock lock(&mu_);
  if (decode_cache_.size() >= kMaxCachedDecodePatterns) decode_cache_.clear();
  decode_cache_.emplace(key, tables);
  return tables;
}

absl::Status Codec::Reconstruct(int stripe, absl::Span<const ConstBytes> shards, uint32_t present,
                                absl::Span<const int> targets,
                                absl::Span<const MutableBytes> outputs) const {
  const int n = k_ + m_;
  if (shards.size() != static_cast<size_t>(n) || targets.size() != outputs.size()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "stripe %d: reconstruct needs %d shards and one output per target, got %d shards, "
        "%d targets, %d outputs",
        stripe, n, shards.size(), targets.size(), outputs.size()));
  }
  const uint32_t all = n == 32 ? ~0u : (1u << n) - 1;
  present &= all;
  uint32_t target_mask = 0;
  for (int t : targets) {
    if (t < 0 || t >= n) {
      return absl::InvalidArgumentError(
          absl::StrFormat("stripe %d: target position %d is outside 0..%d", stripe, t, n - 1));
    }
    if (target_mask & (1u << t)) {
      return absl::InvalidArgumentError(
          absl::StrFormat("stripe %d: target position %d is named twice", stripe, t));
    }
    target_mask |= 1u << t;
  }
  if (targets.empty()) return absl::OkStatus();
  if (absl::popcount(present) < k_) {
    return absl::DataLossError(absl::StrFormat(
        "stripe %d cannot be decoded: positions %s are lost and only %d of %d chunks survive; "
        "RS(%d,%d) needs %d",
        stripe, Positions(all & ~present), absl::popcount(present), n, k_, m_, k_));
  }
  // Decode from the first k survivors: data rows first, so that losing only
  // parity makes B the identity and the work a plain re-encode.
  uint32_t survivors = 0;
  SmallVector<ConstBytes> src;
  for (int q = 0; q < n && static_cast<int>(src.size()) < k_; ++q) {
    if (present & (1u << q)) {
      survivors |= 1u << q;
      src.push_back(shards[q]);
    }
  }
  // Outputs in ascending position order, matching the rows of the tables.
  SmallVector<MutableBytes> dst;
  for (int t = 0; t < n; ++t) {
    if (!(target_mask & (1u << t))) continue;
    for (size_t i = 0; i < targets.size(); ++i) {
      if (targets[i] == t) dst.push_back(outputs[i]);
    }
  }
  std::shared_ptr<const std::vector<uint8_t>> tables = DecodeTables(survivors, target_mask);
  Combine(tables->data(), src, dst);
  return absl::OkStatus();
}

}  // namespace ecsnap::ec
