// ecsnapctl: the admin CLI of ecsnapd.
//
//   ecsnapctl [--address=127.0.0.1:7070 | unix:PATH] [--token_file=F]
//             [--ca_file=CA --slot=N] [--json] COMMAND
//
// Every call carries the daemon's admin token (the daemon writes it at first
// start; by default ecsnapctl reads admin.token beside a unix: address, else
// /run/ecsnap/admin.token). Local addresses are reached with local
// credentials; others need --ca_file, and the daemon must then present the
// certificate of slot N.
//
//   status                      the daemon: slot, arena use, sessions, peers
//   steps [--job=J]             every step held, with its state
//   drop --job=J [--step=S]     drops one step, or every step of a job
//   verify [--job=J] [--step=S] recomputes every stored checksum
//   rebuild [--job=J]           rebuilds from the group what this slot lacks
//   health [--service=S] [--probe_port]
//                               grpc.health.v1: SERVING or NOT_SERVING (exit 0
//                               only when SERVING: usable as a probe); with
//                               --probe_port, on the health-only port
//                               (service ecsnap.live: liveness)
//   status --watch              status every second while a rebuild runs
//   job-token --job=J [--job_secret_file=F]
//                               prints job J's token for the TCP data plane,
//                               made from the daemon's job secret (run on the
//                               daemon's node, as its user; no call is made)
//
// Exit status: 0 on success, 1 when the daemon answers an error (printed on
// stderr), 2 on a usage error.
#include <chrono>
#include <thread>
#include <cstdio>
#include <string>

#include <google/protobuf/util/json_util.h>
#include <grpcpp/grpcpp.h>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "client/admin_channel.h"
#include "common/format.h"
#include "common/job_token.h"
#include "common/read_file.h"
#include "proto/admin.grpc.pb.h"
#include "proto/health.grpc.pb.h"

ABSL_FLAG(std::string, address, "127.0.0.1:7070", "Daemon admin address: host:port or unix:PATH.");
ABSL_FLAG(std::string, token_file, "",
          "File with the admin bearer token (default: admin.token beside a unix: address, "
          "else /run/ecsnap/admin.token).");
ABSL_FLAG(std::string, ca_file, "",
          "Cluster CA (PEM): reach the daemon over TLS, as the holder of --slot's certificate.");
ABSL_FLAG(uint32_t, slot, 0, "With --ca_file: the slot of the daemon at --address.");
ABSL_FLAG(bool, json, false, "Print the daemon's answer as JSON.");
ABSL_FLAG(std::string, job, "", "Job id.");
ABSL_FLAG(std::string, job_secret_file, "/run/ecsnap/job.secret",
          "job-token: the daemon's job secret (daemon.job_secret_file).");
ABSL_FLAG(uint64_t, step, 0, "Step (0: every step).");
ABSL_FLAG(int, timeout_ms, 10000, "Deadline of the call (rebuild: at least an hour).");
ABSL_FLAG(std::string, service, "", "health: the service to ask about (default: the daemon).");
ABSL_FLAG(bool, watch, false, "status: print it again every second while a rebuild runs.");
ABSL_FLAG(bool, probe_port, false,
          "health: --address is the daemon's health-only port (daemon.health_address): plaintext, "
          "no token.");

namespace {

using ecsnap::FormatBytes;

int Fail(const grpc::Status& st) {
  std::fprintf(stderr, "ecsnapctl: %s\n", st.error_message().c_str());
  return 1;
}

int PrintJson(const google::protobuf::Message& m) {
  std::string out;
  google::protobuf::util::JsonPrintOptions opts;
  opts.add_whitespace = true;
  opts.always_print_primitive_fields = true;
  (void)google::protobuf::util::MessageToJsonString(m, &out, opts);
  std::printf("%s", out.c_str());
  return 0;
}

// A running rebuild's line of `status` (nothing when none runs).
void PrintRebuildProgress(const ecsnap::admin::RebuildStatus& rb) {
  if (rb.active() && rb.bytes_total() > 0) {
    std::printf("rebuild   job %s step %lu: %s of %s (%.0f%%)\n", rb.job_id().c_str(), rb.step(),
                FormatBytes(rb.bytes_done()).c_str(), FormatBytes(rb.bytes_total()).c_str(),
                100.0 * rb.bytes_done() / rb.bytes_total());
  } else if (rb.active()) {
    std::printf("rebuild   asking the group what to rebuild\n");
  }
}

std::string State(ecsnap::v1::StepState s) {
  std::string name = ecsnap::v1::StepState_Name(s);
  return name.empty() ? "?" : name;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "ecsnapctl [--address=A] [--token_file=F] [--ca_file=CA --slot=N] [--json] status | steps [--job=J] | "
      "drop --job=J [--step=S] | verify [--job=J] [--step=S] | rebuild [--job=J] | "
      "health [--service=S] | "
      "job-token --job=J [--job_secret_file=F]");
  std::vector<char*> args = absl::ParseCommandLine(argc, argv);
  if (args.size() != 2) {
    std::fprintf(stderr, "usage: %s\n", absl::ProgramUsageMessage().data());
    return 2;
  }
  const std::string command = args[1];
  const bool json = absl::GetFlag(FLAGS_json);
  if (command == "job-token") {
    if (absl::GetFlag(FLAGS_job).empty()) {
      std::fprintf(stderr, "ecsnapctl: job-token needs --job\n");
      return 2;
    }
    // Read as the daemon reads it: the whole file, whitespace trimmed.
    const std::string secret(absl::StripAsciiWhitespace(
        ecsnap::ReadWholeFile(absl::GetFlag(FLAGS_job_secret_file)).value_or("")));
    if (secret.empty()) {
      std::fprintf(stderr, "ecsnapctl: cannot read a job secret from %s\n",
                   absl::GetFlag(FLAGS_job_secret_file).c_str());
      return 1;
    }
    std::printf("%s\n", ecsnap::JobToken(secret, absl::GetFlag(FLAGS_job)).c_str());
    return 0;
  }

  ecsnap::AdminChannelOptions channel_options;
  channel_options.address = absl::GetFlag(FLAGS_address);
  channel_options.token_file = absl::GetFlag(FLAGS_token_file);
  channel_options.ca_file = absl::GetFlag(FLAGS_ca_file);
  channel_options.slot = absl::GetFlag(FLAGS_slot);
  absl::StatusOr<std::shared_ptr<grpc::Channel>> channel =
      command == "health" && absl::GetFlag(FLAGS_probe_port)
          ? grpc::CreateChannel(absl::GetFlag(FLAGS_address), grpc::InsecureChannelCredentials())
          : ecsnap::OpenAdminChannel(channel_options);
  if (!channel.ok()) {
    std::fprintf(stderr, "ecsnapctl: %s\n", std::string(channel.status().message()).c_str());
    return 2;
  }
  if (command == "health") {
    auto health = grpc::health::v1::Health::NewStub(*channel);
    grpc::ClientContext hctx;
    hctx.set_deadline(std::chrono::system_clock::now() +
                      std::chrono::milliseconds(absl::GetFlag(FLAGS_timeout_ms)));
    grpc::health::v1::HealthCheckRequest req;
    req.set_service(absl::GetFlag(FLAGS_service));
    grpc::health::v1::HealthCheckResponse r;
    grpc::Status st = health->Check(&hctx, req, &r);
    if (!st.ok()) return Fail(st);
    if (json) {
      PrintJson(r);
    } else {
      std::printf("%s\n", grpc::health::v1::HealthCheckResponse::ServingStatus_Name(r.status()).c_str());
    }
    return r.status() == grpc::health::v1::HealthCheckResponse::SERVING ? 0 : 1;
  }
  auto stub = ecsnap::admin::Admin::NewStub(*channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() +
                   std::chrono::milliseconds(absl::GetFlag(FLAGS_timeout_ms)));

  if (command == "status" && absl::GetFlag(FLAGS_watch)) {
    // Every second while a rebuild runs (bounded by --timeout_ms per call
    // and 24 h in all); ends when none is running.
    for (int i = 0; i < 24 * 3600; ++i) {
      grpc::ClientContext wctx;
      wctx.set_deadline(std::chrono::system_clock::now() +
                        std::chrono::milliseconds(absl::GetFlag(FLAGS_timeout_ms)));
      ecsnap::admin::StatusResponse r;
      grpc::Status st = stub->Status(&wctx, {}, &r);
      if (!st.ok()) return Fail(st);
      const auto& rb = r.rebuild();
      if (json) {
        PrintJson(rb);
      } else {
        PrintRebuildProgress(rb);
      }
      std::fflush(stdout);
      if (!rb.active()) {
        if (!json) {
          std::printf("no rebuild running%s\n",
                      rb.last_error().empty() ? "" : ("; last error: " + rb.last_error()).c_str());
        }
        return rb.last_error().empty() ? 0 : 1;
      }
      std::this_thread::sleep_for(std::chrono::seconds(1));
    }
    return 1;
  }
  if (command == "status") {
    ecsnap::admin::StatusResponse r;
    grpc::Status st = stub->Status(&ctx, {}, &r);
    if (!st.ok()) return Fail(st);
    if (json) return PrintJson(r);
    std::printf("%s, slot %u (group %u, RS %u+%u), up %.1f s\n", r.version().c_str(), r.slot(),
                r.group(), r.k(), r.m(), r.uptime_ms() / 1000.0);
    std::printf("arena     %s used of %s (pre-faulted in %.2f s; first writes %s)\n",
                FormatBytes(r.arena_used_bytes()).c_str(), FormatBytes(r.arena_bytes()).c_str(),
                r.arena_prefault_ms() / 1000.0,
                r.arena_first_writes_done() ? "done" : "running in the background");
    if (!r.arena_pages().empty()) std::printf("pages     %s\n", r.arena_pages().c_str());
    std::printf("sessions  %u, jobs %u\n", r.sessions(), r.jobs());
    for (const auto& p : r.peers()) {
      std::printf("peer      slot %u %s %s%s\n", p.slot(), p.address().c_str(),
                  p.reachable() ? "reachable" : "UNREACHABLE",
                  p.last_error().empty() ? "" : (" (" + p.last_error() + ")").c_str());
    }
    const auto& rb = r.rebuild();
    PrintRebuildProgress(rb);
    if (!rb.last_error().empty()) std::printf("rebuild   last error: %s\n", rb.last_error().c_str());
    return 0;
  }
  if (command == "steps") {
    ecsnap::admin::ListStepsRequest req;
    req.set_job_id(absl::GetFlag(FLAGS_job));
    ecsnap::admin::ListStepsResponse r;
    grpc::Status st = stub->ListSteps(&ctx, req, &r);
    if (!st.ok()) return Fail(st);
    if (json) return PrintJson(r);
    std::printf("%-24s %10s  %-10s %6s  %12s\n", "JOB", "STEP", "STATE", "RANKS", "BYTES");
    for (const auto& s : r.steps()) {
      std::printf("%-24s %10lu  %-10s %3u/%-2u  %12s\n", s.job_id().c_str(), s.step(),
                  State(s.state()).c_str(), s.ranks_committed(), s.ranks_expected(),
                  FormatBytes(s.bytes()).c_str());
      for (const std::string& why : s.not_protected_because()) {
        std::printf("%-24s %10s    not protected: %s\n", "", "", why.c_str());
      }
    }
    if (r.steps().empty()) std::printf("(no steps)\n");
    return 0;
  }
  if (command == "drop") {
    if (absl::GetFlag(FLAGS_job).empty()) {
      std::fprintf(stderr, "ecsnapctl: drop needs --job (and --step, or every step goes)\n");
      return 2;
    }
    ecsnap::admin::DropRequest req;
    req.set_job_id(absl::GetFlag(FLAGS_job));
    req.set_step(absl::GetFlag(FLAGS_step));
    ecsnap::admin::DropResponse r;
    grpc::Status st = stub->Drop(&ctx, req, &r);
    if (!st.ok()) return Fail(st);
    if (json) return PrintJson(r);
    std::printf("dropped %u step(s), %s\n", r.steps_dropped(), FormatBytes(r.bytes_freed()).c_str());
    return 0;
  }
  if (command == "verify") {
    ecsnap::admin::VerifyRequest req;
    req.set_job_id(absl::GetFlag(FLAGS_job));
    req.set_step(absl::GetFlag(FLAGS_step));
    ecsnap::admin::VerifyResponse r;
    grpc::Status st = stub->Verify(&ctx, req, &r);
    if (!st.ok()) return Fail(st);
    if (json) return PrintJson(r);
    std::printf("checked %u tensors, %s: %s\n", r.tensors_checked(),
                FormatBytes(r.bytes_checked()).c_str(),
                r.errors().empty() ? "all intact" : "ERRORS");
    for (const auto& e : r.errors()) std::printf("  %s\n", e.c_str());
    std::printf("arena: %s\n",
                r.arena_consistent() ? "consistent" : ("INCONSISTENT: " + r.arena_error()).c_str());
    return r.errors().empty() && r.arena_consistent() ? 0 : 1;
  }
  if (command == "rebuild") {
    ctx.set_deadline(std::chrono::system_clock::now() +
                     std::max(std::chrono::milliseconds(absl::GetFlag(FLAGS_timeout_ms)),
                              std::chrono::milliseconds(3600 * 1000)));
    ecsnap::admin::RebuildRequest req;
    req.set_job_id(absl::GetFlag(FLAGS_job));
    ecsnap::admin::RebuildResponse r;
    grpc::Status st = stub->Rebuild(&ctx, req, &r);
    if (!st.ok()) return Fail(st);
    if (json) return PrintJson(r);
    std::printf("rebuild done: job %s step %lu, %s decoded\n", r.rebuild().job_id().c_str(),
                r.rebuild().step(), FormatBytes(r.rebuild().bytes_done()).c_str());
    return 0;
  }
  std::fprintf(stderr, "ecsnapctl: unknown command '%s'\nusage: %s\n", command.c_str(),
               absl::ProgramUsageMessage().data());
  return 2;
}
