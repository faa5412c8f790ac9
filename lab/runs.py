"""Live, instrumented runs for notebooks 04 and 05: a model, a budget in expert slots, a policy, a prompt.

``live_run`` loads the chosen model under the knobs, generates, and keeps everything the figures
need: the result, the stream timeline, every cache decision (``CacheLog``) and the bounds of the
run (``duoserve_core.bench.bounds``: transfer floor, compute floor, Belady's loads for decode).
One loaded model is reconfigured for every run (``Runtime.configure``: new slots, policy and an
empty cache), so no run starts with experts another left behind and no knob change reloads the model.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field

import pandas as pd

import duoserve_core
from duoserve_core.bench import bounds
from duoserve_core.memory import MemoryPlan
from duoserve_core.policy import DEFAULT_KNOBS, PolicyKnobs, policy_class
from duoserve_core.timeline import COLUMNS as TIMELINE_COLUMNS
from duoserve_core.units import format_bytes

from .cache_log import CacheLog
from .paths import BUNDLED_MODEL, BUNDLED_PREDICTOR, DATA, default_device

HELDOUT_TRACE = str(DATA / "traces" / "small-moe-heldout.parquet")
HELDOUT_PROMPTS = DATA / "prompts" / "prompts_heldout.txt"


@dataclass(frozen=True)
class ModelChoice:
    """A model the notebooks can run, with what it needs to be served by every policy."""

    label: str
    model: str
    num_layers: int | None = None
    routing_trace: str | None = None   # routing replayed from a trace (synthesized weights)
    predictor: str | None = None       # a predictor of the same shape (layers, experts, top-k)
    gpu_only: bool = False
    quant: str = "nf4"                 # the experts' format (int4: the one the CPU lane computes fast)

    def load(self, **kw) -> duoserve_core.Runtime:
        with warnings.catch_warnings():
            # the bundled predictor serves the synthetic model's trace routing: same shape, other name
            warnings.filterwarnings("ignore", message="predictor .* was trained on traces of")
            return duoserve_core.load(self.model, quant=self.quant, num_layers=self.num_layers,
                                      routing_trace=self.routing_trace, **kw)


BUNDLED = ModelChoice("small-moe (bundled, trained; 8 layers x 8 experts)", BUNDLED_MODEL,
                      predictor=BUNDLED_PREDICTOR)
MIXTRAL_8_LAYERS = ModelChoice(
    "Mixtral-8x7B experts, first 8 layers (synthesized weights, routing of the bundled trace)",
    "synthetic:mixtral-8x7b", num_layers=8, routing_trace=HELDOUT_TRACE, predictor=BUNDLED_PREDICTOR, gpu_only=True)
MIXTRAL_8_LAYERS_INT4 = ModelChoice(  # notebook 05's live CPU lane: the format with a fast host kernel
    "Mixtral-8x7B experts in int4, first 8 layers (synthesized weights, routing of the bundled trace)",
    "synthetic:mixtral-8x7b", num_layers=8, routing_trace=HELDOUT_TRACE, predictor=BUNDLED_PREDICTOR, gpu_only=True,
    quant="int4")
MODELS = (BUNDLED, MIXTRAL_8_LAYERS)


def model_choices(device: str | None = None) -> dict[str, ModelChoice]:
    """Label -> model for a dropdown: full-size experts only where there is a GPU to move them to."""
    gpu = (device or default_device()).startswith("cuda")
    return {m.label: m for m in MODELS if gpu or not m.gpu_only}


def default_model(device: str | None = None) -> ModelChoice:
    """Mixtral-size experts on a GPU (where copies take real time), the bundled model on a CPU."""
    return MIXTRAL_8_LAYERS if (device or default_device()).startswith("cuda") else BUNDLED


@functools.lru_cache(maxsize=2)
def shared_runtime(choice: ModelChoice, device: str, max_context: int) -> duoserve_core.Runtime:
    """One loaded model per (model, device, context), reconfigured for every run
    (``Runtime.configure``): a knob change costs a run, not a reload of every expert."""
    runtime = choice.load(device=device, max_context=max_context, memory_budget=None, policy="on-demand")
    runtime.warm_up()  # on a GPU the first run would otherwise time kernel loading, not the schedule
    return runtime


def _plan(choice: ModelChoice, device: str, max_context: int) -> tuple[int, int, int, int]:
    """(fixed bytes, bytes per expert, experts in the model, top-k): what a budget in slots needs.
    Fixed bytes (weights, KV cache, activations) do not depend on the budget."""
    runtime = shared_runtime(choice, device, max_context)
    plan = runtime.plan
    return plan.fixed_bytes, plan.expert_bytes, plan.total_experts, runtime.config.num_experts_per_tok


def budget_bytes(choice: ModelChoice, slots: int, device: str, max_context: int) -> int:
    """The memory budget that leaves exactly ``slots`` expert slots after everything else."""
    fixed, expert, _, _ = _plan(choice, device, max_context)
    return fixed + slots * expert


def model_shape(choice: ModelChoice, device: str, max_context: int = 256) -> dict:
    fixed, expert, total, top_k = _plan(choice, device, max_context)
    return {"fixed_bytes": fixed, "expert_bytes": expert, "total_experts": total, "top_k": top_k}


@functools.lru_cache(maxsize=1)
def _heldout_ids() -> tuple[int, ...]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(BUNDLED_MODEL)
    text = " ".join(HELDOUT_PROMPTS.read_text().split("\n"))
    return tuple(tokenizer(text)["input_ids"])


def prompt_ids(n: int, offset: int = 0) -> list[int]:
    """``n`` tokens of the held-out prompts (bundled tokenizer; valid ids for every model here)."""
    ids = _heldout_ids()
    return list(ids[offset:offset + n])


@functools.lru_cache(maxsize=4)
def _warm_up(choice: ModelChoice, device: str, max_context: int) -> None:
    """The first forward of a process pays one-off costs (kernel selection, lazy initialisation);
    run one before anything is measured."""
    runtime = shared_runtime(choice, device, max_context)
    runtime.configure(policy="on-demand", memory_budget=budget_bytes(choice, 8, device, max_context))
    runtime.generate(prompt_ids=prompt_ids(16), max_new_tokens=2, stop_at_eos=False)


@dataclass
class LiveRun:
    """One generation under one setting of the knobs, with all its instruments."""

    choice: ModelChoice
    knobs: dict
    runtime: duoserve_core.Runtime   # shared and reconfigured by later runs: read ``plan``, not runtime.plan
    plan: MemoryPlan                 # this run's memory plan (slots, bytes)
    result: duoserve_core.GenerationResult
    rows: list[dict]
    log: CacheLog
    bounds: dict = field(default_factory=dict)

    @property
    def timeline(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=TIMELINE_COLUMNS)

    @property
    def slots(self) -> int:
        return self.plan.num_slots

    @property
    def device(self) -> str:
        return self.result.device

    @property
    def decode_tokens(self) -> int:
        return len(self.result.tokens) - 1

    def label(self) -> str:
        k = self.knobs
        text = f"{k['policy']}, {self.slots} slots"
        if "predictor_threshold" in policy_class(k["policy"]).uses:
            text += f", depth {k['depth']}, threshold {k['threshold']:.2f}" + (", gate" if k["gate"] else "")
        return text


def live_run(choice: ModelChoice = BUNDLED, *, policy: str = "duoserve", slots: int = 16,
             depth: int = DEFAULT_KNOBS.prefetch_depth, threshold: float = DEFAULT_KNOBS.predictor_threshold, gate: bool = True, prompt_tokens: int = 32, new_tokens: int = 24,
             device: str | None = None, prompt_offset: int = 0, cpu_experts: str = "off",
             cpu_threads: int | None = None) -> LiveRun:
    """Generate ``new_tokens`` after ``prompt_tokens`` held-out tokens under the knobs, greedily.

    ``new_tokens=1`` is a prefill alone. ``gate`` (the speculative gate for layer l+1) and the
    predictor apply to the predicting policies only. ``cpu_experts``/``cpu_threads``: the CPU lane
    (``policy.host_lane``; on a CPU device ``auto`` is off, the forced modes run).
    """
    device = device or default_device()
    max_context = max(256, prompt_tokens + new_tokens)
    _warm_up(choice, device, max_context)
    knobs = PolicyKnobs(policy=policy, predictor=choice.predictor, prefetch_depth=depth, predictor_threshold=threshold,
                        speculative_gate=gate, cpu_experts=cpu_experts,
                        cpu_threads=cpu_threads).effective()  # what the policy does not use is left at its default
    runtime = shared_runtime(choice, device, max_context)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="predictor .* was trained on traces of")
        runtime.configure(memory_budget=budget_bytes(choice, slots, device, max_context), knobs=knobs)
    log = CacheLog().attach(runtime)
    log.start()
    result = runtime.generate(prompt_ids=prompt_ids(prompt_tokens, prompt_offset), max_new_tokens=new_tokens,
                              stop_at_eos=False)
    log.detach()
    rows = runtime.timeline.rows()
    shown = dict(policy=policy, slots=slots, depth=depth, threshold=threshold, gate=knobs.speculative_gate,
                 prompt_tokens=prompt_tokens, new_tokens=new_tokens, cpu_experts=cpu_experts, cpu_threads=cpu_threads)
    run = LiveRun(choice, shown, runtime, runtime.plan, result, rows, log)
    run.bounds = bounds(rows, run.plan.num_slots, run.plan.expert_bytes, run.decode_tokens, devices=run.plan.devices)
    return run


def device_note(device: str) -> str:
    """One sentence on what the device's times mean, for the top of a notebook."""
    if device.startswith("cuda"):
        import torch

        return (f"Running on **{torch.cuda.get_device_name(device)}**: copies run on their own CUDA stream, "
                "so the timelines show real overlap of copies with computation.")
    return ("Running on the **CPU** with the bundled model: every count (copies, hits, misses, wasted prefetches, "
            "slots held, bytes) is exact, but copies are synchronous memcpys here, so nothing overlaps and times "
            "say little about scheduling. Overlap needs a GPU; the committed GPU measurements below show it.")


def describe_budget(choice: ModelChoice, slots: int, device: str, max_context: int = 256) -> str:
    s = model_shape(choice, device, max_context)
    return (f"{slots} of {s['total_experts']} expert slots: {format_bytes(slots * s['expert_bytes'])} of experts "
            f"on top of {format_bytes(s['fixed_bytes'])} for everything else "
            f"(budget {format_bytes(s['fixed_bytes'] + slots * s['expert_bytes'])})")


__all__ = ["BUNDLED", "MIXTRAL_8_LAYERS", "MIXTRAL_8_LAYERS_INT4", "LiveRun", "ModelChoice", "budget_bytes", "default_model", "describe_budget",
           "device_note", "live_run", "model_choices", "model_shape", "prompt_ids"]

