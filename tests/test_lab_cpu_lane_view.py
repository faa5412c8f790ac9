"""Notebook 05's CPU-lane view: the simulated token on three lanes, the CPU share, the H200 measurements."""

import json

import pytest

from lab import cpu_lane_view as cv

SOURCE, SLOTS, GEN = "mixtral-like", 22, 16   # a short request: every run here is cached and shared


@pytest.fixture(scope="module")
def sweep():
    return cv.sweep(SOURCE, SLOTS, gen=GEN)


def test_the_calibration_gives_the_measured_thread_counts():
    assert cv.thread_choices() == (4, 8, 16)
    assert cv.settings() == (("off", None), ("auto", 4), ("auto", 8), ("auto", 16), ("half", 4), ("half", 8),
                             ("half", 16))


def test_a_token_with_the_lane_forced_has_work_on_all_three_lanes():
    df = cv.token_timeline(SOURCE, SLOTS, "duoserve", "half", 16, gen=GEN)
    # and the int4 copies' relayouts on their own stream, as the calibration measured them in decode
    assert cv.calibration().relayout("decode") > 0
    assert set(df["stream"]) == {"compute", "copy", "cpu", "relayout"}
    assert set(df["lane"]) == {cv.LANES[s] for s in ("compute", "copy", "cpu", "relayout")}
    relayouts = df[df["stream"] == "relayout"]
    assert (relayouts["end_ms"] - relayouts["start_ms"]).round(6).eq(round(cv.calibration().relayout("decode") * 1e3, 6)).all()
    assert set(df["step"]) == {GEN // 2} and set(df["phase"]) == {"decode"}
    assert df["start_ms"].min() == 0
    # the lane computes experts only, and they overlap the copy stream's work in the same token
    cpu, copies = df[df["stream"] == "cpu"], df[df["stream"] == "copy"]
    assert set(cpu["kind"]) == {"expert"}
    assert any(((c.start_ms < copies["end_ms"]) & (copies["start_ms"] < c.end_ms)).any() for c in cpu.itertuples())


def test_auto_puts_experts_on_the_cpu_at_16_threads_and_none_at_4():
    """At 16 threads a host expert under copies ends a layer sooner than a second copy; at 4 it is slower
    than any copy path, so auto there equals off (docs/cpu_lane.md)."""
    off = cv.token_timeline(SOURCE, SLOTS, "duoserve", "off", None, gen=GEN)
    at16 = cv.token_timeline(SOURCE, SLOTS, "duoserve", "auto", 16, gen=GEN)
    at4 = cv.token_timeline(SOURCE, SLOTS, "duoserve", "auto", 4, gen=GEN)
    assert set(off["stream"]) == set(at4["stream"]) == {"compute", "copy", "relayout"}
    assert "cpu" in set(at16["stream"]) and (at16["stream"] == "copy").sum() < (off["stream"] == "copy").sum()


def test_the_timeline_step_must_be_a_decode_step():
    with pytest.raises(ValueError, match="decodes steps 1 to 15"):
        cv.token_timeline(SOURCE, SLOTS, "duoserve", "auto", 16, step=0, gen=GEN)


def test_the_timeline_figure_draws_off_and_the_chosen_mode_on_one_axis():
    fig = cv.timeline_figure(SOURCE, SLOTS, "duoserve", 16, gen=GEN, mode="half")
    assert "simulated, H200 calibration" in fig.layout.title.text
    names = {t.name for t in fig.data}
    assert "expert on the CPU" in names and "copy" in names
    on_cpu = [t for t in fig.data if t.name == "expert on the CPU"]
    assert [t.yaxis for t in on_cpu] == ["y2"]   # only the lower panel, the forced half, has CPU work


def test_the_cpu_share_is_a_fraction_and_zero_with_the_lane_off(sweep):
    assert len(sweep) == len(cv.POLICIES) * len(cv.settings())
    assert sweep["CPU share"].between(0, 1).all()
    assert (sweep.loc[sweep["CPU lane"] == "off", "CPU share"] == 0).all()
    at16 = sweep[(sweep["threads"] == 16) & (sweep["CPU lane"] == "half")]
    assert (at16["CPU share"] > 0).all()
    auto = sweep[sweep["CPU lane"] == "auto"]
    assert (auto.loc[auto["threads"] == 4, "CPU share"] == 0).all() and (auto.loc[auto["threads"] == 16, "CPU share"] > 0).all()
    # an expert the host computes is not copied: every needed expert is a hit, a copy or a host compute
    assert (at16["copies per token"] + at16["host computes per token"] <= 2 * 32).all()
    assert set(sweep["kind"]) == {cv.SIMULATED}


def test_cpu_share_counts_host_computes_among_all_needed_experts():
    phases = {"decode": {"hits": 10, "misses": 20, "host_computes": 10}}
    assert cv.cpu_share(phases) == 0.25
    assert cv.cpu_share({"decode": {"hits": 0, "misses": 0, "host_computes": 0}}) == 0.0


def test_the_measured_points_come_from_the_committed_files_with_device_and_date():
    m = cv.measured()
    for mode, path in cv.MEASURED.items():
        record = json.loads(path.read_text())
        rows = m[m["file"] == path.name]
        assert set(rows["CPU lane"]) == {mode}
        assert set(rows["device"]) == {record["device"]} and set(rows["date"]) == {record["date"]}
        for policy, tpot_ms in zip(rows["policy"], rows["TPOT (ms)"]):
            assert tpot_ms == pytest.approx(record["results"][policy]["tpot_s"] * 1e3)
    assert set(m["device"]) == {"NVIDIA H200"} and set(m["date"]) == {"2026-12-02"}
    effect = cv.lane_effect(m)
    assert list(effect.index) == ["on-demand", "lru", "duoserve"]  # the policies measured, in the view's order
    assert effect.loc["duoserve", "off (ms)"] == 129.6 and effect.loc["duoserve", "auto (ms)"] == 106.5
    assert (m.loc[m["CPU lane"] == "off", "CPU share"] == 0).all()
    assert m.loc[(m["CPU lane"] == "auto") & (m["policy"] == "on-demand"), "CPU share"].item() == 0.5
    assert cv.measured_slots() == SLOTS


def test_the_share_figure_marks_the_measured_points(sweep):
    fig = cv.share_figure(sweep, cv.measured(), ("half", 16))
    measured = [t for t in fig.data if "measured, NVIDIA H200, 2026-12-02" in t.name]
    assert len(measured) == 3  # on-demand, lru and duoserve were measured
    assert all(t.marker.symbol == "star-open" for t in measured)
    ring = fig.data[-1]
    assert ring.name == "lane half, 16 threads" and len(ring.x) == len(cv.POLICIES)


def test_at_setting_names_the_threads_it_has(sweep):
    table = cv.at_setting(sweep, "auto", 8)
    assert list(table.index) == list(cv.POLICIES) and "TPOT, lane auto, 8 threads (ms)" in table
    with pytest.raises(ValueError, match=r"threads \[4, 8, 16\]"):
        cv.at_setting(sweep, "auto", 12)


def test_an_unknown_source_or_mode_is_refused():
    with pytest.raises(ValueError, match="unknown routing source"):
        cv.sweep("mixtral", SLOTS, gen=GEN)
    with pytest.raises(ValueError, match="unknown CPU-lane mode"):
        cv.token_timeline(SOURCE, SLOTS, "duoserve", "sometimes", 16, gen=GEN)


def test_the_live_token_runs_the_runtime_on_this_device():
    """The "measured here" panel: the real runtime (the bundled model on a CPU), the lane forced onto half
    of the experts in the token and onto none when off, and the tokens unchanged (one processor here)."""
    off, off_run = cv.live_token("cpu", "duoserve", "off")
    half, half_run = cv.live_token("cpu", "duoserve", "half", 2)
    assert set(off["stream"]) == {"compute", "copy"} and "cpu" in set(half["stream"])
    assert set(half["step"]) == {cv.LIVE_TOKENS // 2} and half["start_ms"].min() == 0
    assert off_run.result.host_computes == 0 < half_run.result.host_computes
    assert half_run.result.tokens == off_run.result.tokens
    assert cv.live_model("cpu").quant == "nf4" and cv.live_model("cuda:0").quant == "int4"


def test_the_live_figure_says_when_auto_ran_as_off():
    fig = cv.live_timeline_figure("cpu", "on-demand", 2, mode="auto")
    titles = [a.text for a in fig.layout.annotations]
    assert titles[1].startswith("lane auto, 2 threads (ran: off)") and "0 experts on the CPU lane" in titles[1]
    assert "measured on cpu" in fig.layout.title.text
