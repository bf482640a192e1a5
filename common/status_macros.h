// RETURN_IF_ERROR / ASSIGN_OR_RETURN for absl::Status and absl::StatusOr.
// Debian's abseil (20220623) ships no status_macros.h; these are the usual two.
#ifndef ECSNAP_COMMON_STATUS_MACROS_H_
#define ECSNAP_COMMON_STATUS_MACROS_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define ECSNAP_CONCAT_INNER_(a, b) a##b
#define ECSNAP_CONCAT_(a, b) ECSNAP_CONCAT_INNER_(a, b)

// Returns the status of `expr` from the enclosing function if it is not OK.
#define RETURN_IF_ERROR(expr)                          \
  do {                                                 \
    ::absl::Status ecsnap_status_ = (expr);            \
    if (!ecsnap_status_.ok()) return ecsnap_status_;   \
  } while (0)

// `lhs = *rexpr` if `rexpr` (an absl::StatusOr) is OK; otherwise returns its
// status. `lhs` may be a declaration: ASSIGN_OR_RETURN(auto x, MakeX());
#define ASSIGN_OR_RETURN(lhs, rexpr) \
  ECSNAP_ASSIGN_OR_RETURN_IMPL_(ECSNAP_CONCAT_(ecsnap_statusor_, __LINE__), lhs, rexpr)

#define ECSNAP_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, rexpr) \
  auto statusor = (rexpr);                                  \
  if (!statusor.ok()) return std::move(statusor).status();  \
  lhs = *std::move(statusor)

#endif  // ECSNAP_COMMON_STATUS_MACROS_H_
