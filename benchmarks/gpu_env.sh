# Sourced by the GPU stage scripts (benchmarks/*_gpu.sh) on a lent GPU machine: installs the carried
# bitsandbytes wheel (.whl/, from ../shared/tools/device-wheels.sh), makes $OUT, and sets TAG to the
# GPU's short name (h100, h200, ...) for result file names.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1)
TAG=$(echo "$GPU" | grep -oiE 'h100|h200|a100|l40s|b200' | head -n1 | tr 'A-Z' 'a-z'); TAG=${TAG:-gpu}
