#!/usr/bin/env bash
# One command from a fresh Debian 12 machine to a running ecsnap: installs the
# packages that are missing, builds everything, then runs the main job.
# Idempotent: a second run installs nothing and rebuilds only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

deploy/install_deps.sh
echo "setup: building //..."
bazel build //...
echo "setup: built. Running the main job (deploy/demo.sh):"
deploy/demo.sh
