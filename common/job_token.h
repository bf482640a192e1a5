// A job's token for the TCP data plane: HMAC-SHA256 of the job id under the
// daemon's job secret, in hex. The daemon checks it when a TCP client
// attaches; `ecsnapctl job-token` prints it for an operator to hand to the
// job. A token admits one job only, and cannot be turned into another's.
#ifndef ECSNAP_COMMON_JOB_TOKEN_H_
#define ECSNAP_COMMON_JOB_TOKEN_H_

#include <string>

#include "absl/strings/string_view.h"

namespace ecsnap {

std::string JobToken(absl::string_view secret, absl::string_view job_id);

// Constant-time comparison of two tokens.
bool TokensEqual(absl::string_view a, absl::string_view b);

}  // namespace ecsnap

#endif  // ECSNAP_COMMON_JOB_TOKEN_H_
