#!/usr/bin/env bash
# GPU checks for a CUDA machine, a few minutes in all: the kernel tests on the GPU (Triton kernels
# against their plain-torch twins), the kernel and step benchmarks, and a short training run.
# Wheels in .whl/ (e.g. omegaconf, which the device image lacks) are installed to /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
status=0
$PY -m pytest -q -p no:cacheprovider tests/kernels tests/model || status=1
$PY benchmarks/kernels.py --repeats 10 || status=1
$PY benchmarks/step.py --repeats 10 || status=1
$PY benchmarks/gpu_train.py --steps 300 || status=1
exit $status
