#include "daemon/service/tls.h"

#include <cstdlib>
#include <filesystem>
#include <string>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace ecsnap::daemon {
namespace {

// Certificates made by deploy/make_certs.sh, as an operator would.
class TlsTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new std::string(std::string(std::getenv("TEST_TMPDIR")) + "/tls");
    Make(*dir_ + "/good", 3, 825);
    Make(*dir_ + "/foreign", 3, 825);
    std::filesystem::create_directories(*dir_ + "/expired");
    std::filesystem::copy(*dir_ + "/good/ca.crt", *dir_ + "/expired/ca.crt");
    std::filesystem::copy(*dir_ + "/good/ca.key", *dir_ + "/expired/ca.key");
    Make(*dir_ + "/expired", 1, -1);
  }
  static void Make(const std::string& dir, int slots, int days) {
    const std::string cmd = absl::StrCat("bash deploy/make_certs.sh ", dir, " ", slots, " ", days,
                                         " >/dev/null");
    ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  }

  static config::Daemon Files(const std::string& cert_dir, const std::string& slot_pattern,
                              const std::string& ca_dir = "") {
    config::Daemon d;
    d.mutable_tls()->set_cert_file(cert_dir + "/" + slot_pattern + ".crt");
    d.mutable_tls()->set_key_file(cert_dir + "/" + slot_pattern + ".key");
    d.mutable_tls()->set_ca_file((ca_dir.empty() ? cert_dir : ca_dir) + "/ca.crt");
    return d;
  }

  static std::string* dir_;
};
std::string* TlsTest::dir_ = nullptr;

TEST_F(TlsTest, AGoodCertificateLoadsForItsSlotOnly) {
  const std::string good = *dir_ + "/good";
  auto m = LoadTls(Files(good, "slot-{slot}"), 1);
  ASSERT_TRUE(m.ok()) << m.status();
  ASSERT_TRUE(m->has_value());
  EXPECT_NE((*m)->cert.find("BEGIN CERTIFICATE"), std::string::npos);
  // Slot 2's files for a daemon started as slot 1.
  auto other = LoadTls(Files(good, "slot-2"), 1);
  EXPECT_EQ(other.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(other.status().message().find("does not name this daemon's slot (slot-1.ecsnap"),
            std::string::npos)
      << other.status();
}

TEST_F(TlsTest, BadFilesAreRefusedWithASentenceNamingThem) {
  const std::string good = *dir_ + "/good";
  // Expired.
  auto expired = LoadTls(Files(*dir_ + "/expired", "slot-0"), 0);
  EXPECT_NE(expired.status().message().find("has expired"), std::string::npos)
      << expired.status();
  // Issued by another CA.
  auto foreign = LoadTls(Files(*dir_ + "/foreign", "slot-0", good), 0);
  EXPECT_NE(foreign.status().message().find("does not verify against daemon.tls.ca_file"),
            std::string::npos)
      << foreign.status();
  // Another slot's key.
  config::Daemon swapped = Files(good, "slot-0");
  swapped.mutable_tls()->set_key_file(good + "/slot-1.key");
  auto mismatch = LoadTls(swapped, 0);
  EXPECT_NE(mismatch.status().message().find("is not the key of the certificate"),
            std::string::npos)
      << mismatch.status();
  // Missing file, and a key where a certificate belongs.
  config::Daemon missing = Files(good, "slot-0");
  missing.mutable_tls()->set_ca_file(good + "/nope.crt");
  EXPECT_EQ(LoadTls(missing, 0).status().code(), absl::StatusCode::kNotFound);
  config::Daemon garbled = Files(good, "slot-0");
  garbled.mutable_tls()->set_cert_file(good + "/slot-0.key");
  EXPECT_NE(LoadTls(garbled, 0).status().message().find("holds no PEM certificate"),
            std::string::npos);
  // Two of three files.
  config::Daemon partial = Files(good, "slot-0");
  partial.mutable_tls()->clear_ca_file();
  EXPECT_EQ(LoadTls(partial, 0).status().code(), absl::StatusCode::kInvalidArgument);
  // None: plaintext, decided by CheckTransportSecurity.
  auto none = LoadTls(config::Daemon(), 0);
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->has_value());
}

config::Config Cluster(const std::string& host) {
  config::Config c;
  c.mutable_cluster()->set_k(1);
  c.mutable_cluster()->set_m(1);
  c.mutable_cluster()->add_slots()->set_peer_address(host + ":1");
  c.mutable_cluster()->add_slots()->set_peer_address(host + ":2");
  c.mutable_daemon()->set_admin_address("127.0.0.1:7070");
  return c;
}

TEST(CheckTransportSecurityTest, PlaintextOnlyWhenAskedAndOnLoopback) {
  config::Config c = Cluster("127.0.0.1");
  // Peers on loopback, but nobody said plaintext.
  EXPECT_NE(CheckTransportSecurity(c, 0).message().find("plaintext: true"), std::string::npos);
  c.mutable_daemon()->set_plaintext(true);
  EXPECT_TRUE(CheckTransportSecurity(c, 0).ok());
  // A peer off the machine: plaintext is refused even when asked for.
  config::Config remote = Cluster("10.0.0.7");
  remote.mutable_daemon()->set_plaintext(true);
  EXPECT_NE(CheckTransportSecurity(remote, 0).message().find("10.0.0.7:1 is not a loopback"),
            std::string::npos);
  // An admin plane open to the network, without peers.
  config::Config lone;
  lone.mutable_daemon()->set_admin_address("0.0.0.0:7070");
  EXPECT_FALSE(CheckTransportSecurity(lone, 0).ok());
  // With tls, anything goes (the files are checked by LoadTls).
  remote.mutable_daemon()->mutable_tls()->set_cert_file("c");
  EXPECT_TRUE(CheckTransportSecurity(remote, 0).ok());
}

}  // namespace
}  // namespace ecsnap::daemon
