#!/usr/bin/env bash
# Installs, builds (warnings are errors) and runs every test: cpu and mpi tests everywhere, gpu
# tests where there is a GPU (they skip with a message elsewhere). Extra arguments go to ctest,
# e.g. -L gpu.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install_deps.sh
bash tools/build.sh -DRANKTUNE_WERROR=ON
build_dir=${RANKTUNE_BUILD_DIR:-build}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0
ctest --test-dir "$build_dir" --output-on-failure -j 2 "$@"
