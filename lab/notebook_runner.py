"""Execute the numbered notebooks headless and keep them, outputs included, as .ipynb and HTML.

    python -m lab.notebook_runner                       # every notebooks/NN_*.ipynb -> reports/notebooks/
    python -m lab.notebook_runner notebooks/03_predictor.ipynb --out /tmp/nb
    python -m lab.notebook_runner --summary nb.json   # also: per notebook, status, seconds and printed text

Each notebook runs top to bottom in a fresh kernel (the ``python3`` kernel of the interpreter that
runs this, so the repository's ``.venv``), in its own folder as the working directory, with its
widgets at their default values. ``NN_name.ipynb`` (with outputs and widget state) and
``NN_name.html`` are written atomically (a temporary file, then a rename), also when a cell
fails: the error is then in place in both, and the run fails, naming the notebook and the cell.

Figures are written with plotly's mimetype for JupyterLab and as HTML with plotly.js inlined
once per notebook (``PLOTLY_RENDERER``), and the widget renderer is inlined in every HTML report
(``WIDGET_RENDERER``), so the reports open offline, sliders and dropdowns included; they load no
script from a CDN (``offline_assets``: require.js and MathJax are left out, nothing uses them).

The kernels get CurveZMQ keys from their manager (``kernel_config``): their traffic is encrypted,
and ipykernel no longer warns, once per notebook, that it runs over TCP in plain text.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import json
import os
import re
import signal
import sys
import time
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
from traitlets.config import Config

from duoserve_core.atomic import atomic_write_text
from duoserve_core.progress import Terminated, interruptible, progress

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
PLOTLY_RENDERER = "plotly_mimetype+notebook"
# @jupyter-widgets/html-manager's standalone renderer (see static/html-manager/README.md)
WIDGET_RENDERER = Path(__file__).resolve().parent / "static" / "html-manager" / "embed.js"


def kernel_config() -> Config:
    """The kernel manager's settings: CurveZMQ keys provisioned by the manager where the kernelspec
    declares support (jupyter_client >= 8.9's ``transport_encryption``; an ipykernel that supports it
    otherwise warns on every start that its TCP traffic is plain text: seven times in ``make run``);
    the IPC transport (Unix sockets, no warning either) where pyzmq or jupyter_client cannot; as
    before on Windows without them. Set at the source, not by filtering the kernel's stderr."""
    import zmq
    from jupyter_client import KernelManager

    config = Config()
    if zmq.has("curve") and KernelManager.class_traits().get("transport_encryption") is not None:
        config.KernelManager.transport_encryption = "auto"
    elif os.name == "posix":
        config.KernelManager.transport = "ipc"
    return config


@dataclass
class NotebookRun:
    name: str
    seconds: float
    ipynb: Path
    html: Path
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_dict(self) -> dict:
        return {"name": self.name, "seconds": round(self.seconds, 1), "ipynb": str(self.ipynb), "html": str(self.html),
                "ok": self.ok, "error": self.error}


def numbered_notebooks(folder: str | Path = NOTEBOOKS) -> list[Path]:
    """``NN_name.ipynb`` files of ``folder``, in order."""
    return sorted(p for p in Path(folder).glob("[0-9][0-9]_*.ipynb"))


@contextmanager
def _env(**values: str):
    """Environment variables for the kernels started inside (they inherit this process's)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _failed_cell(nb: nbformat.NotebookNode) -> int | None:
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and any(o.get("output_type") == "error" for o in cell.get("outputs", [])):
            return i
    return None


def run_notebook(path: str | Path, out_dir: str | Path, *, timeout: int = 600, kernel_name: str = "python3"
                 ) -> NotebookRun:
    """Execute ``path`` and write ``out_dir/<name>.ipynb`` and ``.html``; never raises for a failing cell."""
    path, out_dir = Path(path), Path(out_dir)
    nb = nbformat.read(path, as_version=4)
    client = _Client(nb, timeout=timeout, kernel_name=kernel_name, store_widget_state=True,
                     resources={"metadata": {"path": str(path.parent.resolve())}}, config=kernel_config())
    # No mimic of the Output widget: nbclient's sends comm messages on the shell channel while the
    # cell runs, and with this jupyter_client/pyzmq the cell's execute_reply then only arrives when
    # the cell's timeout expires (notebook 01's interactive_output waited 600 s). Without it, what
    # an Output widget captures lands in the cell's own outputs, where the HTML report shows it.
    client.widget_registry = {}
    error = None
    t0 = time.perf_counter()
    with _env(PLOTLY_RENDERER=PLOTLY_RENDERER, PYTHONUNBUFFERED="1"):
        try:
            client.execute()
        except CellExecutionError as exc:
            cell = _failed_cell(nb)
            summary = str(exc).strip().splitlines()
            error = f"cell {cell}: {summary[-1] if summary else type(exc).__name__}"
        except (CellTimeoutError, DeadKernelError) as exc:
            error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    seconds = time.perf_counter() - t0
    ipynb, html = out_dir / path.name, out_dir / (path.stem + ".html")
    atomic_write_text(ipynb, nbformat.writes(nb))
    atomic_write_text(html, _to_html(nb))
    return NotebookRun(path.stem, seconds, ipynb, html, error)


class _Client(NotebookClient):
    """nbclient's client, stopped cleanly by Ctrl-C or SIGTERM (``execute`` raises the interrupt).

    nbclient's own handlers for both signals queue a kernel shutdown behind the running cell: the
    cell then fails as "Kernel died" and the cleanup runs a second time and fails an assertion, a
    traceback instead of one line. Installed after nbclient's (in the kernel's context), these stop
    the kernel at once (a cell may never return) and cancel the execution; nbclient's way out shuts
    the kernel down, and the interrupt is raised when it is done."""

    signals = (signal.SIGINT, signal.SIGTERM)

    @asynccontextmanager
    async def async_setup_kernel(self, **kwargs):
        async with super().async_setup_kernel(**kwargs):
            loop, task = asyncio.get_running_loop(), asyncio.current_task()
            try:
                for sig in self.signals:
                    loop.add_signal_handler(sig, self._stop, sig, task)
            except (RuntimeError, NotImplementedError):  # not the main thread, or Windows: nbclient's stay
                pass
            yield

    def _stop(self, sig: int, task: asyncio.Task) -> None:
        self.stopped_by = sig
        self.shutdown_kernel = "immediate"
        task.cancel()

    def execute(self, **kwargs):
        self.stopped_by = None
        previous = {sig: signal.getsignal(sig) for sig in self.signals}
        try:
            return super().execute(**kwargs)
        except (asyncio.CancelledError, DeadKernelError):
            if self.stopped_by is None:
                raise
        finally:
            for sig, handler in previous.items():  # the event loop leaves SIG_DFL behind
                signal.signal(sig, handler)
        raise Terminated if self.stopped_by == signal.SIGTERM else KeyboardInterrupt


# What plotly's notebook renderer puts before every figure's HTML: it hard-codes include_mathjax="cdn"
# (plotly 7.1), MathJax 3 for TeX in labels, which no figure here has (see ``offline_assets``).
PLOTLY_MATHJAX = re.compile(r'<script src="https://cdnjs\.cloudflare\.com/ajax/libs/mathjax/[^"]*"></script>')


def _to_html(nb: nbformat.NotebookNode) -> str:
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter(template_name="lab", **offline_assets()).from_notebook_node(nb)
    return PLOTLY_MATHJAX.sub("", body)


@functools.cache
def offline_assets() -> dict[str, str]:
    """nbconvert's options for what its HTML would fetch from CDNs when opened: the widget renderer
    inlined as a data: URL (2.5 MB of base64; it draws the saved widget state, sliders and dropdowns
    at their values), require.js as an empty script: nothing here loads AMD modules (plotly >= 5
    draws without it, and the renderer is html-manager's non-AMD build); MathJax as an empty script
    too: no notebook writes TeX in its markdown (nor a LaTeX output, nor a plotly label in $...$),
    so MathJax from cdnjs (2.7 for markdown, 3 in each plotly figure's HTML: ``PLOTLY_MATHJAX``)
    would typeset nothing, and vendoring it would add megabytes to every report. TeX written later
    shows as its source text, readable; ship MathJax then."""
    renderer = base64.b64encode(WIDGET_RENDERER.read_bytes()).decode("ascii")
    return {"widget_renderer_url": f"data:text/javascript;base64,{renderer}",
            "require_js_url": "data:text/javascript,", "mathjax_url": "data:text/javascript,"}


def run_all(paths: list[Path], out_dir: str | Path, *, timeout: int = 600, log=print,
            runs: list[NotebookRun] | None = None) -> list[NotebookRun]:
    """Every notebook in order (a failure does not stop the others); ``log`` hears one line each.
    ``runs``, where given, is filled as the notebooks finish: what an interrupted run had written."""
    runs = [] if runs is None else runs
    for path in progress(paths, desc="notebooks", unit="notebook"):
        log(f"notebook {path.name} ...")
        run = run_notebook(path, out_dir, timeout=timeout)
        runs.append(run)
        status = "ok" if run.ok else f"FAILED at {run.error}"
        log(f"notebook {path.name}: {status} in {run.seconds:.1f} s -> {run.html}")
    return runs


def text_outputs(nb: nbformat.NotebookNode, limit: int = 4000) -> list[str]:
    """What the notebook's cells printed (streams and plain-text results), each cut at ``limit``
    characters: enough to read what a run measured without opening the notebook."""
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []) if cell.cell_type == "code" else []:
            text = o.get("text") if o.get("output_type") == "stream" else o.get("data", {}).get("text/plain")
            if o.get("output_type") == "error":
                text = f"{o.get('ename')}: {o.get('evalue')}"
            if text:
                out.append(text[:limit])
    return out


def summary(runs: list[NotebookRun]) -> dict:
    """Where and how every notebook ran, with what it printed (``--summary``)."""
    import platform

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or 'unknown'})"
    notebooks = []
    for run in runs:
        nb = nbformat.read(run.ipynb, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        notebooks.append({**run.as_dict(), "code_cells": len(code),
                          "cells_run": sum(c.get("execution_count") is not None for c in code),
                          "printed": text_outputs(nb)})
    return {"device": device, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "notebooks": notebooks}


def failure_message(runs: list[NotebookRun]) -> str | None:
    failed = [r for r in runs if not r.ok]
    if not failed:
        return None
    return "notebook(s) failed: " + "; ".join(f"{r.name} ({r.error}; see {r.html})" for r in failed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", help="notebooks to run (default: every notebooks/NN_*.ipynb)")
    parser.add_argument("--out", default="reports/notebooks", help="folder for the executed .ipynb and .html")
    parser.add_argument("--timeout", type=int, default=600, help="seconds one cell may take")
    parser.add_argument("--summary", default=None, help="also write a JSON summary of the runs here")
    args = parser.parse_args(argv)
    paths = [Path(p) for p in args.notebooks] or numbered_notebooks()
    if not paths:
        print(f"error: no numbered notebooks in {NOTEBOOKS}", file=sys.stderr)
        return 2
    runs: list[NotebookRun] = []
    return interruptible(lambda: _run(paths, args, runs), written=lambda: _written(runs))


def _written(runs: list[NotebookRun]) -> str:
    """What an interrupted run leaves: the reports of the notebooks it finished, and nothing of the one it was in."""
    if not runs:
        return "nothing written"
    return f"wrote the reports of {', '.join(r.name for r in runs)} only"


def _run(paths: list[Path], args: argparse.Namespace, runs: list[NotebookRun]) -> int:
    run_all(paths, args.out, timeout=args.timeout, runs=runs)
    if args.summary:
        atomic_write_text(args.summary, json.dumps(summary(runs), indent=1))
    message = failure_message(runs)
    if message:
        print(f"error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
