#!/usr/bin/env bash
# Installs the Debian 12 packages ecsnap builds and runs with, only those missing.
# Idempotent; needs root (or sudo) when something is missing.
set -euo pipefail

PACKAGES=(
  bazel-bootstrap          # Bazel 4.2.3, builds offline with the stubs in third_party/
  g++ pkg-config
  libgrpc++-dev protobuf-compiler protobuf-compiler-grpc libprotobuf-dev
  libabsl-dev libssl-dev
  openssl                  # deploy/make_certs.sh: the cluster CA and per-slot certificates
  libisal-dev              # Reed-Solomon and CRC-32C
  libibverbs-dev           # RDMA transport (rdma-core)
  libgtest-dev libgmock-dev libbenchmark-dev
  python3 python3-dev python3-numpy python3-torch python3-pybind11 pybind11-dev
  clang libclang-rt-14-dev # tests/fuzz (libFuzzer, ASan) and the thread-safety build
  iproute2 procps util-linux
  libsystemd-dev           # sd_notify: Type=notify readiness, watchdog
  libmicrohttpd-dev        # ecsnapd's Prometheus /metrics endpoint
  systemd                  # systemd-analyze verify of deploy/ecsnapd@.service in the tests
  python3-yaml             # deploy/k8s manifests, checked offline in the tests
)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install_deps: every package is already installed"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "install_deps: installing ${missing[*]}"
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
