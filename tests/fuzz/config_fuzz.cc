// Fuzzes the config parser and its checks: any text either fails with a
// status or yields a config that ValidateConfig accepts or refuses, for
// every slot the config could name, without crashing.
#include <cstdint>
#include <string>

#include "daemon/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace ecsnap::daemon;
  auto config = ParseConfig(std::string(reinterpret_cast<const char*>(data), size), "fuzz");
  if (!config.ok()) return 0;
  ApplyDefaults(&*config);
  const int slots = config->cluster().slots_size();
  for (int slot = 0; slot <= slots && slot < 64; ++slot) {
    ValidateConfig(*config, static_cast<uint32_t>(slot)).IgnoreError();
  }
  return 0;
}
