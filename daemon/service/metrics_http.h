// /metrics over HTTP for Prometheus (daemon.metrics_address): GET /metrics
// answers the text exposition format that `render` returns; anything else is
// 404. Served by libmicrohttpd on a thread of its own, at most 16
// connections at once, each cut after 10 s idle: a scraper cannot hold the
// daemon. Read-only and unauthenticated, like every Prometheus exporter: bind
// it to an address only the monitoring network reaches.
#ifndef ECSNAP_DAEMON_SERVICE_METRICS_HTTP_H_
#define ECSNAP_DAEMON_SERVICE_METRICS_HTTP_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"

struct MHD_Connection;
struct MHD_Daemon;

namespace ecsnap::daemon {

class MetricsHttpServer {
 public:
  // Listens on `address` (host:port; port 0 picks a free one). UNAVAILABLE
  // with the reason when it cannot. `render` is called on the server's
  // thread for each scrape.
  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Start(
      const std::string& address, std::function<std::string()> render);
  // Stops serving (waits for a scrape in progress).
  ~MetricsHttpServer();
  MetricsHttpServer(const MetricsHttpServer&) = delete;
  MetricsHttpServer& operator=(const MetricsHttpServer&) = delete;

  uint16_t port() const { return port_; }

  // Answers one request (libmicrohttpd's callback); true when queued.
  static bool Handle(void* self, ::MHD_Connection* connection, const char* url,
                     const char* method);

 private:
  explicit MetricsHttpServer(std::function<std::string()> render) : render_(std::move(render)) {}

  const std::function<std::string()> render_;
  ::MHD_Daemon* daemon_ = nullptr;
  uint16_t port_ = 0;
};

}  // namespace ecsnap::daemon

#endif  // ECSNAP_DAEMON_SERVICE_METRICS_HTTP_H_
