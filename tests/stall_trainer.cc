// A trainer rank that dies mid-stream, for fault tests: it attaches, begins
// --step with --bytes, streams the first half of them, prints "STALLED" and
// waits to be killed, answering the daemon's keepalive pings meanwhile. Uses the wire protocol directly so that the moment of
// death is exact.
#include <chrono>
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

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  ecsnap::DataChannelOptions options;
  options.address = absl::GetFlag(FLAGS_socket);
  auto data = ecsnap::OpenDataChannel(std::move(options));
  if (!data.ok()) {
    std::fprintf(stderr, "connect failed: %s\n", data.status().ToString().c_str());
    return 1;
  }
  auto stub = ecsnap::v1::Snapshot::NewStub(data->channel);
  grpc::ClientContext attach_ctx;
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
