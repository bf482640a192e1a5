#!/usr/bin/env bash
# Runs a Python test of tests/ with Debian's Python (which has PyTorch) and
# the ecsnap package from the runfiles.
set -euo pipefail
root="$TEST_SRCDIR/ecsnap"
export PYTHONPATH="$root/client/python:$root/tests/python"
export PYTHONUNBUFFERED=1
exec /usr/bin/python3 "$root/$1"
