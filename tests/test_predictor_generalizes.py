"""The predictor generalizes from little data: trained on 300 tokens it is never below the previous
token at equal bytes on held-out routing, its probabilities are calibrated, what it chose per (layer,
depth) is in the file, and popularity is trusted only as far as the data supports it."""

from __future__ import annotations

import math

import pytest
import torch

from duoserve_core.predict import FeatureSpec, load_predictor
from duoserve_core.predict.baselines import Popularity, PreviousToken
from duoserve_core.predict.data import TraceArrays, from_trace
from duoserve_core.predict.evaluate import evaluate
from duoserve_core.predict.layer_predictor import _popularity_precision, fit_predictor
from duoserve_core.traces import Trace
from duoserve_core.traces.synth import preset_arguments, synthesize

TRAIN_TOKENS = 300  # 6 requests of 50 decode tokens


def routing(seed: int, requests: int) -> TraceArrays:
    """bundled-like synthetic routing (8 layers x 8 experts, top-2), 50 decode tokens per request."""
    return from_trace(Trace(*synthesize(**preset_arguments("bundled-like", seed=seed, requests=requests, tokens=50))))


def head(data: TraceArrays, rows: slice) -> TraceArrays:
    return TraceArrays(data.meta, data.experts[rows], data.weights[rows], data.prev_experts[rows], data.phase[rows],
                       None, data.has_weights, 1)


@pytest.fixture(scope="module")
def trained():
    """A depth-2 predictor fitted on 300 tokens; held out: 20 more requests of the same synthetic model
    (the synthesizer draws its permutations and popularity from the seed) and 20 of another seed."""
    drawn = routing(seed=0, requests=26)
    train = head(drawn, slice(0, TRAIN_TOKENS))
    predictor = fit_predictor(train, depth=2, spec=FeatureSpec(), hidden=(64,))
    return predictor, train, {"same model": head(drawn, slice(TRAIN_TOKENS, None)), "other seed": routing(7, 20)}


@pytest.mark.parametrize("test_set", ["same model", "other seed"])
def test_never_below_the_previous_token_at_equal_bytes(trained, test_set):
    predictor, train, tests = trained
    result = evaluate(tests[test_set], predictor, [Popularity(train), PreviousToken()])
    for d in ("1", "2"):
        ours = result["methods"]["predictor"][d]["overall"]
        previous = result["methods"]["previous_token"][d]["overall"]
        assert ours["recall_at"]["2"] >= previous["recall_at"]["2"], (d, ours["recall_at"], previous["recall_at"])
        assert ours["recall_at"]["2"] > result["methods"]["popularity"][d]["overall"]["recall_at"]["2"] + 0.05
        # calibrated on 60 held-out tokens, the probabilities hold on new requests (measured: 0.011-0.027)
        assert ours["calibration"]["ece"] < 0.05


def test_the_choices_are_recorded_and_saved(trained, tmp_path):
    predictor = trained[0]
    fits = predictor.training["fits"]
    assert set(fits) == {f"{l}->{l + d}" for l in range(7) for d in (1, 2) if l + d <= 7}
    # 60 held-out tokens cannot show that the correction helps beyond noise: the prior serves alone
    assert not any(f["correction"] for f in fits.values())
    for (layer, d), mlp in predictor.params.items():
        assert not mlp[-1][0].any()  # a dropped correction's output weights are zero
    path = tmp_path / "p.safetensors"
    predictor.save(path)
    loaded = load_predictor(path)
    assert loaded.training["fits"] == fits and loaded.training["fitted_on"] == TRAIN_TOKENS - 60
    x = predictor.features(3, *(t[:20] for t in (trained[1].experts, trained[1].weights, trained[1].prev_experts)))
    assert torch.equal(loaded.predict(3, x), predictor.predict(3, x))


def test_popularity_is_shrunk_by_what_the_data_supports():
    g = torch.Generator().manual_seed(0)
    uniform = math.log(2 / 6)  # top-2 of 8
    balanced = torch.zeros(1, 2000, 8).scatter_(2, torch.rand(1, 2000, 8, generator=g).argsort(-1)[..., :2], 1.0)
    skewed = torch.zeros(1, 2000, 8)
    skewed[0, :, :2] = 1.0  # experts 0 and 1 take every token
    # balanced routing: the observed spread is mostly noise, so popularity is held near uniform (a
    # precision of 100 is a standard deviation of 0.1 in log-odds); real skew is hardly shrunk
    assert _popularity_precision(balanced, uniform).item() > 100
    assert _popularity_precision(skewed, uniform).item() < 1
