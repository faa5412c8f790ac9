#!/usr/bin/env bash
# The schedulers issue's H100 runs, one stage per device call (each fits the 10-minute limit):
#   bash benchmarks/schedulers_gpu.sh compare-synth   # accelerate peer + every policy, synthesized routing
#   bash benchmarks/schedulers_gpu.sh compare-trace   # every policy, routing replayed from the bundled trace
#   bash benchmarks/schedulers_gpu.sh gate-and-sweep  # calibration, every policy with the gate only, then the sweep
#   bash benchmarks/schedulers_gpu.sh sweep           # prompt lengths, budgets, depth x threshold
#   bash benchmarks/schedulers_gpu.sh extra           # Mixtral-8x22B (16 layers), compute-sanitizer, GPU tests
# Mixtral-8x7B NF4 (experts and attention), budget 15% of the model, prompt 512, 128 new tokens.
# Results land in $OUT (JSON, timelines as Parquet, logs); copy them to benchmarks/results/.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/timelines"
MODEL=(--model synthetic:mixtral-8x7b --quant nf4 --quant-attention nf4 --memory-budget 15%)
TRACE=data/traces/small-moe-heldout.parquet
PREDICTOR=data/predictors/small-moe-x32-depth2.safetensors   # trained on the same replay, 32 layers
DUO=(--speculative-gate --predictor-threshold 0.8 --prefetch-depth 2)
POLICIES=duoserve,uniform,on-demand,lru-speculative,resident
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'bnb', bitsandbytes.__version__)"

case "${1:-}" in
compare-synth)
  python3 benchmarks/accelerate_peer.py --preset mixtral-8x7b --num-layers 4 --budget 3997356441 \
      --prompt-len 512 --gen 8 --out "$OUT/accelerate_peer_h100.json" 2>&1 | tail -3
  python3 -m duoserve_core.bench "${MODEL[@]}" --prompt-len 512 --gen 128 --repeats 2 --policies $POLICIES "${DUO[@]}" \
      --peer "$OUT/accelerate_peer_h100.json" --timelines "$OUT/timelines" --record-trace "$OUT/routing_synth.parquet" \
      --out "$OUT/bench_h100_8x7b_synth.json" ;;
compare-trace)
  python3 -m duoserve_core.bench "${MODEL[@]}" --prompt-len 512 --gen 128 --repeats 2 --policies $POLICIES "${DUO[@]}" \
      --routing-trace $TRACE --predictor $PREDICTOR --peer benchmarks/results/accelerate_peer_h100.json \
      --timelines "$OUT/timelines" --out "$OUT/bench_h100_8x7b_trace.json" ;;
gate-and-sweep)
  python3 -m duoserve_core.calibrate --model synthetic:mixtral-8x7b --quant nf4 --quant-attention nf4 --device auto \
      --out "$OUT/calibration_h100_8x7b_nf4.json" 2>&1 | tail -4
  # duoserve with the speculative gate only (no trained predictor) on the replayed routing, then the sweep
  python3 -m duoserve_core.bench "${MODEL[@]}" --prompt-len 512 --gen 128 --repeats 1 \
      --policies duoserve,uniform,on-demand,lru-speculative "${DUO[@]}" --routing-trace $TRACE \
      --peer benchmarks/results/accelerate_peer_h100.json --timelines "$OUT/timelines" \
      --out "$OUT/bench_h100_8x7b_trace_gate.json"
  bash "$0" sweep-only ;;
sweep|sweep-only)
  python3 -m duoserve_core.bench --sweep "${MODEL[@]}" --prompt-len 512 --gen 16 --repeats 1 \
      --policies duoserve,on-demand "${DUO[@]}" --routing-trace $TRACE --predictor $PREDICTOR \
      --prompt-lens 128,2048 --budgets 8slots,15%,all --depths 1,2 \
      --thresholds 0.6,0.9 --out "$OUT/sweep_h100_8x7b_trace.json" ;;
extra)
  python3 -m duoserve_core.bench --model synthetic:mixtral-8x22b --num-layers 16 --quant nf4 --quant-attention nf4 \
      --memory-budget 15% --prompt-len 512 --gen 32 --repeats 1 --policies duoserve,uniform,on-demand,lru-speculative \
      "${DUO[@]}" --routing-trace $TRACE --out "$OUT/bench_h100_8x22b_16layers_trace.json"
  for tool in memcheck racecheck synccheck; do
    compute-sanitizer --tool $tool --error-exitcode 9 python3 benchmarks/sanitizer_run.py > "$OUT/sanitizer_$tool.log" 2>&1
    echo "compute-sanitizer $tool: exit $? ($(grep -c 'ERROR SUMMARY: 0 errors' "$OUT/sanitizer_$tool.log") clean summaries)"
    tail -2 "$OUT/sanitizer_$tool.log"
  done ;;
*) echo "usage: $0 compare-synth|compare-trace|sweep|extra"; exit 2 ;;
esac
