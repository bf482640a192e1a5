#!/usr/bin/env bash
# The main job: a local ecsnap cluster. Four ecsnapd (one group, RS 2+2) on
# loopback, two trainer ranks per node. The ranks snapshot a few steps and
# the group erasure-codes each one; a trainer dies in the middle of a
# snapshot; then a whole node is SIGKILLed and replaced by an empty one,
# which rebuilds its state from its peers; its ranks restore bit-exact.
# Expects a build (deploy/setup.sh runs one). Everything it starts it stops
# by pid; everything it writes lives in one temporary directory.
set -euo pipefail
SELF=$(readlink -f "$0")
cd "$(dirname "$SELF")/.."
# As root, the arenas go on a tmpfs in huge pages, as deploy/dev-shm-ecsnap.mount
# gives a node: mounted in a mount namespace of the demo's own, so that it
# goes when the demo does. Elsewhere they are plain /dev/shm directories.
if [ -z "${ECSNAP_DEMO_NS:-}" ] && [ "$(id -u)" = 0 ] &&
   unshare --mount --propagation private true 2>/dev/null; then
  ECSNAP_DEMO_NS=1 exec unshare --mount --propagation private bash "$SELF" "$@"
fi

BIN=.bazel/bin
MIB=${MIB:-16}          # state per rank
NODES=4
WORK=$(mktemp -d /tmp/ecsnap-demo-XXXXXX)
SHM=/dev/shm/$(basename "$WORK")
declare -A PIDS=()

cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  umount "$SHM" 2>/dev/null || true
  rm -rf "$WORK" "$SHM"
}
trap cleanup EXIT
mkdir -m 0700 "$SHM"
if [ -n "${ECSNAP_DEMO_NS:-}" ]; then
  mount -t tmpfs -o mode=0700,huge=within_size tmpfs "$SHM" 2>/dev/null || true
fi

say() { printf '%s\n' "$*"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f s", b - a }'; }
ctl() { "$BIN/client/ecsnapctl" --address="unix:$WORK/admin$1.sock" "${@:2}"; }
ranks_of() { echo "$((2 * $1)),$((2 * $1 + 1))"; }
trainer() {  # trainer SLOT RANK ARGS...
  "$BIN/deploy/demo/synthetic_trainer" --socket="$WORK/data$1.sock" --job=demo --rank="$2" \
    --local_ranks="$(ranks_of "$1")" --mib="$MIB" "${@:3}"
}
start_daemon() {
  "$BIN/daemon/ecsnapd" --config="$WORK/cluster.textproto" --slot="$1" --arena_dir="$SHM/slot$1" \
    --socket="$WORK/data$1.sock" --admin_address="unix:$WORK/admin$1.sock" >>"$WORK/ecsnapd$1.log" 2>&1 &
  PIDS[$1]=$!
  for _ in $(seq 1 100); do
    ctl "$1" status >/dev/null 2>&1 && return 0
    kill -0 "${PIDS[$1]}" 2>/dev/null || { cat "$WORK/ecsnapd$1.log"; exit 1; }
    sleep 0.1
  done
  say "ecsnapd $1 did not start"; exit 1
}
wait_state() {  # wait_state STEP STATE: every daemon holds STEP in STATE
  for _ in $(seq 1 200); do
    local n=0
    for s in $(seq 0 $((NODES - 1))); do
      ctl "$s" steps --job=demo | grep -qE "^demo +$1 +$2 " && n=$((n + 1))
    done
    [ "$n" -eq "$NODES" ] && return 0
    sleep 0.05
  done
  say "step $1 did not reach $2 everywhere"; exit 1
}

# Free loopback ports for the peer plane.
read -r -a PORTS <<<"$(python3 -c 'import socket
s=[socket.socket() for _ in range(4)]
[x.bind(("127.0.0.1",0)) for x in s]
print(*[x.getsockname()[1] for x in s])')"
{
  echo "cluster { k: 2 m: 2 peer_timeout_ms: 3000"
  for p in "${PORTS[@]}"; do echo "  slots { peer_address: \"127.0.0.1:$p\" }"; done
  echo "}"
  # Per node: a protected, a LOCAL and a receiving step (trainers are not in
  # lockstep), each with its parity (m/k = 1x), of 2 ranks: 12x, plus slack.
  echo "daemon { arena_bytes: $(( (14 * MIB + 64) << 20 ))"
  # Mutual TLS between the daemons: each slot's certificate names it.
  echo "  tls { cert_file: \"$WORK/tls/slot-{slot}.crt\" key_file: \"$WORK/tls/slot-{slot}.key\""
  echo "        ca_file: \"$WORK/tls/ca.crt\" } }"
} >"$WORK/cluster.textproto"
deploy/make_certs.sh "$WORK/tls" "$NODES" >/dev/null

say "== ecsnap demo: $NODES nodes, one group (RS 2+2, mutual TLS between daemons), 2 ranks per node, $MIB MiB of state per rank"
t=$(now)
for s in $(seq 0 $((NODES - 1))); do start_daemon "$s"; done
say "[cluster] $NODES daemons up in $(since "$t"); each arena populated at start"

say "== every rank snapshots steps 1-3; each step is erasure-coded across the group"
t=$(now)
for s in $(seq 0 $((NODES - 1))); do
  for r in 0 1; do trainer "$s" $((2 * s + r)) --steps=3 >"$WORK/train$s$r.log" & done
done
wait $(jobs -p | grep -vxF "$(printf '%s\n' "${PIDS[@]}")") 2>/dev/null || true
grep -h "step 3" "$WORK"/train*.log | sort | head -2 | sed 's/^/  /'
wait_state 3 PROTECTED
say "[cluster] step 3 PROTECTED on every node, $(since "$t") after the first snapshot"
ctl 0 status | sed 's/^/  /'

say "== a trainer crash: rank 0 is SIGKILLed in the middle of its step-4 snapshot"
set +e
exec 3>&2 2>/dev/null
# One copy thread, so that the thread watching the copy gets a core.
trainer 0 0 --from_step=4 --steps=4 --die_mid_snapshot_at=4 --copy_threads=1 | sed 's/^/  /'
exec 2>&3 3>&-
set -e
trainer 0 0 --restore | sed 's/^/  /'

say "== a node loss: ecsnapd of slot 1 is SIGKILLed, its memory gone; an empty node takes slot 1"
kill -KILL "${PIDS[1]}"; wait "${PIDS[1]}" 2>/dev/null || true
rm -rf "$SHM/slot1"
t=$(now)
start_daemon 1
for r in 2 3; do trainer 1 "$r" --restore | sed 's/^/  /'; done
say "[slot 1] replaced, rebuilt from its peers and both ranks restored in $(since "$t")"
grep -h "rebuilt job" "$WORK/ecsnapd1.log" | sed 's/^[^ ]* /  ecsnapd: /'
wait_state 3 PROTECTED
ctl 1 steps --job=demo | sed 's/^/  /'
say "== demo OK: a trainer crash and a node loss, and every rank's last protected step came back bit-exact"
