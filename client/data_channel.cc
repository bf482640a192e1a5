#include "client/data_channel.h"

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include <grpcpp/create_channel.h>
#include <grpcpp/create_channel_posix.h>
#include <grpcpp/security/credentials.h>

#include "absl/strings/match.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "common/read_file.h"
#include "common/trainer_hello.h"

namespace ecsnap {
namespace {

// Connects to the daemon's socket and reads its hello: an admitted
// connection, or the daemon's reason why not.
absl::StatusOr<UniqueFd> ConnectAdmitted(const std::string& path, absl::Duration timeout,
                                         TrainerHello* hello_out) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr.sun_path)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("socket path %s is longer than a Unix socket allows", path));
  }
  std::memcpy(addr.sun_path, path.data(), path.size());
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!fd.valid()) return absl::InternalError(absl::StrFormat("socket: %s", std::strerror(errno)));
  // Non-blocking, so that a daemon whose backlog is full (EAGAIN on a Unix
  // socket) cannot hold the trainer past its deadline.
  const absl::Time deadline = absl::Now() + timeout;
  int rc;
  while ((rc = ::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr))) != 0 &&
         (errno == EINTR || errno == EAGAIN) && absl::Now() < deadline) {
    if (errno == EAGAIN) absl::SleepFor(absl::Milliseconds(10));
  }
  if (rc != 0) {
    if (errno == EAGAIN) {
      return absl::DeadlineExceededError(absl::StrFormat(
          "ecsnapd at %s takes no new connection (its queue stayed full for %s)", path,
          absl::FormatDuration(timeout)));
    }
    if (errno == EACCES || errno == EPERM) {
      return absl::PermissionDeniedError(absl::StrFormat(
          "cannot connect to ecsnapd at %s: permission denied. The daemon lets other users in "
          "only when its config lists them (daemon.trainer_uids, daemon.trainer_gids)",
          path));
    }
    return absl::UnavailableError(absl::StrFormat(
        "no ecsnapd answers at %s (%s); is the daemon running?", path, std::strerror(errno)));
  }
  auto hello = ReceiveTrainerHello(fd.get(), std::max(deadline - absl::Now(), absl::Milliseconds(1)));
  if (!hello.ok()) {
    return absl::Status(hello.status().code(),
                        absl::StrFormat("ecsnapd at %s: %s", path, hello.status().message()));
  }
  if (!hello->admitted) return absl::PermissionDeniedError(hello->message);
  *hello_out = *std::move(hello);
  return fd;
}

std::string SocketPath(const std::string& address) {
  return absl::StartsWith(address, "unix:") ? address.substr(5) : address;
}

void SetKeepalive(int keepalive_ms, grpc::ChannelArguments& args) {
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, keepalive_ms);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, keepalive_ms);
  args.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  args.SetInt(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);  // as long as it is silent
}

absl::StatusOr<DataChannel> OpenUnix(const std::string& path, const DataChannelOptions& options) {
  TrainerHello hello;
  absl::StatusOr<UniqueFd> fd = ConnectAdmitted(path, options.timeout, &hello);
  if (!fd.ok()) return fd.status();
  TrainerRole role;
  role.kind = TrainerRole::Kind::kGrpc;
  if (absl::Status st = SendTrainerRole(fd->get(), role, options.timeout); !st.ok()) {
    return absl::UnavailableError(absl::StrFormat("ecsnapd at %s: %s", path, st.message()));
  }
  DataChannel out;
  out.windows = hello.windows;
  UniqueFd second(::fcntl(fd->get(), F_DUPFD_CLOEXEC, 0));
  if (!second.valid()) {
    return absl::UnavailableError(
        absl::StrFormat("ecsnapd at %s: cannot duplicate the connection: %s", path,
                        std::strerror(errno)));
  }
  out.socket = std::make_shared<const UniqueFd>(std::move(second));
  grpc::ChannelArguments args = options.args;
  // A daemon of an earlier release takes no frequent pings (it would close
  // the connection for them): this one says so in its hello.
  out.pings = options.keepalive_ms > 0 && hello.pings;
  if (out.pings) SetKeepalive(options.keepalive_ms, args);
  out.channel = grpc::CreateCustomInsecureChannelFromFd("ecsnapd", fd->Release(), args);
  return out;
}

}  // namespace

absl::StatusOr<FetchedWindow> FetchWindow(const std::string& address, const std::string& token,
                                          absl::Duration timeout) {
  const std::string path = SocketPath(address);
  const absl::Time deadline = absl::Now() + timeout;
  TrainerHello hello;
  absl::StatusOr<UniqueFd> fd = ConnectAdmitted(path, timeout, &hello);
  if (!fd.ok()) return fd.status();
  TrainerRole role;
  role.kind = TrainerRole::Kind::kWindow;
  role.token = token;
  if (absl::Status st = SendTrainerRole(fd->get(), role, timeout); !st.ok()) {
    return absl::UnavailableError(absl::StrFormat("ecsnapd at %s: %s", path, st.message()));
  }
  auto reply =
      ReceiveTrainerHello(fd->get(), std::max(deadline - absl::Now(), absl::Milliseconds(1)));
  if (!reply.ok()) {
    return absl::Status(reply.status().code(),
                        absl::StrFormat("ecsnapd at %s: %s", path, reply.status().message()));
  }
  if (!reply->admitted) {
    return absl::FailedPreconditionError(
        absl::StrFormat("ecsnapd at %s gave no window: %s", path, reply->message));
  }
  if (!reply->fd.valid() || reply->fd_bytes == 0) {
    return absl::DataLossError(absl::StrFormat("ecsnapd at %s sent a window without a file", path));
  }
  FetchedWindow out;
  out.fd = std::move(reply->fd);
  out.bytes = reply->fd_bytes;
  return out;
}

absl::StatusOr<DataChannel> OpenDataChannel(DataChannelOptions options) {
  const std::string& a = options.address;
  if (absl::StartsWith(a, "unix:")) return OpenUnix(a.substr(5), options);
  if (!a.empty() && a[0] == '/') return OpenUnix(a, options);
  DataChannel out;
  std::shared_ptr<grpc::ChannelCredentials> creds = grpc::InsecureChannelCredentials();
  if (!options.ca_file.empty()) {
    std::optional<std::string> pem = ReadWholeFile(options.ca_file);
    if (!pem || pem->empty()) {
      return absl::InvalidArgumentError(
          absl::StrFormat("cannot read the CA file %s", options.ca_file));
    }
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = *std::move(pem);
    creds = grpc::SslCredentials(ssl);
    if (!options.tls_name.empty()) options.args.SetSslTargetNameOverride(options.tls_name);
  }
  // Over TCP there is no hello to ask: a remote trainer pings the daemon it
  // is configured for (and gRPC then sets TCP_USER_TIMEOUT to the same).
  out.pings = options.keepalive_ms > 0;
  if (out.pings) SetKeepalive(options.keepalive_ms, options.args);
  out.channel = grpc::CreateCustomChannel(a, creds, options.args);
  return out;
}

}  // namespace ecsnap
