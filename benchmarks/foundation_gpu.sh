#!/usr/bin/env bash
# What one call on the lent GPU runs for the foundation issue: GPU tests, then the 8x7B run.
# bitsandbytes travels as a wheel in .whl/ (../shared/tools/device-wheels.sh).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'bnb', bitsandbytes.__version__)"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_correctness.py 2>&1 | tee "${OUT:-/tmp}/pytest_gpu.log" | tail -15
python3 benchmarks/foundation_gpu.py --out "${OUT:-/tmp}/foundation_h100.json" "$@" 2>&1 | tee "${OUT:-/tmp}/bench.log" | tail -20
