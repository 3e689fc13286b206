#!/usr/bin/env bash
# Installs PyTorch into the given interpreter's environment, choosing the build for this machine:
# a CUDA build when an NVIDIA GPU answers, otherwise the CPU build. `pip install torch==2.13.0` finds the CPU wheel
# on the local disk of our CI machines; elsewhere the CPU index of pytorch.org serves it. An open `torch` range would
# pull a several-GB CUDA build onto a CPU-only machine, so torch is installed here first and pinned exactly.
set -euo pipefail
PY=${1:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
if "$PY" -c "import torch" 2>/dev/null; then
  exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "tunelab: NVIDIA GPU found, installing the CUDA build of torch"
  "$PY" -m pip install -q "torch"
else
  echo "tunelab: no CUDA GPU, installing the CPU build of torch==$TORCH_VERSION"
  "$PY" -m pip install -q "torch==$TORCH_VERSION" 2>/dev/null \
    || "$PY" -m pip install -q "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
fi
