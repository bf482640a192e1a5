#!/usr/bin/env bash
# Runs every test of the project: `bazel test //...`, the CUDA build and its
# tests where the toolkit is installed, then each fuzz target
# for ECSNAP_FUZZ_SECONDS (default 20; 0 skips them) under ASan, then sums
# the gtest XML reports and the fuzz results and prints
# "N passed, N failed, N skipped" as its last line.
# Exit status: 0 when every test passed, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."

bazel test //... "$@"
bazel_rc=$?

# The CUDA build (issue: the GPU path), where the toolkit is installed: every
# target builds with --config=cuda, and the tests of the CUDA data path run
# (on a host without a GPU they check the refusal and skip the device cases,
# saying why). Their reports replace the default build's.
if [ -e /usr/local/cuda/include/cuda_runtime_api.h ]; then
  bazel build --config=cuda //... "$@" &&
    bazel test --config=cuda //tests/gpu/... //tests:torch_helpers_test "$@"
  cuda_rc=$?
  [ $cuda_rc -ne 0 ] && bazel_rc=$cuda_rc
else
  echo "run_all: no CUDA toolkit at /usr/local/cuda: the --config=cuda build is not checked here"
fi

fuzz_results="$(mktemp)"
trap 'rm -f "$fuzz_results"' EXIT
fuzz_seconds="${ECSNAP_FUZZ_SECONDS:-20}"
if [ "$fuzz_seconds" != 0 ]; then
  ECSNAP_FUZZ_RESULTS="$fuzz_results" tests/fuzz/run_fuzzers.sh "$fuzz_seconds"
  # A runner that died before reporting every target counts as a failure.
  if [ $? -ne 0 ] && ! grep -q " failed$" "$fuzz_results"; then
    echo "fuzz-runner failed" >>"$fuzz_results"
  fi
fi

testlogs="$(bazel info bazel-testlogs 2>/dev/null)"
# Only the reports of today's test targets: a deleted target's old report
# must not count, nor a manual one that `bazel test //...` does not run.
targets="$(bazel query 'tests(//...) except attr(tags, manual, //...)' 2>/dev/null)"
python3 - "$testlogs" "$bazel_rc" "$targets" "$fuzz_results" <<'PY'
import os, sys
import xml.etree.ElementTree as ET

root, bazel_rc, targets, fuzz = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), sys.argv[4]
passed = failed = skipped = 0
with open(fuzz) as f:
    for line in f:
        if line.split()[1:] == ["passed"]:
            passed += 1
        else:
            failed += 1
for label in targets:
    package, name = label.lstrip("/").split(":")
    path = os.path.join(root, package, name, "test.xml")
    try:
        tree = ET.parse(path)
    except (ET.ParseError, OSError):
        failed += 1  # a test that crashed before writing its report, or never ran
        continue
    for case in tree.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed += 1
        elif case.get("status") == "notrun" or case.find("skipped") is not None \
                or case.get("result") == "skipped":
            skipped += 1
        else:
            passed += 1
if bazel_rc != 0 and failed == 0:
    failed = 1  # a build failure or a test that wrote no report
print(f"{passed} passed, {failed} failed, {skipped} skipped")
sys.exit(0 if bazel_rc == 0 and failed == 0 else 1)
PY
