// ecsnapd: the per-node snapshot daemon. See DESIGN.md and README.md.
#include <cstdio>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"

ABSL_FLAG(std::string, config, "", "Text-format ecsnap.config.Config file.");
ABSL_FLAG(int, slot, 0, "This node's slot in the cluster config.");

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "ecsnapd: keeps training snapshots in a shared-memory arena and protects "
      "them across nodes with Reed-Solomon erasure coding.\n"
      "Usage: ecsnapd --config=cluster.textproto --slot=N");
  absl::ParseCommandLine(argc, argv);
  std::fprintf(stderr, "ecsnapd: not serving yet\n");
  return 1;
}
