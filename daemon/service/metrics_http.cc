#include "daemon/service/metrics_http.h"

#include <microhttpd.h>
#include <netdb.h>
#include <sys/socket.h>

#include <cstring>

#include "absl/strings/str_format.h"
#include "absl/strings/string_view.h"
#include "common/address.h"

namespace ecsnap::daemon {
namespace {

constexpr char kContentType[] = "text/plain; version=0.0.4; charset=utf-8";

MHD_Result Reply(MHD_Connection* connection, unsigned int code, const std::string& body,
                 const char* type) {
  MHD_Response* r = MHD_create_response_from_buffer(body.size(), const_cast<char*>(body.data()),
                                                    MHD_RESPMEM_MUST_COPY);
  if (r == nullptr) return MHD_NO;
  MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, type);
  const MHD_Result result = MHD_queue_response(connection, code, r);
  MHD_destroy_response(r);
  return result;
}

MHD_Result Dispatch(void* cls, MHD_Connection* connection, const char* url, const char* method,
                    const char*, const char*, size_t* upload_size, void**) {
  // No request body is read: a POST's upload is refused below unread.
  if (upload_size != nullptr && *upload_size != 0) *upload_size = 0;
  return MetricsHttpServer::Handle(cls, connection, url, method) ? MHD_YES : MHD_NO;
}

}  // namespace

bool MetricsHttpServer::Handle(void* self, MHD_Connection* connection, const char* url,
                               const char* method) {
  auto* server = static_cast<MetricsHttpServer*>(self);
  if (absl::string_view(method) != "GET" && absl::string_view(method) != "HEAD") {
    return Reply(connection, MHD_HTTP_METHOD_NOT_ALLOWED, "GET /metrics\n", "text/plain") ==
           MHD_YES;
  }
  if (absl::string_view(url) != "/metrics") {
    return Reply(connection, MHD_HTTP_NOT_FOUND, "ecsnapd serves /metrics only\n",
                 "text/plain") == MHD_YES;
  }
  return Reply(connection, MHD_HTTP_OK, server->render_(), kContentType) == MHD_YES;
}

absl::StatusOr<std::unique_ptr<MetricsHttpServer>> MetricsHttpServer::Start(
    const std::string& address, std::function<std::string()> render) {
  const std::string port = PortOfAddress(address);
  if (port.empty()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "metrics address %s is not host:port (e.g. 0.0.0.0:9464)", address));
  }
  const std::string host = HostOfAddress(address);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* found = nullptr;
  if (int rc = ::getaddrinfo(host.empty() ? nullptr : host.c_str(), port.c_str(), &hints, &found);
      rc != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("metrics address %s: %s", address, ::gai_strerror(rc)));
  }
  sockaddr_storage bind_to{};
  std::memcpy(&bind_to, found->ai_addr, found->ai_addrlen);
  const bool v6 = found->ai_family == AF_INET6;
  ::freeaddrinfo(found);

  std::unique_ptr<MetricsHttpServer> server(new MetricsHttpServer(std::move(render)));
  // epoll (MHD_USE_AUTO): the daemon holds thousands of descriptors (window
  // files), past select()'s 1024. An IPv6 address takes IPv4 scrapers too.
  server->daemon_ = MHD_start_daemon(
      MHD_USE_AUTO_INTERNAL_THREAD | (v6 ? MHD_USE_DUAL_STACK : 0), 0, nullptr, nullptr, &Dispatch,
      server.get(), MHD_OPTION_SOCK_ADDR, reinterpret_cast<sockaddr*>(&bind_to),
      MHD_OPTION_CONNECTION_LIMIT, 16u, MHD_OPTION_CONNECTION_TIMEOUT, 10u, MHD_OPTION_END);
  if (server->daemon_ == nullptr) {
    return absl::UnavailableError(absl::StrFormat(
        "cannot serve metrics on %s (the port is in use, or not ours to bind); set "
        "daemon.metrics_address to a free port",
        address));
  }
  const MHD_DaemonInfo* info = MHD_get_daemon_info(server->daemon_, MHD_DAEMON_INFO_BIND_PORT);
  server->port_ = info != nullptr ? info->port : 0;
  return server;
}

MetricsHttpServer::~MetricsHttpServer() {
  if (daemon_ != nullptr) MHD_stop_daemon(daemon_);
}

}  // namespace ecsnap::daemon
