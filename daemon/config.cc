#include "daemon/config.h"

#include <arpa/inet.h>

#include <vector>

#include <google/protobuf/io/tokenizer.h>
#include <google/protobuf/text_format.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/address.h"
#include "common/data_plane_http2.h"
#include "common/read_file.h"

namespace ecsnap::daemon {
namespace {

class CollectErrors : public google::protobuf::io::ErrorCollector {
 public:
  void AddError(int line, int column, const std::string& message) override {
    if (first_.empty()) first_ = absl::StrFormat("line %d column %d: %s", line + 1, column + 1, message);
  }
  const std::string& first() const { return first_; }

 private:
  std::string first_;
};

}  // namespace

absl::StatusOr<config::Config> LoadConfig(const std::string& path) {
  std::optional<std::string> text = ReadWholeFile(path);
  if (!text) return absl::NotFoundError(absl::StrFormat("cannot read config file %s", path));
  return ParseConfig(*text, "config file " + path);
}

absl::StatusOr<config::Config> ParseConfig(const std::string& text, const std::string& source) {
  config::Config config;
  google::protobuf::TextFormat::Parser parser;
  CollectErrors errors;
  parser.RecordErrorsTo(&errors);
  if (!parser.ParseFromString(text, &config)) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: %s", source, errors.first()));
  }
  return config;
}

void ApplyDefaults(config::Config* config) {
  config::Cluster* c = config->mutable_cluster();
  if (c->k() == 0) c->set_k(1);
  if (c->peer_timeout_ms() == 0) c->set_peer_timeout_ms(5000);
  config::Daemon* d = config->mutable_daemon();
  if (d->arena_dir().empty()) d->set_arena_dir("/dev/shm/ecsnap");
  if (d->arena_bytes() == 0) d->set_arena_bytes(uint64_t{1} << 30);
  if (d->socket_path().empty()) d->set_socket_path("/run/ecsnap/ecsnapd.sock");
  if (d->admin_address().empty()) d->set_admin_address("127.0.0.1:7070");
  if (d->retain() == 0) d->set_retain(1);
  if (d->trainer_keepalive_ms() == 0) d->set_trainer_keepalive_ms(30000);
  const std::string& sock = d->socket_path();
  const size_t slash = sock.rfind('/');
  const std::string sock_dir = slash == std::string::npos ? std::string(".") : sock.substr(0, slash);
  if (d->admin_token_file().empty()) d->set_admin_token_file(sock_dir + "/admin.token");
  if (d->job_secret_file().empty()) d->set_job_secret_file(sock_dir + "/job.secret");
}

absl::Status ValidateConfig(const config::Config& config, uint32_t slot) {
  const config::Cluster& c = config.cluster();
  // In 64 bits: k + m of two 32-bit fields must not wrap to a small n.
  const uint64_t n = uint64_t{c.k()} + c.m();
  if (c.k() < 1 || n > 32) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "cluster.k = %d and cluster.m = %d: need k >= 1 and k + m <= 32", c.k(), c.m()));
  }
  const uint32_t slots = c.slots_size();
  if (slots == 0) {
    if (c.m() > 0) {
      return absl::InvalidArgumentError(
          "cluster.m > 0 needs the peers: list every node in cluster.slots");
    }
    if (slot != 0) return absl::InvalidArgumentError("--slot must be 0 when no slots are listed");
  } else {
    if (slot >= slots) {
      return absl::InvalidArgumentError(
          absl::StrFormat("--slot=%d but the config lists %d slots (0..%d)", slot, slots, slots - 1));
    }
    if (slots % n != 0) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%d slots cannot be cut into groups of k + m = %d; list a multiple of %d slots", slots,
          n, n));
    }
  }
  if (config.daemon().rdma_gid_index() > 255) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "daemon.rdma_gid_index is %d; a port's GID table index is from 0 to 255",
        config.daemon().rdma_gid_index()));
  }
  if (config.daemon().retain() > 64) {
    return absl::InvalidArgumentError("daemon.retain must be at most 64");
  }
  constexpr uint32_t kMaxTrainerKeepaliveMs = 24 * 3600 * 1000;
  if (config.daemon().trainer_keepalive_ms() != 0 &&
      (config.daemon().trainer_keepalive_ms() < kMinKeepaliveMs ||
       config.daemon().trainer_keepalive_ms() > kMaxTrainerKeepaliveMs)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "daemon.trainer_keepalive_ms is %d; it must be from %d to %d (or 0 for the default)",
        config.daemon().trainer_keepalive_ms(), kMinKeepaliveMs, kMaxTrainerKeepaliveMs));
  }
  if (const std::string& host = config.daemon().peer_listen_host(); !host.empty()) {
    // A host only: an address ("0.0.0.0", "::", "[::]") or a name, no port.
    const std::string bare = PeerListenHost(host);
    in6_addr v6{};
    const bool ipv6 = ::inet_pton(AF_INET6, bare.c_str(), &v6) == 1;
    if (bare.empty() || (!ipv6 && bare.find(':') != std::string::npos)) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "daemon.peer_listen_host %s is not a host (an address such as 0.0.0.0 or ::, without "
          "a port: the port is the one of the slot's peer_address)",
          host));
    }
    if (slots > 0) {
      const std::string& own = c.slots(slot).peer_address();
      if (PortOfAddress(own).empty()) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "daemon.peer_listen_host is set, but slot %d's peer_address %s has no TCP port to "
            "listen on",
            slot, own));
      }
    }
  }
  return absl::OkStatus();
}

std::string PeerListenHost(const std::string& host) {
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    return host.substr(1, host.size() - 2);
  }
  return host;
}

std::string PeerListenAddress(const std::string& host, const std::string& peer_address) {
  const std::string bare = PeerListenHost(host);
  const std::string port = PortOfAddress(peer_address);
  return absl::StrCat(bare.find(':') != std::string::npos ? "[" + bare + "]" : bare, ":", port);
}

absl::StatusOr<uint32_t> SlotOfNode(const config::Config& config, const std::string& node) {
  std::vector<uint32_t> found;
  std::vector<std::string> known;
  const auto& slots = config.cluster().slots();
  for (int i = 0; i < slots.size(); ++i) {
    if (!slots[i].node().empty()) known.push_back(slots[i].node());
    if (slots[i].node() == node) found.push_back(static_cast<uint32_t>(i));
  }
  if (found.size() > 1) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "cluster.slots %s all name node %s; each node holds one slot",
        absl::StrJoin(found, ", "), node));
  }
  if (found.empty()) {
    return absl::NotFoundError(absl::StrFormat(
        "no slot of the cluster config is on node %s (the slots' nodes: %s); add `node: \"%s\"` "
        "to its slot",
        node, known.empty() ? "none named" : absl::StrJoin(known, ", "), node));
  }
  return found[0];
}

}  // namespace ecsnap::daemon
