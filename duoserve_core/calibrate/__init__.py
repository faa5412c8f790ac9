"""Measure on this device what the simulator's timing model needs, and write a calibration file.

    python -m duoserve_core.calibrate --model synthetic:mixtral-8x7b --quant nf4 --quant-attention nf4 \\
        --device auto --json [--out data/calibration/<device>_<model>_<quant>.json]

(``calibrate(CalibrationSpec(...))`` from Python; the command line is ``__main__``.)

Four groups of figures, each measured the way the runtime does the work (the file format is
documented in ``duoserve_core.sim.calibration``):

- H2D copies from pinned and from pageable host memory, by size (1 MiB .. 256 MiB and exactly one
  expert record): back-to-back copies on a side stream, timed with CUDA events (perf_counter on
  the CPU, where "H2D" is a host memcpy); and the mean of the runtime's own record copies;
- one expert's computation by token count, for bf16 and NF4 at the model's shape, through the
  runtime's own ``make_format(...).pack/forward`` on a device slot, with the gather and weighted
  scatter the executor wraps around it: back to back (``expert_compute``, the longer of device and
  host time) and, on CUDA, queued behind a device sleep (``device_time.expert``, the device's time
  alone at every token count, for both phases: ``_device_time_per_call``);
- attention (with its norm) and router time by new tokens and context length, read from the
  timeline of the real runtime (``load(..., num_layers=2)``): prefill of ``c`` tokens and decode at
  context ``c`` for every ``c`` of ``--contexts``;
- the host's part: per layer, the time to queue attention, and the bookkeeping after the router's
  device->host sync (a base per layer, plus a cost per expert computed and per copy issued, fitted
  over every layer of a resident and an on-demand run); per step, the time before layer 0 and after
  the last layer (embedding, lm_head, sampling). Host marks are taken from the runtime's own events
  (``_Probe`` subscribes), on the same clock as the timeline (its origin is taken right after a sync);
- device time apart from host time (``device_terms``): a span timed while the compute stream is
  idle lasts as long as the host takes to queue its kernels, and at decode sizes (one token, one
  expert: ~0.1 ms of device work, ~0.5-1 ms of Python) that is the host's time, not the device's.
  The on-demand run is therefore made at top-k slots, so every layer copies: in layers >= 1 of a
  decode step the host queues attention, router and experts while the stream still waits on the
  previous layer's copies, and those spans are device time (``device_time`` attention and router).
  The resident run's decode experts are host-bound; their spans are the host's time per expert at
  decode (``host.per_expert_s.decode``). Both are read from the timelines by the same function that
  ``benchmarks/sim_vs_measured.py --device-times-from`` applies to a bench run's timeline. Its
  expert figure is one point (batch 1 decode routes one token to an expert), and a one-point curve
  is constant: batched decode (4..16 tokens per expert at 16..64 requests) would be charged the
  1-token time. So the calibration's expert device time is the per-token-count curve above instead,
  and the timeline's 1-token point is only logged beside the curve's, as a cross-check;
- batched decode attention (``device_time.attention_rows``): one layer's attention for 1..64 rows of
  one token each, every row read to 576 keys (``measure_batched_attention``), which the timeline's
  one-row decode cannot show.

Per-layer figures are what matter, so a 2-layer model is enough; synthetic weights are generated
on the device. On an H100 the whole run takes well under two minutes at Mixtral-8x7B width.
"""

from __future__ import annotations

import datetime
import re
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import ExpertTensors, expert_shapes, open_source
from ..runtime import device_name, load, resolve_device
from ..events import SpanEvent, StepEvent
from ..experts.device_routing import gather
from ..experts.formats import make_format
from ..kv_cache import RowKVCache
from ..mixtral import attend
from ..progress import progress
from .host_lane import measure_host_lane
from ..host_reference import host_reference_s
from ..sim.calibration import FORMAT, PHASES, SHAPE_KEYS, Calibration, CalibrationError
from ..traces import read_trace

MIB = 2**20
FIT_KEYS = ("phase", "step", "layer", "experts", "copies", "post_s")  # a layer's row of host_fit
DEFAULT_SIZES_MIB = (1, 4, 16, 64, 256)
DEFAULT_CONTEXTS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
BUNDLED_TRACE = Path(__file__).resolve().parents[2] / "data" / "traces" / "small-moe-heldout.parquet"
DECODE_STEPS = 5  # decode tokens generated after each prefill; the first is not measured (warm-up)
# batched decode attention (``measure_batched_attention``): rows of one token each, every row read to
# BATCH_WIDTH keys, the bench's prompt of 512 and half of its 128 tokens
BATCH_ROWS = (1, 2, 4, 8, 16, 32, 64)
BATCH_WIDTH = 576


@dataclass(frozen=True)
class CalibrationSpec:
    """What to measure (``python -m duoserve_core.calibrate``'s flags, typed)."""

    model: str = "synthetic:mixtral-8x7b"
    quant: str = "nf4"
    quant_attention: str = "none"
    device: str = "auto"
    formats: tuple[str, ...] = ("bf16", "nf4")       # expert formats to time (``quant``'s is added)
    max_tokens: int = 2048                           # expert compute: 1, 2, 4, .. up to this
    sizes_mib: tuple[float, ...] = DEFAULT_SIZES_MIB  # H2D copy sizes (one expert record is always added)
    contexts: tuple[int, ...] = DEFAULT_CONTEXTS      # prefill lengths and decode contexts
    routing_trace: str = "auto"                      # auto: the bundled trace where it fits; none: the router
    num_layers: int = 2
    repeats: int = 3
    quiet: bool = False                              # no progress lines on stderr, and no bars
    bars: bool = True                                # a bar per phase while stderr is a terminal (not under --json)
    cpu_threads: tuple[int, ...] = ()                # the CPU lane at these thread counts (``host_lane``); () skips it
    gpus: int = 1                                    # > 1: also every GPU's link at once and peer copies (cuda:0..)
    cuda_graphs: bool | None = None                  # the runtime's runs with the decode graphs (None: its default)


# -- timing helpers --------------------------------------------------------------------------
def _time_per_call(fn, device: torch.device, repeats: int, inner: int) -> float:
    """Median over ``repeats`` of the time per call of ``inner`` back-to-back calls of ``fn``.

    On CUDA the work is bracketed by events on the current stream (device time, the host only
    queues); on the CPU by perf_counter.
    """
    fn()  # warm-up: kernels, allocator, bitsandbytes code tables
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3 / inner)
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples)


FALLBACK_CLOCK_HZ = 3e9  # above any GPU's SM clock: sized with it, a sleep lasts at least as long as planned


def _sleep_cycles_per_s(device: torch.device) -> float:
    """SM cycles per second, to size ``torch.cuda._sleep``: the device's peak clock
    (``get_device_properties(...).clock_rate``, kHz as CUDA's ``cudaDevAttrClockRate``); the SM runs at
    or below its peak, so the sleep lasts at least as long as planned. Where torch reports none (or
    a value out of any GPU's range), a high fixed clock, which errs on the same, safe side."""
    khz = float(getattr(torch.cuda.get_device_properties(device), "clock_rate", 0) or 0)
    return khz * 1e3 if 1e5 <= khz <= 1e7 else FALLBACK_CLOCK_HZ


def _device_time_per_call(fn, device: torch.device, repeats: int, inner: int) -> float:
    """Median over ``repeats`` of the device time per call of ``inner`` calls of ``fn`` (CUDA only).

    ``_time_per_call`` brackets calls that the host queues while the stream is idle: the stream
    runs each kernel as soon as it is queued, so when the host needs longer to queue a call than
    the device to run it (one NF4 expert at 1 token, Mixtral-8x7B width, H200: 0.10 ms of kernels
    in a 0.22 ms span) the span is the host's time. Here the stream is first held by
    ``torch.cuda._sleep`` (a kernel that spins for a number of clock cycles) for about twice the
    host's measured time to queue the ``inner`` calls; the start event is recorded after the sleep, the calls are queued behind it,
    then the end event. When the sleep ends every kernel is already queued and they run back to
    back: start..end is the device's time alone. A repeat whose queueing outlasted its sleep (the
    stream caught up with the host, e.g. a call that synchronises) is measured again with a sleep
    twice as long, a few times at most; past that the sample is kept (then an upper bound).
    """
    fn()  # warm-up
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    sleep_s = max(2 * (time.perf_counter() - t0), 1e-3)  # the host's time to queue ``inner`` calls, twice
    hz = _sleep_cycles_per_s(device)
    samples: list[float] = []
    retries = 4
    while len(samples) < repeats:
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(int(sleep_s * hz))
        t0 = time.perf_counter()
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        queued_s = time.perf_counter() - t0
        end.synchronize()
        if queued_s >= sleep_s and retries > 0:  # the stream may have reached a call before it was queued
            sleep_s, retries = 2 * sleep_s, retries - 1
            continue
        samples.append(start.elapsed_time(end) / 1e3 / inner)
    return statistics.median(samples)


def measure_h2d(device: torch.device, sizes: list[int], repeats: int, *, quiet: bool = False
                ) -> dict[str, list[list[float]]]:
    """Seconds per copy of each size, from pinned and from pageable host memory (a bar per kind unless ``quiet``)."""
    out = {}
    cuda = device.type == "cuda"
    stream = torch.cuda.Stream(device) if cuda else None
    for kind in ("pinned", "pageable"):
        points = []
        for nbytes in progress(sizes, desc=f"H2D {kind}", unit="size", quiet=quiet):
            src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda and kind == "pinned")
            src.fill_(1)
            dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
            inner = max(2, min(16, (256 * MIB) // nbytes))

            def copy() -> None:
                dst.copy_(src, non_blocking=True)

            if cuda:
                with torch.cuda.stream(stream):
                    seconds = _time_per_call(copy, device, repeats, inner)
            else:
                seconds = _time_per_call(copy, device, repeats, inner)
            points.append([nbytes, seconds])
            src = dst = None  # freed before the next size (rebound, not del: copy() reads them)
        out[kind] = points
    return out


def measure_gather(device: torch.device, record_bytes: int, records: int, repeats: int) -> float:
    """Bytes a second of device routing's gather (``experts.device_routing.gather``): ``records`` expert
    records picked from slots by a device index, as a resident one-request decode layer does before its
    experts run (the simulator charges it on such layers)."""
    slots = torch.zeros((records + 2, record_bytes), dtype=torch.uint8, device=device)
    out = torch.empty((records, record_bytes), dtype=torch.uint8, device=device)
    index = torch.arange(records + 1, 1, -1, device=device)[:records]  # not the first rows, in reverse
    seconds = _time_per_call(lambda: gather(slots, index, out), device, repeats, 8)
    return records * record_bytes / seconds


def measure_links(devices: list[torch.device], sizes: list[int], repeats: int) -> list[list[float]]:
    """Seconds per copy on each GPU's link while every one of ``devices`` copies at once (pinned host
    memory, one side stream per GPU, back to back): the slowest link's time per copy. Each GPU of a
    host has its own PCIe link, but they may share the host's memory or a switch: this says whether
    N links really are N times one (H200 x2: 55.4 GB/s each alone, 109 GB/s together)."""
    points = []
    for nbytes in sizes:
        src = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).fill_(1) for _ in devices]
        dst = [torch.empty(nbytes, dtype=torch.uint8, device=d) for d in devices]
        streams = [torch.cuda.Stream(d) for d in devices]
        inner = max(2, min(16, (256 * MIB) // nbytes))
        samples = []
        for r in range(repeats + 1):  # the first round warms up
            for d in devices:
                torch.cuda.synchronize(d)
            marks = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in streams]
            for (start, _), stream in zip(marks, streams):
                start.record(stream)
            for _ in range(inner):  # interleaved, so the links run at once
                for i, stream in enumerate(streams):
                    with torch.cuda.stream(stream):
                        dst[i].copy_(src[i], non_blocking=True)
            for (start, end), stream in zip(marks, streams):
                end.record(stream)
            for _, end in marks:
                end.synchronize()
            if r:
                samples.append(max(start.elapsed_time(end) for start, end in marks) / 1e3 / inner)
        points.append([nbytes, statistics.median(samples)])
    return points


def measure_peer(source: torch.device, target: torch.device, sizes: list[int], repeats: int) -> list[list[float]]:
    """Seconds per device-to-device hand-over (``target`` from ``source``), as the executor makes one: a
    kernel on the source, torch's cross-device copy (NVLink where the GPUs have it, else PCIe peer copies),
    which waits for both devices' queues and makes the target wait for it, and a kernel on the target
    reading the result. Back to back, each hand-over waits for the previous one's last kernel, so the
    figure holds the copy and the two devices' event waits (on an H200 pair the waits, not the bytes,
    dominate up to a few hundred KiB: a layer's hidden states at decode)."""
    points = []
    for nbytes in sizes:
        src = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=source)
        dst = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=target)
        inner = max(2, min(16, (256 * MIB) // nbytes))

        def hand_over() -> None:
            src.mul_(1)                        # the source's producer (an expert, the router)
            dst.copy_(src, non_blocking=True)  # both queues, the copy, the target waits
            with torch.cuda.device(target):
                dst.mul_(1)                    # the target's consumer

        with torch.cuda.device(source):  # the timing events go on the source's stream
            points.append([nbytes, _time_per_call(hand_over, source, repeats, inner)])
    return points


def measure_experts(config, formats: list[str], tokens: list[int], device: torch.device, dtype: torch.dtype,
                    checkpoint_dtype: torch.dtype, repeats: int, *, quiet: bool = False) -> tuple[dict, dict, dict]:
    """Seconds per expert by token count for each format, as the executor computes it (a bar per format
    unless ``quiet``): ``({format: [[tokens, s]...]}`` timed back to back (``_time_per_call``), ``{format:
    record bytes}``, ``{format: [[tokens, s]...]}`` of device time alone (``_device_time_per_call``; CUDA
    only, ``{}`` on the CPU, where every op runs inline and the first is device time already)).
    Both timings run the same ``expert`` closure, so they differ only by the host's part."""
    timings, sizes, device_times = {}, {}, {}
    cuda = device.type == "cuda"
    gen = torch.Generator(device=device).manual_seed(0)
    weights = ExpertTensors(**{
        w: torch.empty(shape, dtype=checkpoint_dtype, device=device).normal_(0, 0.02, generator=gen)
        for w, shape in expert_shapes(config).items()})
    for name in formats:
        fmt = make_format(name, config.hidden_size, config.intermediate_size, checkpoint_dtype)
        record = torch.empty(fmt.nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
        fmt.pack(weights, record, device)
        slot = record.to(device)
        fmt.arrive(slot)  # as the transfer engine does after each copy
        points, device_points = [], []
        for n in progress(tokens, desc=f"expert {name}", unit="size", quiet=quiet):
            x = torch.randn(n, config.hidden_size, dtype=dtype, device=device, generator=gen)
            rows = torch.arange(n, device=device)
            w = torch.rand(n, device=device, generator=gen)
            out = torch.empty_like(x)

            def expert() -> None:  # the executor's expert step: gather, forward, weighted scatter
                y = fmt.forward(slot, x.index_select(0, rows))
                out.index_copy_(0, rows, (y * w.index_select(0, rows)[:, None]).to(dtype))

            points.append([n, _time_per_call(expert, device, repeats, inner=8)])
            if cuda:
                device_points.append([n, _device_time_per_call(expert, device, repeats, inner=8)])
        timings[fmt.name], sizes[fmt.name] = points, fmt.nbytes
        if cuda:
            device_times[fmt.name] = device_points
        slot = record = None  # freed before the next format (rebound, not del: expert() reads slot)
    del weights
    return timings, sizes, device_times


def measure_batched_attention(runtime, rows: tuple[int, ...] = BATCH_ROWS, width: int = BATCH_WIDTH,
                              repeats: int = 3) -> dict:
    """``device_time.attention_rows``: one decode layer's attention span (its norm, ``mixtral.attend``,
    the residual) for B rows of one token each, every row holding ``width - 1`` keys before its token,
    on the runtime's first layer with a KV cache of its own: device time alone on CUDA
    (``_device_time_per_call``), back to back on the CPU. The runtime's timeline sees one row's decode
    attention at every context; a batched step's attention differs by more than its keys (the
    projections of B tokens take another kernel than one token's, the rows' keys and values are
    gathered where their KV rows are not consecutive), and this curve is what the simulator adds for it."""
    config = runtime.config  # the calibration's runtime has 2 layers: its cache is small (0.3 GB at 8x7B, 64 rows)
    width = min(width, config.max_position_embeddings)
    kv = RowKVCache(config, max(rows), width, runtime.dtype, runtime.device)
    inner = runtime.skeleton.model
    layer = inner.layers[0]
    gen = torch.Generator(device=runtime.device).manual_seed(0)
    cuda = runtime.device.type == "cuda"
    points = []
    with torch.inference_mode():
        for b in rows:
            kv.lengths[:] = [width - 1] * b + [0] * (kv.rows - b)
            at = kv.place(list(range(b)), 1, config.sliding_window)
            x = torch.randn(b, 1, config.hidden_size, dtype=runtime.dtype, device=runtime.device, generator=gen)
            rotary = inner.rotary_emb(x, position_ids=at.positions)

            def step() -> None:
                x + attend(layer.self_attn, layer.input_layernorm(x), rotary, at, kv, 0)

            timed = _device_time_per_call if cuda else _time_per_call
            points.append([b, timed(step, runtime.device, repeats, inner=8)])
    return {"width": width, "decode": points}


# -- the runtime's own layers ----------------------------------------------------------------
class _Probe:
    """Host marks of every step and layer of a runtime's ``generate``, on the timeline's clock.

    Subscribes to the runtime's events (``duoserve_core.events.StepEvent``): the request's start (the
    timeline's origin, right after a sync), each step's start, each layer's start, its router's start,
    the moment its top-k is on the host (the sync) and the moment its output is queued. Nothing in
    the runtime is wrapped, and the subscription survives ``configure``.
    """

    def __init__(self, runtime):
        self.rt = runtime
        self.marks: dict[tuple[int, int], dict[str, float]] = defaultdict(dict)
        self.forward_enter: dict[int, float] = {}
        self.origin = 0.0
        self.phase = "prefill"
        self.expert_host: dict[str, list[float]] = defaultdict(list)  # host time to queue one expert, by phase
        self._expert_begin = 0.0
        self._unsubscribe = runtime.events.subscribe(self._on_event)

    _MARKS = {"layer_started": "start", "router_started": "router", "routed": "synced", "layer_done": "moe_exit"}

    def _on_event(self, event) -> None:
        now = time.perf_counter()
        if isinstance(event, SpanEvent):  # the executor's expert call: begin before, end after its kernels are queued
            if event.kind == "expert" and event.stream == "compute":
                if event.edge == "begin":
                    self._expert_begin = now
                elif event.edge == "end":
                    self.expert_host[self.phase].append(now - self._expert_begin)
            return
        if not isinstance(event, StepEvent):
            return
        if event.kind == "step_started":
            self.phase = event.phase
        if event.kind == "request_started":
            self.origin = now  # generate() synchronised just before: the timeline's origin fires now
        elif event.kind == "step_started":
            self.forward_enter[event.step] = now
        elif event.kind in self._MARKS:
            self.marks[(event.step, event.layer)].setdefault(self._MARKS[event.kind], now)

    def remove(self) -> None:
        self._unsubscribe()

    def run(self, prompt: list[int], gen: int) -> tuple[list[dict], list[dict]]:
        """Generate and return (per-layer records, per-step records)."""
        self.marks.clear()
        self.forward_enter.clear()
        self.rt.generate(prompt_ids=prompt, max_new_tokens=gen, stop_at_eos=False)
        rows = self.rt.timeline.rows()
        self.last_rows = rows
        by_key = defaultdict(list)
        for r in rows:
            by_key[(r["step"], r["layer"], r["kind"])].append(r)
        ms = lambda t: (t - self.origin) * 1e3  # noqa: E731 - host clock onto the timeline's
        layers, steps = [], []
        L = self.rt.config.num_hidden_layers
        sync = self.rt.device.type == "cpu"
        for (s, layer), m in sorted(self.marks.items()):
            experts = by_key[(s, layer, "expert")]
            copies = by_key[(s, layer, "h2d")]  # resident and on-demand copy only on demand, in this window
            post = m["moe_exit"] - m["synced"]
            if sync:  # the CPU computes and copies inline: take that work out of the host's bookkeeping
                post -= sum(r["duration_ms"] for r in experts + copies) / 1e3
            phase = "prefill" if s == 0 else "decode"
            past = 0 if s == 0 else len(prompt) + s - 1
            tokens = len(prompt) if s == 0 else 1
            layers.append({
                "step": s, "layer": layer, "phase": phase, "group": len(prompt),
                "x": tokens if s == 0 else past + tokens,
                "attention_s": by_key[(s, layer, "attention")][0]["duration_ms"] / 1e3,
                "router_s": by_key[(s, layer, "router")][0]["duration_ms"] / 1e3,
                "attention_launch_s": m["router"] - m["start"],
                "post_s": post, "experts": len(experts), "copies": len(copies),
                "copy_s": [r["duration_ms"] / 1e3 for r in copies],
                "relayout_s": [r["duration_ms"] / 1e3 for r in by_key[(s, layer, "relayout")]],
                "compute_end_ms": max([r["end_ms"] for r in experts] or [0.0]),
                "moe_exit_ms": ms(m["moe_exit"]),
            })
        for s, enter in sorted(self.forward_enter.items()):
            if s + 1 not in self.forward_enter:
                continue
            first = self.marks[(s, 0)]["start"]
            last = next(r for r in layers if r["step"] == s and r["layer"] == L - 1)
            busy = sum(r["duration_ms"] for r in rows if r["step"] == s and r["stream"] == "compute") / 1e3
            after = max(last["moe_exit_ms"], last["compute_end_ms"])
            steps.append({"step": s, "phase": "prefill" if s == 0 else "decode", "pre_s": first - enter,
                          "post_s": max(0.0, ms(self.forward_enter[s + 1]) - after) / 1e3,
                          "wall_s": self.forward_enter[s + 1] - enter, "compute_busy_s": busy})
        return layers, steps


def measure_runtime(args: CalibrationSpec, device: torch.device, contexts: list[int], repeats: int) -> dict:
    """Attention, router and host figures from a resident and an on-demand run of the real runtime."""
    gen = DECODE_STEPS
    # routed on the host (``device_routing=False``): the host terms are those of layers whose routing the
    # host hears, as every offloaded budget's; a resident decode routed on the device has no such terms
    runtime = load(args.model, device=device, quant=args.quant, attention_quant=args.quant_attention,
                   policy="resident", num_layers=args.num_layers, max_context=max(contexts) + gen + 1,
                   routing_trace=routing_trace(args), cuda_graphs=args.cuda_graphs, device_routing=False)
    vocab = runtime.config.vocab_size
    prompts = {c: torch.randint(3, vocab, (c,), generator=torch.Generator().manual_seed(c)).tolist()
               for c in contexts}
    per_mode, timelines, probe_of = {}, {}, {}
    # On-demand at top-k slots: every layer copies, so the host runs ahead of the compute stream in
    # layers >= 1 and their spans are device time (``device_terms``); resident: every span host-bound.
    k = runtime.config.num_experts_per_tok
    for mode, policy in (("resident", "resident"), ("offloaded", "on-demand")):
        budget = None if mode == "resident" else runtime.plan.fixed_bytes + k * runtime.format.nbytes
        runtime.configure(policy=policy, memory_budget=budget)
        probe = probe_of[mode] = _Probe(runtime)
        layers, steps, runs = [], [], []
        try:
            probe.run(prompts[contexts[0]], gen)  # warm-up (and, resident, the one load of every expert)
            for c in progress(contexts, desc=f"runtime {mode}", unit="context", quiet=args.quiet or not args.bars):
                for _ in range(repeats):
                    lr, st = probe.run(prompts[c], gen)
                    layers += [r for r in lr if r["step"] != 1]  # step 1: first decode, still warming
                    steps += [r for r in st if r["step"] != 1]
                    runs.append((c, [r for r in probe.last_rows if r["step"] != 1]))
        finally:
            probe.remove()
        per_mode[mode], timelines[mode] = (layers, steps), runs
    if args.gpus > 1:  # the on-demand run again with top-k slots on every GPU: what another GPU's experts add
        several = load(args.model, gpus=args.gpus, quant=args.quant, attention_quant=args.quant_attention,
                       policy="on-demand", num_layers=args.num_layers, max_context=max(contexts) + gen + 1,
                       routing_trace=routing_trace(args), cuda_graphs=args.cuda_graphs)
        several.configure(memory_budget=several.plan.fixed_bytes + k * several.format.nbytes)
        runs = []
        for c in [contexts[0], *contexts]:  # the first run warms up
            several.empty_expert_cache()
            several.generate(prompt_ids=prompts[c], max_new_tokens=gen, stop_at_eos=False)
            runs.append((c, [r for r in several.timeline.rows() if r["step"] != 1]))
        timelines["several"] = runs[1:]
        del several
    expert_host = {phase: [t for probe in probe_of.values() for t in probe.expert_host[phase]] for phase in PHASES}
    routed = measure_routed_layer(runtime, prompts[contexts[0]], gen) if runtime.cuda_graphs and device.type == "cuda" \
        else None
    return {"runtime": runtime, "per_mode": per_mode, "timelines": timelines, "expert_host": expert_host,
            "routed_layer": routed}


def measure_routed_layer(runtime, prompt: list[int], gen: int) -> dict | None:
    """A resident decode layer routed on the device (``experts.device_routing``), from the runtime's own
    timeline: the router graph's span and the experts graph's (the gather and ``top_k`` one-token experts),
    medians over layers >= 1 of decode steps >= 2. The host queues such a step without waiting, so these
    spans are device time; the host-routed runs' router spans hold the sync and its copies, which a routed
    layer has not (on the H200 0.03 ms against 0.16 ms). None where the runtime cannot route on the device."""
    runtime.device_routing = True
    plan, k = runtime.plan, runtime.config.num_experts_per_tok  # every expert, and room to gather k of them
    runtime.configure(policy="resident", memory_budget=plan.fixed_bytes + (plan.total_experts + k) * plan.expert_bytes)
    if runtime.decode_routing != "device":
        return None
    runtime.generate(prompt_ids=prompt[:8], max_new_tokens=3, stop_at_eos=False)  # captures the graphs
    runtime.generate(prompt_ids=prompt, max_new_tokens=gen, stop_at_eos=False)
    spans = [r for r in runtime.timeline.rows() if r["phase"] == "decode" and r["step"] >= 2 and r["layer"] >= 1
             and r["kind"] in ("router", "expert")]
    if not spans:
        return None
    median = lambda kind: statistics.median(r["duration_ms"] for r in spans if r["kind"] == kind) / 1e3  # noqa: E731
    return {"router_s": median("router"), "experts_s": median("expert"), "top_k": k}


def routing_trace(args: CalibrationSpec) -> str | None:
    """The trace the runtime replays while it is timed: the bench replays one, and the replay's
    lookups sit inside the router's span. The bundled trace is used when its experts and top-k fit."""
    if args.routing_trace == "none":
        return None
    if args.routing_trace != "auto":
        return args.routing_trace
    meta = read_trace(BUNDLED_TRACE).meta if BUNDLED_TRACE.is_file() else None
    config = open_source(args.model, num_layers=1).config
    if meta is None or (meta.num_experts, meta.top_k) != (config.num_local_experts, config.num_experts_per_tok):
        return None
    return str(BUNDLED_TRACE)


def _curve(records: list[dict], key: str, phase: str) -> list[list[float]]:
    """``[[x, median seconds]]`` per prompt length: decode steps after one prompt are one point."""
    groups = defaultdict(list)
    for r in records:
        if r["phase"] == phase:
            groups[r["group"]].append(r)
    return [[statistics.median(r["x"] for r in rs), max(statistics.median(r[key] for r in rs), 0.0)]
            for _, rs in sorted(groups.items())]


def host_terms(per_mode: dict, pre_copy_s: float | None = None, per_expert_s: dict | None = None) -> dict:
    """Fit the host's post-sync bookkeeping per layer as base(mode) + a per expert + b per copy.

    ``pre_copy_s`` (``pre_copy_host_s``): the offloaded base measured directly, the host's time from a
    decode layer's sync to its first copy. That stretch is on the critical path of a copy-bound decode
    (the copy cannot start before it), and a least-squares fit over every layer spreads it over the
    per-expert and per-copy terms instead (it fitted 0 on the H200); with it given, the fit is over
    the rest of each offloaded layer's bookkeeping. ``per_expert_s`` ({phase: seconds}, on CUDA: the
    host's own time to queue one expert, timed around the executor's call, ``_Probe.expert_host``)
    likewise takes the per-expert term out of the fit: over a layer's bookkeeping the fit cannot tell
    it from waits that scale with the experts' device time (it gave 0.9-1.0 ms per prefill expert on
    the H200, where the measured two-GPU prefill queued each in well under 0.9 ms)."""
    rows, target = [], []
    for mode_index, (_, (layers, _)) in enumerate(sorted(per_mode.items(), key=lambda kv: kv[0] != "resident")):
        for r in layers:
            offloaded = mode_index == 1
            known = (pre_copy_s if offloaded and pre_copy_s is not None else 0.0) \
                + (per_expert_s[r["phase"]] * r["experts"] if per_expert_s else 0.0)
            rows.append([not offloaded] + ([offloaded] if pre_copy_s is None else [])
                        + ([r["experts"]] if not per_expert_s else []) + [r["copies"]])
            target.append(r["post_s"] - known)
    coef = [max(float(c), 0.0) for c in
            np.linalg.lstsq(np.asarray(rows, dtype=float), np.asarray(target), rcond=None)[0]]
    base_res = coef.pop(0)
    base_off = pre_copy_s if pre_copy_s is not None else coef.pop(0)
    per_expert = dict(per_expert_s) if per_expert_s else coef.pop(0)
    per_copy = coef.pop(0)
    steps = per_mode["resident"][1] + per_mode["offloaded"][1]

    def median_of(key: str, phase: str) -> float:
        values = [s[key] for s in steps if s["phase"] == phase]
        return max(statistics.median(values), 0.0) if values else 0.0

    return {"layer_base_s": {"resident": base_res, "offloaded": base_off}, "per_expert_s": per_expert,
            "per_copy_s": per_copy,
            "step_pre_s": {p: median_of("pre_s", p) for p in ("prefill", "decode")},
            "step_post_s": {p: median_of("post_s", p) for p in ("prefill", "decode")}}


def relayout_terms(layers: list[dict]) -> dict:
    """The runtime's relayout spans (int4 on CUDA: each landed record relaid for the GPU's kernel before
    it is read) in the on-demand run's layers: ``relayout_s``, their mean, and ``relayout_by_phase_s``,
    the mean per phase, which the simulator charges in each phase (``Calibration.relayout``). Why per
    phase: a prompt's relayouts run beside its large expert matmuls, a decode token's beside little; on
    the H200 (``data/calibration/h200_mixtral-8x7b_int4.json``, 2026-12-02) the mean is 1.21 ms, the
    prompt's 1.93 ms and decode's 0.26 ms, against 0.33 ms of GPU time for a relayout measured alone
    (``benchmarks/diagnostics/relayout_cost.py``). ``{}`` where nothing was relaid."""
    by_phase = {phase: [d for r in layers if r["phase"] == phase for d in r["relayout_s"]] for phase in ("prefill", "decode")}
    spans = by_phase["prefill"] + by_phase["decode"]
    if not spans:
        return {}
    return {"relayout_s": statistics.fmean(spans),
            "relayout_by_phase_s": {phase: statistics.fmean(d) for phase, d in by_phase.items() if d}}


def overhead_summary(per_mode: dict, num_layers: int) -> dict:
    """The simple residual figure: (wall per decode token - compute-stream busy time) / layers."""
    out = {}
    for mode, (_, steps) in per_mode.items():
        decode = [s for s in steps if s["phase"] == "decode"]
        wall = statistics.median(s["wall_s"] for s in decode)
        busy = statistics.median(s["compute_busy_s"] for s in decode)
        out[mode] = {"wall_per_token_s": wall, "compute_busy_per_token_s": busy,
                     "residual_per_layer_s": (wall - busy) / num_layers}
    return out


SLACK_MS = 0.05  # a span "follows" another when it starts within this of the other's end


def _by_layer(rows: list[dict]) -> dict[tuple[int, int], dict[str, list[dict]]]:
    """Spans by (step, layer), then kind. A layer routed on the device (``experts.device_routing``) is
    left out: its one expert span holds every expert of the layer, which no per-expert term can read."""
    out: dict = defaultdict(lambda: defaultdict(list))
    routed_on_device = {(int(r["step"]), int(r["layer"])) for r in rows if r["kind"] == "expert" and r["expert"] is None}
    for r in rows:
        key = (int(r["step"]), int(r["layer"]))
        if key not in routed_on_device:
            out[key][r["kind"]].append(r)
    return out


def _waits_on_copy(layer: dict[str, list[dict]]) -> bool:
    """Did a copy of this layer land after its router ended (the stream then waited on it)?"""
    router = layer["router"][0]["end_ms"] if layer.get("router") else None
    return router is not None and any(c["end_ms"] > router for c in layer.get("h2d", []))


def pre_copy_host_s(runs: list[tuple[int, list[dict]]]) -> float | None:
    """The host's time from a decode layer's router sync to its first copy (the copy stream is idle then,
    so a copy starts when it is issued), median over the on-demand run's decode layers (steps >= 2)."""
    gaps = []
    for _, rows in runs:
        for (step, _), spans in _by_layer([r for r in rows if r["phase"] == "decode" and int(r["step"]) >= 2]).items():
            if spans.get("router") and spans.get("h2d"):
                gaps.append(min(c["start_ms"] for c in spans["h2d"]) - spans["router"][0]["end_ms"])
    return max(statistics.median(gaps), 0.0) / 1e3 if gaps else None


def _decode_gaps(rows: list[dict]) -> dict[str, list[float]]:
    """Per decode layer (steps >= 2) of a timeline: each device's expert start after its own copy landed,
    and the next layer's attention start after the layer's last expert (ms)."""
    out: dict[str, list[float]] = defaultdict(list)
    layers = _by_layer([r for r in rows if r["phase"] == "decode" and int(r["step"]) >= 2])
    for (step, layer), spans in layers.items():
        copies = {(int(c["expert"]), int(c.get("device", 0))): c for c in spans.get("h2d", [])}
        for e in spans.get("expert", []):
            copy = copies.get((int(e["expert"]), int(e.get("device", 0))))
            if copy is not None:
                out[f"after_copy_{int(e.get('device', 0))}"].append(e["start_ms"] - copy["end_ms"])
        nxt = layers.get((step, layer + 1), {}).get("attention")
        if nxt and spans.get("expert"):
            out["to_next_layer"].append(nxt[0]["start_ms"] - max(e["end_ms"] for e in spans["expert"]))
    return out


def peer_overheads(one: list[tuple[int, list[dict]]], several: list[tuple[int, list[dict]]]) -> dict:
    """What experts on another GPU add in the runtime, beyond the hand-over ``measure_peer`` times: the
    delay of that GPU's expert after its copy landed, over the first GPU's (``in_s``), and the stretch from
    a layer's last expert to the next layer's attention, over the one-GPU run's (``out_s``: the outputs'
    way back, the two devices' event waits), medians of decode layers of two on-demand runs at top-k
    slots (every layer copies; the second run's two misses of a layer cross two links)."""
    med = lambda runs, key: statistics.median([g for _, rows in runs for g in _decode_gaps(rows)[key]] or [0.0])  # noqa: E731
    return {"in_s": max(med(several, "after_copy_1") - med(several, "after_copy_0"), 0.0) / 1e3,
            "out_s": max(med(several, "to_next_layer") - med(one, "to_next_layer"), 0.0) / 1e3}


def device_terms(runs: list[tuple[int, list[dict]]], fmt: str) -> tuple[dict, float | None]:
    """Device times and the host's decode time per expert, from measured timelines.

    ``runs``: ``(prompt tokens, timeline rows)`` per run. Returns (``device_time`` section,
    host seconds per expert at decode or None). Decode steps only; step 0 and 1 are left out.

    - attention and router of layer l >= 1 are device time when layer l-1's last expert waited on
      its copy and this attention started within ``SLACK_MS`` of that expert's end: the host had
      queued it while the stream waited. x = context (prompt + step), one point per run: the median.
      Meant for on-demand runs (every layer copies, the host runs ahead).
    - an expert is device time when it started within ``SLACK_MS`` of its own copy's end (queued
      ahead, waiting on the copy); batch 1 decode routes one token to it, so this is one point
      (``calibrate`` logs it beside ``measure_experts``' per-token-count curve, which it stores instead).
    - an expert of a layer that copied nothing after its router (the stream idle, every input
      ready) is host-bound: its span is the host's time to queue it (``per_expert_s.decode``).
    """
    attention, router, expert, host = [], [], [], []
    for prompt, rows in runs:
        layers = _by_layer([r for r in rows if r["phase"] == "decode" and int(r["step"]) >= 2])
        ctx_a, ctx_r = [], []
        for (step, layer), spans in layers.items():
            context = prompt + step
            copies = {int(c["expert"]): c for c in spans.get("h2d", []) if c.get("expert") is not None}
            for e in spans.get("expert", []):
                copy = copies.get(int(e["expert"]))
                if copy is not None and 0 <= e["start_ms"] - copy["end_ms"] <= SLACK_MS:
                    expert.append(e["duration_ms"] / 1e3)
            if spans.get("router") and spans.get("expert") and not _waits_on_copy(spans):
                host += [e["duration_ms"] / 1e3 for e in spans["expert"]]
            prev = layers.get((step, layer - 1))
            if layer == 0 or prev is None or not prev.get("expert") or not spans.get("attention") \
                    or not spans.get("router"):
                continue
            last = max(prev["expert"], key=lambda x: x["end_ms"])
            prev_copies = {int(c["expert"]): c for c in prev.get("h2d", []) if c.get("expert") is not None}
            waited = prev_copies.get(int(last["expert"]))
            a = spans["attention"][0]
            # the previous layer's last expert waited on its copy, and this attention followed it at once
            if waited is not None and 0 <= last["start_ms"] - waited["end_ms"] <= SLACK_MS \
                    and a["start_ms"] - last["end_ms"] <= SLACK_MS:
                ctx_a.append((context, a["duration_ms"] / 1e3))
                ctx_r.append((context, spans["router"][0]["duration_ms"] / 1e3))
        for out, pts in ((attention, ctx_a), (router, ctx_r)):
            if pts:
                out.append([statistics.median(c for c, _ in pts), statistics.median(v for _, v in pts)])
    section: dict = {}

    def curve(points: list[list[float]]) -> list[list[float]]:
        groups = defaultdict(list)  # runs at one context: one point
        for x, v in points:
            groups[round(x)].append(v)
        return [[float(x), statistics.median(vs)] for x, vs in sorted(groups.items())]

    if attention:
        section["attention"] = {"decode": curve(attention)}
    if router:
        section["router"] = {"decode": curve(router)}
    if expert:
        section["expert"] = {"decode": {fmt: [[1.0, statistics.median(expert)]]}}
    return section, (statistics.median(host) if host else None)


# -- the whole measurement -------------------------------------------------------------------
def calibrate(args: CalibrationSpec, command: str = "python -m duoserve_core.calibrate") -> dict:
    device = resolve_device(args.device)
    visible = torch.cuda.device_count() if device.type == "cuda" else 0
    if args.gpus > 1 and visible < args.gpus:
        raise CalibrationError(f"--gpus {args.gpus}: this machine has {visible} visible CUDA GPU(s) for it; "
                               f"calibrate with --gpus {max(visible, 1)}")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t_start = time.perf_counter()
    source = open_source(args.model, num_layers=1, synth_device=device)
    config = source.config
    checkpoint_dtype = getattr(source, "dtype", None) or config.dtype or torch.float32
    if isinstance(checkpoint_dtype, str):
        checkpoint_dtype = getattr(torch, checkpoint_dtype)
    model_max = config.max_position_embeddings - DECODE_STEPS - 1
    contexts = sorted({min(int(c), model_max) for c in args.contexts})
    tokens = [1 << i for i in range(args.max_tokens.bit_length()) if 1 << i <= args.max_tokens]
    formats = list(dict.fromkeys(list(args.formats) + [args.quant]))

    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if not args.quiet else (lambda *a: None)
    quiet = args.quiet or not args.bars
    log(f"calibrating {args.model} on {device_name(device)}: expert compute ({', '.join(formats)})")
    expert_compute, expert_bytes, expert_device = measure_experts(config, formats, tokens, device, dtype,
                                                                  checkpoint_dtype, args.repeats, quiet=quiet)
    record = expert_bytes[make_format(args.quant, config.hidden_size, config.intermediate_size,
                                      checkpoint_dtype).name]
    sizes = sorted({int(float(s) * MIB) for s in args.sizes_mib} | {record})
    log(f"H2D copies: {len(sizes)} sizes, pinned and pageable")
    h2d = measure_h2d(device, sizes, args.repeats, quiet=quiet)
    gather_Bps = measure_gather(device, record, config.num_experts_per_tok, args.repeats)
    log(f"device routing's gather: {config.num_experts_per_tok} records at {gather_Bps / 1e9:.0f} GB/s")
    peer = None
    if args.gpus > 1:
        gpus = [torch.device("cuda", i) for i in range(args.gpus)]
        log(f"{args.gpus} links at once, and peer copies cuda:0 <-> cuda:1")
        h2d["links"] = {"count": args.gpus, "pinned": measure_links(gpus, sorted({MIB, 16 * MIB, record}), args.repeats)}
        peer_sizes = [8 * 2**10, 64 * 2**10, 512 * 2**10, 4 * MIB, 16 * MIB]
        peer = [[n, max(a, b)] for (n, a), (_, b) in zip(measure_peer(gpus[0], gpus[1], peer_sizes, args.repeats),
                                                         measure_peer(gpus[1], gpus[0], peer_sizes, args.repeats))]
    log(f"runtime layers: contexts {contexts}, resident and on-demand")
    measured = measure_runtime(args, device, contexts, args.repeats)
    runtime, per_mode = measured["runtime"], measured["per_mode"]
    # Attention and router spans from the on-demand run: its compute stream waits on copies, so each
    # layer's kernels are queued before the stream reaches them and the spans are device time alone.
    offloaded_layers = per_mode["offloaded"][0]
    # The runtime's own copies of one record (its on-demand loads) run a little slower on average than
    # isolated back-to-back copies; the simulator prefers this figure at the record size.
    runtime_copies = [d for r in offloaded_layers for d in r["copy_s"]]
    if runtime_copies:
        h2d["runtime"] = [[record, statistics.fmean(runtime_copies)]]
    h2d.update(relayout_terms(offloaded_layers))
    quant_format = make_format(args.quant, config.hidden_size, config.intermediate_size, checkpoint_dtype).name
    log(f"batched decode attention: {', '.join(map(str, BATCH_ROWS))} rows at {BATCH_WIDTH} keys")
    attention_rows = measure_batched_attention(runtime, repeats=args.repeats)
    host_lane = None
    if args.cpu_threads:
        log(f"CPU lane: one {quant_format} expert at {', '.join(map(str, args.cpu_threads))} threads")
        host_lane = measure_lane(config, args.quant, checkpoint_dtype, list(args.cpu_threads), device, dtype)
    device_time, per_expert_host = {}, None
    if device.type == "cuda":  # on the CPU every op runs inline: spans are device time already
        device_time, _ = device_terms(measured["timelines"]["offloaded"], quant_format)
        _, from_spans = device_terms(measured["timelines"]["resident"], quant_format)
        if all(measured["expert_host"][p] for p in PHASES):
            per_expert_host = {p: statistics.median(measured["expert_host"][p]) for p in PHASES}
            log(f"host time per expert: prefill {per_expert_host['prefill'] * 1e3:.3f} ms, decode "
                f"{per_expert_host['decode'] * 1e3:.3f} ms (decode, from the resident run's spans: "
                f"{(from_spans or 0.0) * 1e3:.3f} ms)")
        # the expert: the per-token-count curve held behind a sleep, in both phases, instead of the
        # timeline's one 1-token point (constant as a curve); that point is logged as a cross-check
        timeline_point = device_time.pop("expert", {}).get("decode", {}).get(quant_format)
        device_time["expert"] = {p: {f: [list(pt) for pt in pts] for f, pts in expert_device.items()} for p in PHASES}
        held = {int(n): s for n, s in expert_device.get(quant_format, [])}
        if timeline_point and 1 in held:
            log(f"expert {quant_format} at 1 token, device time: {held[1] * 1e3:.4f} ms behind a sleep, "
                f"{timeline_point[0][1] * 1e3:.4f} ms in the on-demand run's timeline")
        device_time["source"] = ("attention, router: layers >= 1 of the on-demand run at top-k slots "
                                 "(calibrate.device_terms); expert: one expert per token count and format, "
                                 "queued behind a device sleep (calibrate.measure_experts)")
    device_time["attention_rows"] = attention_rows
    device_time["gather_Bps"] = gather_Bps
    if measured["routed_layer"] is not None:
        device_time["routed_layer"] = measured["routed_layer"]
        routed = measured["routed_layer"]
        log(f"a layer routed on the device: router {routed['router_s'] * 1e3:.3f} ms, gather and experts "
            f"{routed['experts_s'] * 1e3:.3f} ms")
    pre_copy = pre_copy_host_s(measured["timelines"]["offloaded"])
    host = host_terms(per_mode, pre_copy, per_expert_host)
    # what that fit read, kept so it can be inspected and redone off the GPU (``host_terms`` on these gives
    # the same terms): a layer's host time after its router's sync, by mode, phase, experts and copies
    host_fit = {"layers": {mode: [{k: r[k] for k in FIT_KEYS} for r in layers] for mode, (layers, _) in per_mode.items()},
                "pre_copy_s": pre_copy, "per_expert_s": per_expert_host}
    out = {
        "format": FORMAT, "device": device_name(device), "device_type": device.type,
        "synchronous": device.type != "cuda", "date": datetime.date.today().isoformat(),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "command": command,
        "model": {"name": args.model, **{k: getattr(config, k) for k in SHAPE_KEYS},
                  "vocab_size": config.vocab_size, "dtype": str(checkpoint_dtype).split(".")[-1],
                  "layers_measured": runtime.config.num_hidden_layers},
        "quant": args.quant, "attention_quant": args.quant_attention, "compute_dtype": str(dtype).split(".")[-1],
        "cuda_graphs": runtime.cuda_graphs,  # the host terms' runs, as they ran (the runtime's resolved choice)
        "expert_bytes": expert_bytes, "h2d": h2d, "expert_compute": expert_compute,
        "attention": {p: _curve(offloaded_layers, "attention_s", p) for p in ("prefill", "decode")},
        "attention_launch": {p: _curve(offloaded_layers, "attention_launch_s", p) for p in ("prefill", "decode")},
        "router": {p: _curve(offloaded_layers, "router_s", p) for p in ("prefill", "decode")},
        "host": {**host, "reference_s": host_reference_s()},
        "host_fit": host_fit,
        "device_time": device_time,
        "routing_trace": routing_trace(args),
        "overhead_summary": overhead_summary(per_mode, runtime.config.num_hidden_layers),
        "seconds_taken": time.perf_counter() - t_start,
    }
    if host_lane is not None:
        out["host_lane"] = host_lane
    if peer is not None:
        out["peer"] = peer
        out["peer_overhead_s"] = peer_overheads(measured["timelines"]["offloaded"], measured["timelines"]["several"])
        out["gpus"] = args.gpus
    Calibration(out, "the new calibration")  # never write a file the simulator would refuse
    return out


def measure_lane(config, quant: str, checkpoint_dtype: torch.dtype, threads: list[int], device: torch.device,
                 dtype: torch.dtype) -> dict:
    """The ``host_lane`` section: one synthesized expert of the model's shape, packed into a host
    record of the runtime's format, timed on the CPU lane (``calibrate.host_lane``)."""
    fmt = make_format(quant, config.hidden_size, config.intermediate_size, checkpoint_dtype)
    g = torch.Generator().manual_seed(0)
    shapes = expert_shapes(config)
    tensors = ExpertTensors(**{k: torch.randn(shape, generator=g).mul_(0.02).to(checkpoint_dtype)
                               for k, shape in shapes.items()})
    record = torch.empty(fmt.nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    fmt.pack(tensors, record, torch.device("cpu"))
    return measure_host_lane(fmt, record, threads, dtype, device)


def default_out(record: dict) -> Path:
    slug = lambda s: re.sub(r"[^A-Za-z0-9]+", "_", s).strip("_").lower()  # noqa: E731
    model = record["model"]["name"].split(":")[-1]
    return Path("data/calibration") / f"{slug(record['device'])}_{slug(model)}_{record['quant']}.json"
