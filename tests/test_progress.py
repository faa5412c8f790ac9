"""Long work shows a tqdm bar on a terminal and nothing where no one watches (CI, pipes, --json)."""

from __future__ import annotations

import sys

from duoserve_core.progress import progress, shows_progress


def test_no_bar_when_stderr_is_not_a_terminal(capsys):
    assert not shows_progress()
    assert list(progress(range(3), desc="recording")) == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_a_bar_on_a_terminal_unless_quiet(capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert list(progress(range(3), desc="recording", unit="prompt", quiet=True)) == [0, 1, 2]
    assert capsys.readouterr().err == ""
    assert list(progress(iter(range(3)), desc="recording", total=3, unit="prompt")) == [0, 1, 2]
    err = capsys.readouterr().err
    assert "recording" in err and "/3" in err and "prompt" in err   # redraws are rate-limited; leave=False clears it


def test_a_hand_driven_bar_and_lines_above_it(capsys, monkeypatch):
    from duoserve_core.progress import print_line, progress_bar

    with progress_bar(desc="bench", total=4, unit="run") as tick:  # not a terminal: no bar, tick does nothing
        tick()
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    with progress_bar(desc="bench", total=4, unit="run") as tick:
        tick(2)
        print_line("prompt duoserve ...")
    captured = capsys.readouterr()
    assert "bench" in captured.err and "/4" in captured.err and captured.out == "prompt duoserve ...\n"


def test_interruptible_exits_130_or_143_with_one_line(capsys):
    import signal

    from duoserve_core.progress import Terminated, interruptible

    def stopped(exc):
        def work():
            raise exc
        return work

    before = signal.getsignal(signal.SIGTERM)
    assert interruptible(lambda: 0) == 0 and capsys.readouterr().err == ""
    assert interruptible(stopped(KeyboardInterrupt)) == 130
    assert capsys.readouterr().err == "interrupted; nothing written\n"
    assert interruptible(stopped(Terminated), written=lambda: "wrote a.html only") == 143
    assert capsys.readouterr().err == "interrupted; wrote a.html only\n"
    assert signal.getsignal(signal.SIGTERM) == before   # the handler is the call's only


def test_sim_sweep_draws_a_bar_on_a_terminal_but_not_under_json(tmp_path, capsys, monkeypatch):
    from test_sim_cli import _files

    from duoserve_core.sim.__main__ import main

    trace, model, cal = _files(tmp_path)
    args = ["--trace", str(trace), "--model-preset", str(model), "--calibration", str(cal), "--sweep",
            "--memory-budget", "all", "--requests", "2"]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "sweep:" in err and "/4" in err and "policy" in err        # the four reference caches
    assert main(args + ["--json"]) == 0
    assert "sweep:" not in capsys.readouterr().err                       # --json: quiet


def test_bench_counts_its_runs_on_a_terminal_but_not_under_json(tmp_path, capsys, monkeypatch):
    from pathlib import Path

    from duoserve_core.bench.__main__ import main

    args = ["--model", str(Path(__file__).resolve().parents[1] / "data" / "small-moe"), "--device", "cpu",
            "--quant", "none", "--memory-budget", "8slots", "--prompt-len", "4", "--gen", "2", "--repeats", "1",
            "--policies", "on-demand,resident", "--force", "--out", str(tmp_path / "b.json")]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "bench:" in err and "/4" in err and "run" in err     # 2 policies x (warm-up + 1 repeat)
    assert main(args + ["--json"]) == 0
    assert "bench:" not in capsys.readouterr().err
