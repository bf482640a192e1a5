#include "common/job_token.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include <cstdlib>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"

namespace ecsnap {

std::string JobToken(absl::string_view secret, absl::string_view job_id) {
  // The purpose is part of the message, so the secret's HMACs for anything
  // else can never pass for a job token.
  const std::string message = absl::StrCat("ecsnap job token v1", absl::string_view("\0", 1), job_id);
  unsigned char mac[EVP_MAX_MD_SIZE];
  unsigned int mac_bytes = 0;
  if (HMAC(EVP_sha256(), secret.data(), static_cast<int>(secret.size()),
           reinterpret_cast<const unsigned char*>(message.data()), message.size(), mac,
           &mac_bytes) == nullptr) {
    std::abort();  // SHA-256 is always there; no token is better than a weak one
  }
  return absl::BytesToHexString(absl::string_view(reinterpret_cast<char*>(mac), mac_bytes));
}

bool TokensEqual(absl::string_view a, absl::string_view b) {
  return a.size() == b.size() && CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0;
}

}  // namespace ecsnap
