#!/usr/bin/env bash
# Configures and builds ranktune into build/ (Release). Extra arguments go to cmake, e.g.
# -DCMAKE_CUDA_ARCHITECTURES=90a or -DRANKTUNE_CUDA=OFF.
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=${RANKTUNE_BUILD_DIR:-build}
cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release "$@"
cmake --build "$build_dir" -j "$(nproc)"
