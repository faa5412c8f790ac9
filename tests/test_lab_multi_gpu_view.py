"""lab.multi_gpu_view: the committed one-GPU and two-GPU runs read as they are and labelled from the files
themselves, the figures drawing one trace per policy over the setups, the simulator at 1, 2 and 4 GPUs with
what it assumed beyond the two-GPU calibration."""

from __future__ import annotations

import json

import pytest

from duoserve_core.errors import BudgetError
from lab import multi_gpu_view as mv

SETUPS = ["1 GPU, 15%", "2 GPUs, 15% each", "1 GPU, 30%"]


def _record(file: str) -> dict:
    return json.loads((mv.RESULTS / file).read_text())


def test_labels_come_from_the_files():
    one, two = _record(mv.MEASURED[0]), _record(mv.MEASURED[1])
    assert mv.devices_of(two) == ["NVIDIA H200", "NVIDIA H200"] and mv.devices_of(one) == ["NVIDIA H200"]
    assert mv.device_label(two) == "2 x H200" and mv.device_label(one) == "H200"
    assert mv.device_label({"device": "NVIDIA H100 80GB HBM3, NVIDIA H200"}) == "H100 + H200"
    assert mv.model_label("synthetic:mixtral-8x22b") == "Mixtral-8x22B (synthesized)"
    assert mv.model_label("mistralai/Mixtral-8x7B-v0.1") == "mistralai/Mixtral-8x7B-v0.1"
    assert mv.budget_of(one) == "15%" and mv.budget_of(_record(mv.MEASURED[-1])) == "30%"
    with pytest.raises(ValueError, match="no --memory-budget"):
        mv.budget_of({"command": "python -m duoserve_core.bench --gpus 2"})
    assert [mv.setup_label(1, "15%"), mv.setup_label(2, "15%"), mv.setup_label(4, "8%")] == \
        ["1 GPU, 15%", "2 GPUs, 15% each", "4 GPUs, 8% each"]


def test_measured_table_is_the_files_own_numbers():
    table = mv.measured_table()
    assert list(dict.fromkeys(table["setup"])) == SETUPS
    assert set(map(tuple, table[["setup", "policy"]].values)) == {(s, p) for s in SETUPS for p in mv.POLICIES}
    by = table.set_index(["file", "policy"])
    for file in mv.MEASURED:
        record = _record(file)
        for policy, r in record["results"].items():
            row = by.loc[(file, policy)]
            assert row["ttft_s"] == r["ttft_s"] and row["tpot_s"] == r["tpot_s"] and row["e2e_s"] == r["e2e_s"]
            assert row["gpus"] == len(r["runtime"]["devices"]) == len(r["runtime"]["memory_plan_by_device"])
            assert row["date"] == record["date"] == "2026-12-01"
            assert row["peak_gpu_bytes"] <= row["budget_bytes"]
    two = table[table["gpus"] == 2]
    assert set(two["device"]) == {"2 x H200"} and set(two["device_slots"]) == {"21 + 35"} and set(two["slots"]) == {56}
    assert set(table[table["setup"] == "1 GPU, 30%"]["slots"]) == {61}
    # the lru run on two GPUs is its own file, joined to its setup
    assert by.loc[(mv.MEASURED[2], "lru"), "setup"] == "2 GPUs, 15% each"


def test_measured_figure_has_a_trace_per_policy_and_panel_over_the_setups():
    table = mv.measured_table()
    fig = mv.measured_figure(table)
    assert len(fig.data) == 2 * len(mv.POLICIES)
    assert [t.name for t in fig.data] == list(mv.POLICIES) * 2
    assert [t.showlegend for t in fig.data] == [True] * 3 + [False] * 3
    for i, trace in enumerate(fig.data):
        key = "ttft_s" if i < len(mv.POLICIES) else "tpot_s"
        assert trace.marker.color == mv.COLOURS[trace.name]
        assert [x.split("<br>")[0] for x in trace.x] == SETUPS
        assert "2 x H200, 2026-12-01, 21 + 35 slots" in trace.x[1] and "H200, 2026-12-01, 61 slots" in trace.x[2]
        rows = table[table["policy"] == trace.name].set_index("setup").loc[SETUPS]
        assert list(trace.y) == pytest.approx(list(rows[key] * 1e3))
    assert "measured on H200 / 2 x H200, 2026-12-01" in fig.layout.title.text


def test_ratio_table_and_sentence():
    table = mv.measured_table()
    ratios = mv.ratio_table(table)
    m = table.set_index(["setup", "policy"])
    for policy in mv.POLICIES:
        row = ratios.loc[("Mixtral-8x7B (synthesized)", policy)]
        one, two, wide = (m.loc[(s, policy)] for s in SETUPS)
        assert row["TTFT 2 / 1"] == round(two["ttft_s"] / one["ttft_s"], 3)
        assert row["TPOT 2 GPUs / 1 GPU at 30%"] == round(two["tpot_s"] / wide["tpot_s"], 3)
        assert row["TTFT 2 / 1"] < 0.65 and row["TPOT 2 / 1"] < 0.7      # the second GPU: faster, both phases
    big = [i for i in ratios.index if i[0].startswith("Mixtral-8x22B")]
    assert big == [("Mixtral-8x22B (synthesized), 16 tokens, 1 run", "duoserve")]
    b1, b2 = (_record(f)["results"]["duoserve"] for f in mv.MEASURED_BIG)
    assert ratios.loc[big[0], "TTFT 2 / 1"] == round(b2["ttft_s"] / b1["ttft_s"], 3)
    sentence = mv.measured_sentence(table)
    two = table[table["gpus"] == 2]
    assert f"to {two['ttft_s'].min() * 1e3:.0f}-{two['ttft_s'].max() * 1e3:.0f} ms" in sentence
    assert "61 slots against 21 + 35" in sentence


def test_batch_table_counts_the_copy_floor_over_every_link():
    table = mv.batch_table().set_index("gpus")
    one, two = table.loc[1], table.loc[2]
    assert one["decode tokens/s"] == _record(mv.MEASURED_BATCH[0])["rows"][0]["decode_tokens_per_s"]
    # one GPU: the file's own floor; two: the file counted one link, the table counts both
    assert one["copy floor, every link (tokens/s)"] == pytest.approx(one["copy floor, file (tokens/s)"], rel=1e-12)
    assert two["copy floor, every link (tokens/s)"] == pytest.approx(2 * two["copy floor, file (tokens/s)"], rel=1e-12)
    assert (table["decode / floor"] <= 1).all() and two["decode tokens/s"] > 1.8 * one["decode tokens/s"]
    assert two["slots"] == "21 + 80" and two["device"] == "2 x H200"
    fig = mv.batch_figure(table.reset_index())
    assert list(fig.data[0].y) == [one["decode tokens/s"], two["decode tokens/s"]]
    assert list(fig.data[1].y) == [one["copy floor, every link (tokens/s)"], two["copy floor, every link (tokens/s)"]]
    assert f"({two['decode tokens/s'] / one['decode tokens/s']:.2f}x)" in mv.batch_sentence(table.reset_index())


def test_simulated_table_one_row_per_policy_and_gpu_count_tpot_falling():
    table = mv.simulated_table(15, 2, 0.5)
    assert len(table) == len(mv.POLICIES) * len(mv.GPU_COUNTS)
    assert set(map(tuple, table[["gpus", "policy"]].values)) == {(n, p) for n in mv.GPU_COUNTS for p in mv.POLICIES}
    t = table.set_index(["gpus", "policy"])
    assert list(t.xs("duoserve", level="policy")["device_slots"]) == ["21", "21 + 34", "21 + 34 + 34 + 34"]
    for policy in mv.POLICIES:
        # 15% is copy-bound on one GPU (far above the decode's compute): a second link cuts TPOT by a third,
        # more GPUs never make it slower
        assert t.loc[(2, policy), "tpot_s"] < 0.7 * t.loc[(1, policy), "tpot_s"], policy
        assert t.loc[(4, policy), "tpot_s"] <= t.loc[(2, policy), "tpot_s"], policy
        assert t.loc[(2, policy), "ttft_s"] < t.loc[(1, policy), "ttft_s"], policy
        assert t.loc[(1, policy), "assumptions"] == t.loc[(2, policy), "assumptions"] == ()
        assert any("4 identical, independent links assumed" in a for a in t.loc[(4, policy), "assumptions"])
    for policy in ("lru", "duoserve"):   # the policies that keep experts gain from the slots four GPUs add
        assert t.loc[(4, policy), "tpot_s"] < t.loc[(2, policy), "tpot_s"], policy
    assert mv.counts_up_to(2) == (1, 2) and mv.counts_up_to(4) == (1, 2, 4) and mv.counts_up_to(1) == (1,)


def test_simulated_figure_and_notes_name_the_calibration_and_assumptions():
    table = mv.simulated_table(15, 2, 0.5)
    fig = mv.simulated_figure(table)
    assert [t.name for t in fig.data] == list(mv.POLICIES) * 2
    assert [x.split("<br>")[0] for x in fig.data[0].x] == ["1 GPU, 15%", "2 GPUs, 15% each", "4 GPUs, 15% each"]
    assert "assumed beyond the calibration" in fig.data[0].x[2] and "assumed" not in fig.data[0].x[1]
    assert "simulated (2 x H200 calibration, 2026-12-01)" in fig.layout.title.text
    note = mv.assumptions_note(table)
    assert mv.CALIBRATION.name in note and "4 GPUs:" in note and "identical, independent links" in note
    assert str(mv.DATA) not in note   # the file by name, not this machine's path
    assert "Nothing assumed" in mv.assumptions_note(mv.simulated_table(15, 2, 0.5, (1, 2)))
    sentence = mv.simulated_sentence(table, mv.measured_table())
    assert "from 1 to 2 to 4 GPUs" in sentence and "256 expert calls" in sentence
    assert json.loads(mv.CALIBRATION.read_text())["gpus"] == 2


def test_a_budget_that_plans_nothing_says_why():
    with pytest.raises(BudgetError, match="3% per GPU plans no run: .*too small"):
        mv.simulated_table(3, gpus=(1,))
