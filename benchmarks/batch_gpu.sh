#!/usr/bin/env bash
# Issue 14 on the GPU machine: continuous batching, throughput by batch size and latency under arrivals.
# Synthesized Mixtral-8x7B, NF4 experts and attention, 15% at batch 1 (+ the batch's KV caches), prompt 512,
# context prompt + GEN, routing replayed from a mixtral-like trace (request i replays trace request i).
#   bash benchmarks/batch_gpu.sh STAGE...   stages: check, calibrate, batch, arrivals, gap, serve   (carry [".whl"]; serve also
#   ".whl-serve": the FastAPI, Starlette, uvicorn, pydantic and opentelemetry-api wheels the GPU image lacks);
#   notebook: notebook NB (07_serving_qos unless set; NB_TIMEOUT 560 s) on the GPU without Jupyter (benchmarks/notebook_cells.py),
#   carrying ".whl-cells" (or the same wheels inside ".whl", under 64 MiB with the tree): IPython,
#   ipywidgets, plotly and their pure-Python needs, about 12 MB; NB_THEN sets knobs after the first cell). Fetch them with
#   ../shared/tools/device-wheels.sh's pip line into .whl-cells (or .whl-serve) instead of .whl:
#   cells: asttokens comm executing ipython ipython_pygments_lexers ipywidgets matplotlib-inline pexpect plotly
#          prompt_toolkit ptyprocess pure_eval stack-data traitlets wcwidth (the versions of .venv)
#   serve: fastapi starlette uvicorn pydantic pydantic_core annotated-types typing-inspection opentelemetry-api
# GEN (32), POLICIES (on-demand,lru,duoserve), BATCHES (1,4,16,64), RATES (0.5,1,2), REQUESTS (24),
# BATCH_TIMEOUT (400 s per policy), ARRIVALS_TIMEOUT (560 s), MAXB (16), SCHEDULES (mixed), SLO ("--slo-ttft-ms 2000 --slo-tpot-ms 500") override the bench's settings;
# a bench cut by its timeout gets SIGABRT, and python's faulthandler writes every thread's stack into its log
# (where a run was stuck, if it was: batched runs with the CPU lane hung on 2026-12-02; benchmarks/diagnostics/lane_stall.py);
# TIMELINES=1: the batch stage also writes each row's timeline under $OUT/timelines; GRAPHS (1, the GPU's default since
# 2026-12-01): the calibrate, batch and arrivals stages run with --cuda-graphs (decode steps' dense part replayed from
# CUDA graphs), their files named ..._graphs; GRAPHS=0 runs them eagerly (--no-cuda-graphs), files without the suffix.
# CPU_EXPERTS=auto (CPU_THREADS, 16): the batch and arrivals stages with the CPU lane (--cpu-experts), files ..._cpu_auto;
# with NF4 experts auto sends none to the host (its NF4 kernel is far slower than a copy): QUANT=int4 (files ..._int4) is
# the format the lane computes. Each stage has its own timeout and log under $OUT; a table last.
# A run cut by its timeout keeps the rows it finished in NAME.partial.json beside its --out (BATCHES=64,16,4,1
# measures the row that matters most first).
set -uo pipefail
source benchmarks/gpu_env.sh
GEN=${GEN:-32}; POLICIES=${POLICIES:-on-demand,lru,duoserve}; BATCHES=${BATCHES:-1,4,16,64}
RATES=${RATES:-0.5,1,2}; REQUESTS=${REQUESTS:-24}; MAXB=${MAXB:-16}; SCHEDULES=${SCHEDULES:-mixed}
SLO=${SLO:---slo-ttft-ms 2000 --slo-tpot-ms 500}
NB=${NB:-notebooks/07_serving_qos.ipynb}
if [ "${GRAPHS:-1}" = 1 ]; then GRAPH_FLAG=--cuda-graphs; GRAPH_SUFFIX=_graphs; else GRAPH_FLAG=--no-cuda-graphs; GRAPH_SUFFIX=; fi
# per policy in the batch stage (one short warm-up and one full run per batch size): batches 1,4,16,64 at GEN=128 take
# about 4-5 minutes (batch 64: 64 prefills of about 0.5 s, then 128 steps of about 0.5 s); one policy per device call there
BATCH_TIMEOUT=${BATCH_TIMEOUT:-400}; ARRIVALS_TIMEOUT=${ARRIVALS_TIMEOUT:-560}
QUANT=${QUANT:-nf4}
COMMON=(--model synthetic:mixtral-8x7b --quant "$QUANT" --quant-attention nf4 --memory-budget 15% --prompt-len 512
        --routing-trace "$MIXTRAL_LIKE_TRACE" "$GRAPH_FLAG"
        ${CPU_EXPERTS:+--cpu-experts "$CPU_EXPERTS" --cpu-threads "${CPU_THREADS:-16}"})
SUFFIX=$([ "$QUANT" = nf4 ] || echo "_$QUANT")${CPU_EXPERTS:+_cpu_$CPU_EXPERTS}$GRAPH_SUFFIX
for stage in "$@"; do
echo "== $stage ($(date +%T))"
case $stage in
check)
  timeout 200 python3 -m pytest -q -x tests/test_gpu.py -k "batched or cudnn" > "$OUT/check.log" 2>&1; tail -2 "$OUT/check.log" ;;
calibrate)
  # the simulator's H200 terms, batched decode attention included (device_time.attention_rows), about 30 s
  timeout 300 python3 -m duoserve_core.calibrate --model synthetic:mixtral-8x7b --quant "$QUANT" --quant-attention nf4 \
      "$GRAPH_FLAG" --out "$OUT/calibration_${TAG}_mixtral-8x7b_$QUANT$GRAPH_SUFFIX.json" --force > "$OUT/calibrate.log" 2>&1
  tail -3 "$OUT/calibrate.log" ;;
batch)
  mixtral_like_trace
  for policy in ${POLICIES//,/ }; do
    timeout -s ABRT "$BATCH_TIMEOUT" python3 -X faulthandler -m duoserve_core.bench "${COMMON[@]}" --gen "$GEN" --repeats 1 --policies "$policy" \
        --max-batch "$BATCHES" ${TIMELINES:+--timelines "$OUT/timelines"} \
        --out "$OUT/batch_${TAG}_8x7b_mixtral_like_$policy$SUFFIX.json" > "$OUT/batch_$policy.log" 2>&1
    tail -n +1 "$OUT/batch_$policy.log" | grep -v "^wrote" | tail -5
    ls "$OUT"/batch_*_"$policy".partial.json 2>/dev/null | sed 's/^/cut by BATCH_TIMEOUT, rows kept: /' || true
  done ;;
arrivals)
  mixtral_like_trace
  timeout -s ABRT "$ARRIVALS_TIMEOUT" python3 -X faulthandler -m duoserve_core.bench "${COMMON[@]}" --gen "$GEN" --policies "$POLICIES" --arrival-rate "$RATES" \
      --requests "$REQUESTS" --max-batch "$MAXB" --prefill-schedule "$SCHEDULES" $SLO \
      --out "$OUT/arrivals_${TAG}_8x7b_mixtral_like_${SCHEDULES//,/_}$SUFFIX.json" \
      > "$OUT/arrivals.log" 2>&1; tail -8 "$OUT/arrivals.log"
  ls "$OUT"/arrivals_*.partial.json 2>/dev/null | sed "s/^/cut by the timeout, rows kept: /" || true ;;
gap)
  # where a batched decode step spends time that the single-request path does not (on 2026-12-01: cuDNN plan builds):
  # the same request through generate and through generate_many at B 1 and 4, both policies, with timelines
  mixtral_like_trace
  timeout 150 python3 -m duoserve_core.bench "${COMMON[@]}" --gen "$GEN" --repeats 1 --policies duoserve,on-demand \
      --timelines "$OUT/timelines" --out "$OUT/gap_${TAG}_generate.json" > "$OUT/gap_generate.log" 2>&1
  timeout 240 python3 -m duoserve_core.bench "${COMMON[@]}" --gen "$GEN" --repeats 1 --policies duoserve,on-demand \
      --max-batch 1,4 --timelines "$OUT/timelines" --out "$OUT/gap_${TAG}_batch.json" > "$OUT/gap_batch.log" 2>&1
  python3 benchmarks/step_split_table.py "$OUT"/gap_*.json || tail -3 "$OUT"/gap_*.log ;;
notebook)
  if [[ -d .whl-cells ]]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl-cells/*.whl \
      || exit 1
  fi
  nb=$(basename "$NB" | cut -c1-2)
  timeout "${NB_TIMEOUT:-560}" python3 -X faulthandler benchmarks/notebook_cells.py "$NB" ${NB_THEN:+--then "$NB_THEN"} \
      --out "$OUT/notebook${nb}_cells_$TAG.json" > "$OUT/notebook$nb.log" 2>&1; echo "exit $?" >> "$OUT/notebook$nb.log"
  tail -14 "$OUT/notebook$nb.log" ;;
serve)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl-serve/*.whl \
    || exit 1
  timeout 300 python3 benchmarks/serve_smoke.py --device cuda --requests 6 --max-tokens 32 \
      --out "$OUT/serve_smoke_$TAG.json" > "$OUT/serve.log" 2>&1; tail -9 "$OUT/serve.log" ;;
esac
done
