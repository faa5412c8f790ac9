"""Knobs as ipywidgets, bound to live redraws, that also work when nobody is watching.

    knobs = Knobs(slots=budget_slider(16), depth=depth_slider(2), threshold=threshold_slider(0.5))
    knobs                                          # the panel, at the top of a notebook
    knobs.live(lambda slots, depth: figure(...))   # drawn now, redrawn when slots or depth move

A live cell's output is an ordinary display with a display id, so a headless run (nbclient,
nbval, nbconvert) keeps what was drawn with the knobs' default values, and the notebook works as
a script. In JupyterLab a change of a knob the function takes (matched by parameter name) calls it
again and replaces the outputs in place. Expensive work shared by several live cells goes through
``knobs.cached`` so that one change runs it once.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable
from typing import Any

import ipywidgets as widgets
import plotly.io as pio
from IPython.display import Markdown, display
from plotly.basedatatypes import BaseFigure

from duoserve_core.policy import DEFAULT_KNOBS, POLICIES

# Replaces an output while it is recomputed. Switching the mimetype also makes JupyterLab build a
# fresh renderer: plotly's renderer ignores an update that keeps its own mimetype.
REDRAWING = {"text/plain": "redrawing..."}

_STYLE = {"description_width": "initial"}
_LAYOUT = widgets.Layout(width="300px")


# -- the knobs --------------------------------------------------------------------------------------
def budget_slider(value: int = 16, total: int = 64, minimum: int = 2, description: str = "budget (expert slots)"
                  ) -> widgets.IntSlider:
    """The memory budget as expert slots: what is left after non-expert weights, KV cache and
    activations (``lab.runs.budget_bytes`` turns it into bytes)."""
    return widgets.IntSlider(value=value, min=minimum, max=total, description=description, style=_STYLE,
                             layout=_LAYOUT, continuous_update=False)


def depth_slider(value: int = DEFAULT_KNOBS.prefetch_depth, maximum: int = 4, description: str = "prefetch depth (layers)") -> widgets.IntSlider:
    return widgets.IntSlider(value=value, min=1, max=maximum, description=description, style=_STYLE,
                             layout=_LAYOUT, continuous_update=False)


def threshold_slider(value: float = DEFAULT_KNOBS.predictor_threshold, description: str = "predictor threshold") -> widgets.FloatSlider:
    return widgets.FloatSlider(value=value, min=0.05, max=0.95, step=0.05, description=description, style=_STYLE,
                               layout=_LAYOUT, continuous_update=False, readout_format=".2f")


def int_slider(value: int, minimum: int, maximum: int, description: str, step: int = 1) -> widgets.IntSlider:
    return widgets.IntSlider(value=value, min=minimum, max=maximum, step=step, description=description,
                             style=_STYLE, layout=_LAYOUT, continuous_update=False)


def policy_dropdown(value: str = "duoserve", options: tuple[str, ...] = POLICIES) -> widgets.Dropdown:
    return widgets.Dropdown(value=value, options=list(options), description="policy", style=_STYLE, layout=_LAYOUT)


def choice_dropdown(options: list[str] | dict[str, Any], value: Any, description: str) -> widgets.Dropdown:
    """A dropdown over labels (a dict maps each label to the value handed to live functions)."""
    return widgets.Dropdown(options=options, value=value, description=description, style=_STYLE, layout=_LAYOUT)


def toggle(value: bool, description: str) -> widgets.Checkbox:
    return widgets.Checkbox(value=value, description=description, style=_STYLE, indent=False)


# -- the panel and its live outputs ----------------------------------------------------------------
class Knobs:
    """Named widgets shown as one panel; live outputs redraw when the knobs they take change."""

    def __init__(self, columns: int = 3, **controls: widgets.ValueWidget):
        if not controls:
            raise ValueError("Knobs needs at least one widget")
        self.controls = controls
        self.columns = columns
        self.status = widgets.HTML(value="")
        self.outputs: list[LiveOutput] = []

    @property
    def values(self) -> dict[str, Any]:
        return {name: w.value for name, w in self.controls.items()}

    def __getitem__(self, name: str) -> Any:
        return self.controls[name].value

    def panel(self) -> widgets.VBox:
        names = list(self.controls)
        rows = [widgets.HBox([self.controls[n] for n in names[i:i + self.columns]])
                for i in range(0, len(names), self.columns)]
        return widgets.VBox(rows + [self.status])

    def _ipython_display_(self) -> None:
        display(self.panel())

    def cached(self, fn: Callable, maxsize: int = 16) -> Callable:
        """``fn`` memoised on its (hashable) arguments: live cells that share a run compute it once."""
        return functools.lru_cache(maxsize=maxsize)(fn)

    def live(self, draw: Callable[..., Any], *, show: Callable = display) -> LiveOutput:
        """Display ``draw(**knobs it takes)`` now and redraw it in place whenever one of them changes.

        ``draw`` returns one displayable (a figure, a DataFrame, a string shown as Markdown) or a
        tuple of them; it must return as many each time.
        """
        out = LiveOutput(self, draw, show=show)
        self.outputs.append(out)
        return out


class LiveOutput:
    """The outputs of one live function: display handles updated on each change of its knobs."""

    def __init__(self, knobs: Knobs, draw: Callable[..., Any], show: Callable = display):
        params = inspect.signature(draw).parameters
        takes_all = any(p.kind is p.VAR_KEYWORD for p in params.values())
        self.names = [n for n in knobs.controls if takes_all or n in params]
        unknown = [n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
                   and p.default is p.empty and n not in knobs.controls]
        if unknown:
            raise TypeError(f"live function takes {unknown}, which are not knobs ({', '.join(knobs.controls)})")
        self.knobs, self.draw, self.redraws = knobs, draw, 0
        items = self._items()
        self.handles = []
        for item in items:
            data, metadata = _bundle(item)
            self.handles.append(show(data, metadata=metadata, raw=True, display_id=True))
        for name in self.names:
            knobs.controls[name].observe(self.redraw, names="value")

    def _ipython_display_(self) -> None:
        """Nothing: the outputs are already displayed (``knobs.live(...)`` may end a cell)."""

    def _items(self) -> list[Any]:
        result = self.draw(**{n: self.knobs[n] for n in self.names})
        return list(result) if isinstance(result, (tuple, list)) else [result]

    def redraw(self, _change: dict | None = None) -> None:
        """Recompute and replace the outputs (an error is shown in place of the first one)."""
        for handle in self.handles:
            handle.update(REDRAWING, raw=True)
        self.knobs.status.value = "<i>running...</i>"
        t0 = time.perf_counter()
        try:
            items = self._items()
        except Exception as exc:  # a knob setting that cannot run (a budget too small): say so in place
            items = [Markdown(f"**{type(exc).__name__}:** {exc}")]
        self.redraws += 1
        for i, handle in enumerate(self.handles):
            if i < len(items):
                data, metadata = _bundle(items[i])
                handle.update(data, metadata=metadata, raw=True)
            else:
                handle.update({"text/plain": ""}, raw=True)
        self.knobs.status.value = f"<i>redrawn in {time.perf_counter() - t0:.1f} s</i>"


def _bundle(item: Any) -> tuple[dict, dict]:
    """``(data, metadata)`` mime bundles for ``display(..., raw=True)``.

    Plotly figures display themselves through ``_ipython_display_``, which drops the display id,
    so their bundle is asked for directly.
    """
    if isinstance(item, str):
        item = Markdown(item)
    if isinstance(item, BaseFigure):
        # The kernel's default renderers (plotly_mimetype, plus HTML where PLOTLY_RENDERER asks for it).
        # Not item._repr_mimebundle_(): it re-activates the renderers on every call, which inlines
        # plotly.js (5 MB) into each figure's output. Outside a kernel plotly has no default renderer,
        # and the plotly mimetype is what a notebook needs anyway.
        data = pio.renderers._build_mime_bundle(item.to_dict()) or \
            pio.renderers["plotly_mimetype"].to_mimebundle(item.to_dict())
        return {"text/plain": f"<plotly figure: {item.layout.title.text or 'untitled'}>", **data}, {}
    from IPython.core.formatters import format_display_data

    return format_display_data(item)
