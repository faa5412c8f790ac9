#!/usr/bin/env bash
# Issue 13 on the GPU machine: the CPU lane's costs and decode with --cpu-experts off/auto.
# Synthesized Mixtral-8x7B, int4 experts (the format both lanes compute from), NF4 attention, 15%,
# prompt 512, mixtral-like routing. Each step has its own timeout and log under $OUT; a table last.
#   bash benchmarks/cpu_lane_gpu.sh STAGE...   stages: costs check splitcheck bandwidth calibrate off auto sweep gil relayout stall   (carry [".whl"])
# gil: benchmarks/diagnostics/lane_gil.py at each of THREADS (a list: 16,15); relayout: benchmarks/diagnostics/relayout_cost.py;
# stall: benchmarks/diagnostics/lane_stall.py's cases (STALL_CASES, STALL_TIMEOUT 110 s each).
# sweep: benchmarks/cpu_lane_sweep.py --measure (threads 4/8/16 x budgets 8 slots, 15%, 64 slots;
# POLICIES; GEN_SWEEP tokens, 32 unless set; THREADS_SWEEP, BUDGETS_SWEEP, SWEEP_TIMEOUT (560 s); one run a cell), rows kept as they come.
# GEN (128), REPEATS (3), POLICIES (on-demand,lru,duoserve), THREADS (16) override the bench's settings;
# BENCH_TIMEOUT (560 s; then SIGABRT: faulthandler prints every thread's stack to the log);
# GRAPHS=1 adds --cuda-graphs (the host-overhead cut) to the benches and the calibration ("..._int4_graphs.json"). Files: ..._cpu_off[_graphs].json, ..._cpu_auto_t<threads>[_graphs].json.
# BUDGET (15%) for off/auto (files get _b<budget> when set: BUDGET=64slots is where auto lost with duoserve on 2026-12-02);
# TIMELINES=1 writes each run's timeline under $OUT/timelines (benchmarks/step_split_table.py reads the result files).
# GC_LOG=1: the benches log each garbage collection over GC_LOG_MS (5) ms into their logs (benchmarks/diagnostics/gc_site).
# SPLIT=F: records laid out so that the lane may share one expert a layer (--cpu-split F; files get _s<F*100>);
# bandwidth: benchmarks/diagnostics/host_bandwidth.py (the lane and the copies against host memory bandwidth);
# splitcheck: tests/test_split_int4.py's GPU tests (a reassembled slot is the unsplit slot; shared experts on the GPU).
set -uo pipefail
source benchmarks/gpu_env.sh
GEN=${GEN:-128}; REPEATS=${REPEATS:-3}; POLICIES=${POLICIES:-on-demand,lru,duoserve}; THREADS=${THREADS:-16}
GRAPHS=${GRAPHS:-}
lscpu | grep -E "Model name|^CPU\(s\)|Core|Socket|NUMA node\(s\)" > "$OUT/lscpu.txt"
trace() {
  [[ -f /tmp/mixtral_like.parquet ]] || timeout 60 python3 -m duoserve_core.traces synth --preset mixtral-like --seed 1 \
      --requests 2 --tokens 128 --prompt-len 512 --out /tmp/mixtral_like.parquet --force > /dev/null
}
for stage in "$@"; do
echo "== $stage ($(date +%T))"
case $stage in
costs)
  timeout 240 python3 benchmarks/cpu_lane_costs.py --formats int4 --threads 4,8,16 --out "$OUT/cpu_lane_costs_${TAG}.json" \
      > "$OUT/costs.log" 2>&1; tail -4 "$OUT/costs.log" ;;
bandwidth)  # the lane and the copies against host memory bandwidth (benchmarks/diagnostics/host_bandwidth.py)
  timeout 200 python3 benchmarks/diagnostics/host_bandwidth.py --threads "$THREADS" --share "${SPLIT:-0.85}" \
      --json "$OUT/host_bandwidth_${TAG}_t$THREADS.json" > "$OUT/bandwidth_t$THREADS.log" 2>&1; tail -8 "$OUT/bandwidth_t$THREADS.log" ;;
splitcheck)
  timeout 240 python3 -m pytest -q -x tests/test_split_int4.py -k "reassembled or gpu" > "$OUT/splitcheck.log" 2>&1
  tail -2 "$OUT/splitcheck.log" ;;
check)
  timeout 300 python3 -m pytest -q -x tests/test_stream_gate.py tests/test_int4_format.py tests/test_gpu.py -k "cuda or held or gpu" \
      > "$OUT/check.log" 2>&1; tail -2 "$OUT/check.log" ;;
calibrate)
  timeout 400 python3 -m duoserve_core.calibrate --model synthetic:mixtral-8x7b --quant int4 --quant-attention nf4 \
      --formats nf4 --max-tokens 512 --cpu-threads 4,8,16 --repeats 3 ${GRAPHS:+--cuda-graphs} \
      --out "$OUT/${TAG}_mixtral-8x7b_int4${GRAPHS:+_graphs}.json" --quiet \
      > "$OUT/calibrate.log" 2>&1; tail -2 "$OUT/calibrate.log" ;;
sweep)
  timeout "${SWEEP_TIMEOUT:-560}" python3 benchmarks/cpu_lane_sweep.py --measure --gen "${GEN_SWEEP:-32}" --policies "$POLICIES" \
      --threads "${THREADS_SWEEP:-4,8,16}" --budgets "${BUDGETS_SWEEP:-8slots,15%,64slots}" \
      --out "$OUT/cpu_lane_sweep_${TAG}.json" --force > "$OUT/sweep.log" 2>&1; tail -14 "$OUT/sweep.log" ;;
gil)
  for t in ${THREADS//,/ }; do  # THREADS may be a list here: 16,15
    timeout 120 python3 benchmarks/diagnostics/lane_gil.py --threads "$t" --intervals 0.0001 --repeats 9 > "$OUT/gil_t$t.log" 2>&1
    head -5 "$OUT/gil_t$t.log" | tail -4
  done ;;
stall)  # STALL_CASES: "mode:order:batch" items (benchmarks/diagnostics/lane_stall.py), each under its own timeout
  for case in ${STALL_CASES:-half:new:1 half:old:1 auto:new:1 half:new:4}; do
    IFS=: read -r mode order batch <<< "$case"
    timeout -s ABRT "${STALL_TIMEOUT:-110}" python3 -X faulthandler benchmarks/diagnostics/lane_stall.py --mode "$mode" \
        --order "$order" --batch "$batch" --threads "$THREADS" > "$OUT/stall_${mode}_${order}_b$batch.log" 2>&1
    echo "$case: exit $?; $(grep -E '^(batch|done)' "$OUT/stall_${mode}_${order}_b$batch.log" | tr '\n' ' ')"
  done ;;
relayout)
  timeout 240 python3 benchmarks/diagnostics/relayout_cost.py --json "$OUT/relayout_cost_${TAG}.json" \
      > "$OUT/relayout.log" 2>&1; tail -14 "$OUT/relayout.log" ;;
off|auto)
  trace
  name=cpu_$stage; [[ $stage == auto ]] && name+=_t$THREADS; [[ -n $GRAPHS ]] && name+=_graphs; [[ -n ${BUDGET:-} ]] && name+=_b${BUDGET%\%}; [[ -n ${SPLIT:-} ]] && name+=_s$(python3 -c "print(round(${SPLIT} * 100))")
  env ${GC_LOG:+PYTHONPATH=$PWD/benchmarks/diagnostics/gc_site:$PYTHONPATH} \
  timeout -s ABRT "${BENCH_TIMEOUT:-560}" python3 -X faulthandler -m duoserve_core.bench --model synthetic:mixtral-8x7b --quant int4 --quant-attention nf4 \
      --memory-budget "${BUDGET:-15%}" --prompt-len 512 --gen "$GEN" --repeats "$REPEATS" --policies "$POLICIES" --cpu-experts $stage \
      --cpu-threads "$THREADS" --routing-trace /tmp/mixtral_like.parquet ${GRAPHS:+--cuda-graphs} ${SPLIT:+--cpu-split $SPLIT} \
      ${TIMELINES:+--timelines "$OUT/timelines"} \
      --out "$OUT/bench_${TAG}_8x7b_int4_mixtral_like_$name.json" --force > "$OUT/bench_$name.log" 2>&1
  tail -4 "$OUT/bench_$name.log"; grep -c "^gc:" "$OUT/bench_$name.log" | sed 's/^/collections over GC_LOG_MS: /' ;;
esac
done
ls "$OUT"/bench_*_cpu_*.json >/dev/null 2>&1 && python3 benchmarks/step_split_table.py "$OUT"/bench_*_cpu_*.json \
  && python3 benchmarks/step_split_table.py --runs "$OUT"/bench_*_cpu_*.json
ls "$OUT"/bench_*_cpu_*.json >/dev/null 2>&1 && python3 - "$OUT"/bench_*_cpu_*.json <<'PY'
import json, sys
for path in sys.argv[1:]:
    r = json.load(open(path))["results"]
    print(path.split("/")[-1])
    for k, v in r.items():
        print(f"  {k:>10}: TPOT {v['tpot_s'] * 1e3:6.1f} ms  TTFT {v['ttft_s'] * 1e3:6.0f} ms  host computes {v['host_computes']:5d}"
              f"  copies {v['h2d_copies']:5d}  tokens[:6] {v['tokens'][:6]}")
PY
