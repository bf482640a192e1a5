// Single-node snapshot service, end to end: real ecsnapd processes, the real
// client library, on private Unix sockets.
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>

#include <chrono>
#include <cstring>
#include <future>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <thread>

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "client/data_channel.h"
#include "client/ecsnap.h"
#include "common/job_token.h"
#include "common/trainer_hello.h"
#include "common/unique_fd.h"
#include "ec/crc32c.h"
#include "gtest/gtest.h"
#include "proto/snapshot.grpc.pb.h"
#include "tests/harness.h"

namespace ecsnap {
namespace {

using testing::DaemonProcess;
using testing::TempDir;

// A rank's synthetic training state; owns the bytes the Tensors borrow.
struct State {
  std::vector<std::vector<uint8_t>> storage;
  std::vector<Tensor> tensors;
};

State MakeState(uint64_t seed, int scale = 1) {
  struct Spec {
    const char* name;
    TensorKind kind;
    DType dtype;
    std::vector<int64_t> shape;
    size_t elem;
  };
  const std::vector<Spec> specs = {
      {"embed.weight", TensorKind::kParam, DType::kFloat32, {64 * scale, 33}, 4},
      {"block0.attn.qkv", TensorKind::kParam, DType::kBFloat16, {33, 99}, 2},
      {"block0.ln.bias", TensorKind::kParam, DType::kFloat16, {1}, 2},
      {"empty", TensorKind::kParam, DType::kFloat32, {0, 5}, 4},
      {"adam.exp_avg", TensorKind::kOptimizer, DType::kFloat64, {1000 * scale + 7}, 8},
      {"adam.step", TensorKind::kOptimizer, DType::kInt64, {}, 8},
      {"mask", TensorKind::kParam, DType::kBool, {13}, 1},
      {"rng.cpu", TensorKind::kRng, DType::kUInt8, {5056}, 1},
      {"extra.loader", TensorKind::kExtra, DType::kBytes, {}, 0},
      {"one_byte", TensorKind::kExtra, DType::kInt8, {1}, 1},
  };
  std::mt19937_64 rng(seed);
  State s;
  for (const Spec& spec : specs) {
    uint64_t elements = 1;
    for (int64_t d : spec.shape) elements *= d;
    const uint64_t bytes = spec.elem == 0 ? 777 : elements * spec.elem;
    s.storage.emplace_back(bytes);
    for (auto& b : s.storage.back()) b = static_cast<uint8_t>(rng());
  }
  for (size_t i = 0; i < specs.size(); ++i) {
    Tensor t;
    t.name = specs[i].name;
    t.kind = specs[i].kind;
    t.dtype = specs[i].dtype;
    t.shape = specs[i].shape;
    t.data = s.storage[i].data();
    t.bytes = s.storage[i].size();
    s.tensors.push_back(t);
  }
  return s;
}

void ExpectRestored(const State& want, const RestoredState& got) {
  ASSERT_EQ(got.tensors.size(), want.tensors.size());
  for (size_t i = 0; i < want.tensors.size(); ++i) {
    const Tensor& w = want.tensors[i];
    const RestoredTensor& g = got.tensors[i];
    EXPECT_EQ(g.name, w.name);
    EXPECT_EQ(g.kind, w.kind);
    EXPECT_EQ(g.dtype, w.dtype);
    EXPECT_EQ(g.shape, w.shape);
    ASSERT_EQ(g.data.size(), w.bytes) << w.name;
    EXPECT_TRUE(std::equal(g.data.begin(), g.data.end(), want.storage[i].begin())) << w.name;
  }
}

class SnapshotTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto d = DaemonProcess::Start(dir_.path(), options_);
    ASSERT_TRUE(d.ok()) << d.status();
    daemon_ = std::move(*d);
  }

  std::unique_ptr<Client> Connect(uint32_t rank, std::vector<uint32_t> local_ranks,
                                  Transport transport = Transport::kSharedMemory,
                                  std::string job = "job") {
    ClientOptions o;
    o.daemon_address = daemon_->socket();
    o.job_id = job;
    o.rank = rank;
    o.local_ranks = local_ranks;
    o.transport = transport;
    auto c = Client::Connect(o);
    EXPECT_TRUE(c.ok()) << c.status();
    return c.ok() ? std::move(*c) : nullptr;
  }

  // Starts tests/stall_trainer as rank 0 of "job" with `args` added, its
  // output in `out`.
  pid_t SpawnStallTrainer(const std::string& out, std::vector<std::string> args) {
    std::vector<std::string> argv = {testing::RunfilePath("tests/stall_trainer"),
                                     "--socket=" + daemon_->socket(), "--rank=0",
                                     "--local_ranks=0"};
    argv.insert(argv.end(), args.begin(), args.end());
    return testing::Spawn(argv, out);
  }

  // True when the file `out` holds the line `word`.
  static bool Printed(const std::string& out, const std::string& word) {
    std::ifstream in(out);
    std::string line;
    while (std::getline(in, line)) {
      if (line == word) return true;
    }
    return false;
  }

  // Polls the admin plane until `job` holds exactly `steps` (for at most
  // `seconds`).
  bool WaitForSteps(const std::string& job, std::vector<uint64_t> steps, int seconds = 5) {
    auto stub = daemon_->AdminStub();
    for (int i = 0; i < seconds * 40; ++i) {
      grpc::ClientContext ctx;
      admin::ListStepsRequest req;
      req.set_job_id(job);
      admin::ListStepsResponse r;
      if (stub->ListSteps(&ctx, req, &r).ok()) {
        std::vector<uint64_t> have;
        for (const auto& s : r.steps()) have.push_back(s.step());
        if (have == steps) return true;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(25));
    }
    return false;
  }

  TempDir dir_;
  DaemonProcess::Options options_;
  std::unique_ptr<DaemonProcess> daemon_;
};

TEST_F(SnapshotTest, MixedTensorsRoundTripThroughSharedMemoryAndGrpcAlike) {
  for (Transport transport : {Transport::kSharedMemory, Transport::kGrpc}) {
    const std::string job = transport == Transport::kGrpc ? "grpc-job" : "shm-job";
    auto client = Connect(0, {0}, transport, job);
    ASSERT_NE(client, nullptr);
    EXPECT_EQ(client->shared_memory(), transport == Transport::kSharedMemory);
    State s = MakeState(7, 50);
    auto handle = client->Snapshot(3, s.tensors);
    ASSERT_TRUE(handle.ok()) << handle.status();
    ASSERT_TRUE(handle->Wait().ok()) << handle->Wait();  // tensors free
    ASSERT_TRUE(handle->WaitCommitted().ok()) << handle->WaitCommitted();
    EXPECT_TRUE(handle->done());
    EXPECT_EQ(handle->bytes_copied(), [&] {
      uint64_t n = 0;
      for (auto& t : s.tensors) n += t.bytes;
      return n;
    }());

    auto restored = client->Restore(kLatestStep);
    ASSERT_TRUE(restored.ok()) << restored.status();
    EXPECT_EQ(restored->step, 3u);
    ExpectRestored(s, *restored);

    // Into caller buffers.
    std::vector<std::vector<uint8_t>> out;
    std::vector<TensorDestination> into;
    for (const Tensor& t : s.tensors) out.emplace_back(t.bytes, 0xEE);
    for (size_t i = 0; i < s.tensors.size(); ++i) {
      into.push_back({s.tensors[i].name, out[i].data(), out[i].size()});
    }
    auto step = client->RestoreInto(3, into);
    ASSERT_TRUE(step.ok()) << step.status();
    for (size_t i = 0; i < out.size(); ++i) EXPECT_EQ(out[i], s.storage[i]) << s.tensors[i].name;

    // A destination of the wrong size is refused before anything is copied.
    into[0].bytes -= 1;
    EXPECT_EQ(client->RestoreInto(3, into).status().code(), absl::StatusCode::kInvalidArgument);
  }
}

TEST_F(SnapshotTest, ARemoteClientStreamsOverTcp) {
  const int port = testing::FreePorts(1)[0];
  options_.extra_flags = {absl::StrCat("--data_address=127.0.0.1:", port)};
  daemon_.reset();
  SetUp();
  ClientOptions o;
  o.daemon_address = absl::StrCat("127.0.0.1:", port);
  o.job_id = "tcp";
  o.transport = Transport::kGrpc;
  // No token, another job's token, a made-up one: refused before any session.
  EXPECT_EQ(Client::Connect(o).status().code(), absl::StatusCode::kUnauthenticated);
  const std::string socket = daemon_->socket();
  std::ifstream in(socket.substr(0, socket.rfind('/')) + "/job.secret");
  std::string secret;
  in >> secret;
  ASSERT_FALSE(secret.empty());
  o.job_token = JobToken(secret, "another-job");
  EXPECT_EQ(Client::Connect(o).status().code(), absl::StatusCode::kPermissionDenied);
  o.job_token = JobToken("not the secret", "tcp");
  EXPECT_EQ(Client::Connect(o).status().code(), absl::StatusCode::kPermissionDenied);
  o.job_token = JobToken(secret, "tcp");
  auto client = Client::Connect(o);
  ASSERT_TRUE(client.ok()) << client.status();
  EXPECT_FALSE((*client)->shared_memory());
  State s = MakeState(5, 20);
  ASSERT_TRUE((*client)->Snapshot(1, s.tensors)->WaitCommitted().ok());
  ExpectRestored(s, *(*client)->Restore(kLatestStep));
}

// A session id is a bearer of nothing on another connection: a second
// process that learns it (here: is handed it) can neither write, restore nor
// abort with it, and the session's owner is unaffected.
TEST_F(SnapshotTest, ASessionIdWorksOnlyOnTheConnectionThatAttached) {
  auto open = [&] {
    DataChannelOptions dco;
    dco.address = daemon_->socket();
    auto data = OpenDataChannel(std::move(dco));
    EXPECT_TRUE(data.ok()) << data.status();
    EXPECT_TRUE(data->windows);
    return v1::Snapshot::NewStub(data->channel);
  };
  auto owner = open();
  auto thief = open();
  grpc::ClientContext attach_ctx;
  v1::AttachRequest attach;
  attach.set_job_id("victim");
  attach.add_local_ranks(0);
  auto stream = owner->Attach(&attach_ctx, attach);
  v1::AttachEvent ev;
  ASSERT_TRUE(stream->Read(&ev));
  auto begin = [&](v1::Snapshot::Stub* stub, uint64_t step) {
    grpc::ClientContext ctx;
    v1::BeginRankRequest req;
    req.set_session_id(ev.session_id());
    req.set_step(step);
    req.set_bytes(4096);
    v1::BeginRankResponse resp;
    return stub->BeginRank(&ctx, req, &resp);
  };
  grpc::Status stolen = begin(thief.get(), 1);
  EXPECT_EQ(stolen.error_code(), grpc::StatusCode::NOT_FOUND) << stolen.error_message();
  {
    grpc::ClientContext ctx;
    v1::RestoreRequest req;
    req.set_session_id(ev.session_id());
    v1::RestoreResponse resp;
    EXPECT_EQ(thief->Restore(&ctx, req, &resp).error_code(), grpc::StatusCode::NOT_FOUND);
  }
  EXPECT_TRUE(begin(owner.get(), 1).ok());
}

// A session opened by hand on a data channel of its own, for tests that
// speak the protocol the way a hostile trainer could.
struct RawSession {
  std::unique_ptr<v1::Snapshot::Stub> stub;
  grpc::ClientContext attach_ctx;
  std::unique_ptr<grpc::ClientReader<v1::AttachEvent>> stream;
  std::string id;

  RawSession(const std::string& socket, const std::string& job) {
    DataChannelOptions dco;
    dco.address = socket;
    auto data = OpenDataChannel(std::move(dco));
    EXPECT_TRUE(data.ok()) << data.status();
    stub = v1::Snapshot::NewStub(data->channel);
    v1::AttachRequest attach;
    attach.set_job_id(job);
    attach.add_local_ranks(0);
    attach.set_windows(true);
    stream = stub->Attach(&attach_ctx, attach);
    v1::AttachEvent ev;
    EXPECT_TRUE(stream->Read(&ev));
    id = ev.session_id();
  }
  ~RawSession() { attach_ctx.TryCancel(); }

  grpc::Status Begin(uint64_t step, uint64_t bytes, v1::BeginRankResponse* resp) {
    grpc::ClientContext ctx;
    v1::BeginRankRequest req;
    req.set_session_id(id);
    req.set_step(step);
    req.set_bytes(bytes);
    return stub->BeginRank(&ctx, req, resp);
  }
  grpc::Status Restore(v1::RestoreResponse* resp) {
    grpc::ClientContext ctx;
    v1::RestoreRequest req;
    req.set_session_id(id);
    return stub->Restore(&ctx, req, resp);
  }
};

// The inode of the window file behind the job's newest restorable step, as
// `raw`'s restore of it is granted.
ino_t InodeOfNewest(RawSession& raw, const std::string& socket) {
  v1::RestoreResponse lease;
  EXPECT_TRUE(raw.Restore(&lease).ok());
  auto window = FetchWindow(socket, lease.window_token(), absl::Seconds(10));
  EXPECT_TRUE(window.ok()) << window.status();
  struct stat st {};
  if (window.ok()) EXPECT_EQ(::fstat(window->fd.get(), &st), 0);
  return st.st_ino;
}

// The window files of the arena in `dir`, by inode.
std::set<ino_t> WindowInodes(const std::string& dir) {
  std::set<ino_t> inodes;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    struct stat st {};
    if (e.path().filename().string().rfind("w.", 0) == 0 && ::stat(e.path().c_str(), &st) == 0) {
      inodes.insert(st.st_ino);
    }
  }
  return inodes;
}

// DESIGN.md §9: a trainer's mapping holds the windows granted to it and
// nothing else. The descriptor it receives is the window's own file (not
// the arena, whose index and other jobs' bytes it never sees), each token
// is good once, and a restored window comes read-only: it cannot be mapped
// writable, written or truncated.
TEST_F(SnapshotTest, ATrainerReceivesOnlyItsWindowsAndRestoresReadOnly) {
  struct stat arena_st {};
  ASSERT_EQ(::stat(daemon_->arena_path().c_str(), &arena_st), 0);
  auto other = Connect(0, {0}, Transport::kSharedMemory, "neighbour");
  State theirs = MakeState(31);
  ASSERT_TRUE(other->Snapshot(1, theirs.tensors)->WaitCommitted().ok());

  auto mine = Connect(0, {0});
  State s = MakeState(32);
  ASSERT_TRUE(mine->Snapshot(1, s.tensors)->WaitCommitted().ok());

  RawSession raw(daemon_->socket(), "job");
  v1::RestoreResponse lease;
  ASSERT_TRUE(raw.Restore(&lease).ok());
  ASSERT_EQ(lease.window_token().size(), kWindowTokenBytes);
  auto window = FetchWindow(daemon_->socket(), lease.window_token(), absl::Seconds(10));
  ASSERT_TRUE(window.ok()) << window.status();
  struct stat st {};
  ASSERT_EQ(::fstat(window->fd.get(), &st), 0);
  EXPECT_NE(st.st_ino, arena_st.st_ino) << "a trainer was handed the whole arena";
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), window->bytes);
  EXPECT_GE(window->bytes, lease.window_bytes());
  EXPECT_LT(window->bytes, lease.window_bytes() + 4096) << "more than the rank's window";
  // The bytes are the rank's, tensor by tensor.
  for (int i = 0; i < lease.manifest().tensors_size(); ++i) {
    const auto& t = lease.manifest().tensors(i);
    std::vector<uint8_t> got(t.length());
    if (got.empty()) continue;
    ASSERT_EQ(::pread(window->fd.get(), got.data(), got.size(), t.offset()),
              static_cast<ssize_t>(got.size()));
    EXPECT_EQ(got, s.storage[i]) << t.name();
  }
  // Read-only, whatever the trainer tries.
  EXPECT_EQ(::mmap(nullptr, window->bytes, PROT_READ | PROT_WRITE, MAP_SHARED, window->fd.get(), 0),
            MAP_FAILED);
  EXPECT_EQ(errno, EACCES);
  const char junk = 'x';
  EXPECT_EQ(::pwrite(window->fd.get(), &junk, 1, 0), -1);
  EXPECT_EQ(::ftruncate(window->fd.get(), 0), -1);
  // A token is good once.
  auto again = FetchWindow(daemon_->socket(), lease.window_token(), absl::Seconds(10));
  EXPECT_EQ(again.status().code(), absl::StatusCode::kFailedPrecondition) << again.status();
  std::string forged(kWindowTokenBytes, '\0');
  EXPECT_EQ(FetchWindow(daemon_->socket(), forged, absl::Seconds(10)).status().code(),
            absl::StatusCode::kFailedPrecondition);
  // Both jobs still restore bit-exact (rank 0 attached again: the raw
  // session above took its place).
  mine = Connect(0, {0});
  ExpectRestored(s, *mine->Restore(kLatestStep));
  ExpectRestored(theirs, *other->Restore(kLatestStep));
  EXPECT_TRUE(daemon_->alive());
}

// Client::Prepare makes the windows of the first steps ahead of them
// (retain + 2: the first step's, the next one's while the first is kept,
// one more while protection lags), and those steps land in those very files.
TEST_F(SnapshotTest, PreparedWindowsAreTheOnesTheFirstStepsFill) {
  const std::string arena = dir_.path() + "/arena";
  auto c = Connect(0, {0});
  State s1 = MakeState(51, 8), s2 = MakeState(52, 8);
  ASSERT_TRUE(c->Prepare(s1.tensors).ok());
  std::set<ino_t> prepared;
  for (int i = 0; i < 200 && prepared.size() < 3; ++i) {  // made in the background
    prepared = WindowInodes(arena);
    if (prepared.size() < 3) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ASSERT_EQ(prepared.size(), 3u) << "retain = 1: retain + 2 windows ahead of the first steps";

  auto inode_of_newest = [&] {
    RawSession raw(daemon_->socket(), "job");
    return InodeOfNewest(raw, daemon_->socket());
  };
  ASSERT_TRUE(c->Snapshot(1, s1.tensors)->WaitCommitted().ok());
  c.reset();
  const ino_t first = inode_of_newest();
  EXPECT_EQ(prepared.count(first), 1u) << "the first snapshot did not use a prepared window";
  c = Connect(0, {0});
  ASSERT_TRUE(c->Snapshot(2, s2.tensors)->WaitCommitted().ok());
  c.reset();
  const ino_t second = inode_of_newest();
  EXPECT_EQ(prepared.count(second), 1u) << "the second snapshot did not use a prepared window";
  EXPECT_NE(first, second);
  c = Connect(0, {0});
  ExpectRestored(s2, *c->Restore(kLatestStep));
  // Never more windows than the rank's bound (retain + 2), once the
  // daemon has made what it makes ahead.
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  EXPECT_LE(WindowInodes(arena).size(), 3u);
}

// After a daemon restart the arena holds the re-adopted steps and no spare
// window: a trainer that restores before its first snapshot has the window
// for that snapshot made (and warmed) then, and its first snapshot fills it.
TEST_F(SnapshotTest, ARestoreBeforeTheFirstSnapshotMakesItsWindow) {
  const std::string arena = dir_.path() + "/arena";
  State s1 = MakeState(61, 8), s2 = MakeState(62, 8);
  ASSERT_TRUE(Connect(0, {0})->Snapshot(1, s1.tensors)->WaitCommitted().ok());
  daemon_->Kill();
  ASSERT_TRUE(daemon_->Restart().ok()) << daemon_->Log();
  const std::set<ino_t> adopted = WindowInodes(arena);

  auto c = Connect(0, {0});
  ExpectRestored(s1, *c->Restore(kLatestStep));
  // The windows of the first steps, as Client::Prepare has: retain + 2 in
  // all, the restored step's own counted.
  std::set<ino_t> made;
  for (int i = 0; i < 200 && made.size() < 2; ++i) {  // made in the background
    for (ino_t ino : WindowInodes(arena)) {
      if (adopted.count(ino) == 0) made.insert(ino);
    }
    if (made.size() < 2) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ASSERT_EQ(made.size(), 2u) << "the restore made no windows for the next snapshots";

  ASSERT_TRUE(c->Snapshot(2, s2.tensors)->WaitCommitted().ok());
  c.reset();
  RawSession raw(daemon_->socket(), "job");
  EXPECT_EQ(made.count(InodeOfNewest(raw, daemon_->socket())), 1u)
      << "the first snapshot after the restore did not use a window it made";
}

// A trainer holds its snapshot window read-write, so it can shrink the file
// under the daemon. The daemon must neither die of SIGBUS nor accept the
// step: it reads zeros where the pages went, the checksums disagree, the
// commit is refused, and every other step on the node is untouched.
TEST_F(SnapshotTest, ATrainerThatTruncatesItsWindowLosesOnlyThatStep) {
  auto neighbour = Connect(0, {0}, Transport::kSharedMemory, "neighbour");
  State theirs = MakeState(41);
  ASSERT_TRUE(neighbour->Snapshot(1, theirs.tensors)->WaitCommitted().ok());

  RawSession raw(daemon_->socket(), "job");
  constexpr uint64_t kBytes = 64 << 10;
  v1::BeginRankResponse granted;
  ASSERT_TRUE(raw.Begin(1, kBytes, &granted).ok());
  auto window = FetchWindow(daemon_->socket(), granted.window_token(), absl::Seconds(10));
  ASSERT_TRUE(window.ok()) << window.status();
  void* p = ::mmap(nullptr, window->bytes, PROT_READ | PROT_WRITE, MAP_SHARED, window->fd.get(), 0);
  ASSERT_NE(p, MAP_FAILED);
  std::memset(p, 0x5a, kBytes);
  const uint32_t crc =
      ec::Crc32c(absl::Span<const uint8_t>(static_cast<const uint8_t*>(p), kBytes));
  ::munmap(p, window->bytes);
  ASSERT_EQ(::ftruncate(window->fd.get(), 0), 0);  // the pages are gone

  grpc::ClientContext ctx;
  v1::CommitRankRequest commit;
  commit.set_session_id(raw.id);
  commit.set_step(1);
  v1::TensorEntry* t = commit.mutable_manifest()->add_tensors();
  t->set_name("state");
  t->set_kind(v1::EXTRA);
  t->set_dtype(v1::UINT8);
  t->add_shape(kBytes);
  t->set_offset(0);
  t->set_length(kBytes);
  t->set_crc32c(crc);
  v1::CommitRankResponse resp;
  grpc::Status st = raw.stub->CommitRank(&ctx, commit, &resp);
  EXPECT_FALSE(st.ok()) << "a step whose bytes vanished was accepted";
  EXPECT_NE(st.error_message().find("crc32c"), std::string::npos) << st.error_message();
  EXPECT_TRUE(daemon_->alive()) << daemon_->Log();
  // The neighbour's step is intact, and the same rank snapshots again.
  ExpectRestored(theirs, *neighbour->Restore(kLatestStep));
  auto again = Connect(0, {0});
  State s = MakeState(42);
  ASSERT_TRUE(again->Snapshot(2, s.tensors)->WaitCommitted().ok());
  ExpectRestored(s, *again->Restore(kLatestStep));
}

// Runs stall_trainer as `uid` against the daemon and returns what it printed
// once it exits or stalls (bounded: 15 s).
std::string TrainerAs(uid_t uid, const std::string& socket, const std::string& log) {
  const pid_t pid = testing::Spawn(
      {"/usr/bin/setpriv", absl::StrCat("--reuid=", uid), absl::StrCat("--regid=", uid),
       "--clear-groups", testing::RunfilePath("tests/stall_trainer"), "--socket=" + socket,
       "--job=other-user", "--step=1", "--bytes=8192"},
      log);
  bool reaped = false;
  for (int i = 0; i < 300 && !reaped; ++i) {
    std::ifstream in(log);
    const std::string text(std::istreambuf_iterator<char>(in), {});
    if (text.find("STALLED") != std::string::npos) break;
    int status;
    reaped = ::waitpid(pid, &status, WNOHANG) == pid;
    if (!reaped) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  if (!reaped) testing::StopProcess(pid, SIGKILL);
  std::ifstream in(log);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// SO_PEERCRED admission: a process of another uid reaches neither the
// daemon's sessions nor its arena unless the config names that uid.
TEST_F(SnapshotTest, AnotherUserIsAdmittedOnlyWhenTheConfigNamesIt) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root, to run a trainer as another uid";
  constexpr uid_t kOther = 65534;  // nobody
  ASSERT_EQ(::chmod(dir_.path().c_str(), 0711), 0);  // the socket is reachable by path
  auto start = [&](std::vector<std::string> flags) {
    daemon_.reset();
    options_.extra_flags = std::move(flags);
    SetUp();
  };
  // Only the daemon's own uid: the socket file itself is closed to others.
  std::string out = TrainerAs(kOther, daemon_->socket(), dir_.path() + "/t1.log");
  EXPECT_NE(out.find("PERMISSION_DENIED"), std::string::npos) << out;
  EXPECT_EQ(out.find("STALLED"), std::string::npos) << out;
  // Other uids listed, not this one: the daemon answers, refuses, says why.
  start({"--trainer_uids=4242", "--trainer_gids=4243"});
  out = TrainerAs(kOther, daemon_->socket(), dir_.path() + "/t2.log");
  EXPECT_NE(out.find("PERMISSION_DENIED: ecsnapd refuses process"), std::string::npos) << out;
  EXPECT_NE(out.find("uid 65534"), std::string::npos) << out;
  EXPECT_EQ(out.find("STALLED"), std::string::npos) << out;
  // The arena is not reachable by path either.
  const pid_t cat = testing::Spawn({"/usr/bin/setpriv", "--reuid=65534", "--regid=65534",
                                    "--clear-groups", "/usr/bin/head", "-c1",
                                    daemon_->arena_path()},
                                   dir_.path() + "/cat.log");
  const int cat_status = testing::StopProcess(cat, 0, 5000);
  EXPECT_TRUE(WIFEXITED(cat_status) && WEXITSTATUS(cat_status) != 0) << cat_status;
  // Named by primary gid: admitted, and its window is the daemon's arena.
  start({"--trainer_gids=65534"});
  out = TrainerAs(kOther, daemon_->socket(), dir_.path() + "/t3.log");
  EXPECT_NE(out.find("STALLED"), std::string::npos) << out;
  // Two admitted users: the job is the first one's, and the second may
  // neither read nor write it.
  start({"--trainer_uids=65533,65534"});
  out = TrainerAs(kOther, daemon_->socket(), dir_.path() + "/t4.log");
  EXPECT_NE(out.find("STALLED"), std::string::npos) << out;
  out = TrainerAs(kOther - 1, daemon_->socket(), dir_.path() + "/t5.log");
  EXPECT_NE(out.find("job other-user belongs to uid 65534; uid 65533 may not"), std::string::npos)
      << out;
  EXPECT_EQ(out.find("STALLED"), std::string::npos) << out;
  // The daemon's own trainers are unaffected throughout.
  auto own = Connect(0, {0}, Transport::kSharedMemory, "own");
  ASSERT_NE(own, nullptr);
  State s = MakeState(3);
  ASSERT_TRUE(own->Snapshot(1, s.tensors)->WaitCommitted().ok());
  ExpectRestored(s, *own->Restore(kLatestStep));
}

// A bare connection to the daemon's socket, before any hello is read.
UniqueFd ConnectRaw(const std::string& socket) {
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, socket.c_str(), sizeof(addr.sun_path) - 1);
  EXPECT_EQ(::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  return fd;
}

// True once the daemon has closed `fd` (bounded: `limit`).
bool ClosedByPeer(int fd, absl::Duration limit) {
  const absl::Time deadline = absl::Now() + limit;
  char c;
  while (absl::Now() < deadline) {
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 50) > 0) {
      const ssize_t n = ::recv(fd, &c, 1, MSG_DONTWAIT);
      if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) return true;
    }
  }
  return false;
}

// Connections that are admitted and then never say what they are for (or
// say it a byte at a time, or say something else) hold nothing for long:
// one user has at most 32 such, each is dropped 2 s after its hello however
// slowly it trickles, junk is dropped at once, and trainers are served
// throughout.
TEST_F(SnapshotTest, ConnectionsThatNeverSayWhatForAreCappedAndDropped) {
  std::vector<UniqueFd> silent;
  for (int i = 0; i < 32; ++i) {
    silent.push_back(ConnectRaw(daemon_->socket()));
    auto hello = ReceiveTrainerHello(silent.back().get(), absl::Seconds(10));
    ASSERT_TRUE(hello.ok()) << hello.status();
    ASSERT_TRUE(hello->admitted) << i << ": " << hello->message;
  }
  UniqueFd one_more = ConnectRaw(daemon_->socket());
  auto refused = ReceiveTrainerHello(one_more.get(), absl::Seconds(10));
  ASSERT_TRUE(refused.ok()) << refused.status();
  EXPECT_FALSE(refused->admitted);
  EXPECT_NE(refused->message.find("have not said what they are for"), std::string::npos)
      << refused->message;

  // One of them trickles a valid gRPC role, a byte every 85 ms (2.7 s in
  // all, past the deadline, each byte sooner than the listener's 100 ms
  // poll): it is cut, not handed to gRPC once the last byte is in.
  char role[kTrainerRoleBytes];
  {
    int pair[2];
    ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair), 0);
    UniqueFd a(pair[0]), b(pair[1]);
    ASSERT_TRUE(SendTrainerRole(a.get(), TrainerRole{}, absl::Seconds(1)).ok());
    ASSERT_EQ(::read(b.get(), role, sizeof(role)), static_cast<ssize_t>(sizeof(role)));
  }
  bool cut = false;
  for (size_t i = 0; i < sizeof(role) && !cut; ++i) {
    cut = ::send(silent[0].get(), role + i, 1, MSG_NOSIGNAL) != 1;
    absl::SleepFor(absl::Milliseconds(85));
  }
  EXPECT_TRUE(cut || ClosedByPeer(silent[0].get(), absl::Seconds(5)))
      << "a role trickled past its deadline was accepted";
  for (size_t i = 1; i < silent.size(); ++i) {
    EXPECT_TRUE(ClosedByPeer(silent[i].get(), absl::Seconds(5))) << "connection " << i;
  }
  // Junk where a role belongs is dropped without waiting.
  UniqueFd junk = ConnectRaw(daemon_->socket());
  ASSERT_TRUE(ReceiveTrainerHello(junk.get(), absl::Seconds(10)).ok());
  const std::string preface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n0123456789";
  ASSERT_EQ(::send(junk.get(), preface.data(), kTrainerRoleBytes, MSG_NOSIGNAL),
            static_cast<ssize_t>(kTrainerRoleBytes));
  EXPECT_TRUE(ClosedByPeer(junk.get(), absl::Milliseconds(1500)));

  auto c = Connect(0, {0});
  ASSERT_NE(c, nullptr);
  State s = MakeState(61);
  ASSERT_TRUE(c->Snapshot(1, s.tensors)->WaitCommitted().ok());
  ExpectRestored(s, *c->Restore(kLatestStep));
  EXPECT_TRUE(daemon_->alive());
}

// One user cannot take every descriptor of the daemon: past the per-uid
// cap a connection is refused with the reason, and closing some lets new
// ones in. A trainer of the same uid meanwhile keeps its session.
TEST_F(SnapshotTest, AConnectionFloodFromOneUserIsCapped) {
  auto own = Connect(0, {0}, Transport::kSharedMemory, "own");
  ASSERT_NE(own, nullptr);
  auto raw = [&] { return ConnectRaw(daemon_->socket()); };
  std::vector<UniqueFd> flood;
  std::string refusal;
  TrainerRole grpc_role;  // each becomes a (silent) gRPC connection
  for (int i = 0; i < 600 && refusal.empty(); ++i) {
    UniqueFd fd = raw();
    auto hello = ReceiveTrainerHello(fd.get(), absl::Seconds(10));
    ASSERT_TRUE(hello.ok()) << hello.status();
    if (hello->admitted) {
      ASSERT_TRUE(SendTrainerRole(fd.get(), grpc_role, absl::Seconds(5)).ok());
    } else {
      refusal = hello->message;
    }
    flood.push_back(std::move(fd));
  }
  // The session above holds one of the uid's connections.
  EXPECT_EQ(flood.size(), 512u) << refusal;
  EXPECT_NE(refusal.find("already has 512 connections open"), std::string::npos) << refusal;
  flood.resize(100);  // closes 412
  bool admitted = false;
  for (int i = 0; i < 200 && !admitted; ++i) {  // gRPC notices the closes soon
    UniqueFd fd = raw();
    auto hello = ReceiveTrainerHello(fd.get(), absl::Seconds(10));
    ASSERT_TRUE(hello.ok()) << hello.status();
    admitted = hello->admitted;
    if (!admitted) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_TRUE(admitted);
  State s = MakeState(4);
  ASSERT_TRUE(own->Snapshot(1, s.tensors)->WaitCommitted().ok());
  ExpectRestored(s, *own->Restore(kLatestStep));
}

TEST_F(SnapshotTest, TwoRanksCommitAStepThatEachRestoresItsOwnPart) {
  auto r0 = Connect(0, {0, 1});
  auto r1 = Connect(1, {0, 1});
  State s0 = MakeState(1), s1 = MakeState(2);
  for (uint64_t step = 1; step <= 3; ++step) {
    auto h0 = r0->Snapshot(step, s0.tensors);
    auto h1 = r1->Snapshot(step, s1.tensors);
    ASSERT_TRUE(h0->WaitCommitted().ok()) << h0->WaitCommitted();
    ASSERT_TRUE(h1->WaitCommitted().ok()) << h1->WaitCommitted();
  }
  auto steps = r0->ListRestorable();
  ASSERT_TRUE(steps.ok());
  ASSERT_EQ(steps->size(), 1u);  // retain = 1
  EXPECT_EQ((*steps)[0].step, 3u);
  EXPECT_EQ((*steps)[0].state, StepState::kLocal);
  ExpectRestored(s0, *r0->Restore(kLatestStep));
  ExpectRestored(s1, *r1->Restore(3));
}

// A trainer that dies (SIGKILL) or stops (SIGSTOP) mid-stream. A stopped one
// answers no keepalive ping: the daemon closes its connection and discards its
// step as a dead trainer's, where one that only stalls (alive, answering
// pings) keeps it.
class StalledTrainerTest : public SnapshotTest, public ::testing::WithParamInterface<int> {
 protected:
  void SetUp() override {
    options_.extra_flags = {"--trainer_keepalive_ms=2000"};
    SnapshotTest::SetUp();
  }
};

TEST_P(StalledTrainerTest, ItsHalfWrittenStepIsDiscardedAndTheCommittedOneStays) {
  const int signal = GetParam();
  State s1 = MakeState(11);
  {
    auto c = Connect(0, {0});
    ASSERT_TRUE(c->Snapshot(1, s1.tensors)->WaitCommitted().ok());
  }
  const std::string out = dir_.path() + "/stall.out";
  const pid_t trainer = SpawnStallTrainer(out, {"--step=2", "--bytes=4194304"});
  absl::Cleanup reap = [trainer] { testing::StopProcess(trainer, SIGKILL); };
  bool stalled = false;
  for (int i = 0; i < 400 && !stalled; ++i) {
    stalled = Printed(out, "STALLED");
    if (!stalled) std::this_thread::sleep_for(std::chrono::milliseconds(25));
  }
  ASSERT_TRUE(stalled) << "the trainer never reached mid-stream";
  ASSERT_TRUE(WaitForSteps("job", {1, 2}));  // step 2 is receiving
  if (signal == SIGSTOP) {
    // Over two keepalive periods: the stalled trainer answers every ping.
    std::this_thread::sleep_for(std::chrono::milliseconds(4500));
    ASSERT_TRUE(WaitForSteps("job", {1, 2})) << daemon_->Log();
  }
  ASSERT_EQ(::kill(trainer, signal), 0);

  // The daemon notices the dead session and discards the half-written step.
  ASSERT_TRUE(WaitForSteps("job", {1}, /*seconds=*/20)) << daemon_->Log();
  auto c = Connect(0, {0});
  auto steps = c->ListRestorable();
  ASSERT_EQ(steps->size(), 1u);
  EXPECT_EQ((*steps)[0].step, 1u);
  ExpectRestored(s1, *c->Restore(kLatestStep));
  // The restarted rank snapshots step 2 again.
  State s2 = MakeState(12);
  ASSERT_TRUE(c->Snapshot(2, s2.tensors)->WaitCommitted().ok());
  ExpectRestored(s2, *c->Restore(kLatestStep));
  EXPECT_TRUE(daemon_->alive());
}

INSTANTIATE_TEST_SUITE_P(KilledOrStopped, StalledTrainerTest, ::testing::Values(SIGKILL, SIGSTOP),
                         [](const ::testing::TestParamInfo<int>& info) {
                           return std::string(info.param == SIGSTOP ? "Stopped" : "Killed");
                         });

TEST_F(SnapshotTest, ADaemonKilledAndRestartedKeepsEveryCommittedStep) {
  options_.retain = 2;
  daemon_.reset();
  SetUp();
  State s[4][2];
  for (int step = 1; step <= 4; ++step) {
    for (int r = 0; r < 2; ++r) s[step - 1][r] = MakeState(step * 10 + r, step);
  }
  {
    auto r0 = Connect(0, {0, 1});
    auto r1 = Connect(1, {0, 1});
    for (int step = 1; step <= 3; ++step) {
      ASSERT_TRUE(r0->Snapshot(step, s[step - 1][0].tensors)->WaitCommitted().ok());
      ASSERT_TRUE(r1->Snapshot(step, s[step - 1][1].tensors)->WaitCommitted().ok());
    }
    // Step 4: rank 0 committed, rank 1 never did. Then the daemon dies.
    ASSERT_TRUE(r0->Snapshot(4, s[3][0].tensors)->WaitCommitted().ok());
    ASSERT_TRUE(WaitForSteps("job", {2, 3, 4}));
    daemon_->Kill();
  }
  ASSERT_TRUE(daemon_->Restart().ok()) << daemon_->Log();
  EXPECT_NE(daemon_->Log().find("re-adopted 2 step(s)"), std::string::npos) << daemon_->Log();
  auto r0 = Connect(0, {0, 1});
  auto r1 = Connect(1, {0, 1});
  auto steps = r0->ListRestorable();
  ASSERT_TRUE(steps.ok());
  ASSERT_EQ(steps->size(), 2u);
  EXPECT_EQ((*steps)[0].step, 3u);
  EXPECT_EQ((*steps)[1].step, 2u);
  for (int step : {2, 3}) {
    ExpectRestored(s[step - 1][0], *r0->Restore(step));
    ExpectRestored(s[step - 1][1], *r1->Restore(step));
  }
  EXPECT_TRUE(WaitForSteps("job", {2, 3}));  // the step in flight is gone
}

// Bad input, sent on the wire as a broken or hostile client would. A healthy
// client keeps working between every case, and the daemon stays up.
// Room for 32 MiB steps, one of them pinned while it is read.
class SnapshotLargeArenaTest : public SnapshotTest {
 protected:
  SnapshotLargeArenaTest() { options_.arena_bytes = 256 << 20; }
};

// A daemon that stops (SIGSTOP) or dies (SIGKILL) while a trainer streams a
// step over gRPC: the trainer's Wait() ends with UNAVAILABLE (keepalive
// pings find the stopped one) instead of blocking, gRPC lets go of the
// borrowed tensors, and the committed step survives byte for byte.
class GrpcStreamFaultTest : public SnapshotLargeArenaTest,
                            public ::testing::WithParamInterface<int> {
 protected:
  std::unique_ptr<Client> ConnectGrpc() {
    ClientOptions o;
    o.daemon_address = daemon_->socket();
    o.job_id = "grpc";
    o.transport = Transport::kGrpc;
    o.keepalive_ms = 1000;
    auto c = Client::Connect(o);
    EXPECT_TRUE(c.ok()) << c.status();
    return c.ok() ? std::move(*c) : nullptr;
  }
};

TEST_P(GrpcStreamFaultTest, TheTrainersWaitFailsAndTheCommittedStepSurvives) {
  const int signal = GetParam();
  State s1 = MakeState(31);
  State s2 = MakeState(32, 8000);  // ~128 MiB: far more than the stream's window
  auto c = ConnectGrpc();
  ASSERT_NE(c, nullptr);
  ASSERT_TRUE(c->Snapshot(1, s1.tensors)->WaitCommitted().ok());

  auto h = c->Snapshot(2, s2.tensors);
  ASSERT_TRUE(h.ok()) << h.status();
  for (int i = 0; i < 20000 && h->bytes_copied() == 0 && !h->done(); ++i) {
    std::this_thread::sleep_for(std::chrono::microseconds(500));
  }
  if (signal == SIGSTOP) {
    daemon_->Pause();
  } else {
    daemon_->Kill();
  }
  const uint64_t sent = h->bytes_copied();
  ASSERT_GT(sent, 0u) << "the stream never started";
  ASSERT_LT(sent, h->bytes_total()) << "the stream ended before the daemon was stopped";
  auto waited = std::async(std::launch::async, [h = *h] { return h.Wait(); });
  const bool returned = waited.wait_for(std::chrono::seconds(60)) == std::future_status::ready;
  if (signal == SIGSTOP) daemon_->Resume();  // lets a blocked Wait end too
  ASSERT_TRUE(returned) << "Wait() still blocked a minute after the daemon stopped";
  const absl::Status st = waited.get();
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable) << st;
  EXPECT_EQ(h->WaitCommitted().code(), absl::StatusCode::kUnavailable);
  c.reset();

  if (signal == SIGKILL) {
    ASSERT_TRUE(daemon_->Restart().ok()) << daemon_->Log();
  }
  EXPECT_TRUE(daemon_->alive());
  ASSERT_TRUE(WaitForSteps("grpc", {1})) << daemon_->Log();  // step 2 was never committed
  c = ConnectGrpc();
  ASSERT_NE(c, nullptr);
  ExpectRestored(s1, *c->Restore(kLatestStep));
  const absl::Status again = c->Snapshot(2, s2.tensors)->WaitCommitted();
  ASSERT_TRUE(again.ok()) << again << "\n" << daemon_->Log();
  ExpectRestored(s2, *c->Restore(kLatestStep));
}

INSTANTIATE_TEST_SUITE_P(StopOrKill, GrpcStreamFaultTest, ::testing::Values(SIGSTOP, SIGKILL),
                         [](const ::testing::TestParamInfo<int>& info) {
                           return std::string(info.param == SIGSTOP ? "Stopped" : "Killed");
                         });

// A trainer that stops taking a restore stream (SIGSTOPped, or alive and
// not reading) leaves the daemon's write pending where no ping passes: the
// daemon ends its connection (after two keepalive periods, or when a ping
// to the stopped one goes unanswered), and the window the stream pinned
// goes back. The arena holds two windows of the step size and
// not three, so step 3 fits only once step 1's pinned window is freed.
class RestoreStallTest : public SnapshotTest, public ::testing::WithParamInterface<bool> {
 protected:
  static constexpr int kScale = 1200;  // ~19 MiB a step, ~20 MiB a window
  void SetUp() override {
    options_.arena_bytes = 48 << 20;
    options_.extra_flags = {"--trainer_keepalive_ms=1000"};
    SnapshotTest::SetUp();
  }
};

TEST_P(RestoreStallTest, ATrainerThatStopsReadingARestoreIsCutAndItsWindowGoesBack) {
  const bool stopped = GetParam();
  {
    auto c = Connect(0, {0}, Transport::kGrpc);
    State s1 = MakeState(15, kScale);
    ASSERT_TRUE(c->Snapshot(1, s1.tensors)->WaitCommitted().ok());
  }
  const std::string out = dir_.path() + "/restore.out";
  const pid_t trainer = SpawnStallTrainer(out, {"--step=1", "--restore"});
  absl::Cleanup reap = [trainer] { testing::StopProcess(trainer, SIGKILL); };
  // Alive, the trainer sees its connection cut and the daemon says why;
  // stopped, the daemon ends its session (a ping or the stall, whichever
  // comes first).
  auto cut_logged = [this] {
    return daemon_->Log().find("took no bytes of a restore") != std::string::npos;
  };
  auto both_sessions_ended = [this] {
    const std::string log = daemon_->Log();
    int ended = 0;
    for (size_t at = log.find(" ended: job "); at != std::string::npos;
         at = log.find(" ended: job ", at + 1)) {
      ++ended;
    }
    return ended >= 2;
  };
  bool stalled = false, cut = false, done = false;
  for (int i = 0; i < 30 * 40 && !done; ++i) {  // 30 s
    if (!stalled && Printed(out, "STALLED")) {
      stalled = true;
      if (stopped) {
        ASSERT_EQ(::kill(trainer, SIGSTOP), 0);
      }
    }
    if (i == 10 * 40 && !stalled) break;  // it never began its restore
    cut = cut || (!stopped && Printed(out, "CUT"));
    done = stalled && (stopped ? both_sessions_ended() : cut && cut_logged());
    std::this_thread::sleep_for(std::chrono::milliseconds(25));
  }
  ASSERT_TRUE(stalled) << "the trainer never began its restore";
  ASSERT_TRUE(done) << daemon_->Log();
  // Step 2 retires step 1; step 3 needs the window step 1's stream pinned.
  auto c = Connect(0, {0}, Transport::kGrpc);
  for (uint64_t step : {2, 3}) {
    State s = MakeState(15 + step, kScale);
    const absl::Status st = c->Snapshot(step, s.tensors)->WaitCommitted();
    ASSERT_TRUE(st.ok()) << "step " << step << ": " << st << "\n" << daemon_->Log();
    ExpectRestored(s, *c->Restore(kLatestStep));
  }
  EXPECT_TRUE(daemon_->alive());
}

INSTANTIATE_TEST_SUITE_P(NotReadingOrStopped, RestoreStallTest, ::testing::Bool(),
                         [](const ::testing::TestParamInfo<bool>& info) {
                           return std::string(info.param ? "Stopped" : "NotReading");
                         });

// The same over TCP, where the daemon has no connection of its own to cut:
// the stalled stream is cancelled, and the trainer, alive, keeps its session
// and its lease until it goes.
class RestoreStallTcpTest : public SnapshotTest {
 protected:
  void SetUp() override {
    port_ = testing::FreePorts(1)[0];
    options_.arena_bytes = 48 << 20;
    options_.extra_flags = {"--trainer_keepalive_ms=1000",
                            absl::StrCat("--data_address=127.0.0.1:", port_)};
    SnapshotTest::SetUp();
  }
  int port_ = 0;
};

TEST_F(RestoreStallTcpTest, ATrainerThatStopsReadingARestoreHasItsStreamCancelled) {
  const int port = port_;
  {
    auto c = Connect(0, {0}, Transport::kGrpc);
    State s1 = MakeState(15, 1200);  // ~19 MiB
    ASSERT_TRUE(c->Snapshot(1, s1.tensors)->WaitCommitted().ok());
  }
  const std::string socket = daemon_->socket();
  std::ifstream in(socket.substr(0, socket.rfind('/')) + "/job.secret");
  std::string secret;
  in >> secret;
  ASSERT_FALSE(secret.empty());
  const std::string out = dir_.path() + "/restore_tcp.out";
  std::vector<std::string> argv = {testing::RunfilePath("tests/stall_trainer"),
                                   absl::StrCat("--socket=127.0.0.1:", port),
                                   "--job_token=" + JobToken(secret, "job"),
                                   "--rank=0",
                                   "--local_ranks=0",
                                   "--step=1",
                                   "--restore",
                                   "--wait_stream_end"};
  const pid_t trainer = testing::Spawn(argv, out);
  absl::Cleanup reap = [trainer] { testing::StopProcess(trainer, SIGKILL); };
  auto logged = [this] {
    return daemon_->Log().find("took no bytes of a restore") != std::string::npos;
  };
  bool stalled = false, gave_up = false;
  for (int i = 0; i < 30 * 40 && !gave_up; ++i) {  // 30 s
    stalled = stalled || Printed(out, "STALLED");
    if (i == 10 * 40 && !stalled) break;  // it never began its restore
    gave_up = stalled && logged();
    if (!gave_up) std::this_thread::sleep_for(std::chrono::milliseconds(25));
  }
  ASSERT_TRUE(stalled) << "the trainer never began its restore";
  ASSERT_TRUE(gave_up) << daemon_->Log();
  // The trainer reads on now: what was in flight, then the stream's end.
  ASSERT_EQ(::kill(trainer, SIGUSR1), 0);
  const std::string cancelled = absl::StrCat("CUT ", static_cast<int>(grpc::StatusCode::CANCELLED));
  bool cut = false;
  for (int i = 0; i < 20 * 40 && !cut; ++i) {  // 20 s
    cut = Printed(out, cancelled);
    if (!cut) std::this_thread::sleep_for(std::chrono::milliseconds(25));
  }
  std::ifstream printed(out);
  ASSERT_TRUE(cut) << "the trainer printed: " << std::string(std::istreambuf_iterator<char>(printed), {});
  // Its session and lease outlive the stream; once it goes, steps 2 and 3
  // fit (step 3 only in the window step 1's lease held).
  std::move(reap).Invoke();
  auto c = Connect(0, {0}, Transport::kGrpc);
  for (uint64_t step : {2, 3}) {
    State s = MakeState(15 + step, 1200);
    const absl::Status st = c->Snapshot(step, s.tensors)->WaitCommitted();
    ASSERT_TRUE(st.ok()) << "step " << step << ": " << st << "\n" << daemon_->Log();
    ExpectRestored(s, *c->Restore(kLatestStep));
  }
  EXPECT_TRUE(daemon_->alive());
}

TEST_F(SnapshotLargeArenaTest, BadInputGetsAReadableStatusAndTheDaemonKeepsServing) {
  auto healthy = Connect(0, {0}, Transport::kSharedMemory, "healthy");
  uint64_t healthy_step = 0;
  auto still_serving = [&] {
    State s = MakeState(++healthy_step);
    auto h = healthy->Snapshot(healthy_step, s.tensors);
    ASSERT_TRUE(h.ok() && h->WaitCommitted().ok()) << h->WaitCommitted();
    ExpectRestored(s, *healthy->Restore(kLatestStep));
  };

  DataChannelOptions dco;
  dco.address = daemon_->socket();
  auto data = OpenDataChannel(std::move(dco));
  ASSERT_TRUE(data.ok()) << data.status();
  auto stub = v1::Snapshot::NewStub(data->channel);
  grpc::ClientContext attach_ctx;
  v1::AttachRequest attach;
  attach.set_job_id("bad");
  attach.set_rank(0);
  attach.add_local_ranks(0);
  auto session_stream = stub->Attach(&attach_ctx, attach);
  v1::AttachEvent ev;
  ASSERT_TRUE(session_stream->Read(&ev));
  const std::string session = ev.session_id();
  ASSERT_EQ(session.size(), 16u);

  auto expect = [&](grpc::Status st, grpc::StatusCode code, const std::string& text) {
    EXPECT_EQ(st.error_code(), code) << st.error_message();
    EXPECT_NE(st.error_message().find(text), std::string::npos) << st.error_message();
    still_serving();
  };
  auto begin = [&](const std::string& sess, uint64_t step, uint64_t bytes) {
    grpc::ClientContext ctx;
    v1::BeginRankRequest req;
    req.set_session_id(sess);
    req.set_step(step);
    req.set_bytes(bytes);
    v1::BeginRankResponse resp;
    return stub->BeginRank(&ctx, req, &resp);
  };
  auto commit = [&](uint64_t step, const v1::Manifest& m) {
    grpc::ClientContext ctx;
    v1::CommitRankRequest req;
    req.set_session_id(session);
    req.set_step(step);
    *req.mutable_manifest() = m;
    v1::CommitRankResponse resp;
    return stub->CommitRank(&ctx, req, &resp);
  };
  auto write = [&](uint64_t step, uint64_t offset, const std::string& data) {
    grpc::ClientContext ctx;
    v1::WriteRankResponse resp;
    auto w = stub->WriteRank(&ctx, &resp);
    v1::WriteRankChunk c;
    c.set_session_id(session);
    c.set_step(step);
    c.set_offset(offset);
    c.set_data(data);
    w->Write(c);
    w->WritesDone();
    return w->Finish();
  };
  auto entry = [](const std::string& name, uint64_t offset, const std::string& bytes) {
    v1::TensorEntry e;
    e.set_name(name);
    e.set_kind(v1::PARAM);
    e.set_dtype(v1::UINT8);
    e.add_shape(bytes.size());
    e.set_offset(offset);
    e.set_length(bytes.size());
    e.set_crc32c(ec::Crc32c(absl::Span<const uint8_t>(
        reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size())));
    return e;
  };

  // Unknown session / job.
  expect(begin(std::string(16, '\x42'), 1, 10), grpc::StatusCode::NOT_FOUND,
         "no session with this id on this connection");
  // A step larger than the arena.
  expect(begin(session, 1, uint64_t{1} << 40), grpc::StatusCode::RESOURCE_EXHAUSTED,
         "needs 1.00 TiB but the whole arena holds");
  // Commit a good step 5.
  const std::string payload(1000, 'x');
  ASSERT_TRUE(begin(session, 5, 1000).ok());
  ASSERT_TRUE(write(5, 0, payload).ok());
  v1::Manifest good;
  *good.add_tensors() = entry("w", 0, payload);
  ASSERT_TRUE(commit(5, good).ok());
  // Steps going backwards.
  expect(begin(session, 4, 10), grpc::StatusCode::FAILED_PRECONDITION, "steps only grow");
  // A write past the window.
  ASSERT_TRUE(begin(session, 6, 1000).ok());
  expect(write(6, 900, std::string(200, 'y')), grpc::StatusCode::INVALID_ARGUMENT,
         "passes the end of the 1000-byte window");
  ASSERT_TRUE(write(6, 0, payload).ok());
  // Manifest offsets outside the window.
  v1::Manifest outside;
  *outside.add_tensors() = entry("w", 500, payload);
  expect(commit(6, outside), grpc::StatusCode::INVALID_ARGUMENT,
         "lies outside the rank's 1000-byte window");
  // A wrong checksum.
  v1::Manifest wrong = good;
  wrong.mutable_tensors(0)->set_crc32c(good.tensors(0).crc32c() ^ 1);
  expect(commit(6, wrong), grpc::StatusCode::INVALID_ARGUMENT, "has crc32c");
  // An oversized name.
  v1::Manifest long_name = good;
  long_name.mutable_tensors(0)->set_name(std::string(10000, 'n'));
  expect(commit(6, long_name), grpc::StatusCode::INVALID_ARGUMENT, "names must have 1 to 4096");
  // An oversized message (the manifest of a hostile client).
  v1::Manifest huge = good;
  huge.mutable_tensors(0)->set_name(std::string(70 << 20, 'h'));
  {
    grpc::Status st = commit(6, huge);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << st.error_message();
    still_serving();
  }
  // Too many local ranks, an invalid job id.
  for (auto [job, ranks, text] :
       std::vector<std::tuple<std::string, int, std::string>>{
           {"ok", 2000, "at most 1024 per node"}, {"no spaces", 1, "job id 'no spaces'"}}) {
    grpc::ClientContext ctx;
    v1::AttachRequest bad;
    bad.set_job_id(job);
    bad.set_rank(0);
    for (int r = 0; r < ranks; ++r) bad.add_local_ranks(r);
    auto s = stub->Attach(&ctx, bad);
    v1::AttachEvent e;
    EXPECT_FALSE(s->Read(&e));
    expect(s->Finish(), grpc::StatusCode::INVALID_ARGUMENT, text);
  }
  // ReadRank: a lease the session does not hold, bytes past the window, a
  // request that is not one.
  auto restore = [&](uint64_t step) {
    grpc::ClientContext ctx;
    v1::RestoreRequest req;
    req.set_session_id(session);
    req.set_step(step);
    v1::RestoreResponse resp;
    EXPECT_TRUE(stub->Restore(&ctx, req, &resp).ok());
    return resp;
  };
  auto read_rank = [&](uint64_t lease, uint64_t offset, uint64_t length, std::string* got) {
    grpc::ClientContext ctx;
    v1::ReadRankRequest req;
    req.set_session_id(session);
    req.set_lease_id(lease);
    req.set_offset(offset);
    req.set_length(length);
    auto r = stub->ReadRank(&ctx, req);
    v1::ReadRankChunk c;
    while (r->Read(&c)) got->append(c.data());
    return r->Finish();
  };
  std::string got;
  expect(read_rank(12345, 0, 10, &got), grpc::StatusCode::NOT_FOUND, "lease 12345 is not held");
  const v1::RestoreResponse five = restore(5);
  expect(read_rank(five.lease_id(), 900, 200, &got), grpc::StatusCode::INVALID_ARGUMENT,
         "passes the end of the 1000-byte window");
  ASSERT_TRUE(read_rank(five.lease_id(), 100, 900, &got).ok());
  EXPECT_EQ(got, payload.substr(100));
  // One message of `bytes` to `method`, as a hostile client sends it.
  auto raw = [&](const std::string& method, const std::string& bytes) {
    grpc::GenericStub generic(data->channel);
    grpc::ClientContext ctx;
    grpc::Slice slice(bytes);
    grpc::ByteBuffer request(&slice, 1);
    grpc::CompletionQueue cq;
    auto call = generic.PrepareCall(&ctx, "/ecsnap.v1.Snapshot/" + method, &cq);
    void* tag;
    bool ok;
    grpc::Status st;
    call->StartCall(&ctx);
    if (cq.Next(&tag, &ok) && ok) {
      call->Write(request, grpc::WriteOptions().set_last_message(), &ctx);
      cq.Next(&tag, &ok);
    }
    call->Finish(&st, &ctx);
    cq.Next(&tag, &ok);
    cq.Shutdown();
    while (cq.Next(&tag, &ok)) {
    }
    return st;
  };
  expect(raw("ReadRank", "\xff\xff\xff"), grpc::StatusCode::INVALID_ARGUMENT,
         "is not a ReadRankRequest");
  expect(raw("WriteRank", "\x0a\x10" + session + "\x22\x80\x80\x80"),
         grpc::StatusCode::INVALID_ARGUMENT, "is not a WriteRankChunk");
  expect(raw("WriteRank", "\x1a\x05x"), grpc::StatusCode::INVALID_ARGUMENT,
         "field 3 came with wire type 2");
  ASSERT_TRUE(commit(6, good).ok());
  ASSERT_TRUE(begin(session, 7, 1000).ok());
  ASSERT_TRUE(write(7, 0, payload).ok());
  ASSERT_TRUE(commit(7, good).ok());
  // A trainer that releases its restore while the bytes are still on their
  // way gets the step's bytes to the end, though later steps take the
  // window's place in the arena meanwhile. (32 MiB: more than the socket and the streams' windows hold.)
  const std::string big(32 << 20, 'a');
  {
    grpc::Status st = begin(session, 8, big.size());
    ASSERT_TRUE(st.ok()) << st.error_message();
  }
  ASSERT_TRUE(write(8, 0, big).ok());
  v1::Manifest seven;
  *seven.add_tensors() = entry("w", 0, big);
  ASSERT_TRUE(commit(8, seven).ok());
  {
    const v1::RestoreResponse lease = restore(8);
    grpc::ClientContext ctx;
    v1::ReadRankRequest req;
    req.set_session_id(session);
    req.set_lease_id(lease.lease_id());
    req.set_length(big.size());
    auto r = stub->ReadRank(&ctx, req);
    v1::ReadRankChunk c;
    ASSERT_TRUE(r->Read(&c));
    std::string read = c.data();
    {
      grpc::ClientContext rctx;
      v1::ReleaseRestoreRequest rel;
      rel.set_session_id(session);
      rel.set_lease_id(lease.lease_id());
      v1::ReleaseRestoreResponse resp;
      ASSERT_TRUE(stub->ReleaseRestore(&rctx, rel, &resp).ok());
    }
    for (uint64_t step : {9, 10, 11, 12}) {
      const std::string other(32 << 20, static_cast<char>('a' + step));
      ASSERT_TRUE(begin(session, step, other.size()).ok());
      ASSERT_TRUE(write(step, 0, other).ok());
      v1::Manifest m;
      *m.add_tensors() = entry("w", 0, other);
      ASSERT_TRUE(commit(step, m).ok());
    }
    while (r->Read(&c)) read += c.data();
    ASSERT_TRUE(r->Finish().ok());
    EXPECT_EQ(read.size(), big.size());
    EXPECT_TRUE(read == big) << "the released window's bytes changed while they were sent";
  }
  // After all that, a later step still commits.
  ASSERT_TRUE(begin(session, 13, 1000).ok());
  ASSERT_TRUE(write(13, 0, payload).ok());
  ASSERT_TRUE(commit(13, good).ok());
  EXPECT_TRUE(daemon_->alive());
  attach_ctx.TryCancel();
  session_stream->Finish();
}

TEST_F(SnapshotTest, ASnapshotThatDoesNotFitIsRefusedWithTheBytesNeeded) {
  auto c = Connect(0, {0});
  std::vector<uint8_t> big(100 << 20, 1);
  Tensor t;
  t.name = "too_big";
  t.dtype = DType::kUInt8;
  t.shape = {static_cast<int64_t>(big.size())};
  t.data = big.data();
  t.bytes = big.size();
  auto h = c->Snapshot(1, {t});
  ASSERT_TRUE(h.ok());
  absl::Status st = h->WaitCommitted();
  EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted) << st;
  EXPECT_EQ(h->Wait(), st);  // failed before the copy: both report it
  EXPECT_NE(st.message().find("snapshot of step 1: job job step 1 rank 0 needs 100.00 MiB"),
            std::string::npos)
      << st;
  // The client and daemon carry on.
  State s = MakeState(1);
  ASSERT_TRUE(c->Snapshot(1, s.tensors)->WaitCommitted().ok());
}

}  // namespace
}  // namespace ecsnap
