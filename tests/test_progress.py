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
