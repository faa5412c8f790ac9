"""What notebook 01 runs: load a model, generate under a policy and budget, summarise the cost."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

import duoserve_core
from duoserve_core.policy import DEFAULT_KNOBS, PolicyKnobs

from .paths import BUNDLED_MODEL, BUNDLED_PREDICTOR, default_device


@dataclass
class QuickRun:
    runtime: duoserve_core.Runtime
    result: duoserve_core.GenerationResult

    def summary(self) -> pd.DataFrame:
        r, plan = self.result, self.runtime.plan
        rows = {
            "device": r.device, "policy": r.policy["policy"],
            "expert slots": f"{plan.num_slots} of {plan.total_experts}",
            "TTFT (ms)": round(r.ttft_s * 1e3, 2), "TPOT (ms)": round((r.tpot_s or 0) * 1e3, 2),
            "experts copied": r.h2d_copies, "bytes copied": r.h2d_bytes,
            "hits / misses": f"{r.expert_hits} / {r.expert_misses}",
            "prefetched (used)": f"{r.phases['decode']['prefetches']} ({r.phases['decode']['prefetch_hits']})",
        }
        return pd.DataFrame({"value": rows})


def quick_run(prompt: str, *, model: str = BUNDLED_MODEL, policy: str = "duoserve", slots: int = 16,
              prefetch_depth: int = DEFAULT_KNOBS.prefetch_depth, threshold: float = DEFAULT_KNOBS.predictor_threshold,
              gate: bool = True, max_new_tokens: int = 24, device: str | None = None) -> QuickRun:
    """Generate with ``slots`` expert slots left after everything else the budget must hold. The
    bundled model's predictor and the speculative gate (``gate``) serve the policies that use them."""
    device = device or default_device()
    probe = duoserve_core.load(model, device=device, quant="nf4", max_context=256)
    budget = probe.plan.fixed_bytes + slots * probe.format.nbytes
    knobs = PolicyKnobs(policy=policy, predictor=BUNDLED_PREDICTOR if model == BUNDLED_MODEL else None,
                        prefetch_depth=prefetch_depth, predictor_threshold=threshold, speculative_gate=gate)
    runtime = duoserve_core.load(model, device=device, quant="nf4", max_context=256, memory_budget=budget,
                                 knobs=knobs.effective())
    runtime.warm_up()  # on a GPU: the first launch's costs stay out of the figures
    result = runtime.generate(prompt, max_new_tokens=max_new_tokens, stop_at_eos=False)
    return QuickRun(runtime, result)
