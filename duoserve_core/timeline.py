"""A record of every copy and every computation: stream, layer, expert, start and end.

The timeline subscribes to the runtime's events (``events.SpanEvent``, and ``StepEvent`` for the
phase and step): when work is queued it marks the stream that does it. On CUDA the marks are
CUDA events recorded on that stream, resolved after the run (reading them during the run would
synchronise); on the CPU a monotonic clock. The CPU lane's spans (``stream="cpu"``) arrive whole,
timed on the host's monotonic clock by the worker that ran them, and are placed against the host
time taken when the timeline was reset (on CUDA that is when the origin event was recorded on an
idle device, so the two time bases agree to within microseconds). Either way the timeline is
measured, never inferred.
It is exported as a pandas DataFrame (for the notebooks) and as a Chrome trace that Perfetto and
chrome://tracing open.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import torch

from .events import Event, SpanEvent, StepEvent

COLUMNS = ["stream", "kind", "phase", "step", "layer", "expert", "nbytes", "start_ms", "end_ms", "duration_ms"]


@dataclass
class _Span:
    stream: str
    kind: str
    phase: str
    step: int
    layer: int
    expert: int | None
    nbytes: int
    start: object
    end: object = None


class Timeline:
    """Collects spans from the events it is subscribed to (``subscribe`` it to an ``EventBus``)."""

    def __init__(self, device: torch.device, enabled: bool = True):
        self.cuda = device.type == "cuda"
        self.enabled = enabled
        self.phase, self.step = "prefill", 0
        self._spans: list[_Span] = []
        self._host_spans: list[dict] = []           # whole spans timed on the host clock (the CPU lane)
        self._open: dict[str, _Span | None] = {}   # the span in progress on each stream
        self._origin: object = None
        self._host_origin = time.perf_counter()

    def on_event(self, event: Event) -> None:
        if isinstance(event, SpanEvent):
            if event.edge == "begin":
                self._open[event.stream] = self.start(event.stream, event.kind, event.layer, event.expert,
                                                      event.nbytes, event.cuda_stream)
            elif event.edge == "end":
                self.end(self._open.pop(event.stream, None), event.cuda_stream)
            elif self.enabled:  # "whole": already timed on the host clock
                self._host_spans.append(dict(stream=event.stream, kind=event.kind, phase=self.phase, step=self.step,
                                             layer=event.layer, expert=event.expert, nbytes=event.nbytes,
                                             start_ms=(event.start_s - self._host_origin) * 1e3,
                                             end_ms=(event.end_s - self._host_origin) * 1e3,
                                             duration_ms=(event.end_s - event.start_s) * 1e3))
        elif isinstance(event, StepEvent) and event.kind == "step_started":
            self.phase, self.step = event.phase, event.step

    def reset(self) -> None:
        """Forget previous spans and start the clock now (on the current stream)."""
        self._spans.clear()
        self._host_spans.clear()
        self._origin = self._mark(None)
        self._host_origin = time.perf_counter()

    def _mark(self, stream: torch.cuda.Stream | None):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        return event

    def start(self, stream: str, kind: str, layer: int, expert: int | None = None, nbytes: int = 0,
              cuda_stream: torch.cuda.Stream | None = None) -> _Span | None:
        if not self.enabled:
            return None
        span = _Span(stream, kind, self.phase, self.step, layer, expert, nbytes, self._mark(cuda_stream))
        self._spans.append(span)
        return span

    def end(self, span: _Span | None, cuda_stream: torch.cuda.Stream | None = None) -> None:
        if span is not None:
            span.end = self._mark(cuda_stream)

    def _ms(self, mark) -> float:
        if self.cuda:
            return self._origin.elapsed_time(mark)
        return (mark - self._origin) * 1e3

    def rows(self) -> list[dict]:
        """Spans as dicts, times in ms from ``reset``. On CUDA, call after the work has finished."""
        if self.cuda and self._spans:
            torch.cuda.synchronize()
        out = []
        for s in self._spans:
            start, end = self._ms(s.start), self._ms(s.end)
            out.append(dict(stream=s.stream, kind=s.kind, phase=s.phase, step=s.step, layer=s.layer,
                            expert=s.expert, nbytes=s.nbytes, start_ms=start, end_ms=end, duration_ms=end - start))
        return out + [dict(r) for r in self._host_spans]

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(self.rows(), columns=COLUMNS)

    def to_chrome_trace(self) -> dict:
        """Chrome trace event format: one complete event ('X') per span, one track per stream."""
        tids = {"compute": 1, "copy": 2, "cpu": 3, "relayout": 4}
        names = {"compute": "compute stream", "copy": "copy stream", "cpu": "CPU lane", "relayout": "relayout stream"}
        events = [{"ph": "M", "name": "thread_name", "pid": 1, "tid": tid, "args": {"name": names[name]}}
                  for name, tid in tids.items()]
        for r in self.rows():
            label = f"{r['kind']} L{r['layer']}" + ("" if r["expert"] is None else f"E{r['expert']}")
            events.append({
                "ph": "X", "name": label, "cat": r["phase"], "pid": 1, "tid": tids.get(r["stream"], 5),
                "ts": r["start_ms"] * 1e3, "dur": max(r["duration_ms"], 0.0) * 1e3,
                "args": {k: r[k] for k in ("phase", "step", "layer", "expert", "nbytes")},
            })
        return {"traceEvents": events, "displayTimeUnit": "ms"}

    def write_chrome_trace(self, path) -> None:
        from .atomic import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_chrome_trace()))
