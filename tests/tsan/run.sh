#!/bin/bash
# ThreadSanitizer run of the daemon, the client and the tests that start real
# daemons (issue: "a --config=tsan run of the daemon and cluster tests is clean").
#
#   tests/tsan/run.sh                 # the default targets below
#   tests/tsan/run.sh //tests:thrash_test --test_arg=--minutes=5
#
# Debian's abseil is not built with TSan, so absl::Mutex hand-offs would be
# invisible and every guarded member would look racy. This script builds the same
# abseil release from Debian's source package with -fsanitize=thread (about a
# minute on 2 cores, cached in $ECSNAP_TSAN_ABSL) and runs the tests with it on
# LD_LIBRARY_PATH; gRPC and protobuf then lock through the instrumented abseil
# too. Every process a test starts writes its reports under a fresh directory,
# and triage.py fails the run on any report whose racing code is ecsnap's
# (reports inside gRPC's own hand-offs, which are not instrumented, are
# counted and listed apart). A deliberate race (race_canary_test) is run
# first: the run fails if it goes unreported.
set -euo pipefail
cd "$(dirname "$0")/../.."

ABSL="${ECSNAP_TSAN_ABSL:-${HOME:-/root}/.cache/ecsnap/absl-tsan}"
OUTPUT_BASE="${ECSNAP_TSAN_OUTPUT_BASE:-${HOME:-/root}/.cache/bazel-tsan}"
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(//common/... //ec/... //daemon/... //client/... //tests:snapshot_test
           //tests:cluster_test //tests:security_test //tests:ops_test)
fi

build_absl() {
  local version
  version=$(dpkg-query -W -f='${source:Version}' libabsl-dev 2>/dev/null) || {
    echo "tsan: libabsl-dev is not installed; run deploy/install_deps.sh first"
    return 1
  }
  echo "tsan: building abseil $version from Debian's source with -fsanitize=thread into $ABSL"
  # A private source list: the machine's own Debian mirrors, as deb-src.
  mkdir -p "$work/apt/lists/partial" "$work/apt/parts"
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -e "$f" ] && sed 's/^Types: .*/Types: deb-src/' "$f" >"$work/apt/parts/$(basename "$f")"
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -e "$f" ] && sed -n 's/^deb /deb-src /p' "$f" >>"$work/apt/parts/debs.list"
  done
  local apt=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$work/apt/parts"
             -o "Dir::State::Lists=$work/apt/lists" -o Debug::NoLocking=1)
  apt-get "${apt[@]}" -qq update
  if ! (cd "$work" && apt-get "${apt[@]}" -qq source --download-only "abseil=$version"); then
    echo "tsan: Debian's source of abseil $version cannot be downloaded (see above)"
    return 1
  fi
  dpkg-source -x "$work"/abseil_*.dsc "$work/src" >/dev/null
  CC=clang CXX=clang++ cmake -S "$work/src" -B "$work/build" -G Ninja -Wno-dev \
    -DCMAKE_CXX_STANDARD=17 -DBUILD_SHARED_LIBS=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_CXX_FLAGS=-fsanitize=thread -DCMAKE_SHARED_LINKER_FLAGS=-fsanitize=thread \
    -DCMAKE_INSTALL_PREFIX="$ABSL.tmp" >/dev/null
  ninja -C "$work/build" install >/dev/null
  echo "$version" >"$ABSL.tmp/debian-version"
  rm -rf "$ABSL" && mv "$ABSL.tmp" "$ABSL"
}

work=$(mktemp -d /tmp/ecsnap-tsan-work.XXXXXX)
reports=$(mktemp -d /tmp/ecsnap-tsan.XXXXXX)
# Trainers that a test runs as another uid (setpriv) write their reports here too.
chmod 1777 "$reports"
trap 'bazel --output_base="$OUTPUT_BASE" shutdown >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

# Rebuilt whenever Debian's abseil changes.
if [ "$(cat "$ABSL/debian-version" 2>/dev/null)" != \
     "$(dpkg-query -W -f='${source:Version}' libabsl-dev 2>/dev/null)" ]; then
  build_absl
fi

# Processes run on after a report (exitcode=0): triage.py decides, not TSan.
options="halt_on_error=0:exitcode=0:second_deadlock_stack=1:history_size=4"
options+=":suppressions=$PWD/tests/tsan/tsan.supp"
tsan_test() {  # tsan_test REPORT_PREFIX BAZEL_ARGS...
  local prefix=$1
  shift
  bazel --output_base="$OUTPUT_BASE" test --config=tsan \
    --test_env=LD_LIBRARY_PATH="$ABSL/lib" --test_env=TSAN_OPTIONS="$options:log_path=$prefix" \
    --sandbox_writable_path="$reports" --test_timeout=1200 "$@"
}

# The canary: two races ThreadSanitizer must see and triage.py must class as
# ecsnap's (a plain counter; a generated protobuf message), or this run
# proves nothing.
tsan_test "$reports/canary" --cache_test_results=no //tests/tsan:race_canary_test >/dev/null
canary=""
if compgen -G "$reports/canary*" >/dev/null; then
  canary=$(tests/tsan/triage.py "$reports"/canary* | tail -1) || true  # exit 1: it found them
fi
if [[ "$canary" != "tsan: 2 report(s) in ecsnap's code"* ]]; then
  echo "tsan: the deliberate races in race_canary_test were not both reported as ecsnap's;"
  echo "      nothing here is checked"
  exit 1
fi
rm -f "$reports"/canary*

rc=0
tsan_test "$reports/report" "${targets[@]}" || rc=$?
verdict=0
if compgen -G "$reports/report*" >/dev/null; then
  tests/tsan/triage.py "$reports"/report* || verdict=1
else
  echo "tsan: no report"
fi
if [ $verdict -ne 0 ]; then
  echo "tsan: races in ecsnap's code (whole reports in $reports)"
  exit 1
fi
rm -rf "$reports"
[ $rc -eq 0 ] && echo "tsan: clean" || echo "tsan: tests failed (exit $rc), no race in ecsnap's code"
exit $rc
