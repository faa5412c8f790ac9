"""Run a notebook's code cells in one in-process IPython shell, without Jupyter: for the GPU machine.

    python benchmarks/notebook_cells.py notebooks/07_serving_qos.ipynb --out reports/notebook07_cells.json

``lab.notebook_runner`` (nbclient, a kernel, HTML reports) is how notebooks run here and in CI; on the
lent GPU machine its Jupyter stack (about 30 MB of wheels) and the repository (about 47 MB) exceed the
64 MiB a call may carry. This runs the same cells top to bottom with only IPython, plotly and
ipywidgets (about 11 MB of wheels; ``bash benchmarks/batch_gpu.sh notebook``): each cell through
``InteractiveShell.run_cell`` with the notebook's folder as the working directory, so its imports, its
widgets' first render (``interactive_output`` calls its function once at creation) and its assert
cells execute as in a kernel; figures are not kept. ``--then CODE`` runs once after the first cell,
where the notebooks make their knobs (e.g. ``--then "knobs.controls['rates'].value = '1'"`` to fit a
call's ten minutes). It stops at the first failing cell and writes, atomically, per cell its index,
seconds, whether it ran, the error, and the text it printed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from duoserve_core.atomic import atomic_write_json  # noqa: E402


def run_cells(path: Path, then: str | None = None) -> list[dict]:
    """Every code cell of ``path``, in order, in one fresh shell (``then`` after the first); stops after
    the first that fails."""
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    cells = ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    if then:
        cells.insert(1, then)
    rows, cwd = [], os.getcwd()
    os.chdir(path.parent)
    try:
        for index, source in enumerate(cells):
            printed = io.StringIO()
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(printed):
                result = shell.run_cell(source, store_history=False)
            error = result.error_before_exec or result.error_in_exec
            rows.append({"cell": index, "seconds": round(time.perf_counter() - t0, 2), "ok": error is None,
                         "error": None if error is None else f"{type(error).__name__}: {error}",
                         "printed": printed.getvalue()[-2000:]})
            # progress on stderr as it happens: a run killed by a signal (no summary) still says how far it got
            print(f"cell {index} {'ok' if error is None else 'FAILED'} in {rows[-1]['seconds']} s", file=sys.stderr, flush=True)
            if error is not None:
                break
    finally:
        os.chdir(cwd)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("notebook")
    p.add_argument("--then", default=None, help="code run once after the first cell (e.g. to set knobs)")
    p.add_argument("--out", default=None, help="JSON summary (written atomically)")
    args = p.parse_args(argv)
    path = Path(args.notebook).resolve()
    if not path.is_file():
        print(f"error: {args.notebook} does not exist; give a notebook file", file=sys.stderr)
        return 2
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    rows = run_cells(path, args.then)
    ok = all(r["ok"] for r in rows) and len(rows) == sum(
        1 for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code") + bool(args.then)
    record = {"notebook": path.name, "device": device, "date": time.strftime("%Y-%m-%d"), "ok": ok, "then": args.then,
              "seconds": round(time.perf_counter() - t0, 1), "cells": rows}
    for r in rows:
        print(f"cell {r['cell']:>2} {'ok' if r['ok'] else 'FAILED'} {r['seconds']:7.1f} s" + (f"  {r['error']}" if r["error"] else ""))
    print(f"{path.name} on {device}: {'ok' if ok else 'failed'} in {record['seconds']} s")
    if args.out:
        atomic_write_json(Path(args.out), record)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
