"""Every CLI that writes a result refuses, before any work, an output it would lose or cannot write."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from duoserve_core.atomic import check_writable
from duoserve_core.bench.__main__ import main as bench_main
from duoserve_core.calibrate.__main__ import main as calibrate_main
from duoserve_core.cli import main as generate_main
from duoserve_core.errors import DuoServeError, OutputError
from duoserve_core.sim.__main__ import main as sim_main

ABSENT = "/no/such/folder"  # a model, trace or calibration that fails at once if the run gets that far
OLD = "the previous result\n"


def _refused(capsys, path: Path, flag: str) -> None:
    """The run stopped with the one-line error, and ``path`` still holds what it held."""
    err = capsys.readouterr().err
    assert err == f"error: {path} exists; choose another {flag} or pass --force to replace it\n"
    assert path.read_text() == OLD


def _existing(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OLD)
    return path


def test_check_writable(tmp_path):
    new = tmp_path / "sub" / "new.json"
    assert check_writable(new, False, "--out") == new
    old = _existing(tmp_path / "old.json")
    with pytest.raises(OutputError, match=r"old.json exists; choose another --out or pass --force to replace it"):
        check_writable(old, False, "--out")
    assert check_writable(old, True, "--out") == old
    with pytest.raises(OutputError, match="is a folder"):
        check_writable(tmp_path, True, "--timeline-out")
    with pytest.raises(OutputError, match=r"lies under .*old.json, which is a file; choose another --record-trace"):
        check_writable(old / "deeper" / "t.parquet", True, "--record-trace")
    assert issubclass(OutputError, DuoServeError)


@pytest.mark.parametrize("flag, name", [("--out", "b.json"), ("--record-trace", "t.parquet")])
def test_bench_refuses_an_existing_output_before_loading(tmp_path, capsys, flag, name):
    path = _existing(tmp_path / name)
    args = ["--model", ABSENT, "--device", "cpu", "--out", str(tmp_path / "other.json"), flag, str(path)]
    assert bench_main(args) == 2
    _refused(capsys, path, flag)


def test_bench_refuses_existing_timelines_and_sweep_out(tmp_path, capsys):
    timeline = _existing(tmp_path / "tl" / "b_on-demand.parquet")
    args = ["--model", ABSENT, "--device", "cpu", "--policies", "duoserve,on-demand", "--out", str(tmp_path / "b.json")]
    assert bench_main(args + ["--timelines", str(tmp_path / "tl")]) == 2
    _refused(capsys, timeline, "--timelines")
    out = _existing(tmp_path / "sweep.json")
    assert bench_main(["--sweep", "--model", ABSENT, "--device", "cpu", "--out", str(out)]) == 2
    _refused(capsys, out, "--out")


def test_bench_checks_its_default_out(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    default = _existing(Path(f"benchmarks/results/bench_cpu_{datetime.date.today().isoformat()}.json"))
    assert bench_main(["--model", ABSENT, "--device", "cpu"]) == 2
    _refused(capsys, default, "--out")


def test_bench_with_force_gets_past_the_check(tmp_path, capsys):
    out = _existing(tmp_path / "b.json")
    assert bench_main(["--model", ABSENT, "--device", "cpu", "--out", str(out), "--force"]) == 2
    assert "exists" not in capsys.readouterr().err and out.read_text() == OLD  # the model error, nothing written


def test_bench_refuses_an_out_under_a_file(tmp_path, capsys):
    blocker = _existing(tmp_path / "file")
    assert bench_main(["--model", ABSENT, "--device", "cpu", "--out", str(blocker / "b.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out ") and "which is a file" in err and err.count("\n") == 1


def test_sim_refuses_existing_outputs_before_reading(tmp_path, capsys):
    base = ["--trace", ABSENT, "--calibration", ABSENT, "--policy", "duoserve,on-demand"]
    out = _existing(tmp_path / "r.json")
    assert sim_main(base + ["--out", str(out)]) == 2
    _refused(capsys, out, "--out")
    timeline = _existing(tmp_path / "tl.on-demand.json")
    assert sim_main(base + ["--timeline-out", str(tmp_path / "tl.json")]) == 2
    _refused(capsys, timeline, "--timeline-out")
    assert sim_main(base + ["--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_calibrate_refuses_an_existing_out_before_timing(tmp_path, capsys):
    out = _existing(tmp_path / "cal.json")
    assert calibrate_main(["--model", ABSENT, "--device", "cpu", "--out", str(out), "--quiet"]) == 2
    _refused(capsys, out, "--out")


def test_generate_refuses_an_existing_timeline_before_loading(tmp_path, capsys):
    timeline = _existing(tmp_path / "trace.json")
    args = ["generate", "--model", ABSENT, "--prompt-ids", "1", "--device", "cpu", "--timeline-out", str(timeline)]
    assert generate_main(args) == 2
    _refused(capsys, timeline, "--timeline-out")


def test_json_prints_the_record_alone(tmp_path, capsys):
    """``--json``: stdout is one JSON document; the table and the "wrote" line go to stderr."""
    import json

    from duoserve_core.bench.__main__ import main as bench

    data = Path(__file__).resolve().parents[1] / "data"
    assert bench(["--model", str(data / "small-moe"), "--device", "cpu", "--memory-budget", "15.5MiB",
                  "--prompt-len", "8", "--gen", "2", "--repeats", "1", "--policies", "on-demand",
                  "--out", str(tmp_path / "b.json"), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["results"]["on-demand"]["prompt_tokens"] == 8
    assert "TTFT ms" in captured.err and "wrote" in captured.err
