// The bulk messages of the gRPC data plane (WriteRankChunk, ReadRankChunk)
// as raw gRPC byte buffers, so that a payload leaves from the caller's memory
// and is read where gRPC received it: the wire form stays protobuf's (a
// daemon or client that parses them as messages reads the same fields), but
// neither side copies the payload into a std::string and again into
// serialized slices.
//
// Sending: a message is a small header slice (the other fields, then the
// payload field's tag and length) and the payload itself as slices that
// borrow memory (BorrowedSlice). Receiving: BulkMessage parses the header
// fields of any protobuf encoding (fields in any order, repeated, unknown
// ones skipped) and gives the payload as spans of the received slices.
#ifndef ECSNAP_COMMON_BULK_MESSAGE_H_
#define ECSNAP_COMMON_BULK_MESSAGE_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <grpcpp/support/byte_buffer.h>
#include <grpcpp/support/slice.h>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace ecsnap {

// The protobuf wire form of a message's leading fields.
class WireWriter {
 public:
  // A varint field (uint64 and friends); zero is written too.
  void Varint(int field, uint64_t value);
  // A length-delimited field with its bytes.
  void Bytes(int field, absl::string_view bytes);
  // A length-delimited field's tag and length, its `length` bytes to
  // follow in slices of their own.
  void BytesHeader(int field, uint64_t length);

  grpc::Slice TakeSlice();

 private:
  void Raw(uint64_t v);
  std::string out_;
};

// A slice over `n` bytes at `data` that gRPC may hold as long as it likes:
// `keep` stays referenced until gRPC lets go of the slice, so the memory's
// owner learns when it may reuse it (the owner's deleter runs then).
grpc::Slice BorrowedSlice(const void* data, size_t n, std::shared_ptr<void> keep);

// The fields a receiver knows, with their wire types; others are skipped.
struct WireField {
  enum Type { kVarint = 0, kBytes = 2 };
  int number;
  Type type;
};

// A received message, read without copying its length-delimited fields.
class BulkMessage {
 public:
  // Moves keep the spans valid (the slices stay where they are); copies
  // would not.
  BulkMessage(BulkMessage&&) = default;
  BulkMessage& operator=(BulkMessage&&) = default;
  BulkMessage(const BulkMessage&) = delete;
  BulkMessage& operator=(const BulkMessage&) = delete;

  // DATA_LOSS, saying what is wrong, for bytes that are not a protobuf
  // message (a truncated field, a bad varint, a group, a length past the
  // end) or a known field with another wire type than `fields` gives it.
  static absl::StatusOr<BulkMessage> Parse(const grpc::ByteBuffer& buffer,
                                           absl::Span<const WireField> fields);

  // The last value of varint field `field`, 0 when absent (proto3).
  uint64_t Varint(int field) const;
  // The last occurrence of length-delimited field `field`, as spans of the
  // received slices (none when absent); valid while this object lives.
  absl::Span<const absl::Span<const uint8_t>> Bytes(int field) const;
  uint64_t BytesLength(int field) const;
  std::string BytesAsString(int field) const;

 private:
  BulkMessage() = default;
  std::vector<grpc::Slice> slices_;
  std::map<int, uint64_t> varints_;
  std::map<int, std::vector<absl::Span<const uint8_t>>> bytes_;
};

}  // namespace ecsnap

#endif  // ECSNAP_COMMON_BULK_MESSAGE_H_
