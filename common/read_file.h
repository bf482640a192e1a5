// Reading a small file whole: certificates, tokens, secrets, configs, logs.
#ifndef ECSNAP_COMMON_READ_FILE_H_
#define ECSNAP_COMMON_READ_FILE_H_

#include <fstream>
#include <optional>
#include <sstream>
#include <string>

namespace ecsnap {

// The bytes of the file at `path`, or nullopt when it cannot be opened
// (errno says why). Callers word their own message: they know what the file
// is for and which flag or field names it.
inline std::optional<std::string> ReadWholeFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return std::nullopt;
  std::stringstream bytes;
  bytes << in.rdbuf();
  return bytes.str();
}

}  // namespace ecsnap

#endif  // ECSNAP_COMMON_READ_FILE_H_
