#!/usr/bin/env bash
# The core-seams issue's GPU check: the refactored runtime (one layer step, events, PolicyKnobs) on a GPU.
#   bash benchmarks/seams_gpu.sh
# 1. the GPU tests and the correctness tests on CUDA; 2. the headline bench (synthesized Mixtral-8x7B NF4,
# 15%, prompt 512, 128 tokens, bundled trace's routing, duoserve = gate at 0.8), whose copies must equal
# the committed run's (benchmarks/results/bench_h200_8x7b_trace_gate.json: same decisions), then a table.
# bitsandbytes travels as a wheel in .whl/ (../shared/tools/device-wheels.sh). Results in $OUT.
set -uo pipefail
source benchmarks/gpu_env.sh
echo "== GPU tests ($(date +%T))"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_correctness.py \
    tests/test_predict.py::test_cuda_graph_replay_equals_eager > "$OUT/pytest_gpu_seams_$TAG.log" 2>&1
tail -3 "$OUT/pytest_gpu_seams_$TAG.log"
echo "== headline bench ($(date +%T))"
timeout 420 python3 -m duoserve_core.bench --model synthetic:mixtral-8x7b --quant nf4 --quant-attention nf4 \
    --memory-budget 15% --prompt-len 512 --gen 128 --repeats 1 \
    --policies duoserve,uniform,on-demand,lru-speculative,resident --speculative-gate --predictor-threshold 0.8 \
    --prefetch-depth 2 --routing-trace data/traces/small-moe-heldout.parquet \
    --out "$OUT/bench_${TAG}_8x7b_trace_gate_seams.json" > "$OUT/bench_seams_$TAG.log" 2>&1
tail -8 "$OUT/bench_seams_$TAG.log"
python3 - "$OUT/bench_${TAG}_8x7b_trace_gate_seams.json" benchmarks/results/bench_h200_8x7b_trace_gate.json <<'PY'
import json, sys
now, then = (json.load(open(p)) for p in sys.argv[1:3])
print(f"{'policy':<16} {'copies now':>10} {'committed':>10} {'same':>5} {'TTFT ms now':>11} {'was':>7} {'TPOT ms now':>11} {'was':>7}")
for name, r in now["results"].items():
    c = then["results"].get(name)
    if c is None:
        continue
    same = (r["h2d_copies"], r["expert_hits"], r["tokens"]) == (c["h2d_copies"], c["expert_hits"], c["tokens"])
    print(f"{name:<16} {r['h2d_copies']:>10} {c['h2d_copies']:>10} {str(same):>5} {r['ttft_s']*1e3:>11.1f} "
          f"{c['ttft_s']*1e3:>7.1f} {(r['tpot_s'] or 0)*1e3:>11.2f} {(c['tpot_s'] or 0)*1e3:>7.2f}")
PY
