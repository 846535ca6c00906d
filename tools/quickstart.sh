#!/usr/bin/env bash
# Quick start: install, build, show the detected set-up, and train the quickstart model
# (jobs/configs/quickstart.yaml) on the GPU if there is one, else on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install_deps.sh
bash tools/build.sh -DRANKTUNE_TESTS=OFF
build_dir=${RANKTUNE_BUILD_DIR:-build}
"$build_dir/ranktune" env
"$build_dir/ranktune" train jobs/configs/quickstart.yaml "$@"
