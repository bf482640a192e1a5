// A trainer rank that stalls mid-stream, for fault tests: it attaches, begins
// --step with --bytes, streams the first half of them, prints "STALLED" and
// waits to be killed or stopped, answering the daemon's keepalive pings
// meanwhile. With --restore it restores --step instead, takes the first
// message of the stream and no more, prints "STALLED", and "CUT" once the
// daemon has ended its connection (with --wait_stream_end, "CUT <code>" with
// the restore stream's own status, read once the test sends SIGUSR1). Uses
// the wire protocol directly so that the moment of the stall is exact.
#include <chrono>
#include <csignal>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "client/data_channel.h"
#include "proto/snapshot.grpc.pb.h"

ABSL_FLAG(std::string, socket, "", "Daemon data socket.");
ABSL_FLAG(std::string, job, "job", "Job id.");
ABSL_FLAG(uint32_t, rank, 0, "Rank.");
ABSL_FLAG(std::vector<std::string>, local_ranks, {}, "Local ranks.");
ABSL_FLAG(uint64_t, step, 1, "Step to leave unfinished.");
ABSL_FLAG(uint64_t, bytes, 1 << 20, "Bytes of the step.");
ABSL_FLAG(bool, restore, false,
          "Restore --step instead, take the first message of its stream and read no more.");
ABSL_FLAG(std::string, job_token, "", "Over TCP: the job's token.");
ABSL_FLAG(bool, wait_stream_end, false,
          "With --restore: after the first message, wait for SIGUSR1 (sent once the daemon "
          "says it cancelled the stream; a TCP trainer's connection is kept), then read what "
          "the stream still holds and print CUT and the stream's status code.");

namespace {
volatile std::sig_atomic_t g_go = 0;
void OnUsr1(int) { g_go = 1; }
}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  std::signal(SIGUSR1, OnUsr1);
  ecsnap::DataChannelOptions options;
  options.address = absl::GetFlag(FLAGS_socket);
  // The stream window stays at gRPC's initial 64 KiB: a stalled reader
  // holds back all but that (and the socket's buffers) of a restore.
  options.args.SetInt(GRPC_ARG_HTTP2_BDP_PROBE, 0);
  auto data = ecsnap::OpenDataChannel(std::move(options));
  if (!data.ok()) {
    std::fprintf(stderr, "connect failed: %s\n", data.status().ToString().c_str());
    return 1;
  }
  auto stub = ecsnap::v1::Snapshot::NewStub(data->channel);
  grpc::ClientContext attach_ctx;
  if (!absl::GetFlag(FLAGS_job_token).empty()) {
    attach_ctx.AddMetadata("authorization", "Bearer " + absl::GetFlag(FLAGS_job_token));
  }
  ecsnap::v1::AttachRequest req;
  req.set_job_id(absl::GetFlag(FLAGS_job));
  req.set_rank(absl::GetFlag(FLAGS_rank));
  for (const auto& r : absl::GetFlag(FLAGS_local_ranks)) req.add_local_ranks(std::stoul(r));
  auto session = stub->Attach(&attach_ctx, req);
  ecsnap::v1::AttachEvent ev;
  if (!session->Read(&ev)) {
    std::fprintf(stderr, "attach failed: %s\n", session->Finish().error_message().c_str());
    return 1;
  }
  if (absl::GetFlag(FLAGS_restore)) {
    grpc::ClientContext restore_ctx;
    ecsnap::v1::RestoreRequest restore;
    restore.set_session_id(ev.session_id());
    restore.set_step(absl::GetFlag(FLAGS_step));
    ecsnap::v1::RestoreResponse lease;
    grpc::Status st = stub->Restore(&restore_ctx, restore, &lease);
    if (!st.ok()) {
      std::fprintf(stderr, "restore failed: %s\n", st.error_message().c_str());
      return 1;
    }
    grpc::ClientContext read_ctx;
    ecsnap::v1::ReadRankRequest read;
    read.set_session_id(ev.session_id());
    read.set_lease_id(lease.lease_id());
    read.set_length(lease.window_bytes());
    auto reader = stub->ReadRank(&read_ctx, read);
    ecsnap::v1::ReadRankChunk chunk;
    if (!reader->Read(&chunk)) {
      std::fprintf(stderr, "read failed: %s\n", reader->Finish().error_message().c_str());
      return 1;
    }
    std::printf("STALLED\n");
    std::fflush(stdout);
    if (absl::GetFlag(FLAGS_wait_stream_end)) {
      // gRPC gives a call's status only once what arrived before it is
      // read: the stream is drained when the test says the daemon gave up.
      // Meanwhile a session reader answers the daemon's pings, as a real
      // client's does.
      std::thread([&session] {
        ecsnap::v1::AttachEvent event;
        while (session->Read(&event)) {
        }
      }).detach();
      for (int i = 0; i < 6000 && g_go == 0; ++i) {
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
      while (reader->Read(&chunk)) {
      }
      const grpc::Status end = reader->Finish();
      std::printf("CUT %d\n", static_cast<int>(end.error_code()));
      std::fflush(stdout);
      std::this_thread::sleep_for(std::chrono::seconds(60));
      return 0;
    }
    // Alive, answering pings, and taking no more of the stream: the daemon
    // ends the connection, which ends the session stream.
    while (session->Read(&ev)) {
    }
    std::printf("CUT\n");
    std::fflush(stdout);
    std::this_thread::sleep_for(std::chrono::seconds(60));
    return 0;
  }
  grpc::ClientContext begin_ctx;
  ecsnap::v1::BeginRankRequest begin;
  begin.set_session_id(ev.session_id());
  begin.set_step(absl::GetFlag(FLAGS_step));
  begin.set_bytes(absl::GetFlag(FLAGS_bytes));
  ecsnap::v1::BeginRankResponse window;
  grpc::Status st = stub->BeginRank(&begin_ctx, begin, &window);
  if (!st.ok()) {
    std::fprintf(stderr, "begin failed: %s\n", st.error_message().c_str());
    return 1;
  }
  grpc::ClientContext write_ctx;
  ecsnap::v1::WriteRankResponse written;
  auto writer = stub->WriteRank(&write_ctx, &written);
  ecsnap::v1::WriteRankChunk chunk;
  chunk.set_session_id(ev.session_id());
  chunk.set_step(absl::GetFlag(FLAGS_step));
  chunk.set_offset(0);
  chunk.set_data(std::string(absl::GetFlag(FLAGS_bytes) / 2, '\x5a'));
  writer->Write(chunk);
  std::printf("STALLED\n");
  std::fflush(stdout);
  // Alive and stalled, as a trainer busy computing: its session reader
  // waits on the Attach stream (which keeps the connection's pings
  // answered) until the daemon ends it. Bounded: the test kills it long
  // before the sleep ends.
  while (session->Read(&ev)) {
  }
  std::this_thread::sleep_for(std::chrono::seconds(60));
  return 0;
}
