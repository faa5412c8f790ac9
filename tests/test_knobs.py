"""The knobs of a schedule: one dataclass, one set of defaults, one place that refuses bad values;
policies say which knobs they use."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import duoserve_core
from duoserve_core.errors import KnobError
from duoserve_core.policy import DEFAULT_KNOBS, POLICIES, PolicyKnobs, make_policy, policy_class

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.mark.parametrize("changes, words", [
    (dict(prefetch_depth=0), "at least 1"), (dict(prefetch_depth=-2), "at least 1"),
    (dict(prefetch_depth=1.5), "whole number"), (dict(prefetch_depth=True), "whole number"),
    (dict(predictor_threshold=-0.1), "between 0 and 1"), (dict(predictor_threshold=1.01), "between 0 and 1"),
    (dict(predictor_threshold=math.nan), "between 0 and 1"), (dict(predictor_threshold=math.inf), "between 0 and 1"),
    (dict(policy="duoserv"), "choose one of duoserve, uniform"),
    (dict(copy_slack=-1), "0 or more"), (dict(copy_slack=math.nan), "0 or more"),
])
def test_bad_knobs_are_refused_with_the_fix(changes, words):
    with pytest.raises(KnobError, match=words):
        PolicyKnobs(**changes)
    with pytest.raises(KnobError, match=words):  # the same check on every path in
        DEFAULT_KNOBS.changed(**changes)


def test_unknown_knob_names_the_known_ones():
    with pytest.raises(TypeError, match="prefetch_depth"):
        DEFAULT_KNOBS.changed(prefetch_dept=2)


def test_policies_declare_what_they_use():
    assert policy_class("duoserve").uses == policy_class("uniform").uses == {
        "predictor", "prefetch_depth", "predictor_threshold", "speculative_gate", "copy_slack"}
    assert all(not policy_class(p).uses for p in ("on-demand", "lru-speculative", "resident", "lru", "per-layer-lru"))
    assert [p for p in POLICIES if policy_class(p).holds_every_expert] == ["resident"]
    knobs = PolicyKnobs(policy="on-demand", predictor="p.safetensors", prefetch_depth=3, predictor_threshold=0.9,
                        speculative_gate=True, copy_slack=2.0)
    assert knobs.effective() == PolicyKnobs(policy="on-demand")      # what it ignores is back at the defaults
    assert knobs.changed(policy="duoserve").effective() == knobs.changed(policy="duoserve")
    policy = make_policy(knobs.changed(policy="uniform"))
    assert (policy.name, policy.depth, policy.threshold, policy.wants_speculation) == ("uniform", 3, 0.9, True)
    windows = {p: make_policy(knobs.changed(policy=p)).prefill_window for p in POLICIES}
    assert windows == {p: 3 if p == "duoserve" else None for p in POLICIES}


def test_one_set_of_defaults_everywhere():
    from duoserve_core.bench.__main__ import parse_args as bench_args
    from duoserve_core.cli import build_parser
    from duoserve_core.sim.__main__ import parse_args as sim_args
    from lab.widgets import depth_slider, threshold_slider

    bench = bench_args([])
    sim = sim_args(["--trace", "t", "--calibration", "c"])
    gen = build_parser().parse_args(["generate", "--model", "m", "--prompt", "p"])
    for args in (bench, sim, gen):
        assert (args.prefetch_depth, args.predictor_threshold, args.copy_slack) == (
            DEFAULT_KNOBS.prefetch_depth, DEFAULT_KNOBS.predictor_threshold, DEFAULT_KNOBS.copy_slack)
    assert (depth_slider().value, threshold_slider().value) == (DEFAULT_KNOBS.prefetch_depth,
                                                                DEFAULT_KNOBS.predictor_threshold)


def test_bad_knobs_fail_before_the_model_loads_and_configure_keeps_the_old_setting(capsys):
    with pytest.raises(KnobError):
        duoserve_core.load("does/not/exist", prefetch_depth=0)  # the knob error, not the missing checkpoint
    rt = duoserve_core.load(DATA / "small-moe", device="cpu", max_context=64, policy="on-demand")
    with pytest.raises(KnobError):
        rt.configure(policy="duoserve", predictor_threshold=2.0)
    assert rt.knobs == PolicyKnobs(policy="on-demand") and rt.policy.name == "on-demand"
    from duoserve_core.cli import main

    assert main(["generate", "--model", str(DATA / "small-moe"), "--prompt-ids", "1,2", "--device", "cpu",
                 "--prefetch-depth", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "prefetch depth 0" in err[0]


def test_device_flag_types():
    import argparse

    from duoserve_core.knob_args import devices, gpus

    assert devices("cuda:0,cuda:1") == "cuda:0,cuda:1" and devices("cpu, cpu") == "cpu, cpu" and devices("cuda") == "cuda"
    for bad in ("", "cuda:0,", "tpu:0", "cuda:-1,cuda:1", "gpu0"):
        with pytest.raises(argparse.ArgumentTypeError):
            devices(bad)
    assert gpus()("2") == 2 and gpus()("auto") == "auto" and gpus(auto=False)("3") == 3
    for bad in ("0", "-1", "1.5", "many"):
        with pytest.raises(argparse.ArgumentTypeError, match="at least 1"):
            gpus()(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="not auto"):
        gpus(auto=False)("auto")
    from duoserve_core.bench.__main__ import parse_args as bench_args
    from duoserve_core.cli import build_parser
    from duoserve_core.sim.__main__ import parse_args as sim_args

    gen, bench = build_parser().parse_args(["generate", "--model", "m", "--prompt", "p"]), bench_args([])
    for args in (gen, bench):  # one device unless asked: today's behaviour
        assert (args.device, args.devices, args.gpus) == ("auto", None, None)
    assert sim_args(["--trace", "t", "--calibration", "c"]).gpus == 1
