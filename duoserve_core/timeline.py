"""A record of every copy and every computation: stream, layer, expert, start and end.

The timeline subscribes to the runtime's events (``events.SpanEvent``, and ``StepEvent`` for the
phase and step): when work is queued it marks the stream that does it. On CUDA the marks are
CUDA events recorded on that stream, resolved after the run (reading them during the run would
synchronise); on the CPU a monotonic clock. The CPU lane's spans (``stream="cpu"``) arrive whole,
timed on the host's monotonic clock by the worker that ran them, and are placed against the host
time taken when the timeline was reset (on CUDA that is when the origin event was recorded on an
idle device, so the two time bases agree to within microseconds). Either way the timeline is
measured, never inferred.
On several GPUs each device's spans carry its index (``device``) and are timed against that
device's own origin event (CUDA events of two devices cannot be compared): the origins are recorded
back to back on idle devices, so the devices' time bases agree to within microseconds too.
It is exported as a pandas DataFrame (for the notebooks) and as a Chrome trace that Perfetto and
chrome://tracing open.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass

import torch

from .events import Event, SpanEvent, StepEvent

COLUMNS = ["stream", "kind", "phase", "step", "layer", "expert", "nbytes", "start_ms", "end_ms", "duration_ms",
           "device"]


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
    device: int = 0


class Timeline:
    """Collects spans from the events it is subscribed to (``subscribe`` it to an ``EventBus``)."""

    def __init__(self, device: torch.device | list[torch.device], enabled: bool = True):
        self.devices = list(device) if isinstance(device, (list, tuple)) else [device]
        self.cuda = self.devices[0].type == "cuda"
        self.enabled = enabled
        self.phase, self.step = "prefill", 0
        self._spans: list[_Span] = []
        self._host_spans: list[dict] = []           # whole spans timed on the host clock (the CPU lane)
        self._open: dict[tuple[int, str], _Span | None] = {}   # the span in progress on each device's stream
        self._origin: list = []                     # one origin mark per device
        self._host_origin = time.perf_counter()

    def on_event(self, event: Event) -> None:
        if isinstance(event, SpanEvent):
            lane = (event.device, event.stream)
            if event.edge == "begin":
                self._open[lane] = self.start(event.stream, event.kind, event.layer, event.expert,
                                              event.nbytes, event.cuda_stream, event.device)
            elif event.edge == "end":
                self.end(self._open.pop(lane, None), event.cuda_stream)
            elif self.enabled:  # "whole": already timed on the host clock
                self._host_spans.append(dict(stream=event.stream, kind=event.kind, phase=self.phase, step=self.step,
                                             layer=event.layer, expert=event.expert, nbytes=event.nbytes,
                                             start_ms=(event.start_s - self._host_origin) * 1e3,
                                             end_ms=(event.end_s - self._host_origin) * 1e3,
                                             duration_ms=(event.end_s - event.start_s) * 1e3, device=event.device))
        elif isinstance(event, StepEvent) and event.kind == "step_started":
            self.phase, self.step = event.phase, event.step

    def reset(self) -> None:
        """Forget previous spans and start the clock now (on each device's current stream)."""
        self._spans.clear()
        self._host_spans.clear()
        self._origin = [self._mark(None, d) for d in range(len(self.devices))]
        self._host_origin = time.perf_counter()

    def _mark(self, stream: torch.cuda.Stream | None, device: int = 0):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream if stream is not None else torch.cuda.current_stream(self.devices[device]))
        return event

    def start(self, stream: str, kind: str, layer: int, expert: int | None = None, nbytes: int = 0,
              cuda_stream: torch.cuda.Stream | None = None, device: int = 0) -> _Span | None:
        if not self.enabled:
            return None
        span = _Span(stream, kind, self.phase, self.step, layer, expert, nbytes, self._mark(cuda_stream, device),
                     device=device)
        self._spans.append(span)
        return span

    def end(self, span: _Span | None, cuda_stream: torch.cuda.Stream | None = None) -> None:
        if span is not None:
            span.end = self._mark(cuda_stream, span.device)

    def _ms(self, mark, device: int = 0) -> float:
        if self.cuda:
            return self._origin[device].elapsed_time(mark)
        return (mark - self._origin[device]) * 1e3

    def rows(self) -> list[dict]:
        """Spans as dicts, times in ms from ``reset``. On CUDA, call after the work has finished."""
        if self.cuda and self._spans:
            for device in self.devices:
                torch.cuda.synchronize(device)
        out = []
        for s in self._spans:
            start, end = self._ms(s.start, s.device), self._ms(s.end, s.device)
            out.append(dict(stream=s.stream, kind=s.kind, phase=s.phase, step=s.step, layer=s.layer,
                            expert=s.expert, nbytes=s.nbytes, start_ms=start, end_ms=end, duration_ms=end - start,
                            device=s.device))
        return out + [dict(r) for r in self._host_spans]

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(self.rows(), columns=COLUMNS)

    def to_chrome_trace(self) -> dict:
        """Chrome trace event format: one complete event ('X') per span, one track per stream, one
        process per device."""
        tids = {"compute": 1, "copy": 2, "cpu": 3, "relayout": 4}
        names = {"compute": "compute stream", "copy": "copy stream", "cpu": "CPU lane", "relayout": "relayout stream"}
        rows = self.rows()
        devices = sorted({r.get("device", 0) for r in rows} | {0})
        events = [{"ph": "M", "name": "thread_name", "pid": d + 1, "tid": tid, "args": {"name": names[name]}}
                  for d in devices for name, tid in tids.items()]
        if len(devices) > 1:
            events += [{"ph": "M", "name": "process_name", "pid": d + 1, "args": {"name": f"device {d}"}}
                       for d in devices]
        for r in rows:
            label = f"{r['kind']} L{r['layer']}" + ("" if r["expert"] is None else f"E{r['expert']}")
            events.append({
                "ph": "X", "name": label, "cat": r["phase"], "pid": r.get("device", 0) + 1,
                "tid": tids.get(r["stream"], 5),
                "ts": r["start_ms"] * 1e3, "dur": max(r["duration_ms"], 0.0) * 1e3,
                "args": {k: r[k] for k in ("phase", "step", "layer", "expert", "nbytes")},
            })
        return {"traceEvents": events, "displayTimeUnit": "ms"}

    def write_chrome_trace(self, path) -> None:
        from .atomic import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_chrome_trace()))


COMPUTE_KINDS = ("attention", "router", "expert")  # the spans a compute stream records


def step_split(rows: list[dict], phase: str, steps: int) -> dict:
    """Where the steps of ``phase`` spent their time, per step (means over ``steps``): the copies and the
    copy streams' busy time, the compute streams' busy time (in all and by kind: attention, router,
    experts) and the CPU lane's, in seconds; with several GPUs the streams of all of them add up. Beside a step's own time it
    says what a latency alone does not: whether a step was long because it copied more, computed more,
    or because the streams idled (host work, syncs) for the rest. The runtime's timeline and the
    simulator's rows have the same columns, so measured and simulated steps split alike.

    ``longest_step_s`` and ``stall_s``: each step's span on the timeline (its first span's start to its
    last one's end), the longest, and the time steps spent beyond twice the median span, per step. Why:
    a mean hides a stall; on the H200 one decode step of a CPU-lane run took 474 ms among steps of
    about 110 ms (the host held up for 350 ms, its relayout launch and the lane's post with it), and
    its three runs' E2E spread 1.21x where the GPU-only runs' spread 1.09x (docs/cpu_lane.md)."""
    mine = [r for r in rows if r["phase"] == phase]
    n = steps or 1

    def busy(stream: str, kind: str | None = None) -> float:
        return sum(r["duration_ms"] for r in mine if r["stream"] == stream and kind in (None, r["kind"])) / 1e3 / n
    spans = step_spans_s(mine)
    median = statistics.median(spans) if spans else 0.0
    return {"copies_per_step": sum(r["kind"] == "h2d" for r in mine) / n, "copy_busy_s": busy("copy"),
            "compute_busy_s": busy("compute"), "cpu_busy_s": busy("cpu"),
            "cpu_jobs_per_step": sum(r["stream"] == "cpu" for r in mine) / n,
            # the compute streams' time by kind: which part of a step grew (they add up to compute_busy_s)
            **{f"{kind}_busy_s": busy("compute", kind) for kind in COMPUTE_KINDS},
            "longest_step_s": max(spans, default=0.0),
            "stall_s": sum(max(0.0, span - 2 * median) for span in spans) / n}


def step_spans_s(rows: list[dict]) -> list[float]:
    """Each step's span in seconds, from its first span's start to its last one's end, in step order."""
    bounds: dict[int, list[float]] = {}
    for r in rows:
        b = bounds.setdefault(r["step"], [r["start_ms"], r["end_ms"]])
        b[0], b[1] = min(b[0], r["start_ms"]), max(b[1], r["end_ms"])
    return [(end - start) / 1e3 for _, (start, end) in sorted(bounds.items())]
