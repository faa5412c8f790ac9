"""One memory plan: "15%" of Mixtral-8x7B is the same 21 expert slots wherever it is asked.

Notebook 07 and ``sim --sweep`` planned the KV cache for the bundled trace's short requests (1.61 GiB
of fixed costs, 22 slots) while the README, notebook 06 and the simulator's replay of the committed
run planned for 512 + 128 tokens (1.78 GiB, 21 slots). Every view now plans through
``memory.plan_context``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from duoserve_core.errors import BudgetError
from duoserve_core.memory import PLAN_CONTEXT, plan_context
from duoserve_core.sim.__main__ import main as sim_main
from duoserve_core.units import format_bytes

ROOT = Path(__file__).resolve().parents[1]
SIM = ["--trace", str(ROOT / "data/traces/small-moe-heldout.parquet"), "--model-preset", "mixtral-8x7b",
       "--quant", "nf4", "--quant-attention", "nf4", "--calibration",
       str(ROOT / "data/calibration/h200_mixtral-8x7b_nf4.json"), "--memory-budget", "15%", "--json"]


def test_plan_context():
    assert plan_context(95, 32768) == PLAN_CONTEXT == 640     # short requests: the committed runs' context
    assert plan_context(2048 + 16, 32768) == 2064            # a longer request is planned for
    assert plan_context(95, 256) == 256                      # a model with a shorter context: its own
    assert plan_context(95, 32768, max_context=128) == 128   # asked for
    with pytest.raises(BudgetError, match="max_context 64 is shorter than the longest request"):
        plan_context(95, 32768, max_context=64)


def _readme_plan() -> tuple[str, float, int]:
    """The published 8x7B figure: "budget 15% = 3.72 GiB: 1.9 GB fixed, 21 expert slots of 256" (docs/results.md,
    which the README's "3.72 GiB, 21 of 256 expert slots" summarises)."""
    text = " ".join((ROOT / "docs" / "results.md").read_text().split())
    m = re.search(r"budget 15% = ([\d.]+ GiB): ([\d.]+) GB fixed, (\d+) expert slots of 256", text)
    assert m, "docs/results.md's 15% plan for Mixtral-8x7B"
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert f"15% of the model ({m.group(1)}, {m.group(3)} of 256 expert slots)" in readme
    return m.group(1), float(m.group(2)), int(m.group(3))


@pytest.fixture(scope="module")
def readme_slots():
    return _readme_plan()[2]


def _sim_plan(capsys, *extra: str) -> dict:
    assert sim_main(SIM + list(extra)) == 0
    return json.loads(capsys.readouterr().out)["model"]["memory_plan"]


def test_sim_sweep_qos_and_replay_resolve_15pct_as_the_readme(capsys, readme_slots):
    sweep = _sim_plan(capsys, "--sweep", "--requests", "2")
    qos = _sim_plan(capsys, "--policy", "on-demand", "--arrivals", "0,0", "--requests", "2", "--gen", "4")
    replay = _sim_plan(capsys, "--policy", "on-demand", "--prompt-len", "512", "--gen", "4")
    assert sweep["num_slots"] == qos["num_slots"] == replay["num_slots"] == readme_slots == 21
    assert sweep["fixed_bytes"] == qos["fixed_bytes"] == replay["fixed_bytes"]
    budget, fixed_gb, _ = _readme_plan()
    assert format_bytes(sweep["budget_bytes"]) == budget and round(sweep["fixed_bytes"] / 1e9, 1) == fixed_gb


def test_notebooks_06_and_07_resolve_15pct_as_the_simulator(readme_slots):
    from lab import paper_figures as pf, qos_view as qv

    # notebook 07: its simulator's plan (every batch size keeps it) and its knob note, at its defaults (32 tokens)
    n07 = pf.sim_setup(qv.SIM_MODEL, 15, qv.context())[0]
    note = pf.knob_note(qv.SIM_MODEL, 15, qv.PROMPT, 32)
    assert set(qv.budget_rows(15, (1, 16))["expert slots"]) == {f"{readme_slots} of 256"}
    # notebook 06: the simulated comparison at prompt 512, 128 tokens, and the budget sweeps' 512 + 32
    n06 = pf.sim_setup("mixtral-8x7b", 15, 512 + 128)[0]
    sweep = pf.sim_setup("mixtral-8x7b", 15, 512 + 32)[0]
    assert n07.plan.num_slots == n06.plan.num_slots == sweep.plan.num_slots == readme_slots
    assert n07.plan.fixed_bytes == n06.plan.fixed_bytes and f"{readme_slots} of 256 expert slots" in note


def test_the_workspace_counts_what_each_format_makes_beside_its_record():
    """NF4 dequantizes a whole expert for a many-token matmul; int4 on a GPU re-packs each landed matrix
    for tinygemm through two temporaries of its size; dense records and int4 on the CPU need nothing
    beside the record."""
    import torch

    from duoserve_core.experts.formats import make_format
    from duoserve_core.memory import workspace_bytes

    nf4, dense = make_format("nf4", 4096, 14336, torch.bfloat16), make_format("bf16", 4096, 14336, torch.bfloat16)
    int4 = make_format("int4", 4096, 14336, torch.bfloat16)
    assert workspace_bytes(nf4, torch.bfloat16, "cuda") == nf4.params * 2
    assert workspace_bytes(dense, torch.bfloat16, "cuda") == 0 and workspace_bytes(int4, torch.bfloat16, "cpu") == 0
    assert int4.cuda_tiles is not None
    assert workspace_bytes(int4, torch.bfloat16, "cuda") == 2 * (2 * 14336) * (4096 // 2)  # w13's packed bytes, twice
