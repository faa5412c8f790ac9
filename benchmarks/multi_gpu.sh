#!/usr/bin/env bash
# Issue 16 on the two-GPU machine (kind nvidia-h200-x2): one GPU against two, and a calibration with both links.
# Synthesized Mixtral-8x7B, NF4 experts and attention, 15% of the model per GPU, prompt 512, mixtral-like routing.
#   bash benchmarks/multi_gpu.sh STAGE...   stages: check, calibrate, single, batch, big   (carry [".whl"])
# big: synthesized Mixtral-8x22B (its own router: random routing), duoserve, one GPU against two.
# GEN (64), REPEATS (3), POLICIES (on-demand,lru,duoserve), BATCH (64), BGEN (32), SETUPS ("1,15% 2,15% 1,30%":
# GPUs,budget per GPU), SINGLE_TIMEOUT (300 s per setup), BIG_GEN (16), BIG_REPEATS (1), BIG_TIMEOUT (200 s per GPU
# count) override the settings. At GEN=128 a setup of three policies takes about 5 minutes on one GPU (give
# SINGLE_TIMEOUT=560 and one setup per device call: SETUPS="1,15%"); 8x22B at BIG_GEN=128 BIG_REPEATS=3 about 9.
# Each stage has its own timeout and log under $OUT; a table last.
set -uo pipefail
source benchmarks/gpu_env.sh
GEN=${GEN:-64}; REPEATS=${REPEATS:-3}; POLICIES=${POLICIES:-on-demand,lru,duoserve}; BATCH=${BATCH:-64}; BGEN=${BGEN:-32}
SINGLE_TIMEOUT=${SINGLE_TIMEOUT:-300}; BIG_GEN=${BIG_GEN:-16}; BIG_REPEATS=${BIG_REPEATS:-1}; BIG_TIMEOUT=${BIG_TIMEOUT:-200}
SETUPS=${SETUPS:-1,15% 2,15% 1,30%}; TIMELINES=${TIMELINES:-}  # TIMELINES=1: each policy's timeline under $OUT
COMMON=(--model synthetic:mixtral-8x7b --quant nf4 --quant-attention nf4 --prompt-len 512 --routing-trace "$MIXTRAL_LIKE_TRACE")
for stage in "$@"; do
echo "== $stage ($(date +%T))"
case $stage in
check)
  timeout 300 python3 -m pytest -q -x tests/test_gpu.py -k "two_gpus or batched" > "$OUT/check.log" 2>&1; tail -3 "$OUT/check.log" ;;
calibrate)
  timeout 420 python3 -m duoserve_core.calibrate --model synthetic:mixtral-8x7b --quant nf4 --quant-attention nf4 \
      --gpus 2 --out "$OUT/calibration_${TAG}x2_mixtral-8x7b_nf4.json" --force > "$OUT/calibrate.log" 2>&1
  tail -4 "$OUT/calibrate.log" ;;
single)
  mixtral_like_trace
  for setup in $SETUPS; do
    set -- ${setup/,/ }
    timeout "$SINGLE_TIMEOUT" python3 -m duoserve_core.bench "${COMMON[@]}" --gpus "$1" --memory-budget "$2" --gen "$GEN" \
        --repeats "$REPEATS" --policies "$POLICIES" ${TIMELINES:+--timelines "$OUT"} \
        --out "$OUT/multi_${TAG}_8x7b_mixtral_like_${1}gpu_${2%\%}.json" > "$OUT/single_${1}gpu_${2%\%}.log" 2>&1
    echo "-- $1 GPU(s), $2 each"; grep -v "^wrote" "$OUT/single_${1}gpu_${2%\%}.log" | tail -6
  done ;;
batch)
  mixtral_like_trace
  for gpus in 1 2; do
    timeout 240 python3 -m duoserve_core.bench "${COMMON[@]}" --gpus "$gpus" --memory-budget 15% --gen "$BGEN" \
        --repeats 1 --policies duoserve --max-batch "$BATCH" \
        --out "$OUT/multi_batch_${TAG}_8x7b_mixtral_like_${gpus}gpu.json" > "/tmp/batch_${gpus}gpu.log" 2>&1
    echo "-- batch $BATCH on $gpus GPU(s)"; grep -v "^wrote" "/tmp/batch_${gpus}gpu.log" | tail -4
  done ;;
big)
  for gpus in 1 2; do
    timeout "$BIG_TIMEOUT" python3 -m duoserve_core.bench --model synthetic:mixtral-8x22b --quant nf4 --quant-attention nf4 \
        --prompt-len 512 --gpus "$gpus" --memory-budget 15% --gen "$BIG_GEN" --repeats "$BIG_REPEATS" --policies duoserve \
        --out "$OUT/multi_${TAG}_8x22b_synth_${gpus}gpu.json" > "/tmp/big_${gpus}gpu.log" 2>&1
    echo "-- 8x22B on $gpus GPU(s)"; grep -v "^wrote" "/tmp/big_${gpus}gpu.log" | tail -3
  done ;;
esac
done
