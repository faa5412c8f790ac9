"""LLaPor on the bundled model: depths 1-3 against the id-only predictor, the speculative gate and the
previous token, on the held-out prompts' decode tokens. Writes benchmarks/results/llapor_small_moe.json.

    .venv/bin/python -m duoserve_core.predict train --trace data/traces/small-moe-train.parquet --depth 3 \\
        --out /tmp/p3.safetensors
    .venv/bin/python benchmarks/llapor_eval.py --id-predictor /tmp/p3.safetensors

What it needs and makes, under --work (git-ignored reports/llapor/ by default; each step is skipped
when its file exists):

1. the bundled training and held-out prompts recorded again with hidden states, on the CPU as the
   committed traces were (their routing is identical, checked below): the training trace fits
   the 32-dimension PCA, the held-out trace is projected with that basis (~12 min each on 2 cores);
2. LLaPor, depth 3 (~4 min), and the ablation with the same MLPs on routing alone (--no-hidden).

The committed traces (data/traces/) are read, never written.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from duoserve_core import load  # noqa: E402
from duoserve_core.atomic import atomic_write_json  # noqa: E402
from duoserve_core.predict.data import from_trace  # noqa: E402
from duoserve_core.predict.layer_predictor import load_predictor  # noqa: E402
from duoserve_core.predict.llapor import (baseline_scores, id_predictor_scores, llapor_scores,  # noqa: E402
                                          load_hidden_traces, load_llapor, score_methods, train_llapor)
from duoserve_core.traces import read_prompts, read_trace, record, write_trace  # noqa: E402

MODEL = ROOT / "data" / "small-moe"
PROMPTS = {"train": ROOT / "data" / "prompts" / "prompts_train.txt",
           "heldout": ROOT / "data" / "prompts" / "prompts_heldout.txt"}
COMMITTED = {"train": ROOT / "data" / "traces" / "small-moe-train.parquet",
             "heldout": ROOT / "data" / "traces" / "small-moe-heldout.parquet"}
DEPTH = 3
DIMS = 32
NEW_TOKENS = 64  # as the committed traces were recorded


def _record(split: str, out: Path, basis_from: Path | None) -> None:
    if out.exists():
        return
    t0 = time.perf_counter()
    runtime = load(MODEL, device="cpu", quant="none", policy="resident")
    basis = read_trace(basis_from).meta.hidden_basis if basis_from else None
    df, meta = record(runtime, read_prompts(PROMPTS[split]), NEW_TOKENS, hidden_dims=None if basis else DIMS,
                      hidden_basis=basis)
    write_trace(out, df, meta)
    print(f"recorded {out} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


def _id_format(path: Path) -> str:
    with safe_open(path, framework="pt") as f:
        return (f.metadata() or {}).get("format", "?")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--id-predictor", required=True, help="the id-only predictor, depth 3 (python -m "
                        "duoserve_core.predict train --trace data/traces/small-moe-train.parquet --depth 3)")
    parser.add_argument("--work", default=str(ROOT / "reports" / "llapor"), help="traces and LLaPor files")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "llapor_small_moe.json"))
    parser.add_argument("--jobs", type=int, default=1, help="MLPs fitted in parallel")
    args = parser.parse_args()
    work = Path(args.work)
    traces = {s: work / f"small-moe-{s}-hidden.parquet" for s in ("train", "heldout")}
    _record("train", traces["train"], None)
    _record("heldout", traces["heldout"], traces["train"])
    for split, path in traces.items():  # the same routing as the committed traces: only the column is new
        same = np.array_equal(read_trace(path).expert_array(), read_trace(COMMITTED[split]).expert_array())
        if not same:
            print(f"warning: {path}'s routing differs from {COMMITTED[split]}", file=sys.stderr)
    files = {"llapor": work / "llapor-depth3.safetensors", "llapor_no_hidden": work / "llapor-nohidden-depth3.safetensors"}
    for name, path in files.items():
        if not path.exists():
            train_llapor([traces["train"]], depth=DEPTH, use_hidden=name == "llapor", jobs=args.jobs,
                         log=lambda m: print(m, file=sys.stderr)).save(path)

    test = read_trace(traces["heldout"])
    predictor = load_llapor(files["llapor"], expect=test.meta)
    ablation = load_llapor(files["llapor_no_hidden"], expect=test.meta)
    id_only = load_predictor(args.id_predictor, expect=test.meta)
    predictor.check_basis(test.meta.hidden_basis, str(traces["heldout"]))
    arrays, hidden, _ = load_hidden_traces([traces["heldout"]])
    keep = torch.from_numpy(arrays.phase == "decode")
    data, hidden = arrays.select(("decode",)), hidden[keep]
    methods = {"llapor": llapor_scores(predictor, data, hidden),
               "llapor_no_hidden": llapor_scores(ablation, data, hidden),
               "id_only": id_predictor_scores(id_only, data), **baseline_scores(data)}
    result = score_methods(data, methods, DEPTH)
    k = result["top_k"]
    table = [{"method": name, "depth": int(d), "exact_topk": round(r["overall"]["exact_topk"], 4),
              "half_correct": round(r["overall"]["half_correct"], 4),
              **{f"R@{m}": round(v, 4) for m, v in r["overall"]["recall_at"].items()}}
             for name, per_depth in result["methods"].items() for d, r in per_depth.items()]
    basis = test.meta.hidden_basis
    record_out = {
        "what": "next-layer expert prediction on the bundled model's held-out decode tokens, depths 1-3",
        "phase": "decode", "tokens": data.num_tokens, "requests": int(from_trace(test).requests),
        "train_trace": str(traces["train"].relative_to(ROOT) if traces["train"].is_relative_to(ROOT) else traces["train"]),
        "test_trace": str(traces["heldout"].relative_to(ROOT) if traces["heldout"].is_relative_to(ROOT) else traces["heldout"]),
        "routing_identical_to": {s: str(p.relative_to(ROOT)) for s, p in COMMITTED.items()},
        "hidden_state": {"dims": basis.dims, "hidden_size": basis.hidden_size, "basis": basis.fingerprint(),
                         "fitted_on": basis.fitted_on,
                         "variance_kept_per_layer": [round(float(v), 4) for v in basis.explained.sum(1)]},
        "predictors": {
            "llapor": {"file": files["llapor"].name, "hidden_sizes": {str(l): list(h) for l, h in predictor.hidden.items()},
                       "features": f"id features ({predictor.spec.num_features(8, 8)}) + {basis.dims} PCA dims"},
            "llapor_no_hidden": {"file": files["llapor_no_hidden"].name,
                                 "features": "id features only; LLaPor's MLPs otherwise"},
            "id_only": {"file": str(args.id_predictor), "format": _id_format(Path(args.id_predictor)),
                        "hidden": list(id_only.hidden)},
        },
        "notes": [f"R@m: recall of each method's m best-scored experts per layer (equal bytes at equal m); "
                  f"top-{k}", "speculative_gate holds only its top-k guesses (spec_experts), so its R@3 and R@4 "
                  "add the lowest-id experts and mean nothing; it exists at depth 1 only"],
        "table": table, "result": result,
    }
    atomic_write_json(args.out, record_out)
    print(f"{'method':<18}{'depth':>6}{'exact':>8}{'half':>8}{'R@2':>8}{'R@3':>8}{'R@4':>8}")
    for row in table:
        print(f"{row['method']:<18}{row['depth']:>6}{row['exact_topk']:>8.3f}{row['half_correct']:>8.3f}"
              f"{row['R@2']:>8.3f}{row['R@3']:>8.3f}{row['R@4']:>8.3f}")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
