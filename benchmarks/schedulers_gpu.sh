#!/usr/bin/env bash
# The schedulers issue's GPU runs, one stage per device call (each fits the 10-minute limit):
#   bash benchmarks/schedulers_gpu.sh headline    # GPU tests, calibration, accelerate peer, every policy (trace routing)
#   bash benchmarks/schedulers_gpu.sh more        # trained predictor, synthesized routing, Mixtral-8x22B, the sweep
#   bash benchmarks/schedulers_gpu.sh notebooks   # every notebook executed on the GPU (needs .whl-nb, see below)
#   bash benchmarks/schedulers_gpu.sh extra       # notebook 05, synthesized routing, 8x22B duoserve/uniform repeated
#   bash benchmarks/schedulers_gpu.sh sanitizer   # compute-sanitizer memcheck / racecheck / synccheck, tiny model
# Mixtral-8x7B NF4 (experts and attention), budget 15% of the model, prompt 512, 128 new tokens.
# File names carry the GPU (h100, h200, ...); results land in $OUT (JSON, timelines as Parquet, logs):
# copy them to benchmarks/results/. bitsandbytes travels as a wheel in .whl/ (../shared/tools/device-wheels.sh);
# the notebook stage also needs the Jupyter packages the GPU image lacks, as wheels in .whl-nb/.
set -uo pipefail
source benchmarks/gpu_env.sh
mkdir -p "$OUT/timelines"
MODEL=(--model synthetic:mixtral-8x7b --quant nf4 --quant-attention nf4 --memory-budget 15%)
TRACE=data/traces/small-moe-heldout.parquet
PREDICTOR=data/predictors/small-moe-x32-depth2.safetensors   # trained on the same replay, 32 layers
DUO=(--speculative-gate --predictor-threshold 0.8 --prefetch-depth 2)
POLICIES=duoserve,uniform,on-demand,lru-speculative,resident
nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.max,pcie.link.width.max --format=csv,noheader
python3 -c "import torch, transformers, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'bnb', bitsandbytes.__version__)"
stage() { echo "== $1 ($(date +%T))"; }

case "${1:-}" in
headline)
  stage "GPU tests"
  python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_correctness.py \
      tests/test_predict.py::test_cuda_graph_replay_equals_eager 2>&1 | tee "$OUT/pytest_gpu_$TAG.log" | tail -4
  stage calibrate
  python3 -m duoserve_core.calibrate --model synthetic:mixtral-8x7b --quant nf4 --quant-attention nf4 --device auto \
      --out "$OUT/calibration_${TAG}_8x7b_nf4.json" 2>&1 | tail -3
  stage "accelerate peer"
  python3 benchmarks/accelerate_peer.py --preset mixtral-8x7b --num-layers 4 --budget 3997356441 \
      --prompt-len 512 --gen 8 --out "$OUT/accelerate_peer_$TAG.json" 2>&1 | tail -2
  stage "every policy, routing of the bundled trace, duoserve = gate"
  python3 -m duoserve_core.bench "${MODEL[@]}" --prompt-len 512 --gen 128 --repeats 1 --policies $POLICIES "${DUO[@]}" \
      --routing-trace $TRACE --peer "$OUT/accelerate_peer_$TAG.json" --timelines "$OUT/timelines" \
      --out "$OUT/bench_${TAG}_8x7b_trace_gate.json"
  tar -C "$OUT" -czf "$OUT/timelines.tar.gz" timelines && rm -r "$OUT/timelines" ;;
more)
  stage "duoserve and uniform with the trained predictor (gate for l+1, predictor for l+2)"
  python3 -m duoserve_core.bench "${MODEL[@]}" --prompt-len 512 --gen 128 --repeats 1 --policies duoserve,uniform \
      "${DUO[@]}" --predictor-threshold 0.9 --routing-trace $TRACE --predictor $PREDICTOR \
      --out "$OUT/bench_${TAG}_8x7b_trace_predictor.json" 2>&1 | tail -4
  stage "Mixtral-8x22B, all 56 layers, routing of the bundled trace"
  python3 -m duoserve_core.bench --model synthetic:mixtral-8x22b --quant nf4 --quant-attention nf4 --memory-budget 15% \
      --prompt-len 512 --gen 32 --repeats 1 --policies duoserve,uniform,on-demand,lru-speculative "${DUO[@]}" \
      --routing-trace $TRACE --out "$OUT/bench_${TAG}_8x22b_trace_gate.json" 2>&1 | tail -7
  stage "sweep: prompt lengths, budgets, depth x threshold"
  python3 -m duoserve_core.bench --sweep "${MODEL[@]}" --prompt-len 512 --gen 16 --repeats 1 \
      --policies duoserve,on-demand "${DUO[@]}" --routing-trace $TRACE \
      --prompt-lens 128,2048 --budgets 8slots,15%,all --depths 1,3 --thresholds 0.6,0.9 \
      --out "$OUT/sweep_${TAG}_8x7b_trace.json" 2>&1 | tail -3 ;;
notebooks)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl-nb/*.whl \
    || exit 1
  export JUPYTER_PATH=/tmp/site/share/jupyter PATH=/tmp/site/bin:$PATH
  stage "every notebook, headless, on the GPU"
  python3 -m lab.notebook_runner --out "$OUT/nb" --summary "$OUT/notebooks_$TAG.json" 2>&1 | tee "$OUT/notebooks_$TAG.log"
  tar -C "$OUT/nb" -czf "$OUT/notebooks_${TAG}_ipynb.tar.gz" $(cd "$OUT/nb" && ls *.ipynb)
  tar -C "$OUT/nb" -czf "$OUT/notebooks_${TAG}_html.tar.gz" $(cd "$OUT/nb" && ls *.html); rm -rf "$OUT/nb" ;;
extra)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl-nb/*.whl \
    || exit 1
  export JUPYTER_PATH=/tmp/site/share/jupyter PATH=/tmp/site/bin:$PATH
  stage "notebook 05 on the GPU"
  python3 -m lab.notebook_runner notebooks/05_decode_prefetch_cache.ipynb --out "$OUT/nb" \
      --summary "$OUT/notebook05_$TAG.json" 2>&1 | grep notebook; rm -rf "$OUT/nb"
  stage "every policy, synthesized routing"
  python3 -m duoserve_core.bench "${MODEL[@]}" --prompt-len 512 --gen 128 --repeats 1 --policies $POLICIES "${DUO[@]}" \
      --peer "benchmarks/results/accelerate_peer_$TAG.json" --record-trace "$OUT/routing_synth_$TAG.parquet" \
      --out "$OUT/bench_${TAG}_8x7b_synth.json" 2>&1 | tail -8
  stage "Mixtral-8x22B: duoserve and uniform, median of 3"
  python3 -m duoserve_core.bench --model synthetic:mixtral-8x22b --quant nf4 --quant-attention nf4 --memory-budget 15% \
      --prompt-len 512 --gen 32 --repeats 3 --policies duoserve,uniform "${DUO[@]}" \
      --routing-trace $TRACE --out "$OUT/bench_${TAG}_8x22b_trace_gate_repeats.json" 2>&1 | tail -4 ;;
sanitizer)
  for tool in memcheck racecheck synccheck; do
    timeout 150 compute-sanitizer --tool $tool --error-exitcode 9 python3 benchmarks/sanitizer_run.py \
        > "$OUT/sanitizer_$tool.log" 2>&1
    echo "compute-sanitizer $tool: exit $? ($(grep -c 'ERROR SUMMARY: 0 errors' "$OUT/sanitizer_$tool.log") clean summaries)"
    tail -2 "$OUT/sanitizer_$tool.log"
  done ;;
*) echo "usage: $0 headline|more|notebooks|extra|sanitizer"; exit 2 ;;
esac
