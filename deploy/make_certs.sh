#!/usr/bin/env bash
# Makes a cluster's CA and one certificate per slot for ecsnapd's mutual TLS
# (DESIGN.md §9), with openssl:
#
#   deploy/make_certs.sh DIR SLOTS [DAYS]
#
# writes DIR/ca.crt, DIR/ca.key and, for each slot N in 0..SLOTS-1,
# DIR/slot-N.crt and DIR/slot-N.key. A slot's certificate names it
# ("slot-N.ecsnap" among its subject alternative names): a daemon accepts a
# message about slot N only from the holder of that certificate, and dials a
# peer expecting that name. Point every daemon's config at its own files:
#
#   daemon { tls { cert_file: "DIR/slot-{slot}.crt" key_file: "DIR/slot-{slot}.key"
#                  ca_file: "DIR/ca.crt" } }
#
# ("{slot}" is replaced by the daemon's --slot). Keys are P-256, mode 0600;
# keep ca.key off the nodes. An existing CA in DIR is reused, so that more
# slots can be added later. DAYS (default 825) bounds each certificate's
# life; a negative value makes already-expired ones (for tests).
set -euo pipefail

if [[ $# -lt 2 || $# -gt 3 ]]; then
  echo "usage: $0 DIR SLOTS [DAYS]" >&2
  exit 2
fi
dir=$1
slots=$2
days=${3:-825}
if ! [[ $slots =~ ^[0-9]+$ ]] || (( slots < 1 || slots > 4096 )); then
  echo "$0: SLOTS must be 1..4096, not '$slots'" >&2
  exit 2
fi
command -v openssl >/dev/null || { echo "$0: openssl is not installed (apt-get install openssl)" >&2; exit 1; }
mkdir -p "$dir"
umask 077
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if [[ ! -f $dir/ca.crt || ! -f $dir/ca.key ]]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$dir/ca.key" -out "$dir/ca.crt" -days 3650 \
    -subj "/O=ecsnap/CN=ecsnap cluster CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    2>"$tmp/err" || { cat "$tmp/err" >&2; exit 1; }
fi
for ((n = 0; n < slots; n++)); do
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$dir/slot-$n.key" -out "$tmp/slot-$n.csr" -subj "/O=ecsnap/CN=ecsnap slot $n" \
    2>"$tmp/err" || { cat "$tmp/err" >&2; exit 1; }
  cat >"$tmp/ext" <<EXT
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=DNS:slot-$n.ecsnap
EXT
  openssl x509 -req -in "$tmp/slot-$n.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -days "$days" -extfile "$tmp/ext" \
    -out "$dir/slot-$n.crt" 2>"$tmp/err" || { cat "$tmp/err" >&2; exit 1; }
done
chmod 0644 "$dir"/*.crt
echo "made $dir/ca.crt and certificates for slots 0..$((slots - 1)) (valid $days days)"
