"""Decode never loses to a plain cache, on several routing sources (the simulator, H200 calibration).

A decode policy tuned on the bundled model's easy routing lost to loading on demand on real Mixtral
routing; so duoserve is held, on routing with no structure (``random``), with Mixtral's statistics
(``mixtral-like``), with the bundled model's (``bundled-like`` and the bundled trace itself), with no
predictor and with a predictor trained on other routing (a wrong one), to at most 1.02x the decode
TPOT of the better of ``on-demand`` and ``lru``. ``benchmarks/decode_routing_sweep.py`` runs the
full-length version (512-token prompts, 64 tokens, a right predictor too) and commits its table.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from duoserve_core.policy import PolicyKnobs
from duoserve_core.sim import build_model, load_calibration, simulate
from duoserve_core.traces import RoutingReplay, read_trace, write_trace
from duoserve_core.traces.synth import preset_arguments, synthesize

DATA = Path(__file__).resolve().parents[1] / "data"
CALIBRATION = DATA / "calibration" / "h200_mixtral-8x7b_nf4_2026-12-01.json"
PREDICTOR = str(DATA / "predictors" / "small-moe-x32-depth2.safetensors")  # trained on the bundled routing
PROMPT, GEN = 64, 40


@pytest.fixture(scope="module")
def routings(tmp_path_factory):
    folder = tmp_path_factory.mktemp("routing")
    out = {"bundled trace": DATA / "traces" / "small-moe-heldout.parquet"}
    for preset in ("random", "mixtral-like", "bundled-like"):
        args = preset_arguments(preset, seed=1, requests=1, tokens=GEN, prompt_len=PROMPT)
        args["layers"] = 32
        df, meta = synthesize(**args)
        write_trace(folder / f"{preset}.parquet", df, meta)
        out[preset] = folder / f"{preset}.parquet"
    return out


def decode_tpot(replay, slots: int, knobs: PolicyKnobs) -> float:
    model = build_model("mixtral-8x7b", quant="nf4", attention_quant="nf4", memory_budget=f"{slots}slots",
                        max_context=PROMPT + GEN, device_type="cuda")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="predictor .* was trained on traces of")
        return simulate(model, load_calibration(CALIBRATION), replay, knobs, PROMPT, GEN, warmup=0,
                        policy_time=False)["tpot_s"]


@pytest.mark.parametrize("slots", [8, 16, 21, 32, 64, 128])
@pytest.mark.parametrize("routing", ["random", "mixtral-like", "bundled-like", "bundled trace"])
def test_duoserve_decode_is_never_slower_than_the_better_plain_cache(routings, routing, slots):
    replay = RoutingReplay(read_trace(routings[routing]), 32, 8, 2)
    best = min(decode_tpot(replay, slots, PolicyKnobs(policy=p)) for p in ("on-demand", "lru"))
    for predictor in (None, PREDICTOR):
        duo = decode_tpot(replay, slots, PolicyKnobs(policy="duoserve", predictor=predictor))
        assert duo <= 1.02 * best, (routing, slots, predictor, duo / best)
