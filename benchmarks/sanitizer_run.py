"""The tiny model through every policy on the GPU, for compute-sanitizer (memcheck, racecheck, synccheck).

    compute-sanitizer --tool racecheck python3 benchmarks/sanitizer_run.py

Small on purpose (sanitizers slow kernels 10-100x) but it exercises every path of the runtime: the copy
stream and its events, slot reuse under a budget of a few slots, prefetch, eviction, NF4 and bf16.
Exits non-zero if any policy's tokens differ from the all-resident run's.
"""

from __future__ import annotations

import duoserve_core

PROMPT = list(range(3, 40))


def main() -> int:
    for quant in ("nf4", "bf16"):
        rt = duoserve_core.load("synthetic:tiny", device="cuda", quant=quant, policy="resident", max_context=128)
        want = rt.generate(prompt_ids=PROMPT, max_new_tokens=12, stop_at_eos=False).tokens
        tight = rt.plan.fixed_bytes + 3 * rt.format.nbytes
        for policy, kw in (("on-demand", {}), ("lru-speculative", {}), ("uniform", {}),
                           ("duoserve", dict(speculative_gate=True, predictor_threshold=0.3))):
            rt.configure(policy=policy, memory_budget=tight, **kw)
            got = rt.generate(prompt_ids=PROMPT, max_new_tokens=12, stop_at_eos=False).tokens
            print(f"{quant} {policy}: {'same tokens' if got == want else 'TOKENS DIFFER'}")
            if got != want:
                return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
