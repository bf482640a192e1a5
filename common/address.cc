#include "common/address.h"

#include <arpa/inet.h>
#include <netinet/in.h>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/strip.h"
#include "absl/strings/str_cat.h"

namespace ecsnap {

bool IsLoopbackAddress(const std::string& address) {
  if (absl::StartsWith(address, "unix:") || absl::StartsWith(address, "unix-abstract:")) {
    return true;
  }
  if (address.find(',') != std::string::npos) return false;  // a list of addresses
  std::string a = address;
  if (absl::StartsWith(a, "ipv4:") || absl::StartsWith(a, "ipv6:")) a = a.substr(5);
  // "host:port" or "[v6]:port" -> host.
  std::string host = a;
  if (absl::StartsWith(a, "[")) {
    const size_t end = a.find(']');
    host = end == std::string::npos ? a : a.substr(1, end - 1);
  } else if (const size_t colon = a.rfind(':'); colon != std::string::npos) {
    host = a.substr(0, colon);
  }
  if (host == "localhost") return true;
  // Literal addresses only: "127.evil.example" is a name, resolved anywhere.
  in_addr v4{};
  if (::inet_pton(AF_INET, host.c_str(), &v4) == 1) return (ntohl(v4.s_addr) >> 24) == 127;
  in6_addr v6{};
  return ::inet_pton(AF_INET6, host.c_str(), &v6) == 1 && IN6_IS_ADDR_LOOPBACK(&v6);
}

namespace {
constexpr char kSlotPrefix[] = "slot-";
constexpr char kSlotSuffix[] = ".ecsnap";
}  // namespace

std::string SlotName(uint32_t slot) { return absl::StrCat(kSlotPrefix, slot, kSlotSuffix); }

bool ParseSlotName(const std::string& name, uint32_t* slot) {
  const std::string lower = absl::AsciiStrToLower(name);
  absl::string_view digits = lower;
  return absl::ConsumePrefix(&digits, kSlotPrefix) && absl::ConsumeSuffix(&digits, kSlotSuffix) &&
         !digits.empty() && digits.size() <= 10 &&
         digits.find_first_not_of("0123456789") == absl::string_view::npos &&
         absl::SimpleAtoi(digits, slot) && SlotName(*slot) == lower;
}

std::string HostOfAddress(absl::string_view address) {
  for (absl::string_view scheme : {"dns:///", "dns:", "ipv4:", "ipv6:"}) {
    if (absl::StartsWith(address, scheme)) {
      address.remove_prefix(scheme.size());
      break;
    }
  }
  if (absl::StartsWith(address, "[")) {
    const size_t end = address.find(']');
    return std::string(address.substr(1, end == absl::string_view::npos ? end : end - 1));
  }
  const size_t colon = address.rfind(':');
  return std::string(colon == absl::string_view::npos ? address : address.substr(0, colon));
}

std::string PortOfAddress(absl::string_view address) {
  if (absl::StartsWith(address, "unix:")) return "";
  const size_t colon = address.rfind(':');
  if (colon == absl::string_view::npos || colon + 1 == address.size()) return "";
  const absl::string_view port = address.substr(colon + 1);
  if (port.find_first_not_of("0123456789") != absl::string_view::npos) return "";
  return std::string(port);
}

}  // namespace ecsnap
