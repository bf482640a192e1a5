// The connection from a trainer to its node's ecsnapd, before any session.
//
// On a Unix socket the daemon first checks who connected (SO_PEERCRED) and
// answers with a hello that carries the arena's descriptor
// (common/trainer_hello.h); gRPC then runs over the same socket. Over TCP
// the channel is plain gRPC, with TLS when a CA file is given.
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
  absl::Duration timeout = absl::Seconds(10);
};

struct DataChannel {
  std::shared_ptr<grpc::Channel> channel;
  // The daemon's arena, when it shares one with this process.
  UniqueFd arena_fd;
  uint64_t arena_bytes = 0;
};

// UNAVAILABLE when no daemon answers; PERMISSION_DENIED, with the daemon's
// sentence, when it refuses this process.
absl::StatusOr<DataChannel> OpenDataChannel(DataChannelOptions options);

}  // namespace ecsnap

#endif  // ECSNAP_CLIENT_DATA_CHANNEL_H_
