#!/usr/bin/env bash
# The main job: a local ecsnapd and two trainer ranks. The ranks snapshot a
# few steps; rank 0 is SIGKILLed in the middle of a snapshot; restarted, both
# ranks restore the last complete step and check it byte for byte.
# Expects a build (deploy/setup.sh runs one). Everything it starts it stops
# by pid; everything it writes lives in one temporary directory.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=.bazel/bin
MIB=${MIB:-64}
WORK=$(mktemp -d /tmp/ecsnap-demo-XXXXXX)
ARENA_DIR=/dev/shm/$(basename "$WORK")
DAEMON_PID=""

cleanup() {
  if [ -n "$DAEMON_PID" ] && kill -0 "$DAEMON_PID" 2>/dev/null; then
    kill -TERM "$DAEMON_PID"; wait "$DAEMON_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK" "$ARENA_DIR"
}
trap cleanup EXIT

say() { printf '%s\n' "$*"; }
ctl() { "$BIN/client/ecsnapctl" --address="unix:$WORK/admin.sock" "$@"; }
trainer() { "$BIN/deploy/demo/synthetic_trainer" --socket="$WORK/data.sock" --local_ranks=0,1 --mib="$MIB" "$@"; }

say "== ecsnap demo: one node, one ecsnapd, two trainer ranks with $MIB MiB of state each"
"$BIN/daemon/ecsnapd" --arena_dir="$ARENA_DIR" --arena_bytes=$(( (4 * MIB + 64) << 20 )) \
  --socket="$WORK/data.sock" --admin_address="unix:$WORK/admin.sock" >"$WORK/ecsnapd.log" 2>&1 &
DAEMON_PID=$!
for _ in $(seq 1 100); do
  ctl status >/dev/null 2>&1 && break
  kill -0 "$DAEMON_PID" 2>/dev/null || { cat "$WORK/ecsnapd.log"; exit 1; }
  sleep 0.1
done
say "[ecsnapd] $(grep -o 'arena .* in [0-9.]* s' "$WORK/ecsnapd.log")"

say "== both ranks snapshot steps 1-3; at step 4 rank 0 dies in mid-snapshot"
trainer --rank=1 --steps=4 &
R1=$!
# The shell's own "Killed" notice goes to /dev/null; the trainer reports on stdout.
set +e
exec 3>&2 2>/dev/null
trainer --rank=0 --steps=4 --die_mid_snapshot_at=4
R0_STATUS=$?
exec 2>&3 3>&-
set -e
wait "$R1"
say "[rank 0] exited with status $R0_STATUS ($(kill -l $((R0_STATUS - 128)) 2>/dev/null || echo '?'))"

# The daemon notices the dead session and discards its half-written step.
for _ in $(seq 1 50); do
  ctl steps --job=demo | grep -q ' 4  RECEIVING   1/2' && break
  sleep 0.1
done
say "[ecsnapd] steps held now:"
ctl steps --job=demo | sed 's/^/          /'

say "== rank 0 restarts and restores; so does rank 1"
trainer --rank=0 --restore
trainer --rank=1 --restore
say "== demo OK: the last complete step came back byte for byte after a trainer crash"
