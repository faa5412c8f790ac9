#!/usr/bin/env bash
# Issue 13's first item on the GPU machine: the host overhead of a decode token, with and without the
# decode steps' dense part replayed from CUDA graphs (``--cuda-graphs``, ``duoserve_core/decode_graph.py``; the
# GPU's default since 2026-12-01: the eager rows pass ``--no-cuda-graphs``).
# Synthesized Mixtral-8x7B, NF4 experts and attention, prompt 512, mixtral-like routing.
#   bash benchmarks/host_overhead_gpu.sh STAGE...   stages: check, profile, resident, offloaded, routing   (carry [".whl"])
# check: the graph (decode, slot, predictor) and attention GPU tests; profile: profile_step.py at 4 layers, resident, eager then graphs;
# resident: every expert resident (40 GiB), TPOT eager and with graphs (the target: at most 1.5x the GPU's
# compute time, which the run's timeline gives); offloaded: duoserve and on-demand at 15%, eager and with graphs;
# routing: the device-routing GPU tests, then resident with graphs, routed on the device (the default) and on the host.
# GEN (64) and REPEATS (3) override the bench's settings. Each stage has its own timeout and log under $OUT.
set -uo pipefail
source benchmarks/gpu_env.sh
GEN=${GEN:-64}; REPEATS=${REPEATS:-3}
COMMON=(--model synthetic:mixtral-8x7b --quant nf4 --quant-attention nf4 --prompt-len 512 --gen "$GEN"
        --repeats "$REPEATS" --routing-trace "$MIXTRAL_LIKE_TRACE")
for stage in "$@"; do
echo "== $stage ($(date +%T))"
case $stage in
check)
  timeout 240 python3 -m pytest -q tests/test_decode_graph.py tests/test_gpu.py tests/test_calibrate.py tests/test_predict.py \
      -k "graph or cudnn or transformers or batched or attention" > "$OUT/check.log" 2>&1; tail -3 "$OUT/check.log" ;;
profile)
  for graphs in "" --cuda-graphs; do
    timeout 200 python3 benchmarks/diagnostics/profile_step.py --policy resident --quant-attention nf4 --prompt-len 512 \
        "${graphs:---no-cuda-graphs}" > "$OUT/profile_resident${graphs:+_graphs}.log" 2>&1
    grep -E "^timeline|decode compute" "$OUT/profile_resident${graphs:+_graphs}.log"
  done ;;
resident)
  mixtral_like_trace
  for graphs in "" --cuda-graphs; do
    timeout 280 python3 -m duoserve_core.bench "${COMMON[@]}" --memory-budget 40GiB --policies resident "${graphs:---no-cuda-graphs}" \
        --out "$OUT/host_${TAG}_resident${graphs:+_graphs}.json" > "$OUT/resident${graphs:+_graphs}.log" 2>&1
    grep -v "^wrote" "$OUT/resident${graphs:+_graphs}.log" | tail -4
  done ;;
offloaded)
  mixtral_like_trace
  for graphs in "" --cuda-graphs; do
    timeout 280 python3 -m duoserve_core.bench "${COMMON[@]}" --memory-budget 15% --policies duoserve,on-demand "${graphs:---no-cuda-graphs}" \
        --out "$OUT/host_${TAG}_offloaded${graphs:+_graphs}.json" > "$OUT/offloaded${graphs:+_graphs}.log" 2>&1
    grep -v "^wrote" "$OUT/offloaded${graphs:+_graphs}.log" | tail -5
  done ;;
routing)
  timeout 200 python3 -m pytest -q tests/test_device_routing.py tests/test_decode_graph.py tests/test_gpu.py \
      -k "routing or graph or timeline" > "$OUT/routing_check.log" 2>&1; tail -3 "$OUT/routing_check.log"
  mixtral_like_trace
  for routing in device host; do  # the default, then --no-device-routing
    timeout 240 python3 -m duoserve_core.bench "${COMMON[@]}" --memory-budget 40GiB --policies resident \
        "$([[ $routing == device ]] && echo --device-routing || echo --no-device-routing)" \
        --out "$OUT/host_overhead_${TAG}_8x7b_resident_${routing}_routing.json" > "$OUT/resident_${routing}_routing.log" 2>&1
    grep -v "^wrote" "$OUT/resident_${routing}_routing.log" | tail -4
  done ;;
esac
done
