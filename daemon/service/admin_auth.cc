#include "daemon/service/admin_auth.h"

#include <fcntl.h>
#include <openssl/crypto.h>
#include <openssl/rand.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <grpcpp/security/auth_metadata_processor.h>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
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

namespace {

// Reads the token of an existing file opened without following a link: a
// regular file of this user, readable by nobody else.
absl::StatusOr<std::string> ReadToken(const std::string& what, const std::string& path, int fd) {
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    return absl::FailedPreconditionError(
        absl::StrFormat("%s %s is not a regular file", what, path));
  }
  if (st.st_uid != ::geteuid()) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "%s %s belongs to uid %d, not to this daemon's uid %d; remove it to have "
        "a new one made",
        what, path, st.st_uid, ::geteuid()));
  }
  if ((st.st_mode & 077) != 0) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "%s %s is readable by others (mode %o); chmod 600 it", what, path,
        st.st_mode & 0777));
  }
  std::string text(257, '\0');
  const ssize_t got = ::pread(fd, text.data(), text.size(), 0);
  if (got > 256) {
    return absl::FailedPreconditionError(
        absl::StrFormat("%s %s is longer than 256 bytes; it holds one token", what, path));
  }
  text.resize(got > 0 ? static_cast<size_t>(got) : 0);
  const std::string token(absl::StripAsciiWhitespace(text));
  if (token.empty()) {
    return absl::FailedPreconditionError(
        absl::StrFormat("%s %s is empty; remove it to have a new one made", what, path));
  }
  return token;
}

}  // namespace

absl::StatusOr<std::string> LoadOrCreateSecret(const std::string& what, const std::string& path,
                                              bool* created) {
  *created = false;
  const size_t slash = path.rfind('/');
  if (slash != std::string::npos && slash > 0) {
    const std::string dir = path.substr(0, slash);
    if (::mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "cannot create the directory of %s %s: %s", what, path, std::strerror(errno)));
    }
  }
  // A few rounds: another daemon sharing the directory may be writing it.
  for (int attempt = 0; attempt < 50; ++attempt) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd >= 0) {
      auto token = ReadToken(what, path, fd);
      ::close(fd);
      // Empty: being written by its maker; look again shortly.
      if (token.ok() || !absl::StrContains(token.status().message(), "is empty") ||
          attempt == 49) {
        return token;
      }
      ::usleep(20000);
      continue;
    }
    if (errno == ELOOP) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "%s %s is a symbolic link; it must be a file of its own", what, path));
    }
    if (errno != ENOENT) {
      return absl::FailedPreconditionError(
          absl::StrFormat("cannot open %s %s: %s", what, path, std::strerror(errno)));
    }
    unsigned char raw[32];
    if (RAND_bytes(raw, sizeof(raw)) != 1) {
      return absl::InternalError(absl::StrFormat("no randomness for a new %s", what));
    }
    const std::string token = absl::BytesToHexString(
        absl::string_view(reinterpret_cast<const char*>(raw), sizeof(raw)));
    // Written whole under a temporary name, then linked into place: nobody
    // reads half a token, and an existing file (or link) is never replaced.
    const std::string tmp = absl::StrFormat("%s.%d.tmp", path, ::getpid());
    ::unlink(tmp.c_str());
    const int out = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (out < 0) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "cannot create %s %s: %s", what, path, std::strerror(errno)));
    }
    const std::string line = token + "\n";
    const bool ok = ::write(out, line.data(), line.size()) == static_cast<ssize_t>(line.size()) &&
                    ::fsync(out) == 0;
    ::close(out);
    const bool linked = ok && ::link(tmp.c_str(), path.c_str()) == 0;
    const int link_errno = errno;
    ::unlink(tmp.c_str());
    if (linked) {
      *created = true;
      return token;
    }
    if (!ok || link_errno != EEXIST) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "cannot write %s %s: %s", what, path, std::strerror(link_errno)));
    }
    // Made meanwhile by another daemon: read that one.
  }
  return absl::FailedPreconditionError(
      absl::StrFormat("%s %s keeps changing; is another process rewriting it?", what, path));
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
