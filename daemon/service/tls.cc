#include "daemon/service/tls.h"

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <set>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_replace.h"
#include "common/address.h"
#include "common/read_file.h"

namespace ecsnap::daemon {
namespace {

absl::StatusOr<std::string> ReadFile(const std::string& what, const std::string& path) {
  std::optional<std::string> bytes = ReadWholeFile(path);
  if (!bytes) {
    return absl::NotFoundError(absl::StrFormat("cannot read daemon.tls.%s %s", what, path));
  }
  if (bytes->empty()) {
    return absl::InvalidArgumentError(absl::StrFormat("daemon.tls.%s %s is empty", what, path));
  }
  return *std::move(bytes);
}

std::string OpenSslError() {
  const unsigned long e = ERR_get_error();
  if (e == 0) return "no detail";
  char buf[256];
  ERR_error_string_n(e, buf, sizeof(buf));
  ERR_clear_error();
  return buf;
}

struct X509Deleter {
  void operator()(X509* x) const { X509_free(x); }
};
struct KeyDeleter {
  void operator()(EVP_PKEY* k) const { EVP_PKEY_free(k); }
};
struct StoreDeleter {
  void operator()(X509_STORE* s) const { X509_STORE_free(s); }
};
struct StoreCtxDeleter {
  void operator()(X509_STORE_CTX* c) const { X509_STORE_CTX_free(c); }
};
struct BioDeleter {
  void operator()(BIO* b) const { BIO_free(b); }
};
using BioPtr = std::unique_ptr<BIO, BioDeleter>;

BioPtr Bio(const std::string& pem) {
  return BioPtr(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
}

absl::Status CheckMaterial(const TlsMaterial& m, const config::Tls& files, uint32_t slot) {
  std::unique_ptr<X509, X509Deleter> cert(
      PEM_read_bio_X509(Bio(m.cert).get(), nullptr, nullptr, nullptr));
  if (!cert) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "daemon.tls.cert_file %s holds no PEM certificate (%s)", files.cert_file(),
        OpenSslError()));
  }
  std::unique_ptr<EVP_PKEY, KeyDeleter> key(
      PEM_read_bio_PrivateKey(Bio(m.key).get(), nullptr, nullptr, nullptr));
  if (!key) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "daemon.tls.key_file %s holds no PEM private key (%s)", files.key_file(),
        OpenSslError()));
  }
  if (X509_check_private_key(cert.get(), key.get()) != 1) {
    ERR_clear_error();
    return absl::InvalidArgumentError(absl::StrFormat(
        "daemon.tls.key_file %s is not the key of the certificate in %s", files.key_file(),
        files.cert_file()));
  }
  if (X509_cmp_current_time(X509_get0_notAfter(cert.get())) <= 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "the certificate in daemon.tls.cert_file %s has expired; make a new one "
        "(deploy/make_certs.sh)",
        files.cert_file()));
  }
  if (X509_cmp_current_time(X509_get0_notBefore(cert.get())) >= 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "the certificate in daemon.tls.cert_file %s is not valid yet (check the clock)",
        files.cert_file()));
  }
  const std::string name = SlotName(slot);
  if (X509_check_host(cert.get(), name.data(), name.size(), X509_CHECK_FLAG_NO_WILDCARDS,
                      nullptr) != 1) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "the certificate in daemon.tls.cert_file %s does not name this daemon's slot (%s among "
        "its subject alternative names); it belongs to another slot",
        files.cert_file(), name));
  }
  std::unique_ptr<X509_STORE, StoreDeleter> store(X509_STORE_new());
  BioPtr ca_bio = Bio(m.ca);
  int cas = 0;
  while (X509* ca = PEM_read_bio_X509(ca_bio.get(), nullptr, nullptr, nullptr)) {
    X509_STORE_add_cert(store.get(), ca);
    X509_free(ca);
    ++cas;
  }
  ERR_clear_error();  // the end of the file reads as an error
  if (cas == 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("daemon.tls.ca_file %s holds no PEM certificate", files.ca_file()));
  }
  std::unique_ptr<X509_STORE_CTX, StoreCtxDeleter> ctx(X509_STORE_CTX_new());
  X509_STORE_CTX_init(ctx.get(), store.get(), cert.get(), nullptr);
  if (X509_verify_cert(ctx.get()) != 1) {
    const int err = X509_STORE_CTX_get_error(ctx.get());
    ERR_clear_error();
    return absl::InvalidArgumentError(absl::StrFormat(
        "the certificate in daemon.tls.cert_file %s does not verify against daemon.tls.ca_file "
        "%s: %s",
        files.cert_file(), files.ca_file(), X509_verify_cert_error_string(err)));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::optional<TlsMaterial>> LoadTls(const config::Daemon& daemon, uint32_t slot) {
  // One config serves every slot: "{slot}" in a path is this daemon's slot.
  config::Tls t = daemon.tls();
  const std::string n = absl::StrCat(slot);
  t.set_cert_file(absl::StrReplaceAll(t.cert_file(), {{"{slot}", n}}));
  t.set_key_file(absl::StrReplaceAll(t.key_file(), {{"{slot}", n}}));
  t.set_ca_file(absl::StrReplaceAll(t.ca_file(), {{"{slot}", n}}));
  const int given = !t.cert_file().empty() + !t.key_file().empty() + !t.ca_file().empty();
  if (given == 0) return std::optional<TlsMaterial>();
  if (given != 3) {
    return absl::InvalidArgumentError(
        "daemon.tls needs all of cert_file, key_file and ca_file, or none");
  }
  TlsMaterial m;
  auto cert = ReadFile("cert_file", t.cert_file());
  if (!cert.ok()) return cert.status();
  auto key = ReadFile("key_file", t.key_file());
  if (!key.ok()) return key.status();
  auto ca = ReadFile("ca_file", t.ca_file());
  if (!ca.ok()) return ca.status();
  m.cert = std::move(*cert);
  m.key = std::move(*key);
  m.ca = std::move(*ca);
  if (absl::Status st = CheckMaterial(m, t, slot); !st.ok()) return st;
  return std::optional<TlsMaterial>(std::move(m));
}

absl::Status CheckTransportSecurity(const config::Config& config, uint32_t slot) {
  const config::Daemon& d = config.daemon();
  const config::Tls& t = d.tls();
  if (!t.cert_file().empty() || !t.key_file().empty() || !t.ca_file().empty()) {
    return absl::OkStatus();  // TLS everywhere; LoadTls checks the files
  }
  std::vector<std::string> open;  // addresses that would be plaintext
  const bool peers = config.cluster().slots_size() > 1;
  if (peers) {
    for (int i = 0; i < config.cluster().slots_size(); ++i) {
      const std::string& a = config.cluster().slots(i).peer_address();
      if (!IsLoopbackAddress(a)) open.push_back(absl::StrCat("cluster.slots[", i, "] ", a));
    }
  }
  if (!IsLoopbackAddress(d.admin_address())) open.push_back("daemon.admin_address " + d.admin_address());
  if (!d.data_address().empty() && !IsLoopbackAddress(d.data_address())) {
    open.push_back("daemon.data_address " + d.data_address());
  }
  if (!open.empty()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "slot %d: %s is not a loopback address and daemon.tls is not set: the state and the "
        "admin token would cross the network in clear. Set daemon.tls { cert_file key_file "
        "ca_file } (deploy/make_certs.sh makes them)",
        slot, open.front()));
  }
  if (peers && !d.plaintext()) {
    return absl::InvalidArgumentError(
        "the peer plane needs daemon.tls { cert_file key_file ca_file } (deploy/make_certs.sh "
        "makes them), or `plaintext: true` in the daemon block for a cluster on loopback "
        "addresses only");
  }
  return absl::OkStatus();
}

std::shared_ptr<grpc::ServerCredentials> PeerServerCredentials(const TlsMaterial* tls) {
  if (tls == nullptr) return grpc::InsecureServerCredentials();
  grpc::SslServerCredentialsOptions options(
      GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  options.pem_root_certs = tls->ca;
  options.pem_key_cert_pairs.push_back({tls->key, tls->cert});
  return grpc::SslServerCredentials(options);
}

std::shared_ptr<grpc::ChannelCredentials> PeerChannelCredentials(const TlsMaterial* tls) {
  if (tls == nullptr) return grpc::InsecureChannelCredentials();
  grpc::SslCredentialsOptions options;
  options.pem_root_certs = tls->ca;
  options.pem_private_key = tls->key;
  options.pem_cert_chain = tls->cert;
  return grpc::SslCredentials(options);
}

std::shared_ptr<grpc::ServerCredentials> ServerTlsCredentials(const TlsMaterial& tls) {
  grpc::SslServerCredentialsOptions options(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  options.pem_key_cert_pairs.push_back({tls.key, tls.cert});
  return grpc::SslServerCredentials(options);
}

std::optional<uint32_t> CallerSlot(const grpc::ServerContext& context) {
  const std::shared_ptr<const grpc::AuthContext> auth = context.auth_context();
  if (auth == nullptr || !auth->IsPeerAuthenticated()) return std::nullopt;
  // DNS names only (not URI or e-mail names), each exactly SlotName(N):
  // "slot-01.ecsnap" or "slot-+1.ecsnap" name no slot.
  std::set<uint32_t> slots;
  for (const grpc::string_ref& v : auth->FindPropertyValues(GRPC_PEER_DNS_PROPERTY_NAME)) {
    uint32_t slot = 0;
    if (ParseSlotName(std::string(v.data(), v.size()), &slot)) slots.insert(slot);
  }
  // A certificate speaks for one slot: one naming several is nobody's.
  if (slots.size() != 1) return std::nullopt;
  return *slots.begin();
}

}  // namespace ecsnap::daemon
