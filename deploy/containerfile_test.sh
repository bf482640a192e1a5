#!/usr/bin/env bash
# deploy/Containerfile's runtime stage installs every shared library that
# ecsnapd and ecsnapctl link (by their Debian packages, or as a dependency of
# one it names): checked offline against ldd, dpkg and the apt cache, so that
# a new library in the build cannot leave the image unable to start.
set -uo pipefail
containerfile="$1"
shift
packages=$(sed -n '/^FROM debian:12-slim/,$p' "$containerfile" |
  sed -n '/apt-get install/,/rm -rf/p' | tr ' \\' '\n\n' | grep -E '^lib[a-z0-9+.-]+$' | sort -u)
[ -n "$packages" ] || { echo "FAIL: no runtime packages found in $containerfile"; exit 1; }
# What the named packages bring (the base image's essentials included).
provided=$( (echo "$packages"; echo libc6 libgcc-s1 libstdc++6 zlib1g | tr ' ' '\n';
  apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
    --no-replaces --no-enhances $packages 2>/dev/null | grep -E '^\w' ) | sed 's/:.*//' | sort -u)
fail=0
# One dpkg query for every library of every binary (each query reads every
# package's file list).
libs=$(for bin in "$@"; do ldd "$bin" | awk '/=>/ {print $1}'; done | sort -u)
owners=$(dpkg -S $(sed 's|^|*/|' <<<"$libs") 2>/dev/null | grep -v i386)
for lib in $libs; do
  pkg=$(grep -E "/${lib//+/\\+}\$" <<<"$owners" | head -1 | cut -d: -f1)
  if [ -z "$pkg" ]; then
    echo "FAIL: the binaries link $lib, which no installed Debian package provides"
    fail=1
  elif ! grep -qx "$pkg" <<<"$provided"; then
    echo "FAIL: the binaries link $lib (package $pkg), which $containerfile does not install"
    fail=1
  fi
done
grep -q '^USER 10001' "$containerfile" || { echo "FAIL: the image does not run as a non-root user"; fail=1; }
[ $fail -eq 0 ] && echo "PASS: the runtime stage provides every library of $*"
exit $fail
