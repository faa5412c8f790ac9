"""The discrete-event model: the real cache and policy, driven on simulated streams.

Four clocks advance: the host thread's, the compute stream's, the copy stream's and the CPU
lane's (seconds from the start of the request). The real ``ExpertCache``, the real policy object and the real
``LayerStep`` (``experts.layer_step``, the runtime's own) make every decision; the cache's
transfer engine is ``SimTransferEngine``, which puts each copy on the copy-stream clock instead
of moving bytes, and the layer step computes on ``_SimLayer``, which advances the clocks. What
this module owns is time, in the order the runtime does the work:

    step:  LayerStep.begin_step (the phase plan) -> step_pre (embedding, mask; host)
    layer: LayerStep.layer_started -> attention -> router (the host waits for the compute stream)
           -> layer_base (host) -> LayerStep.run (router_done / speculated, acquire, prefetch plans,
           each expert once its copy landed, layer_done)
    step:  lm_head and sampling (step_post, after the compute stream is done)

A resident one-request decode step routed on the device (``experts.device_routing``, where the runtime
would: ``device_routing`` and the reasons of ``host_routing_reason``, the calibration's ``cuda_graphs``
standing for the runtime's) has no sync: per layer the compute clock runs attention, the router, and
the gather of the top-k records plus their experts (``Calibration.routed_layer_s``), while the
host only queues (its replays are not a calibrated term: the H200 kept the compute stream busy 86% of
such a token); after the last layer ``LayerStep.run`` hears every layer's routing, as the runtime's
``settle`` does, in the same order.

It emits the runtime's events (``events``): the timeline and a ``lab.cache_log.CacheLog`` subscribe
to a simulator exactly as to a runtime.

Timing rules (every term comes from the calibration, ``sim.calibration``):

- a kernel starts at max(compute clock, host clock, its inputs ready) and runs its *device* time
  (``device_time`` where the calibration has it: the spans timed with an idle stream are the
  host's launch time at decode sizes, not the device's); queuing attention costs the host
  ``attention_launch``, an expert ``per_expert[phase]``, and neither can end before the host
  finished queuing it;
- the router ends with a device->host sync: the host clock jumps to the compute clock;
- after the sync the host spends ``layer_base`` (+ ``per_copy`` per copy it issues);
- a copy starts at max(copy clock, host clock, the end of the last kernel that read its slot)
  and lasts the calibrated H2D time for one record; an expert waits for its slot's copy;
- the policy's own decisions (its event handlers, eviction ranking, the predictor it runs) cost
  the host the time they take here, timed as they run and scaled to the calibrated host's speed
  (``Calibration.host_scale``);
- the CPU lane (``--cpu-experts``; ``policy.host_lane`` decides from the calibration's
  ``host_lane`` curve and the copy time) starts an expert at max(its clock, the host clock) and
  runs the calibrated time for its tokens; at the layer's end the host queues, per result, the
  compute stream's hold until the lane is done and the result's copy into the layer's output
  (``per_expert`` host time each) and goes on: the compute stream, not the host, waits for the
  lane (``experts.stream_gate``); a shared expert (``--cpu-split``) runs its head on the lane at the
  head's share of that time, and its tail's copy, relayout and kernels take the tail's share of a
  record's (an assumption the H200 did not bear out: docs/cpu_lane.md, "A shared expert");
- on a synchronous device (the CPU) the host waits for every operation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..batching import DEFAULT_SCHEDULE, Batcher, Request
from ..errors import KnobError
from ..events import CacheEvent, Event, EventBus, SpanEvent, StepEvent
from ..runtime import check_arrivals
from ..experts.cache import ExpertCache, stats_delta
from ..experts.device_routing import RanOnDevice, host_routing_reason
from ..experts.layer_step import LayerStep, PhaseCounts
from ..policy import Phase, Policy, PolicyKnobs, load_policy, routing_source
from ..policy.host_lane import HostLane, LaneCosts
from ..timeline import Timeline
from ..traces import RoutingReplay, replayed_probabilities
from .calibration import Calibration, format_name
from .sim_model import SimModel


@dataclass
class Clocks:
    """The host thread, the CPU lane, and each device's compute and copy streams (``compute`` is the
    first device's, where the dense part runs)."""

    host: float = 0.0
    cpu: float = 0.0
    computes: list[float] = field(default_factory=lambda: [0.0])
    copies: list[float] = field(default_factory=lambda: [0.0])

    @property
    def compute(self) -> float:
        return self.computes[0]

    @compute.setter
    def compute(self, value: float) -> None:
        self.computes[0] = value

    def reset(self, devices: int = 1) -> None:
        self.host = self.cpu = 0.0
        self.computes, self.copies = [0.0] * devices, [0.0] * devices


class SimTimeline(Timeline):
    """A ``Timeline`` whose spans come whole from the simulator: same rows, DataFrame and Chrome trace."""

    def __init__(self, enabled: bool = True):
        super().__init__(torch.device("cpu"), enabled=enabled)
        self._rows: list[dict] = []

    @classmethod
    def from_rows(cls, rows: list[dict]) -> "SimTimeline":
        """A timeline of rows kept from a run, e.g. to write its Chrome trace later."""
        timeline = cls()
        timeline._rows = [dict(r) for r in rows]
        return timeline

    def reset(self) -> None:
        self._rows.clear()

    def on_event(self, event: Event) -> None:
        if isinstance(event, SpanEvent) and event.edge == "whole":
            self.add(event.stream, event.kind, event.layer, event.expert, event.nbytes, event.start_s, event.end_s,
                     event.device)
        else:
            super().on_event(event)

    def add(self, stream: str, kind: str, layer: int, expert: int | None, nbytes: int, start: float,
            end: float, device: int = 0) -> None:
        if self.enabled:
            self._rows.append(dict(stream=stream, kind=kind, phase=self.phase, step=self.step, layer=layer,
                                   expert=expert, nbytes=nbytes, start_ms=start * 1e3, end_ms=end * 1e3,
                                   duration_ms=(end - start) * 1e3, device=device))

    def rows(self) -> list[dict]:
        return [dict(r) for r in self._rows]


class TimedPolicy:
    """The policy as the cache and the layer step see it: every decision it makes advances the host
    clock by the time it took (times ``scale``). Everything else is the policy's own."""

    CALLS = ("phase", "layer_started", "router_done", "speculated", "layer_done", "eviction_order",
             "worth_replacing")

    def __init__(self, policy: Policy, clocks: Clocks, scale: float):
        self.inner, self.clocks, self.scale = policy, clocks, scale
        self.spent_s = 0.0
        for name in self.CALLS:
            setattr(self, name, self._timed(getattr(policy, name)))

    def _timed(self, call):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = call(*args, **kwargs)
            spent = (time.perf_counter() - t0) * self.scale
            self.clocks.host += spent
            self.spent_s += spent
            return out
        return timed

    def __getattr__(self, name):
        return getattr(self.inner, name)


class _Store:
    """What the cache reads of the host store: the record size."""

    def __init__(self, record_bytes: int):
        self.record_bytes = record_bytes


class SimTransferEngine:
    """``TransferEngine``'s interface on the simulated copy streams: one per device, each its own link
    (``device_slots``: slots per device, numbered as ``experts.transfer.TransferEngines`` does)."""

    def __init__(self, device_slots: list[int], record_bytes: int, clocks: Clocks, calibration: Calibration,
                 events: EventBus, synchronous: bool, tail_bytes: int = 0):
        self.device_of_slot = [d for d, n in enumerate(device_slots) for _ in range(n)]
        self.num_slots, self.devices, self.store = len(self.device_of_slot), len(device_slots), _Store(record_bytes)
        self.clocks, self.events, self.synchronous = clocks, events, synchronous
        self.copy_s = calibration.link_copy_s(record_bytes, self.devices)
        # a shared expert's tail (``--cpu-split``): its share of a record's copy and of its relayout
        self.tail_bytes, self.tail_share = tail_bytes, tail_bytes / record_bytes
        self.per_copy_s = calibration.per_copy_s
        # a landed record's relayout (int4 on CUDA), one after another on each device's relayout stream
        # while the copy stream goes on: it delays the record's use, not the next copy; its time is the
        # phase's (``phase``, set by the simulator at each step)
        self.relayout_s = {p: 0.0 if synchronous else calibration.relayout(p) for p in ("prefill", "decode")}
        self.phase = "prefill"
        self.reset()

    def reset(self) -> None:
        self.ready = [0.0] * self.num_slots   # when each slot's last copy lands (and is relaid)
        self.free = [0.0] * self.num_slots    # when each slot's last reader finishes
        self.relayouts = [0.0] * self.devices  # when each device's relayout stream is free
        self.tail_ready = self.tail_free = 0.0  # the tail buffer's, as a slot's

    def copy_tail(self, key: tuple[int, int]) -> None:
        """A shared expert's tail into the first device's tail buffer: ``tail_share`` of a copy and a relayout."""
        self.tail_ready = self._copy(key, 0, self.tail_free, self.tail_share, self.tail_bytes)

    def copy_in(self, index: int, key: tuple[int, int]) -> None:
        d = self.device_of_slot[index]
        self.ready[index] = self._copy(key, d, self.free[index], 1.0, self.store.record_bytes)

    def _copy(self, key: tuple[int, int], d: int, not_before: float, share: float, nbytes: int) -> float:
        """``share`` of a record's copy on device ``d``'s link, after ``not_before`` (its buffer's last reader),
        then that share of its relayout; returns when the buffer is usable."""
        c = self.clocks
        c.host += self.per_copy_s
        start = max(c.copies[d], c.host, not_before)
        c.copies[d] = ready = start + self.copy_s * share
        if self.synchronous:
            c.host = c.copies[d]
        self.events.emit(SpanEvent("whole", "copy", "h2d", key[0], key[1], nbytes,
                                   start_s=start, end_s=c.copies[d], device=d))
        relayout_s = self.relayout_s[self.phase] * share
        if relayout_s:
            begin = max(c.copies[d], self.relayouts[d])
            self.relayouts[d] = ready = begin + relayout_s
            self.events.emit(SpanEvent("whole", "relayout", "relayout", key[0], key[1],
                                       start_s=begin, end_s=ready, device=d))
        return ready


class _SimLayer:
    """``ExpertDevice`` on the clocks: an expert's kernels start once queued and once its slot's copy
    landed, and (like attention) cannot end before the host has finished queueing them; a
    synchronous device (the CPU) runs them inline. An expert in another device's slot runs on that
    device's compute clock once the layer's hidden states crossed to it (``peer_s``, right after the
    router, on a side stream, once the host queues that device's first expert: ``_DeviceShare``);
    ``join`` brings each such device's outputs back before the layer's combine."""

    def __init__(self, sim: "Simulator", phase: str, counts: list[int], routed: float, peer_in_s: float,
                 peer_out_s: float):
        self.sim, self.phase, self.counts = sim, phase, counts
        self.not_before = 0.0
        self.on_host = 0  # experts given to the CPU lane this layer
        self.tail_bytes = sim.engine.tail_bytes
        self.routed, self.peer_in_s, self.peer_out_s = routed, peer_in_s, peer_out_s
        self.peer_in = [0.0] * sim.devices  # when the layer's inputs reached each device
        self.used: set[int] = set()

    def wait_ready(self, slot: int) -> None:
        self.not_before = self.sim.engine.ready[slot]

    def compute(self, layer: int, expert: int, slot: int, share: float = 1.0) -> None:
        """Expert ``expert`` from ``slot`` (-1: the tail buffer, ``share`` of an expert's work)."""
        cal, c = self.sim.cal, self.sim.clocks
        d = self.sim.engine.device_of_slot[slot] if slot >= 0 else 0
        if d and d not in self.used:  # the layer's inputs leave on the side stream once the router is done
            self.used.add(d)
            self.peer_in[d] = max(self.routed, c.host) + self.peer_in_s
        device_s = cal.expert_device_s(self.sim.fmt, self.phase, self.counts[expert]) * share
        if cal.synchronous:
            c.host += cal.per_expert(self.phase)
        start = max(c.computes[d], c.host, self.not_before + (cal.peer_in_s if d else 0.0), self.peer_in[d])
        if cal.synchronous:
            c.computes[d] = c.host = start + device_s
        else:
            c.host += cal.per_expert(self.phase)
            c.computes[d] = max(start + device_s, c.host)
        self.sim.events.emit(SpanEvent("whole", "compute", "expert", layer, expert, start_s=start,
                                       end_s=c.computes[d], device=d))

    def mark_read(self, slot: int) -> None:
        self.sim.engine.free[slot] = self.sim.clocks.computes[self.sim.engine.device_of_slot[slot]]

    def join(self) -> None:
        """Each other device's outputs cross back after its last expert and once the first device's queue
        reached the copy (the copy waits on both streams, as torch's cross-device copy does)."""
        c = self.sim.clocks
        for d in sorted(self.used):
            c.computes[d] = c.compute = max(c.computes[d], c.compute, c.host) + self.peer_out_s
            if self.sim.cal.synchronous:
                c.host = c.compute

    def copy_tail(self, layer: int, expert: int) -> None:
        self.sim.engine.copy_tail((layer, expert))

    def compute_tail(self, layer: int, expert: int) -> None:
        self.not_before = self.sim.engine.tail_ready
        self.compute(layer, expert, -1, self.sim.engine.tail_share)
        self.sim.engine.tail_free = self.sim.clocks.computes[0]

    def compute_on_host(self, layer: int, expert: int, head_only: bool = False) -> None:
        """An expert on the CPU lane at its calibrated time (``head_only``: a shared expert's head, the
        lane's share of that time)."""
        share = self.sim.model.format.fraction if head_only else 1.0
        c, lane_s = self.sim.clocks, self.sim.host_lane_s(self.counts[expert]) * share
        start = max(c.cpu, c.host)
        c.cpu = start + lane_s
        if self.sim.cal.synchronous:
            c.host = c.compute = c.cpu
        self.on_host += 1
        self.sim.events.emit(SpanEvent("whole", "cpu", "expert", layer, expert, start_s=start, end_s=c.cpu))
        # as the runtime reports each lane job's time (a layer later there): at the calibrated speed the
        # rule's slowdown stays 1, so only a lane made slower than its costs (a study, a test) moves it
        self.sim.host_lane.observe(self.counts[expert], lane_s / share)

    def finish_host(self) -> None:
        c = self.sim.clocks
        c.host += self.sim.cal.per_expert(self.phase) * self.on_host
        c.compute = max(c.compute, c.host, c.cpu)
        self.on_host = 0


@dataclass
class SimRun:
    """What one simulated ``generate`` produced: the engine's figures and the timeline rows."""

    prompt_tokens: int
    new_tokens: int
    ttft_s: float
    tpot_s: float | None
    e2e_s: float
    phases: dict
    peak_resident: int
    rows: list[dict] = field(repr=False)


@dataclass
class SimBatch:
    """What one simulated ``generate_many`` produced: per request its latencies (from the run's start),
    the run's throughput and the cache's counters, and the timeline rows."""

    requests: list[dict]
    max_batch: int
    e2e_s: float
    tokens_per_s: float
    decode_steps: int
    mean_batch: float
    decode_s: float             # time in decode steps (prefills apart), as ``BatchRun``'s
    decode_tokens_per_s: float
    counts: dict
    rows: list[dict] = field(repr=False)
    prompt_steps: int = 0       # steps that ran a prompt (or a chunk), as ``BatchRun``'s
    prompt_s: float = 0.0


class Simulator:
    """One simulated runtime: model, calibration, policy, cache; ``generate`` replays a request.

    ``policy``: a ``PolicyKnobs``, a policy name or instance, with knob fields as keywords
    (``prefetch_depth=1``...), as ``duoserve_core.load`` takes them.
    """

    def __init__(self, model: SimModel, calibration: Calibration, replay: RoutingReplay,
                 policy: str | Policy | PolicyKnobs = "on-demand", *, record_timeline: bool = True,
                 policy_time: bool = True, device_routing: bool = True, **knob_values):
        calibration.check(model.config, model.quant, model.attention_quant)
        self.model, self.cal, self.replay = model, calibration, replay
        self.fmt = format_name(model.quant, calibration)
        c = model.config
        self.L, self.E, self.k = c.num_hidden_layers, c.num_local_experts, c.num_experts_per_tok
        knobs = policy if isinstance(policy, PolicyKnobs) else PolicyKnobs(policy=policy)
        self.knobs = knobs.changed(**knob_values)
        inner = load_policy(self.knobs, (routing_source(model.name, replay, self.L), self.L, self.E, self.k))
        self.mode = "resident" if inner.holds_every_expert else "offloaded"
        self.clocks = Clocks()
        self.policy = TimedPolicy(inner, self.clocks, calibration.host_scale() if policy_time else 0.0)
        self.events = EventBus()
        self.timeline = SimTimeline(record_timeline)
        self.events.subscribe(self.timeline.on_event)
        self.events.subscribe(self._track_peak)
        self.devices = model.plan.devices
        if bool(self.knobs.cpu_split) != bool(model.format.fraction):
            raise KnobError(f"cpu_split {self.knobs.cpu_split} but the model's records are "
                            + (f"split at {model.format.fraction:.3g}" if model.format.fraction else "not split")
                            + ": build the model with build_model(..., cpu_split=...) as the knob says")
        self.engine = SimTransferEngine(model.plan.device_slots or [model.plan.num_slots], model.format.nbytes,
                                        self.clocks, calibration, self.events, calibration.synchronous,
                                        model.format.tail_bytes)
        self.assumptions = calibration.assumptions(self.devices)  # what several GPUs' timing assumes
        self.cache = ExpertCache(self.engine, self.policy, self.L, self.E, self.events)
        inner.attach(self.cache)
        self.host_lane = self._host_lane(calibration)
        self.layer_step = LayerStep(self.cache, self.policy, self.events, self.host_lane)
        self._peak_resident = 0
        plan = model.plan
        why = host_routing_reason(
            enabled=device_routing, graphs=bool(calibration.raw.get("cuda_graphs", False)), policy=inner,
            devices=self.devices, lane_on=self.host_lane.enabled, top_k=self.k,
            dequantizes=not calibration.synchronous and not model.format.computes_in_place(torch.device("cuda"), model.dtype),
            expert_bytes=plan.expert_bytes, headroom_bytes=plan.headroom_bytes)
        self.decode_routing = "device" if why is None else f"host ({why})"  # as the runtime's ``describe()``

    def _host_lane(self, calibration: Calibration) -> HostLane:
        """The CPU lane the knobs ask for, costed by the calibration (the runtime measures its own)."""
        mode = self.knobs.cpu_experts
        if mode == "auto" and calibration.synchronous:  # as the runtime: nothing to split on a CPU device
            mode = "off"
        if mode == "off":
            return HostLane("off")
        curve, threads = calibration.host_lane_curve(self.fmt, self.knobs.cpu_threads)
        self.host_lane_s = lambda tokens: curve.at(tokens)
        costs = LaneCosts(self.engine.copy_s + self.engine.relayout_s["decode"], self.host_lane_s,  # as the runtime times a copy
                          lambda tokens: calibration.expert_device_s(self.fmt, "decode", tokens),
                          threads, source=f"calibration {calibration.where}")
        return HostLane(mode, costs, split=self.model.format.fraction)

    def _track_peak(self, event: Event) -> None:
        if isinstance(event, CacheEvent):
            self._peak_resident = max(self._peak_resident, event.resident)

    # -- the bench's habits ------------------------------------------------------------------
    def empty_cache(self) -> None:
        """Release every expert, as ``Runtime.empty_expert_cache`` does before a measured run."""
        self.cache.empty()

    # -- one request -------------------------------------------------------------------------
    def generate(self, prompt_tokens: int, new_tokens: int, request_id: int = 0) -> SimRun:
        """Prefill ``prompt_tokens`` then decode until ``new_tokens`` tokens exist, clocks from zero."""
        self.clocks.reset(self.devices)
        self.engine.reset()
        self.timeline.reset()
        self.events.emit(StepEvent("request_started"))
        self._peak_resident = len(self.cache.resident())
        counts = PhaseCounts(self.cache)
        ttft = 0.0
        for step in range(new_tokens):
            phase = Phase.PREFILL if step == 0 else Phase.DECODE
            first = 0 if step == 0 else prompt_tokens + step - 1
            self._step_many(step, phase, [(request_id, first, prompt_tokens if step == 0 else 1)])
            if step == 0:
                ttft = self.clocks.host
                counts.mark()
        e2e = self.clocks.host
        counts.mark()
        return SimRun(prompt_tokens, new_tokens, ttft, (e2e - ttft) / (new_tokens - 1) if new_tokens > 1 else None,
                      e2e, counts.phases(), self._peak_resident, self.timeline.rows())

    def generate_many(self, requests: list[tuple[int, int]], max_batch: int, arrivals: list[float] | None = None,
                      prefill_schedule: str = DEFAULT_SCHEDULE, prefill_chunk: int | None = None) -> SimBatch:
        """``(prompt tokens, new tokens)`` per request, scheduled by the runtime's own batcher
        (``batching.Batcher``: the same prefill schedule, joins and segments; request ``i`` replays trace
        request ``i``), its steps timed by the simulator's clocks from zero; an idle simulator jumps to
        the next arrival. A request leaves when it has its tokens (no EOS here); its latencies count
        from its arrival."""
        self.clocks.reset(self.devices)
        self.engine.reset()
        self.timeline.reset()
        self.events.emit(StepEvent("request_started"))
        start = self.cache.stats.as_dict()
        arrivals = check_arrivals(arrivals, len(requests))
        batcher = Batcher(_SimStep(self), max_batch, set(), clock=lambda: self.clocks.host,
                          schedule=prefill_schedule, prefill_chunk=prefill_chunk)
        done = batcher.run([Request(i, [0] * n, new, arrival_s=arrivals[i]) for i, (n, new) in enumerate(requests)],
                           wait=lambda t: setattr(self.clocks, "host", t))  # an idle simulator jumps
        e2e = self.clocks.host
        per_request = [{"prompt_tokens": n, "new_tokens": new, **done[i].latencies()}
                       for i, (n, new) in enumerate(requests)]
        return SimBatch(per_request, max_batch, e2e, sum(n for _, n in requests) / e2e if e2e > 0 else 0.0,
                        batcher.decode_steps, batcher.mean_batch, batcher.decode_s, batcher.decode_tokens_per_s,
                        stats_delta(start, self.cache.stats.as_dict()), self.timeline.rows(),
                        batcher.prompt_steps, batcher.prompt_s)

    def _compute(self, kind: str, layer: int, seconds: float) -> None:
        c = self.clocks
        start = max(c.compute, c.host)
        c.compute = start + seconds
        if self.cal.synchronous:
            c.host = c.compute
        self.events.emit(SpanEvent("whole", "compute", kind, layer, start_s=start, end_s=c.compute))

    def _step_many(self, step: int, phase: Phase, segments: list[tuple[int, int, int]]) -> None:
        """One forward over ``segments`` ((request, first position, tokens) each, the runtime's
        ``ExpertExecutor.begin_step`` order): one attention call per layer and group (a prompt chunk, the
        decode tokens of every request's KV row), the router and the experts over every token at once
        (``OffloadedMixtral.mixed``)."""
        cal, c, p = self.cal, self.clocks, phase.value
        self.layer_step.begin_step(step, phase)
        self.engine.phase = p
        c.host += cal.step_pre_s[p]
        n_tokens = sum(n for _, _, n in segments)
        # A step's attention is one call per group and layer (``mixtral.attend``): a prompt chunk (the last
        # segment of a prompt step), timed by the prompt curves at its tokens, and the decode tokens of B
        # rows, each read up to the widest row's context (``RowKVCache``): the host queues the kernels
        # once (the launch at that context), and the device time is ``Calibration.decode_attention_device_s``
        riding, chunk = (segments[:-1], segments[-1][2]) if phase is Phase.PREFILL else (segments, 0)
        width = max((first + n for _, first, n in riding), default=0)
        groups = [(cal.attention_device_s("prefill", chunk), cal.attention_launch["prefill"].at(chunk))] if chunk else []
        if riding:
            groups.append((cal.decode_attention_device_s(len(riding), width), cal.attention_launch["decode"].at(width)))
        router_s = cal.router_device_s(p, n_tokens if phase is Phase.PREFILL else width)
        # several devices: the layer's hidden states cross to each other device after the router, and each
        # one's outputs (k rows per token) come back before the combine (``ExpertExecutor``)
        peer_in_s = peer_out_s = 0.0
        if self.devices > 1:
            hidden_bytes = n_tokens * self.model.config.hidden_size * self.model.dtype.itemsize
            peer_in_s, peer_out_s = cal.peer_s(hidden_bytes), cal.peer_s(hidden_bytes * self.k) + cal.peer_out_s
        on_device = self.decode_routing == "device" and phase is Phase.DECODE and n_tokens == 1 \
            and self.cache.slot_table() is not None
        for layer in range(self.L):
            self.layer_step.layer_started(layer)
            start = max(c.compute, c.host)
            for attention_s, launch_s in groups:  # one group's attention after the other, on one stream
                begin = max(c.compute, c.host)
                c.host += launch_s
                c.compute = max(begin + attention_s, c.host)
            self.events.emit(SpanEvent("whole", "compute", "attention", layer, start_s=start, end_s=c.compute))
            self.events.emit(StepEvent("router_started", step, p, layer))
            if on_device:  # no sync: the router, the gather and the experts follow on the compute stream
                routed_router_s, experts_s = cal.routed_layer_s(self.fmt, width, self.k, self.model.plan.expert_bytes)
                self._compute("router", layer, routed_router_s)
                self._compute("expert", layer, experts_s)
                self.events.emit(StepEvent("layer_done", step, p, layer))
                continue
            self._compute("router", layer, router_s)
            c.host = max(c.host, c.compute)  # the router's top-k goes to the host: one sync per layer
            c.host += cal.layer_base_s[self.mode]
            experts, probs, counts = self._routing(layer, segments)
            guess = None
            if self.policy.wants_speculation and layer + 1 < self.L:
                # where the trace has no guess the real gate's would be used; the simulator has none
                guesses = [self.replay.speculation(r, first, n, layer) for r, first, n in segments]
                guess = torch.cat(guesses) if all(g is not None for g in guesses) else None
            device = _SimLayer(self, p, counts, c.compute, peer_in_s, peer_out_s)
            self.layer_step.run(layer, experts, probs, guess, device)
            device.join()
            self.events.emit(StepEvent("layer_done", step, p, layer))
        if on_device:  # the routing log read back once the step is queued: every layer's bookkeeping
            c.host = max(c.host, c.compute)
            for layer in range(self.L):
                experts, probs, counts = self._routing(layer, segments)
                self.layer_step.run(layer, experts, probs, None, RanOnDevice(counts))
        c.host = max(c.host, c.compute) + cal.step_post_s[p]
        self.events.emit(StepEvent("step_done", step, p))

    def _routing(self, layer: int, segments: list[tuple[int, int, int]]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Layer ``layer``'s replayed routing of the step's tokens: top-k ``[tokens, k]``, the router
        probabilities the policy reads (the replayed weights where routed, as the runtime's replay has
        them) and each expert's token count."""
        routed = [self.replay.routing(r, first, n, layer) for r, first, n in segments]
        experts = torch.cat([e for e, _ in routed])
        weights = torch.cat([w for _, w in routed])
        probs = replayed_probabilities(experts, weights, self.E)
        return experts, probs, torch.bincount(experts.flatten(), minlength=self.E).tolist()


class _SimStep:
    """A batcher step on the simulator: ``_step_many`` advances the clocks; there are no logits."""

    def __init__(self, sim: Simulator):
        self.sim = sim

    def __call__(self, step, phase, segments, decode, chunk):
        self.sim._step_many(step, phase, segments)
        return None, None

    def release(self, row: int) -> None:
        """The simulator holds no KV cache."""
