# Sourced by the GPU stage scripts (benchmarks/*_gpu.sh) on a lent GPU machine: installs the carried
# bitsandbytes wheel (.whl/, from ../shared/tools/device-wheels.sh), makes $OUT, and sets TAG to the
# GPU's short name (h100, h200, ...) for result file names.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1)
TAG=$(echo "$GPU" | grep -oiE 'h100|h200|a100|l40s|b200' | head -n1 | tr 'A-Z' 'a-z'); TAG=${TAG:-gpu}
# The batch, multi-GPU and host-overhead stages' routing: the mixtral-like preset, seed 1, 64 requests of a
# 512-token prompt and 128 tokens (request i of a run replays trace request i), made once per machine.
MIXTRAL_LIKE_TRACE=/tmp/mixtral_like_64.parquet
mixtral_like_trace() {
  [[ -f $MIXTRAL_LIKE_TRACE ]] || timeout 120 python3 -m duoserve_core.traces synth --preset mixtral-like --seed 1 \
      --requests 64 --tokens 128 --prompt-len 512 --out "$MIXTRAL_LIKE_TRACE" --force > /dev/null
}
