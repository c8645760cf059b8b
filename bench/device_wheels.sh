#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels the GPU machine lacks, for Python 3.12 on x86-64; the
# device tool carries .whl (name it in `carry`) and bench/device_check.sh installs them first.
#   nvidia-cutlass: CUTLASS/CuTe headers for the sm90 CUDA kernels (a build requirement).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "nvidia-cutlass==4.2.0.0"
ls -la .whl
