#include "daemon/daemon.h"

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <fstream>

#include <grpcpp/resource_quota.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server_builder.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "common/data_plane_http2.h"
#include "common/format.h"
#include "common/log.h"
#include "common/metrics.h"
#include "common/unique_fd.h"
#include "daemon/config.h"
#include "daemon/service/admin_auth.h"
#include "daemon/service/tls.h"

namespace ecsnap::daemon {
namespace {

constexpr char kVersion[] = "ecsnapd 0.1";
// Largest message accepted: a manifest of many tensors, or one stream chunk.
constexpr int kMaxMessageBytes = 64 << 20;
// Threads serving sync calls, and the memory gRPC may buffer, are bounded.
constexpr int kMaxServerThreads = 64;
constexpr size_t kServerMemoryBytes = size_t{512} << 20;

// Removes a Unix socket file left by a daemon that died, but never one that
// a live server still answers on.
absl::Status ClaimSocketPath(const std::string& path) {
  const std::string dir = path.substr(0, path.rfind('/'));
  if (!dir.empty() && ::mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST) {
    return absl::InternalError(absl::StrFormat("cannot create socket directory %s: %s", dir,
                                               std::strerror(errno)));
  }
  struct sockaddr_un addr {};
  if (path.size() >= sizeof(addr.sun_path)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "socket path %s is longer than the %d bytes a Unix socket allows", path,
        sizeof(addr.sun_path) - 1));
  }
  if (::access(path.c_str(), F_OK) != 0) return absl::OkStatus();
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.c_str(), path.size());
  if (fd.valid() && ::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "socket %s is served by another process; give each daemon its own --socket", path));
  }
  ::unlink(path.c_str());
  return absl::OkStatus();
}

void Configure(grpc::ServerBuilder& builder) {
  grpc::ResourceQuota quota("ecsnapd");
  quota.SetMaxThreads(kMaxServerThreads);
  quota.Resize(kServerMemoryBytes);
  builder.SetResourceQuota(quota);
  builder.SetMaxReceiveMessageSize(kMaxMessageBytes);
  builder.SetMaxSendMessageSize(kMaxMessageBytes);
}

}  // namespace

// Readiness answers for the services the daemon's servers register.
Daemon::Daemon()
    : health_({v1::Snapshot::service_full_name(), admin::Admin::service_full_name(),
               peer::Peer::service_full_name()}) {}

absl::StatusOr<std::unique_ptr<Daemon>> Daemon::Start(const config::Config& config,
                                                      uint32_t slot,
                                                      std::function<void()> on_ready) {
  std::unique_ptr<Daemon> d(new Daemon());
  d->config_ = config;
  d->on_ready_ = std::move(on_ready);
  d->slot_ = slot;
  const config::Daemon& dc = config.daemon();
  const config::Cluster& cc = config.cluster();
  // Transport security first: a daemon that would serve in clear where it
  // must not, or with a certificate that is not its own, never starts.
  if (absl::Status st = CheckTransportSecurity(config, slot); !st.ok()) return st;
  auto tls = LoadTls(dc, slot);
  if (!tls.ok()) return tls.status();
  d->tls_ = std::move(*tls);
  const TlsMaterial* tls_material = d->tls();
  bool token_created = false;
  auto token = LoadOrCreateSecret("admin token file", dc.admin_token_file(), &token_created);
  if (!token.ok()) return token.status();
  if (token_created) Log("wrote a new admin token to %s (mode 0600)", dc.admin_token_file());
  Arena::Options ao;
  ao.dir = dc.arena_dir();
  ao.bytes = dc.arena_bytes();
  auto arena = Arena::Open(ao);
  if (!arena.ok()) return arena.status();
  d->arena_ = std::move(*arena);
  Log("arena %s: %s %s in %.2f s", d->arena_->path(), FormatBytes(d->arena_->size()),
      d->arena_->adopted() ? "re-opened and populated" : "reserved and populated",
      d->arena_->prefault_seconds());
  Log("arena %s: %s", d->arena_->path(), d->arena_->pages().how);

  StoreOptions so;
  so.retain = dc.retain();
  so.final_state = cc.m() > 0 ? v1::PROTECTED : v1::LOCAL;
  d->store_ = std::make_unique<StepStore>(d->arena_.get(), so);
  if (d->arena_->adopted()) {
    AdoptReport r = d->store_->Adopt();
    Log("re-adopted %d step(s) (%d rank(s)) from the arena; dropped %d rank(s)", r.steps_adopted,
        r.ranks_adopted, r.ranks_dropped);
    for (const std::string& note : r.notes) Log("  %s", note);
  }

  if (cc.m() > 0) {
    if (absl::Status st = d->StartPeerPlane(slot); !st.ok()) return st;
  }

  d->arena_->DropUnclaimedRecords();

  d->snapshot_service_ = std::make_unique<SnapshotService>(d->store_.get(), slot);
  AdminInfo info;
  info.slot = slot;
  info.group = d->protector_ ? d->protector_->group().id : 0;
  info.k = cc.k();
  info.m = cc.m();
  info.version = kVersion;
  d->admin_service_ = std::make_unique<AdminService>(d->store_.get(), d->arena_.get(), info,
                                                     d->parity_.get(),
                                                     d->protector_.get(), d->rebuilder_.get());
  if (d->rebuilder_) {
    Rebuilder* rebuilder = d->rebuilder_.get();
    StepStore* store = d->store_.get();
    d->snapshot_service_->SetBeforeRestore([rebuilder, store](uint64_t session) {
      auto who = store->SessionRank(session);
      if (who.ok()) rebuilder->ServeRank(who->first, who->second, absl::Seconds(60));
    });
  }

  if (!dc.health_address().empty()) {
    // Health only, in the clear: it tells whether the daemon serves, nothing else.
    grpc::ServerBuilder builder;
    Configure(builder);
    builder.AddListeningPort(dc.health_address(), grpc::InsecureServerCredentials());
    // Anyone who reaches it may ask: a small budget of watches of its own.
    builder.RegisterService(d->NewHealthService(/*max_watches=*/4));
    d->health_server_ = builder.BuildAndStart();
    if (!d->health_server_) {
      return absl::UnavailableError(absl::StrFormat(
          "cannot serve health checks on %s (in use, or no permission); set "
          "daemon.health_address to a free port",
          dc.health_address()));
    }
  }
  if (absl::Status st = ClaimSocketPath(dc.socket_path()); !st.ok()) return st;
  {
    TrainerPolicy policy;
    policy.daemon_uid = ::geteuid();
    policy.uids.insert(dc.trainer_uids().begin(), dc.trainer_uids().end());
    policy.gids.insert(dc.trainer_gids().begin(), dc.trainer_gids().end());
    d->window_grants_ = std::make_unique<WindowGrants>(d->arena_.get());
    WindowGrants* grants = d->window_grants_.get();
    auto listener = TrainerListener::Listen(
        dc.socket_path(), std::move(policy),
        [grants](const std::string& token, uid_t uid) { return grants->Fetch(token, uid); });
    if (!listener.ok()) return listener.status();
    d->trainer_listener_ = std::move(*listener);
    TrainerListener* l = d->trainer_listener_.get();
    d->snapshot_service_->SetConnectionKey(
        [l](const std::string& peer) { return l->ConnectionKey(peer); });
    d->snapshot_service_->SetDaemonUid(::geteuid());
    d->snapshot_service_->SetWindowGrants(
        [l](const std::string& peer) { return l->ConnectionUid(peer); }, grants);
    // A restore stream its trainer stopped taking for two keepalive periods
    // ends its connection (a TCP trainer's stream is cancelled instead).
    if (dc.trainer_keepalive_ms() > 0) {
      d->trainer_stall_dog_ = std::make_unique<CallWatchdog>(
          absl::Milliseconds(dc.trainer_keepalive_ms()) * 2);
      d->snapshot_service_->SetStallCut(d->trainer_stall_dog_.get(),
                                        [l](const std::string& key) { return l->Cut(key); });
    }
    if (!dc.data_address().empty()) {
      bool created = false;
      auto secret = LoadOrCreateSecret("job secret file", dc.job_secret_file(), &created);
      if (!secret.ok()) return secret.status();
      if (created) Log("made a job secret in %s", dc.job_secret_file());
      d->snapshot_service_->SetJobSecret(*secret);
    }

    grpc::ServerBuilder builder;
    Configure(builder);
    // A connection with no call in flight (a trainer's session is an Attach
    // that stays open) is closed after a while: no one holds descriptors
    // without using them.
    builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_IDLE_MS, 120 * 1000);
    // The gRPC data plane's HTTP/2 settings (the client sets the same); at
    // most 8 streams per connection (a session's Attach and its calls), and
    // the server's memory quota bounds what all of them hold.
    for (const Http2Setting& s : kDataPlaneHttp2) builder.AddChannelArgument(s.key, s.value);
    builder.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS, 8);
    // Trainers' keepalive pings (a stream stalled on a silent daemon has no
    // data to show for the connection).
    builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS,
                               kMinKeepaliveMs);
    builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
    // And the daemon pings a silent trainer: one that stopped answering
    // would otherwise hold its session, its step in flight and the windows
    // its reads pin for as long as the connection stays up.
    // (Unset only where the defaults were not applied: no pings then, as
    // no stall cut.)
    if (dc.trainer_keepalive_ms() > 0) {
      builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, dc.trainer_keepalive_ms());
      builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, dc.trainer_keepalive_ms());
    }
    if (!dc.data_address().empty()) {
      builder.AddListeningPort(dc.data_address(),
                               tls_material != nullptr ? ServerTlsCredentials(*tls_material)
                                                       : grpc::InsecureServerCredentials());
    }
    builder.RegisterService(d->snapshot_service_.get());
    builder.RegisterService(d->NewHealthService());
    d->data_server_ = builder.BuildAndStart();
    if (!d->data_server_) {
      return absl::UnavailableError(absl::StrFormat(
          "cannot serve the data plane on unix:%s%s (in use, or no permission)",
          dc.socket_path(), dc.data_address().empty() ? "" : " and " + dc.data_address()));
    }
    d->trainer_listener_->Serve(d->data_server_.get());
  }
  {
    const std::string admin = dc.admin_address();
    if (absl::StartsWith(admin, "unix:")) {
      if (absl::Status st = ClaimSocketPath(admin.substr(5)); !st.ok()) return st;
    }
    grpc::ServerBuilder builder;
    Configure(builder);
    builder.AddListeningPort(admin, AdminServerCredentials(admin, tls_material, *token));
    builder.RegisterService(d->admin_service_.get());
    builder.RegisterService(d->NewHealthService());
    d->admin_server_ = builder.BuildAndStart();
    if (!d->admin_server_) {
      return absl::UnavailableError(
          absl::StrFormat("cannot serve the admin plane on %s (in use, or no permission)", admin));
    }
  }
  Log("%s slot %d serving: data unix:%s%s, admin %s (token in %s)%s", kVersion, slot,
      dc.socket_path(), dc.data_address().empty() ? "" : " and " + dc.data_address(),
      dc.admin_address(), dc.admin_token_file(),
      tls_material != nullptr ? ", TLS on" : ", plaintext (loopback only)");
  if (d->health_server_) Log("health checks (grpc.health.v1 only) on %s", dc.health_address());
  if (!dc.metrics_address().empty()) {
    Daemon* daemon = d.get();
    auto metrics =
        MetricsHttpServer::Start(dc.metrics_address(), [daemon] { return daemon->RenderMetrics(); });
    if (!metrics.ok()) return metrics.status();
    d->metrics_server_ = std::move(*metrics);
    Log("metrics on http://%s:%d/metrics", HostOfAddress(dc.metrics_address()),
        d->metrics_server_->port());
  }
  if (d->rebuilder_) {
    // Learn what the group holds: rebuild what this slot lost, re-protect
    // what it re-adopted. Serving starts at once; restores wait for it.
    Rebuilder* rebuilder = d->rebuilder_.get();
    // Its errors are logged and shown by ecsnapctl status.
    Protector* protector = d->protector_.get();
    Daemon* daemon = d.get();
    d->rebuild_thread_ = std::thread([rebuilder, protector, daemon] {
      rebuilder->Run("").IgnoreError();
      protector->SetReady();
      daemon->BecomeReady();
      daemon->rebuild_done_ = true;
    });
  } else {
    d->BecomeReady();
  }
  return d;
}

absl::Status Daemon::StartPeerPlane(uint32_t slot) {
  const config::Cluster& cc = config_.cluster();
  auto group = FormGroup(cc, slot);
  if (!group.ok()) return group.status();
  auto layout = ec::Layout::Create(cc.k(), cc.m());
  if (!layout.ok()) return layout.status();
  auto codec = ec::Codec::Create(cc.k(), cc.m());
  if (!codec.ok()) return codec.status();
  codec_ = std::move(*codec);
  parity_ = std::make_unique<ParityStore>(arena_.get(), *layout, codec_.get(), group->self);
  if (arena_->adopted()) {
    ParityStore::AdoptReport r = parity_->Adopt();
    Log("re-adopted %d parity row(s) from the arena; dropped %d", r.rows_adopted, r.rows_dropped);
    for (const std::string& note : r.notes) Log("  %s", note);
  }
  Protector::Options po;
  po.peer_timeout_ms = cc.peer_timeout_ms();
  po.retain = config_.daemon().retain();
  // A bulk port needs a host to listen on: a unix: peer address (loopback
  // tests) keeps chunk bytes in the gRPC streams; TCP peers fall back to them.
  po.tcp_bulk = (cc.bulk_transport() == config::Cluster::BULK_TCP ||
                 cc.bulk_transport() == config::Cluster::BULK_RDMA) &&
                !absl::StartsWith(group->addresses[group->self], "unix:");
  if (po.tcp_bulk && cc.bulk_transport() == config::Cluster::BULK_RDMA) {
    RdmaFabricOptions fo;
    fo.device.name = config_.daemon().rdma_device();
    fo.device.gid_index = static_cast<uint8_t>(config_.daemon().rdma_gid_index());
    // A push to each other position and a read of k survivors per stripe
    // being rebuilt, each side, with room to spare.
    fo.transfers = static_cast<uint32_t>(std::max(32, 4 * layout->n()));
    auto fabric = RdmaFabric::Open(fo);
    if (fabric.ok()) {
      rdma_fabric_ = *std::move(fabric);
      po.rdma = rdma_fabric_.get();
      Log("bulk transport: RDMA on %s (%d transfers x %d slots of %s staged), TCP to peers "
          "without a device",
          rdma_fabric_->device_name(), fo.transfers, fo.slots, FormatBytes(fo.slot_bytes));
    } else {
      Log("bulk transport: cluster.bulk_transport BULK_RDMA, but %s; chunks travel over TCP",
          fabric.status().message());
    }
  }
  const TlsMaterial* tls = this->tls();
  po.credentials = PeerChannelCredentials(tls);
  if (tls != nullptr) {
    for (uint32_t s : group->slots) po.peer_names.push_back(SlotName(s));
  }
  std::string listen = group->addresses[group->self];
  if (const std::string& host = config_.daemon().peer_listen_host(); !host.empty()) {
    listen = PeerListenAddress(host, listen);  // ValidateConfig checked both
  }
  protector_ = std::make_unique<Protector>(store_.get(), parity_.get(), *group, *layout, po);
  Rebuilder::Options ro;
  ro.bytes_per_second = cc.rebuild_bytes_per_sec();
  // Enough threads for every fetch of the widest rebuild in flight (k per
  // stripe, a few stripes at once); more wait their turn.
  fetch_executor_ = std::make_unique<Executor>(16, 64);
  rebuilder_ = std::make_unique<Rebuilder>(arena_.get(), store_.get(), parity_.get(),
                                           protector_.get(), codec_.get(), fetch_executor_.get(),
                                           ro);
  Protector* protector = protector_.get();
  store_->SetLocalListener(
      [protector](const std::string& job, uint64_t step) { protector->OnLocal(job, step); });
  store_->SetRewindListener(
      [protector](const std::string& job, uint64_t step) { protector->OnRewind(job, step); });
  store_->SetRetentionGate(protector);
  parity_->SetRowLostListener(
      [protector](const peer::StripeProtected& row) { protector->Announce(row); });
  chunk_intake_ = std::make_unique<ChunkIntake>(store_.get(), parity_.get(), protector_.get());
  if (po.tcp_bulk) {
    BulkServer::Options bo;
    bo.host = HostOfAddress(listen);
    bo.port = config_.daemon().bulk_port();
    bo.workers = std::max(16, 2 * layout->n());
    bo.ticket_lifetime = absl::Milliseconds(cc.peer_timeout_ms());
    auto bulk = BulkServer::Listen(bo, protector_->watchdog());
    if (!bulk.ok()) return bulk.status();
    bulk_server_ = std::move(*bulk);
  }
  peer_service_ = std::make_unique<PeerService>(store_.get(), parity_.get(), protector_.get(),
                                                chunk_intake_.get(), bulk_server_.get(),
                                                /*authenticated=*/tls != nullptr);
  if (rdma_fabric_ != nullptr) peer_service_->UseRdma(rdma_fabric_.get());
  grpc::ServerBuilder builder;
  Configure(builder);
  builder.AddListeningPort(listen, PeerServerCredentials(tls));
  builder.RegisterService(peer_service_.get());
  builder.RegisterService(NewHealthService());
  peer_server_ = builder.BuildAndStart();
  if (!peer_server_) {
    return absl::UnavailableError(
        absl::StrFormat("cannot serve the peer plane on %s (in use, or no permission)", listen));
  }
  protector_->Start();
  Log("group %d: slots {%s}, this slot at position %d, RS %d+%d, peer plane on %s (%s), "
      "chunk bytes %s",
      group->id, absl::StrJoin(group->slots, ", "), group->self, cc.k(), cc.m(), listen,
      tls != nullptr ? "mutual TLS, peers named by their certificates" : "plaintext",
      bulk_server_ != nullptr
          ? absl::StrFormat("over TCP port %d (token-admitted, not encrypted)",
                            bulk_server_->port())
          : std::string(tls != nullptr ? "inside the TLS streams" : "inside the gRPC streams"));
  return absl::OkStatus();
}

HealthService* Daemon::NewHealthService(int max_watches) {
  health_services_.push_back(std::make_unique<HealthService>(&health_, max_watches));
  return health_services_.back().get();
}

void Daemon::BecomeReady() {
  health_.SetServing(true);
  Log("ready: %s", Summary());
  if (on_ready_) on_ready_();
}

bool Daemon::Alive() const {
  (void)store_->sessions();  // takes the store's lock
  return true;
}

std::string Daemon::Summary() const {
  // Used as ecsnapctl status and /metrics count it: of the data area.
  return absl::StrFormat("slot %d, arena %s of %s used, %d session(s)", slot_,
                         FormatBytes(arena_->data_bytes() - arena_->free_bytes()),
                         FormatBytes(arena_->data_bytes()), store_->sessions());
}

std::string Daemon::RenderMetrics() const {
  std::string out;
  auto family = [&out](const char* name, const char* help) {
    absl::StrAppend(&out, "# HELP ", name, " ", help, "\n# TYPE ", name, " gauge\n");
  };
  auto sample = [&out](const char* name, const MetricLabels& labels, uint64_t value) {
    absl::StrAppend(&out, name, RenderLabels(labels), " ", value, "\n");
  };
  family("ecsnap_ready", "1 once the daemon serves (arena pre-faulted, start-up rebuild done).");
  sample("ecsnap_ready", {}, health_.serving() ? 1 : 0);
  family("ecsnap_arena_bytes", "Bytes of the arena's data area, by use.");
  const uint64_t free_bytes = arena_->free_bytes();
  sample("ecsnap_arena_bytes", {{"state", "used"}}, arena_->data_bytes() - free_bytes);
  sample("ecsnap_arena_bytes", {{"state", "free"}}, free_bytes);
  family("ecsnap_sessions", "Trainer sessions attached.");
  sample("ecsnap_sessions", {}, store_->sessions());
  // job_id, not job: Prometheus gives every series the scrape job's `job`.
  family("ecsnap_steps", "Steps held, by job and state.");
  std::map<std::pair<std::string, std::string>, int> steps;
  for (const StepSummary& s : store_->ListSteps("")) {
    ++steps[{s.job_id, v1::StepState_Name(s.state)}];
  }
  for (const auto& [key, count] : steps) {
    sample("ecsnap_steps", {{"job_id", key.first}, {"state", key.second}}, count);
  }
  if (protector_) {
    family("ecsnap_peer_reachable", "1 when the peer answered its last call.");
    for (const PeerState& p : protector_->Peers()) {
      sample("ecsnap_peer_reachable", {{"peer", std::to_string(p.slot)}}, p.reachable ? 1 : 0);
    }
  }
  if (rebuilder_) {
    const admin::RebuildStatus rb = rebuilder_->status();
    family("ecsnap_rebuild_active", "1 while a rebuild runs.");
    sample("ecsnap_rebuild_active", {}, rb.active() ? 1 : 0);
    family("ecsnap_rebuild_progress_bytes", "The running rebuild's bytes, done and in all.");
    sample("ecsnap_rebuild_progress_bytes", {{"of", "done"}}, rb.bytes_done());
    sample("ecsnap_rebuild_progress_bytes", {{"of", "total"}}, rb.bytes_total());
  }
  out += Metrics().Render();
  return out;
}

bool Daemon::Shutdown() {
  health_.Shutdown();
  metrics_server_.reset();
  // Within about a second whatever the peers do (DESIGN.md §10): the rebuild
  // stops at its next slice and every call in flight to a peer is cancelled
  // first, so that no handler waits on a peer; then the servers get what is
  // left of the grace.
  const auto deadline = std::chrono::system_clock::now() + std::chrono::seconds(1);
  if (rebuilder_) rebuilder_->Stop();
  bool clean = true;
  if (protector_) clean = protector_->Stop(absl::Milliseconds(500));
  if (bulk_server_) bulk_server_->Stop();
  if (trainer_listener_) trainer_listener_->Stop();
  if (snapshot_service_) snapshot_service_->EndSessions();
  if (data_server_) data_server_->Shutdown(deadline);
  if (admin_server_) admin_server_->Shutdown(deadline);
  if (peer_server_) peer_server_->Shutdown(deadline);
  if (health_server_) health_server_->Shutdown(deadline);
  if (!clean) return false;
  if (rebuild_thread_.joinable()) {
    // The start-up pass ends at its next slice once stopped; bounded anyway.
    for (int i = 0; i < 100 && !rebuild_done_; ++i) absl::SleepFor(absl::Milliseconds(10));
    if (!rebuild_done_) return false;
    rebuild_thread_.join();
  }
  return true;
}

Daemon::~Daemon() {
  Shutdown();
  data_server_.reset();
  admin_server_.reset();
  peer_server_.reset();
  health_server_.reset();
}

}  // namespace ecsnap::daemon
