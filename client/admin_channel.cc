#include "client/admin_channel.h"

#include <cerrno>
#include <cstring>

#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "common/address.h"
#include "common/read_file.h"

namespace ecsnap {
namespace {

std::string Target(const std::string& a) {
  if (!a.empty() && a[0] == '/') return "unix:" + a;
  return a;
}

absl::StatusOr<std::string> ReadFile(const std::string& what, const std::string& path) {
  std::optional<std::string> bytes = ReadWholeFile(path);
  if (!bytes) {
    return absl::NotFoundError(absl::StrFormat(
        "cannot read the %s %s (%s); pass --token_file / --ca_file, or run as the daemon's "
        "user",
        what, path, std::strerror(errno)));
  }
  return *std::move(bytes);
}

// Sends the token with every call, over a local connection too (whose
// security level gRPC rates below what call credentials ask by default).
class TokenPlugin final : public grpc::MetadataCredentialsPlugin {
 public:
  explicit TokenPlugin(std::string token) : value_("Bearer " + std::move(token)) {}
  bool IsBlocking() const override { return false; }
  grpc::Status GetMetadata(grpc::string_ref, grpc::string_ref, const grpc::AuthContext&,
                           std::multimap<grpc::string, grpc::string>* metadata) override {
    metadata->insert({"authorization", value_});
    return grpc::Status::OK;
  }

 private:
  const std::string value_;
};

}  // namespace

std::string DefaultAdminTokenFile(const std::string& address) {
  const std::string target = Target(address);
  if (absl::StartsWith(target, "unix:")) {
    const std::string path = target.substr(5);
    const size_t slash = path.rfind('/');
    return (slash == std::string::npos ? std::string(".") : path.substr(0, slash)) +
           "/admin.token";
  }
  return "/run/ecsnap/admin.token";
}

absl::StatusOr<std::shared_ptr<grpc::Channel>> OpenAdminChannel(
    const AdminChannelOptions& options) {
  const std::string target = Target(options.address);
  const std::string token_file =
      options.token_file.empty() ? DefaultAdminTokenFile(target) : options.token_file;
  auto token = ReadFile("admin token file", token_file);
  if (!token.ok()) return token.status();
  const std::string trimmed(absl::StripAsciiWhitespace(*token));
  std::shared_ptr<grpc::ChannelCredentials> transport;
  grpc::ChannelArguments args;
  if (!options.ca_file.empty()) {
    auto ca = ReadFile("CA file", options.ca_file);
    if (!ca.ok()) return ca.status();
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = *ca;
    transport = grpc::SslCredentials(ssl);
    args.SetSslTargetNameOverride(SlotName(options.slot));
  } else if (absl::StartsWith(target, "unix:")) {
    transport = grpc::experimental::LocalCredentials(UDS);
  } else if (IsLoopbackAddress(target)) {
    transport = grpc::experimental::LocalCredentials(LOCAL_TCP);
  } else {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s is not a local address: pass --ca_file (and --slot) to reach it over TLS", target));
  }
  auto call = grpc::experimental::MetadataCredentialsFromPlugin(
      std::make_unique<TokenPlugin>(trimmed), GRPC_SECURITY_NONE);
  return grpc::CreateCustomChannel(target, grpc::CompositeChannelCredentials(transport, call),
                                   args);
}

}  // namespace ecsnap
