#include "common/bulk_message.h"

#include <algorithm>

#include <grpc/slice.h>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"

namespace ecsnap {

void WireWriter::Raw(uint64_t v) {
  while (v >= 0x80) {
    out_.push_back(static_cast<char>(v | 0x80));
    v >>= 7;
  }
  out_.push_back(static_cast<char>(v));
}

void WireWriter::Varint(int field, uint64_t value) {
  Raw(static_cast<uint64_t>(field) << 3 | WireField::kVarint);
  Raw(value);
}

void WireWriter::Bytes(int field, absl::string_view bytes) {
  BytesHeader(field, bytes.size());
  out_.append(bytes.data(), bytes.size());
}

void WireWriter::BytesHeader(int field, uint64_t length) {
  Raw(static_cast<uint64_t>(field) << 3 | WireField::kBytes);
  Raw(length);
}

grpc::Slice WireWriter::TakeSlice() {
  grpc::Slice s(out_);
  out_.clear();
  return s;
}

grpc::Slice BorrowedSlice(const void* data, size_t n, std::shared_ptr<void> keep) {
  auto* held = new std::shared_ptr<void>(std::move(keep));
  grpc_slice s = grpc_slice_new_with_user_data(
      const_cast<void*>(data), n, [](void* p) { delete static_cast<std::shared_ptr<void>*>(p); },
      held);
  return grpc::Slice(s, grpc::Slice::STEAL_REF);
}

namespace {

// Reads bytes across a message's slices.
class Cursor {
 public:
  explicit Cursor(const std::vector<grpc::Slice>& slices) : slices_(slices) { Settle(); }

  bool done() const { return i_ == slices_.size(); }

  bool Byte(uint8_t* b) {
    if (done()) return false;
    *b = slices_[i_].begin()[pos_++];
    Settle();
    return true;
  }

  bool Varint(uint64_t* v) {
    *v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      uint8_t b;
      if (!Byte(&b)) return false;
      if (shift == 63 && b > 1) return false;  // past 64 bits
      *v |= static_cast<uint64_t>(b & 0x7f) << shift;
      if ((b & 0x80) == 0) return true;
    }
    return false;
  }

  // The next `n` bytes as spans of the slices (appended to `out` unless null).
  bool Take(uint64_t n, std::vector<absl::Span<const uint8_t>>* out) {
    while (n > 0) {
      if (done()) return false;
      const uint64_t here = std::min<uint64_t>(n, slices_[i_].size() - pos_);
      if (out != nullptr) out->emplace_back(slices_[i_].begin() + pos_, here);
      pos_ += here;
      n -= here;
      Settle();
    }
    return true;
  }

 private:
  // Moves past exhausted (and empty) slices.
  void Settle() {
    while (i_ < slices_.size() && pos_ == slices_[i_].size()) {
      ++i_;
      pos_ = 0;
    }
  }

  const std::vector<grpc::Slice>& slices_;
  size_t i_ = 0;
  size_t pos_ = 0;
};

}  // namespace

absl::StatusOr<BulkMessage> BulkMessage::Parse(const grpc::ByteBuffer& buffer,
                                               absl::Span<const WireField> fields) {
  BulkMessage m;
  if (!buffer.Dump(&m.slices_).ok()) {
    return absl::DataLossError("the message's bytes could not be read (compressed?)");
  }
  Cursor c(m.slices_);
  while (!c.done()) {
    uint64_t tag;
    if (!c.Varint(&tag)) return absl::DataLossError("the message ends inside a field's tag");
    const uint64_t number = tag >> 3;
    const int type = static_cast<int>(tag & 7);
    if (number == 0 || number > (uint64_t{1} << 29) - 1) {
      return absl::DataLossError(absl::StrFormat("field number %d is not a protobuf field", number));
    }
    const WireField* known = nullptr;
    for (const WireField& f : fields) {
      if (static_cast<uint64_t>(f.number) == number) known = &f;
    }
    if (known != nullptr && known->type != type) {
      return absl::DataLossError(absl::StrFormat(
          "field %d came with wire type %d, expected %d", number, type, known->type));
    }
    const int n = static_cast<int>(number);
    uint64_t v = 0;
    bool ok = true;
    switch (type) {
      case WireField::kVarint:
        ok = c.Varint(&v);
        if (ok && known != nullptr) m.varints_[n] = v;
        break;
      case 1:  // fixed64
        ok = c.Take(8, nullptr);
        break;
      case 5:  // fixed32
        ok = c.Take(4, nullptr);
        break;
      case WireField::kBytes: {
        ok = c.Varint(&v);
        if (!ok) break;
        if (known == nullptr) {
          ok = c.Take(v, nullptr);
          break;
        }
        std::vector<absl::Span<const uint8_t>>& spans = m.bytes_[n];
        spans.clear();
        ok = c.Take(v, &spans);
        break;
      }
      default:
        return absl::DataLossError(
            absl::StrFormat("field %d has wire type %d, which no data-plane message uses", number,
                            type));
    }
    if (!ok) {
      return absl::DataLossError(
          absl::StrFormat("the message ends inside field %d (or a varint runs past 64 bits)", number));
    }
  }
  return m;
}

uint64_t BulkMessage::Varint(int field) const {
  auto it = varints_.find(field);
  return it == varints_.end() ? 0 : it->second;
}

absl::Span<const absl::Span<const uint8_t>> BulkMessage::Bytes(int field) const {
  auto it = bytes_.find(field);
  if (it == bytes_.end()) return {};
  return it->second;
}

uint64_t BulkMessage::BytesLength(int field) const {
  uint64_t n = 0;
  for (const auto& s : Bytes(field)) n += s.size();
  return n;
}

std::string BulkMessage::BytesAsString(int field) const {
  std::string out;
  out.reserve(BytesLength(field));
  for (const auto& s : Bytes(field)) out.append(reinterpret_cast<const char*>(s.data()), s.size());
  return out;
}

}  // namespace ecsnap
