"""Notebooks executed headless: outputs kept (.ipynb and HTML), a failing cell named, the main job runs them."""

from __future__ import annotations

import json

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from lab import main_job
from lab.notebook_runner import failure_message, numbered_notebooks, offline_assets, run_notebook

LIVE = """from lab.widgets import Knobs, budget_slider
import plotly.graph_objects as go
knobs = Knobs(slots=budget_slider(3))
knobs.live(lambda slots: go.Figure(go.Bar(x=list(range(slots)), y=[1] * slots), layout=dict(title="bars")))"""


def _write(path, *sources):
    nb = new_notebook(cells=[new_markdown_cell("# test")] + [new_code_cell(s) for s in sources])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def test_outputs_are_kept_with_plotly_and_html(tmp_path, capfd):
    nb = _write(tmp_path / "00_live.ipynb", LIVE, "import sys; print(sys.prefix)")
    run = run_notebook(nb, tmp_path / "out")
    assert run.ok, run.error
    assert "without encryption" not in capfd.readouterr().err      # the kernel's transport is encrypted
    executed = nbformat.read(run.ipynb, as_version=4)
    outputs = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs]
    figures = [o for o in outputs if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert len(figures) == 1 and "text/html" in figures[0]["data"]   # JupyterLab's mimetype and the HTML report's
    assert "widgets" in executed.metadata                            # widget state, for the HTML report
    html = run.html.read_text()
    assert "bars" in html and "Plotly" in html
    # the widget renderer travels in the page; nothing of it, nor require.js, is fetched (test_browser opens it offline)
    assert offline_assets()["widget_renderer_url"] in html and "@jupyter-widgets/html-manager" not in html
    assert "require.min.js" not in html and "unpkg.com" not in html
    assert not list((tmp_path / "out").glob(".*.tmp"))               # atomic writes leave no temporaries


def test_a_failing_cell_is_named_and_still_written(tmp_path):
    nb = _write(tmp_path / "01_broken.ipynb", "x = 1", "assert x == 2, 'x is not two'", "print('never')")
    run = run_notebook(nb, tmp_path / "out")
    assert not run.ok and "cell 2" in run.error and "x is not two" in run.error
    assert run.html.is_file() and "x is not two" in run.html.read_text()
    assert "01_broken" in failure_message([run])


def test_numbered_notebooks_are_found_in_order(tmp_path):
    for name in ("02_b.ipynb", "01_a.ipynb", "scratch.ipynb"):
        _write(tmp_path / name, "1")
    assert [p.name for p in numbered_notebooks(tmp_path)] == ["01_a.ipynb", "02_b.ipynb"]


def test_the_main_job_executes_the_notebooks(tmp_path):
    folder = tmp_path / "nbs"
    folder.mkdir()
    _write(folder / "01_ok.ipynb", "print('hello')")
    out = tmp_path / "reports"
    assert main_job.main(["--out", str(out), "--max-new-tokens", "2", "--notebooks", str(folder)]) == 0
    assert (out / "notebooks" / "01_ok.ipynb").is_file() and (out / "notebooks" / "01_ok.html").is_file()
    report = (out / "main_job.md").read_text()
    assert "| 01_ok | ok |" in report
    assert "times are not a measure of the schedules" in report  # a CPU run says what its times mean
    assert report.index("experts copied") < report.index("TTFT ms")  # the counts lead
    assert json.loads((out / "main_job.json").read_text())["notebooks"][0]["ok"]

    _write(folder / "02_fails.ipynb", "raise RuntimeError('boom')")
    assert main_job.main(["--out", str(out), "--max-new-tokens", "2", "--notebooks", str(folder)]) == 1
    assert "FAILED" in (out / "main_job.md").read_text()


def test_output_widgets_do_not_stall_the_run(tmp_path):
    """An ``interactive_output`` panel drawing a plotly figure (as in notebook 01) runs in seconds,
    its figure kept in the cell (nbclient's Output-widget mimic stalled it for the cell's timeout)."""
    nb = _write(tmp_path / "02_output_widget.ipynb", """import ipywidgets as widgets
import plotly.graph_objects as go
from IPython.display import display
n = widgets.IntSlider(value=3)
draw = lambda n: display(go.Figure(go.Bar(x=list(range(3000)), y=list(range(3000))), layout=dict(title=f"n={n}")))
display(n, widgets.interactive_output(draw, dict(n=n)))""")
    run = run_notebook(nb, tmp_path / "out", timeout=40)
    assert run.ok and run.seconds < 30, (run.error, run.seconds)
    outputs = nbformat.read(run.ipynb, as_version=4).cells[1].outputs
    assert any("application/vnd.plotly.v1+json" in o.get("data", {}) for o in outputs)
