#include "common/address.h"

#include "gtest/gtest.h"

namespace ecsnap {
namespace {

TEST(IsLoopbackAddressTest, OnlyLiteralLoopbackAddressesAndUnixSockets) {
  for (const char* a : {"127.0.0.1:7070", "127.1.2.3:1", "localhost:1", "[::1]:7070",
                        "unix:/run/x.sock", "ipv4:127.0.0.1:5"}) {
    EXPECT_TRUE(IsLoopbackAddress(a)) << a;
  }
  for (const char* a : {"10.0.0.1:7070", "0.0.0.0:7070", "[::]:1", "127.evil.example:1",
                        "localhost.evil.example:1", "[::ffff:10.0.0.1]:1", "example.com:1",
                        "ipv4:127.0.0.1:1,10.0.0.5:1"}) {
    EXPECT_FALSE(IsLoopbackAddress(a)) << a;
  }
}

TEST(SlotNameTest, ParseIsTheExactInverse) {
  for (uint32_t slot : {0u, 7u, 4095u, 4294967295u}) {
    uint32_t got = 1;
    EXPECT_TRUE(ParseSlotName(SlotName(slot), &got)) << slot;
    EXPECT_EQ(got, slot);
  }
  uint32_t got = 0;
  EXPECT_TRUE(ParseSlotName("SLOT-3.ECSNAP", &got));
  EXPECT_EQ(got, 3u);
  for (const char* name : {"slot-01.ecsnap", "slot-+1.ecsnap", "slot- 1.ecsnap", "slot-.ecsnap",
                           "slot-4294967296.ecsnap", "slot-1.ecsnap.evil", "xslot-1.ecsnap",
                           "slot-1"}) {
    EXPECT_FALSE(ParseSlotName(name, &got)) << name;
  }
}

TEST(PortOfAddressTest, GivesTheDigitsAfterTheLastColonOrNothing) {
  EXPECT_EQ(PortOfAddress("10.0.0.1:7071"), "7071");
  EXPECT_EQ(PortOfAddress("[::1]:9464"), "9464");
  EXPECT_EQ(PortOfAddress("dns:///node-3:7071"), "7071");
  EXPECT_EQ(PortOfAddress("node-3"), "");
  EXPECT_EQ(PortOfAddress("node-3:"), "");
  EXPECT_EQ(PortOfAddress("node-3:70x1"), "");
  EXPECT_EQ(PortOfAddress("[::1]"), "");
  EXPECT_EQ(PortOfAddress("unix:/run/ecsnap/1.sock"), "");
  EXPECT_EQ(PortOfAddress("unix:/run/x:7071"), "");
}

TEST(HostOfAddressTest, NamesTheHostOfEveryFormOfPeerAddress) {
  EXPECT_EQ(HostOfAddress("10.0.0.1:7071"), "10.0.0.1");
  EXPECT_EQ(HostOfAddress("[::1]:7071"), "::1");
  EXPECT_EQ(HostOfAddress("node-3.ecsnap.svc:7071"), "node-3.ecsnap.svc");
  EXPECT_EQ(HostOfAddress("dns:///node-3:7071"), "node-3");
  EXPECT_EQ(HostOfAddress("ipv4:127.0.0.1:7071"), "127.0.0.1");
}

}  // namespace
}  // namespace ecsnap
