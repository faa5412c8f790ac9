"""The discrete-event model: the real cache and policy, driven on simulated streams.

Three clocks advance: the host thread's, the compute stream's and the copy stream's (seconds
from the start of the request). The real ``ExpertCache`` and the real policy object make every
decision; the cache's transfer engine is ``SimTransferEngine``, which puts each copy on the
copy-stream clock instead of moving bytes. ``Simulator`` calls the policy and the cache in the
order ``Runtime._decode_loop``, ``OffloadedMixtral.forward`` and ``ExpertExecutor.moe`` do:

    step:  phase(...) plan -> step_pre (embedding, mask; host)
    layer: layer_started plan -> attention -> router (the host waits for the compute stream)
           -> router_done / speculated -> acquire resident experts first, then the missing ones
           -> the plans of router_done/speculated -> each expert computed once its copy landed
           -> layer_done plan
    step:  lm_head and sampling (step_post, after the compute stream is done)

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
- on a synchronous device (the CPU) the host waits for every operation.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from ..experts.cache import ExpertCache
from ..policy import Phase, Plan, Policy, make_policy
from ..timeline import Timeline
from ..traces import RoutingReplay
from .calibration import Calibration, format_name
from .model import SimModel


@dataclass
class Clocks:
    host: float = 0.0
    compute: float = 0.0
    copy: float = 0.0


class SimTimeline(Timeline):
    """A ``Timeline`` whose spans are written by the simulator: same rows, DataFrame and Chrome trace."""

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

    def add(self, stream: str, kind: str, layer: int, expert: int | None, nbytes: int, start: float,
            end: float) -> None:
        if self.enabled:
            self._rows.append(dict(stream=stream, kind=kind, phase=self.phase, step=self.step, layer=layer,
                                   expert=expert, nbytes=nbytes, start_ms=start * 1e3, end_ms=end * 1e3,
                                   duration_ms=(end - start) * 1e3))

    def rows(self) -> list[dict]:
        return [dict(r) for r in self._rows]


class TimedPolicy:
    """The policy as the cache and the simulator see it: every decision it makes advances the host
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
    """``TransferEngine``'s interface on the simulated copy stream."""

    def __init__(self, num_slots: int, record_bytes: int, clocks: Clocks, calibration: Calibration,
                 timeline: SimTimeline, synchronous: bool):
        self.num_slots, self.store = num_slots, _Store(record_bytes)
        self.clocks, self.timeline, self.synchronous = clocks, timeline, synchronous
        self.copy_s = calibration.copy_s(record_bytes)
        self.per_copy_s = calibration.per_copy_s
        self.ready = [0.0] * num_slots   # when each slot's last copy lands
        self.free = [0.0] * num_slots    # when each slot's last reader finishes

    def copy_in(self, index: int, key: tuple[int, int]) -> None:
        c = self.clocks
        c.host += self.per_copy_s
        start = max(c.copy, c.host, self.free[index])
        c.copy = self.ready[index] = start + self.copy_s
        if self.synchronous:
            c.host = c.copy
        self.timeline.add("copy", "h2d", key[0], key[1], self.store.record_bytes, start, c.copy)

    def wait_ready(self, index: int) -> float:
        return self.ready[index]

    def mark_read(self, index: int, until: float) -> None:
        self.free[index] = until


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


class Simulator:
    """One simulated runtime: model, calibration, policy, cache; ``generate`` replays a request."""

    def __init__(self, model: SimModel, calibration: Calibration, replay: RoutingReplay,
                 policy: str | Policy = "on-demand", *, predictor: str | None = None, prefetch_depth: int = 2,
                 predictor_threshold: float = 0.3, speculative_gate: bool = False, record_timeline: bool = True,
                 policy_time: bool = True):
        calibration.check(model.config, model.quant, model.attention_quant)
        self.model, self.cal, self.replay = model, calibration, replay
        self.fmt = format_name(model.quant, calibration)
        c = model.config
        self.L, self.E, self.k = c.num_hidden_layers, c.num_local_experts, c.num_experts_per_tok
        layer_predictor = None
        if predictor is not None:
            from ..predict import load_predictor

            layer_predictor = load_predictor(predictor, expect=(model.name, self.L, self.E, self.k), device="cpu")
        inner = make_policy(policy, predictor=layer_predictor, prefetch_depth=prefetch_depth,
                            predictor_threshold=predictor_threshold, speculative_gate=speculative_gate)
        self.mode = "resident" if inner.name == "resident" else "offloaded"
        self.clocks = Clocks()
        self.policy = TimedPolicy(inner, self.clocks, calibration.host_scale() if policy_time else 0.0)
        self.timeline = SimTimeline(record_timeline)
        self.engine = SimTransferEngine(model.plan.num_slots, model.format.nbytes, self.clocks, calibration,
                                        self.timeline, calibration.synchronous)
        self.cache = ExpertCache(self.engine, self.policy, self.L, self.E)
        inner.attach(self.cache)
        self._peak_resident = 0

    # -- the bench's habits ------------------------------------------------------------------
    def empty_cache(self) -> None:
        """Release every expert, as ``bench.empty_cache`` does before a measured run."""
        self.cache.empty()

    # -- one request -------------------------------------------------------------------------
    def generate(self, prompt_tokens: int, new_tokens: int, request_id: int = 0) -> SimRun:
        """Prefill ``prompt_tokens`` then decode until ``new_tokens`` tokens exist, clocks from zero."""
        self.clocks.host = self.clocks.compute = self.clocks.copy = 0.0
        self.engine.ready = [0.0] * self.engine.num_slots
        self.engine.free = [0.0] * self.engine.num_slots
        self.timeline.reset()
        self._peak_resident = len(self.cache.resident())
        snapshots = [self.cache.stats.as_dict()]
        ttft = 0.0
        for step in range(new_tokens):
            phase = Phase.PREFILL if step == 0 else Phase.DECODE
            first = 0 if step == 0 else prompt_tokens + step - 1
            self._step(step, phase, prompt_tokens if step == 0 else 1, first, request_id)
            if step == 0:
                ttft = self.clocks.host
                snapshots.append(self.cache.stats.as_dict())
        e2e = self.clocks.host
        snapshots.append(self.cache.stats.as_dict())
        delta = lambda a, b: {k: b[k] - a[k] for k in b}  # noqa: E731
        return SimRun(prompt_tokens, new_tokens, ttft, (e2e - ttft) / (new_tokens - 1) if new_tokens > 1 else None,
                      e2e, {"prefill": delta(snapshots[0], snapshots[1]), "decode": delta(snapshots[1], snapshots[2]),
                            "total": delta(snapshots[0], snapshots[2])},
                      self._peak_resident, self.timeline.rows())

    def _apply(self, plan: Plan) -> None:
        """``ExpertExecutor.apply``: releases, then loads until one finds no room."""
        for key in plan.release:
            self.cache.release(key)
        for key in plan.load:
            if not self.cache.prefetch(key) and not self.cache.is_resident(key):
                break
        self._peak_resident = max(self._peak_resident, len(self.cache.resident()))

    def _compute(self, kind: str, layer: int, expert: int | None, seconds: float, not_before: float = 0.0) -> None:
        c = self.clocks
        start = max(c.compute, c.host, not_before)
        c.compute = start + seconds
        if self.cal.synchronous:
            c.host = c.compute
        self.timeline.add("compute", kind, layer, expert, 0, start, c.compute)

    def _step(self, step: int, phase: Phase, n_tokens: int, first: int, request_id: int) -> None:
        cal, c, p = self.cal, self.clocks, phase.value
        self.timeline.phase, self.timeline.step = p, step
        self._apply(self.policy.phase(phase))
        c.host += cal.step_pre_s[p]
        x = n_tokens if phase is Phase.PREFILL else first + n_tokens  # prefill: tokens; decode: context
        attention_s, launch_s = cal.attention_device_s(p, x), cal.attention_launch[p].at(x)
        router_s = cal.router_device_s(p, x)
        for layer in range(self.L):
            self._apply(self.policy.layer_started(layer))
            start = max(c.compute, c.host)
            c.host += launch_s
            c.compute = max(start + attention_s, c.host)
            self.timeline.add("compute", "attention", layer, None, 0, start, c.compute)
            self._compute("router", layer, None, router_s)
            c.host = max(c.host, c.compute)  # the router's top-k goes to the host: one sync per layer
            self._moe(layer, request_id, first, n_tokens, p)
        c.host = max(c.host, c.compute) + cal.step_post_s[p]

    def _moe(self, layer: int, request_id: int, first: int, n_tokens: int, phase: str) -> None:
        cal, c = self.cal, self.clocks
        c.host += cal.layer_base_s[self.mode]
        experts, weights = self.replay.routing(request_id, first, n_tokens, layer)
        probs = torch.zeros(n_tokens, self.E).scatter_(1, experts, weights.float())
        ahead = [self.policy.router_done(layer, experts, probs)]
        if self.policy.wants_speculation and layer + 1 < self.L:
            guess = self.replay.speculation(request_id, first, n_tokens, layer)
            if guess is not None:  # where the trace has no guess the real gate's would be used
                ahead.append(self.policy.speculated(layer + 1, guess))
        counts = torch.bincount(experts.flatten(), minlength=self.E).tolist()
        needed = [e for e, n in enumerate(counts) if n]
        pending = deque(sorted(needed, key=lambda e: not self.cache.holds((layer, e))))
        in_flight: deque = deque()
        while pending or in_flight:
            while pending and (self.cache.holds((layer, pending[0])) or self.cache.can_make_room()):
                e = pending.popleft()
                slot, _ = self.cache.acquire((layer, e))
                in_flight.append((e, slot))
                self._peak_resident = max(self._peak_resident, len(self.cache.resident()))
            for plan in ahead:
                self._apply(plan)
            ahead = []
            e, slot = in_flight.popleft()
            # Like attention: the kernels start once queued (and the slot's copy landed) and cannot end
            # before the host has finished queueing them. (A synchronous device runs them inline.)
            if cal.synchronous:
                c.host += cal.per_expert(phase)
            start = max(c.compute, c.host, self.engine.wait_ready(slot))
            if cal.synchronous:
                c.compute = c.host = start + cal.expert_device_s(self.fmt, phase, counts[e])
            else:
                c.host += cal.per_expert(phase)
                c.compute = max(start + cal.expert_device_s(self.fmt, phase, counts[e]), c.host)
            self.timeline.add("compute", "expert", layer, e, 0, start, c.compute)
            self.engine.mark_read(slot, c.compute)
            self.cache.unpin((layer, e))
        self._apply(self.policy.layer_done(layer))

