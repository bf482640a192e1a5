// Facts about the addresses the daemon and its clients dial or serve on,
// shared so that both sides judge an address the same way.
#ifndef ECSNAP_COMMON_ADDRESS_H_
#define ECSNAP_COMMON_ADDRESS_H_

#include <cstdint>
#include <string>

#include "absl/strings/string_view.h"

namespace ecsnap {

// True for unix: addresses and literal loopback addresses (127.0.0.0/8,
// ::1) or exactly "localhost", with a port. A name such as
// "127.evil.example", a list of addresses, or any other host is not.
bool IsLoopbackAddress(const std::string& address);

// The host of a host:port address ("10.0.0.1:7071", "[::1]:7071",
// "node-3:7071", "dns:///node-3:7071", "ipv4:127.0.0.1:7071"): where else
// to listen or dial on the same host (a bulk port, a metrics port).
std::string HostOfAddress(absl::string_view address);
// The port of a host:port address, as its digits ("7071" of "[::1]:7071");
// empty for a unix: address or one without a numeric port.
std::string PortOfAddress(absl::string_view address);

// The DNS name a cluster certificate carries for slot `slot`:
// "slot-N.ecsnap" (deploy/make_certs.sh).
std::string SlotName(uint32_t slot);
// Its inverse: the slot a name is SlotName of (case aside); false for any
// other name ("slot-01.ecsnap", "slot-+1.ecsnap" included).
bool ParseSlotName(const std::string& name, uint32_t* slot);

}  // namespace ecsnap

#endif  // ECSNAP_COMMON_ADDRESS_H_
