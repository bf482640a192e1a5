#include "daemon/admin_auth.h"

#include <fcntl.h>
#include <openssl/crypto.h>
#include <openssl/rand.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>

#include <grpcpp/security/auth_metadata_processor.h>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"

namespace ecsnap::daemon {
namespace {

class TokenProcessor final : public grpc::AuthMetadataProcessor {
 public:
  explicit TokenProcessor(std::string token) : want_("Bearer " + std::move(token)) {}

  // Cheap and never blocks: run on the transport's thread.
  bool IsBlocking() const override { return false; }

  grpc::Status Process(const InputMetadata& auth_metadata, grpc::AuthContext*,
                       OutputMetadata* consumed, OutputMetadata*) override {
    auto it = auth_metadata.find("authorization");
    if (it == auth_metadata.end()) {
      return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                          "admin calls need the daemon's token: ecsnapctl reads it from "
                          "--token_file (default /run/ecsnap/admin.token)");
    }
    const grpc::string_ref got = it->second;
    // Constant-time comparison: the token must not leak through timing.
    if (got.size() != want_.size() ||
        CRYPTO_memcmp(got.data(), want_.data(), want_.size()) != 0) {
      return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                          "the admin token does not match this daemon's admin_token_file");
    }
    consumed->insert({std::string(it->first.data(), it->first.size()),
                      std::string(got.data(), got.size())});
    return grpc::Status::OK;
  }

 private:
  const std::string want_;
};

}  // namespace

absl::StatusOr<std::string> LoadOrCreateAdminToken(const std::string& path, bool* created) {
  *created = false;
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    if (errno != ENOENT) {
      return absl::FailedPreconditionError(
          absl::StrFormat("cannot stat admin token file %s: %s", path, std::strerror(errno)));
    }
    unsigned char raw[32];
    if (RAND_bytes(raw, sizeof(raw)) != 1) {
      return absl::InternalError("no randomness for a new admin token");
    }
    const std::string token = absl::BytesToHexString(
        absl::string_view(reinterpret_cast<const char*>(raw), sizeof(raw)));
    const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0 && errno == EEXIST) {
      // Another daemon sharing the directory made it first: use that one,
      // once it is written.
      for (int i = 0; i < 100; ++i) {
        struct stat now {};
        if (::stat(path.c_str(), &now) == 0 && now.st_size > 0) break;
        ::usleep(10000);
      }
      return LoadOrCreateAdminToken(path, created);
    }
    if (fd < 0) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "cannot create admin token file %s: %s", path, std::strerror(errno)));
    }
    const std::string line = token + "\n";
    const bool ok = ::write(fd, line.data(), line.size()) == static_cast<ssize_t>(line.size());
    ::close(fd);
    if (!ok) {
      ::unlink(path.c_str());
      return absl::FailedPreconditionError(
          absl::StrFormat("cannot write admin token file %s", path));
    }
    *created = true;
    return token;
  }
  if ((st.st_mode & 077) != 0) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "admin token file %s is readable by others (mode %o); chmod 600 it", path,
        st.st_mode & 0777));
  }
  std::ifstream in(path);
  std::string token;
  std::getline(in, token);
  token = std::string(absl::StripAsciiWhitespace(token));
  if (token.empty()) {
    return absl::FailedPreconditionError(
        absl::StrFormat("admin token file %s is empty; remove it to have a new one made", path));
  }
  return token;
}

std::shared_ptr<grpc::ServerCredentials> AdminServerCredentials(const std::string& address,
                                                                const TlsMaterial* tls,
                                                                const std::string& token) {
  std::shared_ptr<grpc::ServerCredentials> creds;
  if (absl::StartsWith(address, "unix:")) {
    creds = grpc::experimental::LocalServerCredentials(UDS);
  } else if (tls != nullptr) {
    creds = ServerTlsCredentials(*tls);
  } else {
    creds = grpc::experimental::LocalServerCredentials(LOCAL_TCP);
  }
  creds->SetAuthMetadataProcessor(std::make_shared<TokenProcessor>(token));
  return creds;
}

}  // namespace ecsnap::daemon
