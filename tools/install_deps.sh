#!/usr/bin/env bash
# Installs what ranktune builds with, from Debian's packages (nothing is downloaded at build time).
# The GPU path also needs the CUDA toolkit (nvcc, cuBLAS, NCCL) under /usr/local/cuda; without it
# ranktune builds the CPU path only.
set -euo pipefail
packages=(build-essential cmake ninja-build pkg-config libopenmpi-dev openmpi-bin libhdf5-dev hdf5-tools
          libyaml-cpp-dev nlohmann-json3-dev libgtest-dev libpcre2-dev python3 python3-matplotlib
          slurmctld slurmd slurm-client munge)  # the slurm test's local cluster (tools/slurm_local.sh)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if [ -x /usr/local/cuda/bin/nvcc ]; then
  echo "CUDA toolkit: $(/usr/local/cuda/bin/nvcc --version | tail -2 | head -1)"
else
  echo "no CUDA toolkit at /usr/local/cuda: building the CPU path only"
fi
