// The TCP bulk transport (cluster.bulk_transport BULK_TCP, the default):
// chunk bytes over plain TCP connections, sent straight from arena memory
// and folded (or decoded) straight from a small receive buffer, with no
// protobuf, HTTP/2 or TLS pass in between (DESIGN.md §4, §9).
//
// A transfer is opened on the gRPC control channel (Peer.OpenPush,
// Peer.OpenRead), where the caller's certificate and every field are checked
// exactly as for the gRPC streams; the holder answers with a ticket: a
// 16-byte random token and its bulk port. The caller then opens one TCP
// connection to that port and presents the token; a token admits one
// connection, once, and expires after the peer timeout. Without a valid
// token a connection is closed before a byte of payload is read or sent.
//
// Wire of one connection (integers little-endian):
//   caller -> holder  "ECSNAPB1" (8 bytes), token (16 bytes)
//   push:  caller -> holder  exactly the ticket's length of chunk bytes
//          holder -> caller  uint32 status code, uint32 stripe complete,
//                            uint32 message length (<= 1024), message
//   read:  holder -> caller  exactly the ticket's length of bytes
//
// The bytes are not encrypted: a tap on the fabric can read them, and the
// chunk CRCs (checked by every fold and rebuild) catch damage, not a forger
// on the path. BULK_GRPC keeps them inside the mutual-TLS streams.
#ifndef ECSNAP_DAEMON_PEER_TCP_TRANSPORT_H_
#define ECSNAP_DAEMON_PEER_TCP_TRANSPORT_H_

#include <atomic>
#include <deque>
#include <map>
#include <optional>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/address.h"
#include "daemon/peer/call_watchdog.h"
#include "daemon/peer/grpc_transport.h"
#include "daemon/peer/rdma_transport.h"
#include "daemon/peer/transport.h"
#include "proto/peer.grpc.pb.h"

namespace ecsnap::daemon {

// The holder's half: the bulk port, the tickets it issued, and the threads
// that serve the connections that present them.
class BulkServer {
 public:
  struct Options {
    // Host (a literal address or a name) and port to listen on; port 0 picks
    // a free one.
    std::string host = "127.0.0.1";
    uint32_t port = 0;
    // Connections served at once; more wait in the accept backlog's stead in
    // a queue of the same size, and past that are closed.
    int workers = 16;
    // Tickets outstanding at once; past that OpenPush/OpenRead answer
    // RESOURCE_EXHAUSTED (the caller retries).
    size_t max_tickets = 1024;
    // A ticket not used within this is dropped (a push's fold is aborted).
    absl::Duration ticket_lifetime = absl::Seconds(5);
  };

  // `watchdog` cuts a connection that stops making progress (and every one
  // at Stop); it outlives the server.
  static absl::StatusOr<std::unique_ptr<BulkServer>> Listen(Options options,
                                                            CallWatchdog* watchdog);
  ~BulkServer();
  BulkServer(const BulkServer&) = delete;
  BulkServer& operator=(const BulkServer&) = delete;

  uint32_t port() const { return port_; }

  // A ticket for a push of `length` bytes into `sink`. `key` names the chunk
  // and its sender: Revoke(key) drops the ticket while it is unused.
  absl::StatusOr<std::string> IssuePush(const std::string& key, uint64_t length,
                                        std::unique_ptr<ChunkSink> sink);
  // Drops the unused push ticket issued under `key`, aborting its fold: a
  // sender that could not use its ticket (its connection failed) opens the
  // push again at once instead of finding the row busy until it expires.
  void Revoke(const std::string& key);
  // A ticket for a read of [offset, offset + length) of `chunk`.
  absl::StatusOr<std::string> IssueRead(PinnedChunk chunk, uint64_t offset, uint64_t length);

  // What a ticket admits, for a carrier other than the bulk port (the RDMA
  // transport presents the token on the control channel instead).
  struct Claimed {
    uint64_t length = 0;
    std::unique_ptr<ChunkSink> sink;  // a push
    PinnedChunk chunk;                // a read
    uint64_t offset = 0;
  };
  // Takes the ticket `token` names, once, as a connection presenting it
  // would. NOT_FOUND for an unknown, used or expired token.
  absl::StatusOr<Claimed> Claim(const std::string& token);

  // Closes the port, cuts every connection, drops every ticket; joins.
  void Stop();

  size_t tickets() const;

 private:
  struct Ticket {
    std::string key;  // a push's, for Revoke
    absl::Time expires;
    uint64_t length = 0;
    std::unique_ptr<ChunkSink> sink;  // a push
    PinnedChunk chunk;                // a read
    uint64_t offset = 0;
  };

  BulkServer(Options options, CallWatchdog* watchdog, int listen_fd, uint32_t port);
  absl::StatusOr<std::string> Issue(Ticket ticket);
  // Takes the live ticket `token` names out of the books.
  std::optional<Ticket> Take(const std::string& token);
  void AcceptLoop();
  void WorkLoop();
  void Serve(int fd);
  void ServePush(int fd, Ticket& ticket, CallWatchdog::Watch* watch);
  void ServeRead(int fd, Ticket& ticket, CallWatchdog::Watch* watch);
  // Drops expired tickets; returns them so that their sinks are aborted off
  // the lock.
  std::vector<Ticket> ExpireLocked(absl::Time now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const Options options_;
  CallWatchdog* const watchdog_;
  const int listen_fd_;
  const uint32_t port_;

  mutable absl::Mutex mu_;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::map<std::string, Ticket> tickets_ ABSL_GUARDED_BY(mu_);  // by token
  std::map<std::string, std::string> keys_ ABSL_GUARDED_BY(mu_);  // push key -> token
  std::deque<int> pending_ ABSL_GUARDED_BY(mu_);  // accepted, not yet served
  std::set<int> serving_ ABSL_GUARDED_BY(mu_);
  std::vector<std::thread> threads_;
};

// The caller's half.
class TcpTransport final : public PeerTransport {
 public:
  // `stubs` and `addresses` (host:port of each peer plane) by group position;
  // `slots` the group's slot numbers, for messages. Stubs and `watchdog`
  // outlive the transport.
  TcpTransport(std::vector<peer::Peer::Stub*> stubs, std::vector<std::string> addresses,
               std::vector<uint32_t> slots, CallWatchdog* watchdog);

  // Sends and reads over RDMA through `carrier` (BULK_RDMA) to every holder
  // that takes it, and over TCP to the others: a holder that answers that
  // it has no device is sent to over TCP for kNoDeviceTcp, and one that
  // fails kRdmaFailuresBeforeTcp RDMA transfers in a row for
  // kFailingRdmaTcp, before RDMA is tried again. Set before the first
  // transfer; the carrier outlives the transport.
  void UseRdma(RdmaCarrier* carrier) { rdma_ = carrier; }
  static constexpr absl::Duration kNoDeviceTcp = absl::Minutes(10);
  static constexpr int kRdmaFailuresBeforeTcp = 3;
  static constexpr absl::Duration kFailingRdmaTcp = absl::Minutes(1);

  const char* name() const override { return rdma_ != nullptr ? "rdma" : "tcp"; }
  absl::StatusOr<bool> Push(int holder, const peer::PushChunkHeader& header,
                            const ChunkBytes& bytes) override;
  absl::StatusOr<std::unique_ptr<ChunkReader>> OpenRead(
      int holder, const peer::GetChunkRequest& request) override;

 private:
  // Opens the connection a ticket admits: connected, hello and token sent.
  absl::StatusOr<int> Dial(int holder, const peer::BulkTicket& ticket);

  const std::vector<peer::Peer::Stub*> stubs_;
  const std::vector<std::string> hosts_;
  const std::vector<uint32_t> slots_;
  CallWatchdog* const watchdog_;
  // For a holder that has no bulk port (UNIMPLEMENTED).
  GrpcTransport fallback_;
  // Whether a transfer to `holder` tries RDMA now.
  bool RdmaTo(int holder) const;
  // Books how an RDMA transfer to or from `holder` ended (`st`: its error).
  void RdmaDone(int holder, const absl::Status& st, const RdmaEnd& end);

  RdmaCarrier* rdma_ = nullptr;
  // Per group position: RDMA is not tried before this (absl::ToUnixNanos),
  // and the RDMA transfers that failed in a row.
  std::unique_ptr<std::atomic<int64_t>[]> tcp_until_;
  std::unique_ptr<std::atomic<int>[]> rdma_failures_;
};

}  // namespace ecsnap::daemon

#endif  // ECSNAP_DAEMON_PEER_TCP_TRANSPORT_H_
