// A channel to a daemon's admin plane, as ecsnapctl and tests open it: local
// credentials on a Unix socket or loopback TCP, TLS (checking the daemon's
// certificate against the cluster CA) elsewhere, and the admin token sent
// with every call.
#ifndef ECSNAP_CLIENT_ADMIN_CHANNEL_H_
#define ECSNAP_CLIENT_ADMIN_CHANNEL_H_

#include <memory>
#include <string>

#include <grpcpp/channel.h>

#include "absl/status/statusor.h"

namespace ecsnap {

struct AdminChannelOptions {
  // host:port, unix:PATH, or /PATH.
  std::string address = "127.0.0.1:7070";
  // Default: admin.token beside a unix: address, else /run/ecsnap/admin.token.
  std::string token_file;
  // Cluster CA: when set, the daemon is reached over TLS and must present
  // the certificate of `slot` (the name "slot-N.ecsnap").
  std::string ca_file;
  uint32_t slot = 0;
};

// Where the token of the daemon at `address` is, when not given.
std::string DefaultAdminTokenFile(const std::string& address);

// NOT_FOUND / PERMISSION_DENIED with a sentence naming the file when the
// token or CA cannot be read.
absl::StatusOr<std::shared_ptr<grpc::Channel>> OpenAdminChannel(const AdminChannelOptions& options);

}  // namespace ecsnap

#endif  // ECSNAP_CLIENT_ADMIN_CHANNEL_H_
