"""benchmarks/notebook_cells.py: a notebook's code cells in one in-process IPython shell (the GPU
machine's way to run a notebook without Jupyter): cells share a namespace, run in the notebook's folder,
``--then`` runs after the first cell, and the first failing cell stops the run and is reported. Run as a
command (a subprocess): the shell it makes is the process's IPython instance, which the other tests'
process must not get."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "notebook_cells.py"


def _notebook(path: Path, *sources: str) -> Path:
    cells = [{"cell_type": "markdown", "metadata": {}, "source": ["# title"]}]
    cells += [{"cell_type": "code", "metadata": {}, "source": [s], "outputs": [], "execution_count": None}
              for s in sources]
    path.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    return path


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_cells_share_a_namespace_run_in_the_notebooks_folder_and_then_runs_second(tmp_path):
    (tmp_path / "data.txt").write_text("41")
    nb = _notebook(tmp_path / "nb.ipynb", "x = int(open('data.txt').read())", "print(x + y)")
    out = tmp_path / "summary.json"
    proc = _run(str(nb), "--then", "y = 1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    record = json.loads(out.read_text())
    assert record["ok"] and [r["ok"] for r in record["cells"]] == [True, True, True]
    assert record["cells"][2]["printed"].strip() == "42"


def test_the_first_failing_cell_stops_the_run_and_the_summary_says_so(tmp_path):
    nb = _notebook(tmp_path / "nb.ipynb", "a = 1", "assert a == 2, 'a is not 2'", "b = 3")
    out = tmp_path / "summary.json"
    assert _run(str(nb), "--out", str(out)).returncode == 1
    record = json.loads(out.read_text())
    assert record["ok"] is False and len(record["cells"]) == 2
    assert record["cells"][1]["error"] == "AssertionError: a is not 2"
    missing = _run(str(tmp_path / "missing.ipynb"))
    assert missing.returncode == 2 and missing.stderr.strip().startswith("error: ") and len(missing.stderr.splitlines()) == 1
