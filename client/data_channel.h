// The connection from a trainer to its node's ecsnapd, before any session.
//
// On a Unix socket the daemon first checks who connected (SO_PEERCRED) and
// answers with a hello (common/trainer_hello.h); gRPC then runs over the
// same socket, and each granted window's file is fetched on a connection of
// its own (FetchWindow). Over TCP the channel is plain gRPC, with TLS when a
// CA file is given.
#ifndef ECSNAP_CLIENT_DATA_CHANNEL_H_
#define ECSNAP_CLIENT_DATA_CHANNEL_H_

#include <cstdint>
#include <memory>
#include <string>

#include <grpcpp/channel.h>
#include <grpcpp/support/channel_arguments.h>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/unique_fd.h"

namespace ecsnap {

struct DataChannelOptions {
  // A Unix socket ("/path" or "unix:/path") or "host:port".
  std::string address;
  // TCP only: the cluster CA (PEM) to check the daemon's certificate with,
  // and the name it must carry ("slot-N.ecsnap"). Without a CA file the
  // channel is plaintext, which a daemon serves on loopback only.
  std::string ca_file;
  std::string tls_name;
  grpc::ChannelArguments args;
  // Pings a silent daemon after this many ms, and closes the connection
  // when the answer takes as long: over TCP always, over the Unix socket
  // where the daemon's hello says it takes pings. 0: never.
  int keepalive_ms = 0;
  absl::Duration timeout = absl::Seconds(10);
};

struct DataChannel {
  std::shared_ptr<grpc::Channel> channel;
  // The daemon hands this process windows of shared memory (a Unix socket
  // of a daemon with an arena).
  bool windows = false;
  // The channel pings the daemon (DataChannelOptions::keepalive_ms, and the
  // daemon takes pings).
  bool pings = false;
  // Unix socket only (null over TCP): a second descriptor of the connection
  // under `channel`. shutdown(2) on it ends the connection for gRPC too: a
  // daemon that stopped reading otherwise holds a stream's write, and the
  // memory it borrows, for as long as the process lives (a keepalive ping
  // cannot pass the unsent bytes; over TCP, gRPC's keepalive sets
  // TCP_USER_TIMEOUT, which covers that case).
  std::shared_ptr<const UniqueFd> socket;
};

// UNAVAILABLE when no daemon answers; PERMISSION_DENIED, with the daemon's
// sentence, when it refuses this process.
absl::StatusOr<DataChannel> OpenDataChannel(DataChannelOptions options);

struct FetchedWindow {
  UniqueFd fd;         // read-write, or read-only for a restore
  uint64_t bytes = 0;  // of the file
};

// The file of the window granted under `token`, from the daemon's socket at
// `address`. FAILED_PRECONDITION with the daemon's reason when it gives
// none (a used or expired token, another user's, a retired window).
absl::StatusOr<FetchedWindow> FetchWindow(const std::string& address, const std::string& token,
                                          absl::Duration timeout);

}  // namespace ecsnap

#endif  // ECSNAP_CLIENT_DATA_CHANNEL_H_
