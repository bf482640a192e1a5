// Loading and checking the daemon's configuration (proto/config.proto).
#ifndef ECSNAP_DAEMON_CONFIG_H_
#define ECSNAP_DAEMON_CONFIG_H_

#include <string>

#include "absl/status/statusor.h"
#include "proto/config.pb.h"

namespace ecsnap::daemon {

// Parses a text-format Config. INVALID_ARGUMENT with the parser's line and
// column on a syntax error; NOT_FOUND when the file cannot be read.
absl::StatusOr<config::Config> LoadConfig(const std::string& path);
// The same from text; `source` names it in messages.
absl::StatusOr<config::Config> ParseConfig(const std::string& text, const std::string& source);

// Fills unset fields with their documented defaults.
void ApplyDefaults(config::Config* config);

// Checks the config for the daemon of `slot`: k and m against the number of
// slots, the slot in range, sizes sensible. INVALID_ARGUMENT naming the field.
absl::Status ValidateConfig(const config::Config& config, uint32_t slot);

// daemon.peer_listen_host without brackets ("[::]" -> "::").
std::string PeerListenHost(const std::string& host);
// The address the peer plane listens on: `host` (peer_listen_host) with the
// port of `peer_address` ("::" and "x:7071" -> "[::]:7071").
std::string PeerListenAddress(const std::string& host, const std::string& peer_address);

// The slot whose `node` is `node`. NOT_FOUND naming the nodes the config
// knows when none is; INVALID_ARGUMENT when two slots name the same node.
absl::StatusOr<uint32_t> SlotOfNode(const config::Config& config, const std::string& node);

}  // namespace ecsnap::daemon

#endif  // ECSNAP_DAEMON_CONFIG_H_
