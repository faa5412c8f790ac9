"""Decode at Mixtral-8x7B size on chosen routing: the sources and the one run that
``benchmarks/decode_routing_sweep.py`` and notebook 05 (``lab.routing_view``) both make.

A decode policy tuned on the bundled model's easy routing lost to loading on demand on real Mixtral
routing, so decode is judged on several routing sources: the synthetic presets of ``traces.synth``
(``random``: nothing to predict; ``mixtral-like``: Mixtral-8x7B's statistics; ``bundled-like``:
the bundled model's) drawn at the model's 32 layers, and the bundled trace, which ``RoutingReplay``
expands from its 8 layers to 32. The model is Mixtral-8x7B with NF4 experts and attention, timed by
the committed H200 calibration (``CALIBRATION``), its budget given in expert slots.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pandas as pd

from ..policy import PolicyKnobs
from ..traces import RoutingReplay, Trace, TraceMeta
from ..traces.synth import preset_arguments, synthesize
from .calibration import Calibration
from .runner import simulate
from .sim_model import SimModel, build_model

DATA = Path(__file__).resolve().parents[2] / "data"
CALIBRATION = DATA / "calibration" / "h200_mixtral-8x7b_nf4_2026-12-01.json"
BUNDLED_TRACE = DATA / "traces" / "small-moe-heldout.parquet"
MODEL = "mixtral-8x7b"
LAYERS, EXPERTS, TOP_K = 32, 8, 2   # Mixtral-8x7B's routing; every preset is drawn at its depth (bundled-like's own is 8)


def preset_routing(preset: str, *, seed: int | None = None, requests: int | None = None, tokens: int | None = None,
                   prompt_len: int = 0, layers: int = LAYERS) -> tuple[pd.DataFrame, TraceMeta]:
    """A synthetic preset's trace rows at ``layers`` layers (``requests`` x (``prompt_len`` prefill +
    ``tokens`` decode) tokens; ``None``: the preset's own size and seed, at which it was tuned): the
    routing a Mixtral-deep model, or a predictor for it, is given."""
    args = preset_arguments(preset, seed=seed, requests=requests, tokens=tokens, prompt_len=prompt_len)
    args["layers"] = layers
    return synthesize(**args)


def mixtral_replay(trace: Trace) -> RoutingReplay:
    """``trace``'s routing as Mixtral-8x7B replays it (a shallower trace's layers reused in relabelled blocks)."""
    return RoutingReplay(trace, LAYERS, EXPERTS, TOP_K)


def mixtral_model(slots: int, max_context: int) -> SimModel:
    """Mixtral-8x7B, NF4 experts and attention, with ``slots`` expert slots (the H200 calibration's shape)."""
    return build_model(MODEL, quant="nf4", attention_quant="nf4", memory_budget=f"{slots}slots",
                       max_context=max_context, device_type="cuda")


def decode_result(model: SimModel, calibration: Calibration, replay: RoutingReplay, knobs: PolicyKnobs, prompt_len: int,
                  gen: int) -> dict:
    """One request through the simulator, as ``simulate``'s bench record: no warm-up and no policy
    decision time charged, so the figures are deterministic. A predictor trained on other routing
    is used on purpose here (the wrong-predictor case), so its mismatch warning is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="predictor .* was trained on traces of")
        return simulate(model, calibration, replay, knobs, prompt_len, gen, warmup=0, policy_time=False)
