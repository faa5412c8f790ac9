#!/usr/bin/env bash
# Where a decode token's host time goes on the GPU machine: cProfile of one short bench run per policy
# (synthesized Mixtral-8x7B NF4 at 15%, mixtral-like routing, prompt 512, 32 tokens, no repeats).
#   bash benchmarks/diagnostics/profile_decode_gpu.sh [POLICY ...]      (device run with carry [".whl"])
set -uo pipefail
source benchmarks/gpu_env.sh
timeout 60 python3 -m duoserve_core.traces synth --preset mixtral-like --seed 1 --requests 2 --tokens 32 --prompt-len 512 \
    --out /tmp/ml.parquet --force > /dev/null
for policy in "${@:-duoserve on-demand}"; do
  timeout 150 python3 -m cProfile -o "$OUT/prof_$policy.out" -m duoserve_core.bench --model synthetic:mixtral-8x7b \
      --quant nf4 --quant-attention nf4 --memory-budget 15% --prompt-len 512 --gen 32 --repeats 1 --policies "$policy" \
      --routing-trace /tmp/ml.parquet --out "$OUT/bench_prof_$policy.json" > "$OUT/prof_$policy.log" 2>&1
  tail -2 "$OUT/prof_$policy.log"
  python3 -c "import pstats,sys; pstats.Stats(sys.argv[1]).sort_stats('tottime').print_stats(22)" "$OUT/prof_$policy.out" \
      | tail -30 | cut -c1-150
done
