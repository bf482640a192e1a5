// The one place absl::Status and grpc::Status are converted, both ways. Codes
// share their numbering; messages pass through unchanged.
#ifndef ECSNAP_COMMON_GRPC_STATUS_H_
#define ECSNAP_COMMON_GRPC_STATUS_H_

#include <grpcpp/support/status.h>

#include <string>

#include "absl/status/status.h"

namespace ecsnap {

inline grpc::Status ToGrpc(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

inline absl::Status FromGrpc(const grpc::Status& s) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

}  // namespace ecsnap

#endif  // ECSNAP_COMMON_GRPC_STATUS_H_
