// The admin plane's authentication (DESIGN.md §9): every call carries
// "authorization: Bearer <token>", checked in one place (an
// AuthMetadataProcessor on the admin server's credentials) before any
// handler runs. The token lives in a file: the daemon writes a fresh random
// one (mode 0600) at first start when the file does not exist, and ecsnapctl
// reads it.
#ifndef ECSNAP_DAEMON_SERVICE_ADMIN_AUTH_H_
#define ECSNAP_DAEMON_SERVICE_ADMIN_AUTH_H_

#include <memory>
#include <string>

#include <grpcpp/security/server_credentials.h>

#include "absl/status/statusor.h"
#include "daemon/service/tls.h"

namespace ecsnap::daemon {

// The secret in `path` (the admin token, the job secret); when the file
// does not exist, a new random one (256 bits, hex) written there with mode
// 0600 (and its directory made). FAILED_PRECONDITION when the file is a
// link, not this user's, readable by others, or empty. `what` names the file
// in messages ("admin token file").
absl::StatusOr<std::string> LoadOrCreateSecret(const std::string& what, const std::string& path,
                                              bool* created);

// Credentials of the admin server at `address` (host:port or unix:PATH):
// TLS on TCP when `tls` is given, else local credentials (Unix socket or
// loopback TCP only); every call must carry the token.
std::shared_ptr<grpc::ServerCredentials> AdminServerCredentials(const std::string& address,
                                                                const TlsMaterial* tls,
                                                                const std::string& token);

}  // namespace ecsnap::daemon

#endif  // ECSNAP_DAEMON_SERVICE_ADMIN_AUTH_H_
