#!/usr/bin/env bash
# Wheels for benchmarks/device_check.py on a GPU machine without network: megatron-core and
# its pure dependencies for that machine's Python (default 3.12; torch is already there),
# and Muon's packages.
#   bash benchmarks/fetch_device_wheels.sh [PYTHON_VERSION] [FOLDER]
set -euo pipefail
PY=${1:-3.12}
DEST=${2:-"$(dirname "$0")/../.whl"}
python -m pip download --only-binary=:all: --no-deps --python-version "$PY" -d "$DEST" \
  "megatron-core==0.16.1" numpy "packaging>=24.2"
# megatron-core's Muon for device_check.py's check f (pure Python; it declares Python 3.12+)
python -m pip download --only-binary=:all: --no-deps --python-version "$PY" -d "$DEST" \
  "emerging-optimizers==0.3.0" absl-py
echo "wheels in $DEST: carry this folder to the GPU machine next to the working tree"
