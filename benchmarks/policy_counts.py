"""Decode misses, prefetches and bytes of each policy on the bundled model: counts, not timings.

    python benchmarks/policy_counts.py --out benchmarks/results/policy_counts_small_moe.json

Counts are exact and device-independent (the schedule does not change the tokens or the routing),
so this runs on any CPU; what they cost in time is the GPU benchmark's job.
"""

from __future__ import annotations

import argparse
import datetime

import duoserve_core
from duoserve_core.atomic import atomic_write_json

MODEL, PREDICTOR = "data/small-moe", "data/predictors/small-moe-depth2.safetensors"
PROMPTS = ["Return the file system representation for path. If the object is a str or bytes object, then",
           "The following functions are available in the module for working with",
           "If the optional argument is given, the result is"]
CONFIGS = {
    "on-demand": dict(policy="on-demand"),
    "lru-speculative": dict(policy="lru-speculative"),
    "duoserve predictor t=0.3": dict(policy="duoserve", predictor=PREDICTOR, predictor_threshold=0.3),
    "duoserve predictor t=0.6": dict(policy="duoserve", predictor=PREDICTOR, predictor_threshold=0.6),
    "duoserve gate + predictor t=0.6": dict(policy="duoserve", predictor=PREDICTOR, predictor_threshold=0.6,
                                            speculative_gate=True),
    # the full-size benchmark's setting: the gate for the next layer, no trained predictor
    "duoserve gate t=0.8": dict(policy="duoserve", predictor_threshold=0.8, speculative_gate=True),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--gen", type=int, default=48)
    args = p.parse_args()
    ref = duoserve_core.load(MODEL, device="cpu", quant="nf4", policy="resident", max_context=256)
    expected = [ref.generate(t, max_new_tokens=args.gen, stop_at_eos=False).tokens for t in PROMPTS]
    rows = []
    for slots in (8, 16, 32):
        budget = ref.plan.fixed_bytes + slots * ref.format.nbytes
        for label, kw in CONFIGS.items():
            rt = duoserve_core.load(MODEL, device="cpu", quant="nf4", memory_budget=budget, max_context=256, **kw)
            total = dict.fromkeys(("misses", "hits", "prefetches", "prefetch_hits", "prefetch_wasted", "h2d_copies"), 0)
            for text, tokens in zip(PROMPTS, expected):
                r = rt.generate(text, max_new_tokens=args.gen, stop_at_eos=False)
                assert r.tokens == tokens, (label, slots)
                for k in total:
                    total[k] += r.phases["decode"][k]
            rows.append({"slots": slots, "config": label, **total})
            print(f"{slots:3d} slots  {label:32s} misses {total['misses']:5d}  copies {total['h2d_copies']:5d}  "
                  f"prefetch hits {total['prefetch_hits']:5d} / {total['prefetches']:5d}")
    atomic_write_json(args.out, {"date": datetime.date.today().isoformat(), "device": "cpu (counts only)",
                                 "command": f"python benchmarks/policy_counts.py --out {args.out}",
                                 "model": MODEL, "decode_tokens_per_prompt": args.gen - 1, "prompts": PROMPTS,
                                 "rows": rows})


if __name__ == "__main__":
    main()
