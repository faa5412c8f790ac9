#!/usr/bin/env bash
# Issue 12's GPU check of the decode policy: synthesized Mixtral-8x7B NF4 (experts and attention) at 15%,
# prompt 512, 128 tokens, median of 3, duoserve (default knobs) against on-demand and lru, on two routings:
# the mixtral-like synthetic preset (no gate: synthetic routing has no router to guess with) and the
# bundled trace (duoserve with its recorded speculative gate). Results in $OUT; a table last.
#   bash benchmarks/decode_gpu.sh [mixtral-like|trace|all]      (device run with carry [".whl"])
set -uo pipefail
source benchmarks/gpu_env.sh
COMMON=(--model synthetic:mixtral-8x7b --quant nf4 --quant-attention nf4 --memory-budget 15% --prompt-len 512 --gen 128
        --repeats 3 --policies duoserve,on-demand,lru)
STAGE=${1:-all}   # mixtral-like, trace or all: one routing per device call keeps each under 10 minutes
if [[ $STAGE != trace ]]; then
echo "== mixtral-like routing ($(date +%T))"
timeout 60 python3 -m duoserve_core.traces synth --preset mixtral-like --seed 1 --requests 2 --tokens 128 --prompt-len 512 \
    --out /tmp/mixtral_like.parquet --force | tail -2
timeout 500 python3 -m duoserve_core.bench "${COMMON[@]}" --routing-trace /tmp/mixtral_like.parquet \
    --out "$OUT/bench_${TAG}_8x7b_mixtral_like_decode.json" > "$OUT/bench_mixtral_like.log" 2>&1
tail -4 "$OUT/bench_mixtral_like.log"
fi
if [[ $STAGE != mixtral-like ]]; then
echo "== bundled trace routing, duoserve with the gate ($(date +%T))"
timeout 500 python3 -m duoserve_core.bench "${COMMON[@]}" --speculative-gate --routing-trace data/traces/small-moe-heldout.parquet \
    --out "$OUT/bench_${TAG}_8x7b_trace_gate_decode.json" > "$OUT/bench_trace_gate.log" 2>&1
tail -4 "$OUT/bench_trace_gate.log"
fi
ls "$OUT"/bench_*_decode.json >/dev/null 2>&1 && python3 - "$OUT"/bench_*_decode.json <<'PY'
import json, sys
for path in sys.argv[1:]:
    r = json.load(open(path))["results"]
    best = min(r[p]["tpot_s"] for p in ("on-demand", "lru") if p in r)
    print(path.split("/")[-1], {k: round(v["tpot_s"] * 1e3, 2) for k, v in r.items()},
          "duoserve/best", round(r["duoserve"]["tpot_s"] / best, 3), "TTFT/floor", round(r["duoserve"]["ttft_over_floor"], 3))
PY
