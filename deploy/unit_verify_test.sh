#!/usr/bin/env bash
# systemd-analyze verify of deploy/ecsnapd@.service, as an instance, with the
# ExecStart binary pointing at the built ecsnapd (verify checks it exists).
# Any line systemd prints (an unknown key, a value it cannot parse) fails the
# test: systemd only warns about those and would run the unit without them.
# A unit with a misspelt key is checked first, to show the check can fail.
set -uo pipefail
unit="$1"
ecsnapd="$(cd "$(dirname "$2")" && pwd)/$(basename "$2")"
if ! command -v systemd-analyze >/dev/null; then
  echo "systemd-analyze is not installed (Debian package systemd): run deploy/install_deps.sh"
  exit 1
fi
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
verify() {  # verify FILE: prints what systemd says, returns 1 when it says anything
  local out
  out=$(cd "$dir" && timeout 60 systemd-analyze verify "./$(basename "$1")" 2>&1)
  local rc=$?
  echo "$out"
  [ $rc -eq 0 ] && [ -z "$out" ]
}
sed "s|/usr/local/bin/ecsnapd|$ecsnapd|" "$unit" >"$dir/ecsnapd@3.service"
sed 's/^ProtectSystem=/ProtectSystm=/' "$dir/ecsnapd@3.service" >"$dir/ecsnapd@4.service"
if verify "$dir/ecsnapd@4.service" >/dev/null; then
  echo "FAIL: a misspelt key went unnoticed; this check proves nothing"
  exit 1
fi
if ! verify "$dir/ecsnapd@3.service"; then
  echo "FAIL: systemd-analyze verify has something to say about $unit (above)"
  exit 1
fi
for want in "Type=notify" "WatchdogSec=" "ProtectSystem=strict" "NoNewPrivileges=yes" \
            "PrivateTmp=yes" "CapabilityBoundingSet=" "LimitMEMLOCK=" "ReadWritePaths="; do
  grep -q "^$want" "$unit" || { echo "FAIL: $unit has no $want"; exit 1; }
done
# The arena's mount unit beside it, if given (its name must be its path).
if [ $# -ge 3 ]; then
  cp "$3" "$dir/dev-shm-ecsnap.mount"
  if ! verify "$dir/dev-shm-ecsnap.mount"; then
    echo "FAIL: systemd-analyze verify has something to say about $3 (above)"
    exit 1
  fi
  grep -q "^Options=.*huge=within_size" "$3" || { echo "FAIL: $3 mounts no huge pages"; exit 1; }
  echo "PASS: $3 verifies"
fi
echo "PASS: $unit verifies"
