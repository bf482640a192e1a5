// Transport security of the daemon's planes (DESIGN.md §9).
//
// With the config's `tls` files, the peer plane is mutual TLS: every daemon
// presents a certificate of the cluster's CA whose subject alternative names
// include SlotName(N) ("slot-N.ecsnap", common/address.h) for its slot N
// (one slot per certificate), and
// requires the same of its
// callers. A caller's slot comes from its certificate, never from a message,
// and a client checks that the server it reaches holds the certificate of
// the slot it dialled (whatever the address). The admin and TCP data planes
// are TLS with the same certificate. Without `tls`, plaintext is served only
// when the config says `plaintext: true` and every address is loopback.
#ifndef ECSNAP_DAEMON_SERVICE_TLS_H_
#define ECSNAP_DAEMON_SERVICE_TLS_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include <grpcpp/grpcpp.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/security/server_credentials.h>

#include "absl/status/statusor.h"
#include "common/address.h"
#include "proto/config.pb.h"

namespace ecsnap::daemon {

// PEM contents of a node's certificate, key and the cluster CA.
struct TlsMaterial {
  std::string cert;
  std::string key;
  std::string ca;
};

// Reads and checks the daemon's `tls` files for `slot`: each readable, the
// certificate within its validity period, issued by the CA, naming the slot,
// and matching the key. nullopt when the config has no tls files.
// INVALID_ARGUMENT or NOT_FOUND with a sentence naming the file otherwise.
absl::StatusOr<std::optional<TlsMaterial>> LoadTls(const config::Daemon& daemon, uint32_t slot);

// Checks that the planes' security fits their addresses: no tls and no
// `plaintext: true` with peers, or any non-loopback address without tls,
// is refused with a sentence saying what to set.
absl::Status CheckTransportSecurity(const config::Config& config, uint32_t slot);

// Credentials of the peer plane: mutual TLS with `tls`, plaintext without.
std::shared_ptr<grpc::ServerCredentials> PeerServerCredentials(const TlsMaterial* tls);
std::shared_ptr<grpc::ChannelCredentials> PeerChannelCredentials(const TlsMaterial* tls);
// Server-side TLS (no client certificate) for the admin and TCP data planes.
std::shared_ptr<grpc::ServerCredentials> ServerTlsCredentials(const TlsMaterial& tls);

// The cluster slot the caller's certificate names; nullopt on a plaintext
// connection, or for a certificate naming none or several.
std::optional<uint32_t> CallerSlot(const grpc::ServerContext& context);

}  // namespace ecsnap::daemon

#endif  // ECSNAP_DAEMON_SERVICE_TLS_H_
