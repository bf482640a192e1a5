#!/usr/bin/env bash
# Builds the fuzz targets with --config=fuzz (clang, ASan, libFuzzer) in an
# output base of their own, so the default build stays cached, and runs each
# for SECONDS (default 20) from its seed corpus.
#
#   tests/fuzz/run_fuzzers.sh [SECONDS] [TARGET...]
#
# Prints a line per target; a crash keeps its input under
# /tmp/ecsnap-fuzz-crashes/ and is reported with the command that replays it.
# With ECSNAP_FUZZ_RESULTS set, appends "NAME passed|failed" lines to that
# file (tests/run_all.sh counts them). Exit status: 0 when nothing crashed.
set -uo pipefail
cd "$(dirname "$0")/../.."

secs="${1:-20}"
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(manifest_fuzz rank_record_fuzz config_fuzz inventory_fuzz parity_fold_fuzz
                                         peer_message_fuzz)
base="${ECSNAP_FUZZ_OUTPUT_BASE:-${HOME:-/root}/.cache/bazel-fuzz}"
results="${ECSNAP_FUZZ_RESULTS:-/dev/null}"

record() { echo "$1 $2" >>"$results"; }
# Whatever happens: the second Bazel server is not left running, nor the
# working directory.
work=""
crashes=/tmp/ecsnap-fuzz-crashes
cleanup() {
  bazel --output_base="$base" shutdown >/dev/null 2>&1
  if [ -n "$work" ]; then rm -rf "$work"; fi
  rmdir "$crashes" 2>/dev/null  # kept only when it holds a crash
}
trap cleanup EXIT

labels=()
for t in "${targets[@]}"; do labels+=("//tests/fuzz:$t"); done
# Bounded: a cold clang+ASan build of these targets takes a few minutes.
if ! timeout --kill-after=30 1200 \
    bazel --output_base="$base" build --config=fuzz --symlink_prefix=/ "${labels[@]}"; then
  echo "fuzz: the fuzz build failed"
  for t in "${targets[@]}"; do record "$t" failed; done
  exit 1
fi
bin="$(bazel --output_base="$base" info --config=fuzz bazel-bin 2>/dev/null)"
# The second Bazel server is not needed while the targets run.
bazel --output_base="$base" shutdown

work="$(mktemp -d /tmp/ecsnap-fuzz.XXXXXX)" || exit 1
status=0
for t in "${targets[@]}"; do
  mkdir -p "$work/$t" "$crashes"
  log="$work/$t.log"
  # Bounded: libFuzzer stops at -max_total_time; timeout(1) is the backstop.
  # Targets that need files (an arena) make them under TEST_TMPDIR, which goes
  # with $work whatever becomes of the target.
  TEST_TMPDIR="$work" timeout --kill-after=10 $((secs + 60)) "$bin/tests/fuzz/$t" \
    -max_total_time="$secs" \
    -rss_limit_mb=2048 -max_len=65536 -timeout=10 -print_final_stats=1 \
    -artifact_prefix="$crashes/$t-" "$work/$t" "tests/fuzz/corpus/$t" >"$log" 2>&1
  rc=$?
  runs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$')"
  if [ $rc -eq 0 ]; then
    echo "fuzz $t: ok, ${runs:-?} inputs in ${secs} s"
    record "$t" passed
  else
    echo "fuzz $t: FAILED (exit $rc); last lines:"
    tail -n 30 "$log"
    echo "replay: $bin/tests/fuzz/$t $crashes/$t-*"
    record "$t" failed
    status=1
  fi
done
exit $status
