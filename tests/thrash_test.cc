// The thrasher: a seeded nemesis against a 6-daemon RS(4,2) group while one
// rank per node snapshots every ~100 ms, and a checker of the promises of
// DESIGN.md §2 (STYLE.md §10):
//   - after any <= m nodes lost, a replaced node's rank restores a step at
//     least as new as the newest one every daemon had reported PROTECTED
//     before the kill, byte for byte, and never DATA_LOSS;
//   - a restarted daemon's rank restores the same way from its own arena;
//   - no daemon dies unless the nemesis killed it;
//   - once the faults stop, a new step becomes PROTECTED everywhere, every
//     rank still held verifies, and the arenas hold no leftovers.
//
//   bazel test //tests:thrash_test                          (about 2 minutes)
//   .bazel/bin/tests/thrash_test --minutes=30               (a long run)
//   .bazel/bin/tests/thrash_test --seed=S                   (replays a schedule)
//
// The seed fixes the nemesis's choices and every rank's bytes; thread timing
// still varies between runs, so a replay reproduces the schedule, not the
// interleaving.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bitset>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "client/ecsnap.h"
#include "gtest/gtest.h"
#include "proto/admin.grpc.pb.h"
#include "tests/harness.h"

ABSL_FLAG(uint64_t, seed, 0,
          "Seed of the fault schedule and the ranks' bytes (0: $ECSNAP_THRASH_SEED, else the "
          "clock).");
ABSL_FLAG(double, minutes, 1.5, "How long the nemesis runs, in minutes.");
ABSL_FLAG(int, max_events, 2000, "At most this many nemesis events.");

namespace ecsnap {
namespace {

using testing::Cluster;
using testing::DaemonProcess;
using testing::TempDir;

constexpr int kK = 4;
constexpr int kM = 2;
constexpr int kN = kK + kM;
constexpr char kJob[] = "soak";
constexpr uint64_t kRankBytes = 512 << 10;
constexpr absl::Duration kStepPeriod = absl::Milliseconds(100);
// Rebuilds capped so that a node's rebuild takes a second or two and kills
// land in the middle of one.
constexpr char kClusterFields[] = "rebuild_bytes_per_sec: 500000";
// How long a restarted or replaced node may take to report PROTECTED again.
constexpr absl::Duration kHealBound = absl::Seconds(90);
constexpr absl::Duration kRestoreBound = absl::Seconds(60);
// Once the faults stop, how long the group may take to protect a new step.
constexpr absl::Duration kSettleBound = absl::Seconds(60);
// Arena bytes a daemon may still use at the end: with retain 1, one
// protected step and one in flight, data and parity (about 0.8 MiB each),
// with room to spare; leaking a row or a rank per fault would exceed it.
constexpr uint64_t kArenaUsedBound = 4 << 20;

uint64_t ChooseSeed() {
  uint64_t seed = absl::GetFlag(FLAGS_seed);
  if (seed != 0) return seed;
  if (const char* env = std::getenv("ECSNAP_THRASH_SEED"); env != nullptr && *env != '\0') {
    seed = std::strtoull(env, nullptr, 10);
  }
  if (seed != 0) return seed;
  return static_cast<uint64_t>(absl::ToUnixNanos(absl::Now()));
}

// A rank's state at a step: a function of (seed, slot, step) only.
struct State {
  std::vector<std::vector<uint8_t>> bytes;
  std::vector<Tensor> tensors;
};

State MakeState(uint64_t seed, int slot, uint64_t step) {
  std::mt19937_64 rng(seed ^ (step * 0x9E3779B97F4A7C15ull) ^ (uint64_t(slot) << 56));
  State s;
  const std::vector<uint64_t> sizes = {kRankBytes + 4096u * slot + 8u * (step % 5), 77};
  for (uint64_t size : sizes) {
    s.bytes.emplace_back(size);
    auto& b = s.bytes.back();
    for (uint64_t i = 0; i < size; i += 8) {
      const uint64_t v = rng();
      std::memcpy(b.data() + i, &v, std::min<uint64_t>(8, size - i));
    }
  }
  for (size_t i = 0; i < sizes.size(); ++i) {
    Tensor t;
    t.name = i == 0 ? "weights" : "rng";
    t.dtype = DType::kUInt8;
    t.shape = {static_cast<int64_t>(sizes[i])};
    t.data = s.bytes[i].data();
    t.bytes = sizes[i];
    s.tensors.push_back(t);
  }
  return s;
}

ClientOptions RankOptions(const DaemonProcess& d, int slot, int rpc_timeout_ms) {
  ClientOptions o;
  o.daemon_address = d.socket();
  o.job_id = kJob;
  o.rank = slot;
  o.local_ranks = {static_cast<uint32_t>(slot)};
  o.rpc_timeout_ms = rpc_timeout_ms;
  return o;
}

std::string Tail(const std::string& log, int lines) {
  std::vector<absl::string_view> all = absl::StrSplit(log, '\n');
  const size_t from = all.size() > static_cast<size_t>(lines) ? all.size() - lines : 0;
  return absl::StrJoin(all.begin() + from, all.end(), "\n");
}

class Thrasher {
 public:
  Thrasher(uint64_t seed, Cluster* cluster) : seed_(seed), rng_(seed), cluster_(cluster) {}

  // Runs writers, the poller and the nemesis (on the calling thread, which
  // spawned the daemons and so must outlive them) for `duration` or
  // `max_events` events.
  void Run(absl::Duration duration, int max_events);

  int events() const { return events_; }
  int restores_checked() const { return restores_; }
  std::vector<std::string> failures() {
    absl::MutexLock l(&mu_);
    return failures_;
  }
  int writer_errors() {
    absl::MutexLock l(&mu_);
    return writer_errors_;
  }

 private:
  // A node that counts against the m the group may lose: stopped, being
  // replaced or restarted, not yet protected again, or holding a corrupt
  // chunk of a step that may still be restored.
  struct Fault {
    enum Kind { kPaused, kHealing, kCorrupt } kind;
    uint64_t heal_step = 0;  // kHealing: the slot reports this step (or newer) PROTECTED;
                             // kCorrupt: every slot has reported a newer step PROTECTED
    absl::Time until;        // kPaused: SIGCONT then
    absl::Time since;
    bool stuck = false;  // reported once as a failure; stays counted
  };

  void Writer(int slot);
  void Poller();
  uint64_t StepNow() const { return 1 + (absl::Now() - start_) / kStepPeriod; }

  void Fail(const std::string& what, int slot);
  std::string Faults() const;
  bool Fits(const std::vector<int>& slots) const;  // may `slots` become faulty too?
  void Tend();
  void TakeDown(int slot);
  void BringUp(int slot);
  void CheckRestore(int slot, uint64_t floor, const char* after);

  void KillAndStart(const std::vector<int>& slots, bool replace);
  void Settle();
  void CheckArenas();
  void Pause(int slot);
  void Corrupt(int slot);

  const uint64_t seed_;
  std::mt19937_64 rng_;  // the nemesis's
  Cluster* const cluster_;
  absl::Time start_;
  absl::Time nemesis_start_;
  std::atomic<bool> stop_{false};
  int events_ = 0;
  int restores_ = 0;
  // Nemesis thread only.
  std::multimap<int, Fault> faults_;

  mutable absl::Mutex mu_;
  std::bitset<kN> down_ ABSL_GUARDED_BY(mu_);         // writers must let go of the node
  std::bitset<kN> writer_idle_ ABSL_GUARDED_BY(mu_);  // and have
  std::map<uint64_t, std::bitset<kN>> seen_protected_ ABSL_GUARDED_BY(mu_);
  uint64_t group_protected_ ABSL_GUARDED_BY(mu_) = 0;        // every slot reported it PROTECTED
  uint64_t newest_protected_[kN] ABSL_GUARDED_BY(mu_) = {};  // since the slot's last event
  uint64_t epoch_[kN] ABSL_GUARDED_BY(mu_) = {};             // kills of the slot so far
  std::vector<std::string> failures_ ABSL_GUARDED_BY(mu_);
  int writer_errors_ ABSL_GUARDED_BY(mu_) = 0;
};

void Thrasher::Writer(int slot) {
  std::unique_ptr<Client> client;
  uint64_t last = 0;
  int errors = 0;
  while (!stop_) {
    bool down;
    {
      absl::MutexLock l(&mu_);
      down = down_[slot];
      if (down) {
        client.reset();
        writer_idle_[slot] = true;
      } else {
        writer_idle_[slot] = false;
      }
    }
    if (down) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
      continue;
    }
    if (client == nullptr) {
      auto c = Client::Connect(RankOptions(cluster_->daemon(slot), slot, 5000));
      if (!c.ok()) {
        absl::MutexLock l(&mu_);
        ++writer_errors_;
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
        continue;
      }
      client = std::move(*c);
    }
    const uint64_t step = StepNow();
    if (step <= last) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
      continue;
    }
    last = step;  // even if it fails: steps only grow
    State state = MakeState(seed_, slot, step);
    auto h = client->Snapshot(step, state.tensors);
    absl::Status st = h.ok() ? h->WaitCommitted() : h.status();
    if (!st.ok()) {
      // Expected while a daemon is down, stopped or rebuilding: start again
      // with a fresh session, as a trainer would.
      if (++errors <= 5)
        std::printf("  writer %d step %llu: %s\n", slot, static_cast<unsigned long long>(step),
                    st.ToString().c_str());
      absl::MutexLock l(&mu_);
      ++writer_errors_;
      client.reset();
    }
  }
}

void Thrasher::Poller() {
  // A fresh channel after a failed call: one that failed would sit out
  // gRPC's reconnect backoff after the daemon is back.
  std::unique_ptr<admin::Admin::Stub> stubs[kN];
  while (!stop_) {
    for (int slot = 0; slot < kN && !stop_; ++slot) {
      if (stubs[slot] == nullptr) stubs[slot] = cluster_->daemon(slot).AdminStub();
      uint64_t epoch;
      {
        absl::MutexLock l(&mu_);
        epoch = epoch_[slot];
      }
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(300));
      admin::ListStepsRequest req;
      req.set_job_id(kJob);
      admin::ListStepsResponse resp;
      if (!stubs[slot]->ListSteps(&ctx, req, &resp).ok()) {
        stubs[slot].reset();
        continue;
      }
      absl::MutexLock l(&mu_);
      // An answer from before the node was killed says nothing of the new one.
      if (epoch != epoch_[slot]) continue;
      for (const auto& s : resp.steps()) {
        if (s.state() != v1::PROTECTED) continue;
        newest_protected_[slot] = std::max(newest_protected_[slot], s.step());
        auto& seen = seen_protected_[s.step()];
        seen.set(slot);
        if (seen.all()) group_protected_ = std::max(group_protected_, s.step());
      }
      while (!seen_protected_.empty() && seen_protected_.begin()->first + 1000 < group_protected_) {
        seen_protected_.erase(seen_protected_.begin());
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

void Thrasher::Fail(const std::string& what, int slot) {
  const std::string line =
      absl::StrCat("FAILURE at ", absl::FormatDuration(absl::Now() - nemesis_start_), " (seed ",
                   seed_, "): ", what);
  std::printf("%s\n", line.c_str());
  bool first_few;
  {
    absl::MutexLock l(&mu_);
    failures_.push_back(line);
    first_few = failures_.size() <= 5;
  }
  if (first_few && slot >= 0) {
    std::printf("---- slot %d log (last 40 lines) ----\n%s\n", slot,
                Tail(cluster_->daemon(slot).Log(), 40).c_str());
  }
  std::fflush(stdout);
}

std::string Thrasher::Faults() const {
  std::vector<std::string> out;
  for (const auto& [slot, f] : faults_) {
    const char* kind = f.kind == Fault::kPaused    ? "stopped"
                       : f.kind == Fault::kHealing ? "healing"
                                                   : "corrupt";
    out.push_back(absl::StrCat(slot, ":", kind, f.stuck ? "(stuck)" : ""));
  }
  return absl::StrCat("{", absl::StrJoin(out, ","), "}");
}

bool Thrasher::Fits(const std::vector<int>& slots) const {
  std::bitset<kN> faulty;
  for (const auto& [s, f] : faults_) faulty.set(s);
  for (int s : slots) faulty.set(s);
  return static_cast<int>(faulty.count()) <= kM;
}

// Resumes stopped nodes whose time came, forgets healed faults, and checks
// that every daemon is alive.
void Thrasher::Tend() {
  uint64_t group_protected;
  uint64_t newest[kN];
  {
    absl::MutexLock l(&mu_);
    group_protected = group_protected_;
    std::copy(newest_protected_, newest_protected_ + kN, newest);
  }
  const absl::Time now = absl::Now();
  for (auto it = faults_.begin(); it != faults_.end();) {
    const int slot = it->first;
    Fault& f = it->second;
    bool healed = false;
    switch (f.kind) {
      case Fault::kPaused:
        healed = now >= f.until;
        if (healed) cluster_->daemon(slot).Resume();
        break;
      case Fault::kHealing:
        healed = newest[slot] >= f.heal_step;
        break;
      case Fault::kCorrupt:
        healed = group_protected >= f.heal_step;
        break;
    }
    if (!healed && !f.stuck && f.kind != Fault::kPaused && now - f.since > kHealBound) {
      f.stuck = true;
      Fail(absl::StrCat("slot ", slot, " has not reported step ", f.heal_step,
                        " or newer PROTECTED ", absl::FormatDuration(kHealBound),
                        " after its fault (newest it reported: ", newest[slot],
                        ", every slot: ", group_protected, ")"),
           slot);
    }
    it = healed ? faults_.erase(it) : std::next(it);
  }
  for (int slot = 0; slot < kN; ++slot) {
    if (cluster_->daemon(slot).alive()) continue;
    Fail(absl::StrCat("slot ", slot, " died, and the nemesis did not kill it"), slot);
    TakeDown(slot);
    faults_.erase(slot);
    {
      absl::MutexLock l(&mu_);
      newest_protected_[slot] = 0;
      ++epoch_[slot];
    }
    if (absl::Status st = cluster_->daemon(slot).Restart(); !st.ok()) {
      Fail(absl::StrCat("slot ", slot, " does not restart: ", st.ToString()), slot);
    }
    faults_.insert({slot, Fault{Fault::kHealing, group_protected, {}, now}});
    BringUp(slot);
  }
}

void Thrasher::TakeDown(int slot) {
  {
    absl::MutexLock l(&mu_);
    down_.set(slot);
    writer_idle_.reset(slot);
  }
  absl::MutexLock l(&mu_);
  auto idle = [this, slot]()
                  ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) -> bool { return writer_idle_.test(slot); };
  // The writer may be waiting on a stopped daemon: bounded by its RPC deadline.
  if (!mu_.AwaitWithTimeout(absl::Condition(&idle), absl::Seconds(15))) {
    std::printf("  writer %d did not let go of its session within 15 s\n", slot);
  }
}

void Thrasher::BringUp(int slot) {
  absl::MutexLock l(&mu_);
  down_.reset(slot);
}

// `slot`'s rank restores its newest step: at least `floor`, byte for byte.
void Thrasher::CheckRestore(int slot, uint64_t floor, const char* after) {
  const absl::Time deadline = absl::Now() + kRestoreBound;
  std::unique_ptr<Client> client;
  absl::StatusOr<RestoredState> got = absl::UnavailableError("not tried");
  while (absl::Now() < deadline) {
    if (client == nullptr) {
      auto c = Client::Connect(RankOptions(cluster_->daemon(slot), slot, 30000));
      if (!c.ok()) {
        got = c.status();
        std::this_thread::sleep_for(std::chrono::milliseconds(200));
        continue;
      }
      client = std::move(*c);
    }
    got = client->Restore(kLatestStep);
    if (got.ok() || got.status().code() == absl::StatusCode::kDataLoss) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  ++restores_;
  const std::string context =
      absl::StrCat("slot ", slot, " after ", after, " (protected everywhere before: step ", floor,
                   ", faults ", Faults(), ")");
  if (!got.ok()) {
    Fail(absl::StrCat(context, ": restore: ", got.status().ToString()), slot);
    return;
  }
  if (got->step < floor) {
    Fail(absl::StrCat(context, ": restored step ", got->step, ", older than ", floor), slot);
  }
  const State want = MakeState(seed_, slot, got->step);
  bool same = got->tensors.size() == want.bytes.size();
  for (size_t i = 0; same && i < want.bytes.size(); ++i) {
    const auto& g = got->tensors[i].data;
    same =
        g.size() == want.bytes[i].size() && std::equal(g.begin(), g.end(), want.bytes[i].begin());
  }
  if (!same) {
    Fail(absl::StrCat(context, ": step ", got->step, " restored with other bytes"), slot);
  }
  std::printf("  slot %d restored step %llu (floor %llu)%s\n", slot,
              static_cast<unsigned long long>(got->step), static_cast<unsigned long long>(floor),
              same ? "" : " WRONG BYTES");
}

// Kills `slots` at once, then restarts them in place (`replace`: empty, as
// new nodes), and checks that each one's rank restores.
void Thrasher::KillAndStart(const std::vector<int>& slots, bool replace) {
  for (int slot : slots) TakeDown(slot);
  uint64_t floor;
  {
    absl::MutexLock l(&mu_);
    floor = group_protected_;
    for (int slot : slots) {
      newest_protected_[slot] = 0;
      ++epoch_[slot];
    }
  }
  for (int slot : slots) {
    faults_.erase(slot);  // a kill ends a pause too
    cluster_->daemon(slot).Kill();
  }
  for (int slot : slots) {
    DaemonProcess& d = cluster_->daemon(slot);
    if (absl::Status st = replace ? d.Replace() : d.Restart(); !st.ok()) {
      Fail(absl::StrCat("slot ", slot, " does not start again: ", st.ToString()), slot);
    }
    faults_.insert({slot, Fault{Fault::kHealing, floor, {}, absl::Now()}});
  }
  for (int slot : slots) CheckRestore(slot, floor, replace ? "replacement" : "restart in place");
  for (int slot : slots) BringUp(slot);
}

void Thrasher::Pause(int slot) {
  const absl::Duration d = absl::Milliseconds(500 + rng_() % 2500);
  cluster_->daemon(slot).Pause();
  faults_.insert({slot, Fault{Fault::kPaused, 0, absl::Now() + d, absl::Now()}});
  std::printf("  slot %d stopped for %s\n", slot, absl::FormatDuration(d).c_str());
}

// Flips a byte of `slot`'s chunk of the newest step protected everywhere,
// in its live memory.
void Thrasher::Corrupt(int slot) {
  uint64_t step;
  {
    absl::MutexLock l(&mu_);
    step = group_protected_;
  }
  if (step == 0) return;
  const State victim = MakeState(seed_, slot, step);
  const bool flipped = cluster_->daemon(slot).FlipByteAfter(victim.bytes[0].data(), 64, 32);
  std::printf("  slot %d: step %llu %s\n", slot, static_cast<unsigned long long>(step),
              flipped ? "chunk corrupted" : "already retired, nothing corrupted");
  if (flipped) faults_.insert({slot, Fault{Fault::kCorrupt, step + 1, {}, absl::Now()}});
}

void Thrasher::Run(absl::Duration duration, int max_events) {
  start_ = absl::Now();
  std::vector<std::thread> threads;
  for (int slot = 0; slot < kN; ++slot) threads.emplace_back([this, slot] { Writer(slot); });
  threads.emplace_back([this] { Poller(); });

  // Let the group protect a first step before the faults start.
  for (int i = 0; i < 300; ++i) {
    {
      absl::MutexLock l(&mu_);
      if (group_protected_ > 0) break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  nemesis_start_ = absl::Now();
  {
    absl::MutexLock l(&mu_);
    if (group_protected_ == 0) failures_.push_back("no step became PROTECTED in 30 s");
  }

  const absl::Time end = nemesis_start_ + duration;
  while (absl::Now() < end && events_ < max_events) {
    // A pause between events, tending faults meanwhile.
    const absl::Time next = absl::Now() + absl::Milliseconds(200 + rng_() % 1000);
    while (absl::Now() < next) {
      Tend();
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    const int kind = static_cast<int>(rng_() % 10);
    // Kills and replacements take 1..m nodes at once, as many as still fit.
    const int want = kind < 6 ? 1 + static_cast<int>(rng_() % kM) : 1;
    std::vector<int> order(kN);
    for (int i = 0; i < kN; ++i) order[i] = i;
    std::shuffle(order.begin(), order.end(), rng_);
    std::vector<int> slots;
    for (int slot : order) {
      if (static_cast<int>(slots.size()) == want) break;
      slots.push_back(slot);
      if (!Fits(slots)) slots.pop_back();
    }
    if (slots.empty()) continue;
    ++events_;
    const char* name = kind < 3   ? "kill and restart"
                       : kind < 6 ? "replace"
                       : kind < 8 ? "stop"
                                  : "corrupt";
    std::printf(
        "t=%s event %d: %s slots {%s}, faults %s\n",
        absl::FormatDuration(absl::Trunc(absl::Now() - nemesis_start_, absl::Milliseconds(100)))
            .c_str(),
        events_, name, absl::StrJoin(slots, ",").c_str(), Faults().c_str());
    std::fflush(stdout);
    if (kind < 6) {
      KillAndStart(slots, /*replace=*/kind >= 3);
    } else if (kind < 8) {
      Pause(slots[0]);
    } else {
      Corrupt(slots[0]);
    }
  }
  for (int slot = 0; slot < kN; ++slot) cluster_->daemon(slot).Resume();
  faults_.clear();
  Settle();
  stop_ = true;
  for (auto& t : threads) t.join();
  CheckArenas();
}

// The faults stop: a step snapshotted after the last one becomes PROTECTED
// on every daemon within kSettleBound, and no daemon dies meanwhile.
void Thrasher::Settle() {
  const uint64_t after = StepNow() + 1;
  const absl::Time deadline = absl::Now() + kSettleBound;
  uint64_t group_protected = 0;
  while (absl::Now() < deadline) {
    Tend();
    {
      absl::MutexLock l(&mu_);
      group_protected = group_protected_;
    }
    if (group_protected >= after) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  std::printf("settle: step %llu protected everywhere (wanted %llu or newer)\n",
              static_cast<unsigned long long>(group_protected),
              static_cast<unsigned long long>(after));
  if (group_protected < after) {
    Fail(absl::StrCat("no step snapshotted after the last fault (", after,
                      " or newer) became PROTECTED on every daemon within ",
                      absl::FormatDuration(kSettleBound), "; newest: ", group_protected),
         -1);
  }
}

// With the writers gone: every rank a daemon still holds verifies, and the
// arena holds a few steps' worth, not what every fault left behind.
void Thrasher::CheckArenas() {
  std::this_thread::sleep_for(std::chrono::seconds(1));  // retirements settle
  for (int slot = 0; slot < kN; ++slot) {
    auto stub = cluster_->daemon(slot).AdminStub();
    {
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
      admin::VerifyRequest req;
      req.set_job_id(kJob);
      admin::VerifyResponse resp;
      grpc::Status st = stub->Verify(&ctx, req, &resp);
      if (!st.ok() || resp.errors_size() > 0 || resp.tensors_checked() == 0) {
        Fail(absl::StrCat("slot ", slot, " verify: ", st.error_message(), " ",
                          resp.tensors_checked(),
                          " tensors checked, errors: ", absl::StrJoin(resp.errors(), "; ")),
             slot);
      }
    }
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    admin::StatusResponse status;
    grpc::Status st = stub->Status(&ctx, {}, &status);
    std::printf("slot %d: arena %llu of %llu bytes used\n", slot,
                static_cast<unsigned long long>(status.arena_used_bytes()),
                static_cast<unsigned long long>(status.arena_bytes()));
    if (!st.ok() || status.arena_used_bytes() > kArenaUsedBound) {
      Fail(absl::StrCat("slot ", slot, ": ", st.error_message(), " arena ",
                        status.arena_used_bytes(), " bytes used after the run, more than ",
                        kArenaUsedBound),
           slot);
    }
  }
}

TEST(Thrash, AnyMLostNodesRestoreTheNewestProtectedStepUnderRandomFaults) {
  const uint64_t seed = ChooseSeed();
  std::printf("thrash: seed %llu (replay: --seed=%llu), %.1f minutes, RS(%d,%d)\n",
              static_cast<unsigned long long>(seed), static_cast<unsigned long long>(seed),
              absl::GetFlag(FLAGS_minutes), kK, kM);
  std::fflush(stdout);
  TempDir dir;
  DaemonProcess::Options o;
  o.arena_bytes = 64 << 20;
  o.cluster_fields = kClusterFields;
  auto cluster = Cluster::Start(dir.path(), kK, kM, o);
  ASSERT_TRUE(cluster.ok()) << cluster.status();

  Thrasher thrasher(seed, cluster->get());
  thrasher.Run(absl::Seconds(absl::GetFlag(FLAGS_minutes) * 60), absl::GetFlag(FLAGS_max_events));
  const std::vector<std::string> failures = thrasher.failures();
  std::printf(
      "thrash: seed %llu, %d events, %d restores checked, %zu failures (%d writer errors "
      "tolerated)\n",
      static_cast<unsigned long long>(seed), thrasher.events(), thrasher.restores_checked(),
      failures.size(), thrasher.writer_errors());
  EXPECT_TRUE(failures.empty()) << "seed " << seed << ":\n" << absl::StrJoin(failures, "\n");
}

}  // namespace
}  // namespace ecsnap

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  absl::ParseCommandLine(argc, argv);
  return RUN_ALL_TESTS();
}
