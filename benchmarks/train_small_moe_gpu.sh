#!/usr/bin/env bash
# One call on the lent GPU: train the bundled small MoE, pack it for the trip back ($OUT takes
# files of at most 16 MiB), and time a GPU forward of it. Needs data/corpus carried along.
set -euo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -m lab.smallmoe.train --corpus data/corpus --out /tmp/small-moe 2>&1 | tee "$OUT/train.log" | tail -40
tar -C /tmp -czf /tmp/small-moe.tgz small-moe
split -b 15M /tmp/small-moe.tgz "$OUT/small-moe.tgz.part-"
ls -la "$OUT"
# Predictor hot-path timing on this GPU, when a predictor was carried along in .carry/.
if [ -f .carry/pred_old.safetensors ]; then
  python3 -m duoserve_core.predict bench --predictor .carry/pred_old.safetensors --device cuda 2>&1 | tee "$OUT/predictor_bench_cuda.txt" | tail -6
  python3 -m duoserve_core.predict bench --predictor .carry/pred_old.safetensors --device cuda --batch 8 2>&1 | tail -2
fi
