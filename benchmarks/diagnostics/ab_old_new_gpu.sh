#!/usr/bin/env bash
# A/B on the GPU: the working tree's duoserve_core against an older revision's, same bench, same machine,
# one after the other (the old code in .old/, carried: mkdir .old && git archive REV duoserve_core | tar -x -C .old;
# device run with carry [".whl", ".old"]). Used for the core-seams refactor: same copies, times within noise.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1
ROOT=$PWD
ARGS="--model synthetic:mixtral-8x7b --quant nf4 --quant-attention nf4 --memory-budget 15% --prompt-len 512 --gen 64 --repeats 3 --policies duoserve,uniform,on-demand --speculative-gate --predictor-threshold 0.8 --prefetch-depth 2 --routing-trace $ROOT/data/traces/small-moe-heldout.parquet"
for v in new old; do
  if [ $v = old ]; then cd $ROOT/.old; else cd $ROOT; fi
  echo "== $v $(date +%T)"
  PYTHONPATH=/tmp/site:$PWD timeout 280 python3 -m duoserve_core.bench $ARGS --out $OUT/ab_$v.json > $OUT/ab_$v.log 2>&1
  tail -4 $OUT/ab_$v.log
  python3 -c "
import json; r=json.load(open('$OUT/ab_$v.json'))['results']
for k,v in r.items(): print(k, v['h2d_copies'], round(v['ttft_s']*1e3,1), round(v['tpot_s']*1e3,2), [round(x,2) for x in v['repeats_e2e_s']])"
done
