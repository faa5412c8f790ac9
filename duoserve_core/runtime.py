"""``Runtime``: requests in, tokens out. Loading, the prefill and decode phases, metrics and the timeline.

``load()`` reads a checkpoint (or synthesizes one) into an offloaded runtime: experts packed into
the pinned host store, everything else on the device, expert slots sized by the memory budget.
``Runtime.generate`` runs one request; ``Runtime.configure`` swaps budget and knobs in place.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .checkpoint import ExpertTensors, TensorSource, open_source
from .errors import BudgetError, CheckpointError, DeviceError, KnobError, PromptError, SettingError
from .events import EventBus, StepEvent
from .collector import CollectorMeter, long_lived_objects_frozen
from .experts.cache import ExpertCache, stats_delta
from .experts.device_routing import DeviceRoutedMoE, host_routing_reason
from .experts.executor import ExpertExecutor
from .experts.layer_step import LayerStep, PhaseCounts
from .experts.formats import SplitInt4Format, make_format
from .experts.host_lane import HostLaneWorker, measure_costs
from .experts.host_store import HostExpertStore
from .experts.transfer import TailLayout, TransferEngine, TransferEngines
from .memory import MemoryPlan, kv_cache_bytes, plan_memory, resolve_budget
from .batching import DEFAULT_SCHEDULE, Batcher, Request, sample
from .decode_graph import DecodeGraphs
from .experts.slot_graph import SlotGraphs
from .kv_cache import RowKVCache
from .mixtral import OffloadedMixtral, build_skeleton, dense_bytes, materialize
from .policy import Phase, Policy, PolicyKnobs, load_policy, routing_source
from .policy.host_lane import HostLane
from .timeline import Timeline
from .traces import RoutingReplay, read_trace
from .units import format_bytes

DEFAULT_MAX_CONTEXT = 4096


class _Result:
    def as_dict(self) -> dict:
        """The fields but the logits (JSON-ready; the logits' tensors are neither kept nor copied)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "logits"}


@dataclass
class GenerationResult(_Result):
    """What one ``generate`` call produced and what it cost."""

    tokens: list[int]
    prompt_tokens: int
    ttft_s: float
    tpot_s: float | None
    e2e_s: float
    peak_gpu_bytes: int | None      # torch's peak on the device during the call: every tensor the process holds
    h2d_bytes: int
    h2d_copies: int
    h2d_bandwidth_gbps: float | None
    expert_hits: int
    expert_misses: int
    host_computes: int              # experts computed by the CPU lane (``--cpu-experts``)
    device: str
    policy: dict
    phases: dict = field(default_factory=dict)
    text: str | None = None
    logits: list[torch.Tensor] | None = field(default=None, repr=False)
    peak_gpu_bytes_by_device: list[int] | None = None  # each GPU's peak (several GPUs), the first's first
    gc_pause_s: float = 0.0         # the garbage collector's time during the call (``collector.CollectorMeter``)
    gc_longest_pause_s: float = 0.0  # its longest collection: a decode step this long beside it was the collector's


@dataclass
class RequestResult(_Result):
    """One request of a ``generate_many`` run: its tokens and its latencies, from its arrival."""

    tokens: list[int]
    prompt_tokens: int
    queue_s: float                  # from its arrival until its prefill began
    ttft_s: float                   # from its arrival until its first token (queueing included)
    tpot_s: float | None            # its decode: (last token - first token) / (tokens - 1)
    e2e_s: float                    # from its arrival until its last token
    arrival_s: float = 0.0          # when it arrived, from the run's start
    text: str | None = None
    logits: list[torch.Tensor] | None = field(default=None, repr=False)


@dataclass
class BatchRun:
    """What one ``generate_many`` call produced: every request in input order, and the run's totals
    (the cache's counters cannot be split by request: one copy serves every request of a step)."""

    requests: list[RequestResult]
    max_batch: int
    e2e_s: float
    tokens_per_s: float             # generated tokens (first tokens included) per second of the run
    decode_steps: int
    mean_batch: float               # requests per decode step, on average
    decode_s: float                 # time in decode steps (steps with no prompt tokens)
    decode_tokens_per_s: float      # their tokens per second: the batch's decode throughput
    prefill_schedule: str           # how newcomers' prompts met the decode (``batching.Batcher``)
    peak_gpu_bytes: int | None
    h2d_bytes: int
    h2d_copies: int
    expert_hits: int
    expert_misses: int
    host_computes: int
    device: str
    policy: dict
    peak_gpu_bytes_by_device: list[int] | None = None
    prompt_steps: int = 0           # steps that ran a prompt (or a chunk of one), riding decode tokens included
    prompt_s: float = 0.0           # their time
    gc_pause_s: float = 0.0         # the garbage collector's time during the run (``collector.CollectorMeter``)
    gc_longest_pause_s: float = 0.0  # its longest collection

    def as_dict(self) -> dict:
        return {**{f.name: getattr(self, f.name) for f in fields(self) if f.name != "requests"},
                "requests": [r.as_dict() for r in self.requests], **self.percentiles()}

    def percentiles(self) -> dict:
        """TTFT and TPOT p50/p99 over the requests (a request's TPOT first, then the percentile over requests)."""
        def pct(values: list[float], q: float) -> float | None:
            return float(torch.quantile(torch.tensor(values, dtype=torch.float64), q)) if values else None
        ttft = [r.ttft_s for r in self.requests]
        tpot = [r.tpot_s for r in self.requests if r.tpot_s is not None]
        return {"ttft_p50_s": pct(ttft, 0.5), "ttft_p99_s": pct(ttft, 0.99), "tpot_p50_s": pct(tpot, 0.5),
                "tpot_p99_s": pct(tpot, 0.99)}


DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """The compute dtype: a torch dtype or its name (bf16, fp16, fp32); ``None`` or ``auto``: the device's default."""
    if dtype in (None, "auto"):
        return None
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if dtype in (torch.bfloat16, torch.float16, torch.float32):
        return dtype
    raise SettingError(f"dtype {dtype!r} is not a compute dtype; use bf16, fp16 or fp32 (or torch.bfloat16, ...), "
                       "or auto")


def check_arrivals(arrivals: list[float] | None, count: int) -> list[float]:
    """Arrival times, one per request, finite and not negative (all 0 when not given)."""
    if arrivals is None:
        return [0.0] * count
    values = list(arrivals)
    if len(values) != count or not all(isinstance(a, (int, float)) and not isinstance(a, bool) and
                                       math.isfinite(a) and a >= 0 for a in values):
        raise PromptError(f"arrivals must give {count} finite times of at least 0 s, one per prompt; "
                          f"got {values[:5]}{'...' if len(values) > 5 else ''}")
    return [float(a) for a in values]


def splits_experts(device: torch.device) -> bool:
    """Whether a CPU lane beside ``device`` is a second place to compute experts: not on a CPU device,
    where every expert already runs on the host (``--cpu-experts auto`` is then off)."""
    return device.type != "cpu"


def check_max_batch(max_batch: int) -> None:
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise PromptError(f"max_batch must be a whole number of at least 1, got {max_batch!r}")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` picks CUDA when present; a device that is not there is a clear error."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise DeviceError(f"device {device!r} is not a device; use cpu, cuda or cuda:N") from exc
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise DeviceError(f"device {device!r} is not supported; use cpu or cuda")
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise DeviceError(f"--device {device} was asked for, but no CUDA GPU is visible (torch {torch.__version__}, "
                          f"{build}); use --device cpu, or run on a machine with an NVIDIA GPU")
    index = dev.index or 0
    if index >= torch.cuda.device_count():
        raise DeviceError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def resolve_cuda_graphs(cuda_graphs: bool | None, devices: list[torch.device]) -> bool:
    """Whether a runtime on ``devices`` replays decode from CUDA graphs: as asked, else (``None``) on one
    GPU. On the H200 (2026-12-01) they cut a resident decode token from 89.6 to 34.8 ms, with the same
    tokens; a copy-bound offloaded token moved within the link's own variation (duoserve 134.5 -> 131.5 ms,
    on-demand 141.2 -> 145.8 ms with its copy stream 2.3 ms busier: docs/cpu_lane.md).
    Off on the CPU, where there is no launch cost to save, and on several GPUs, where only the first
    device's slots would get graphs and no two-GPU run has measured them."""
    if cuda_graphs is not None:
        return bool(cuda_graphs)
    return len(devices) == 1 and devices[0].type == "cuda"


def resolve_devices(device: str | torch.device | None = "auto", devices=None, gpus: int | str | None = None
                    ) -> list[torch.device]:
    """The runtime's devices, the first one running the dense part: ``devices`` (a list, or names joined
    by commas: ``cuda:0,cuda:1``), else ``gpus`` (``N`` GPUs from cuda:0, ``auto``: every visible GPU, the
    CPU where there is none), else ``device`` alone. The same CUDA device twice is an error; the CPU may
    repeat (CPU "devices" run the several-device logic where there is no GPU, as the tests do)."""
    if devices is not None and gpus is not None:
        raise DeviceError("give --devices or --gpus, not both")
    if gpus is not None:
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus == "auto":
            return [torch.device("cuda", i) for i in range(visible)] or [torch.device("cpu")]
        if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
            raise DeviceError(f"--gpus must be a whole number of at least 1 or auto, got {gpus!r}")
        if gpus > visible:
            raise DeviceError(f"--gpus {gpus} was asked for, but this machine has {visible} visible CUDA GPU(s); "
                              + (f"use --gpus {visible} or fewer" if visible else "use --device cpu"))
        return [torch.device("cuda", i) for i in range(gpus)]
    if devices is None:
        return [resolve_device(device)]
    names = [d.strip() for d in devices.split(",")] if isinstance(devices, str) else list(devices)
    if not names or any(n in ("", None) for n in names):
        raise DeviceError(f"--devices {devices!r} names no device; use e.g. cuda:0,cuda:1")
    try:
        kinds = {torch.device(n).type for n in names}
    except (RuntimeError, ValueError) as exc:
        raise DeviceError(f"--devices {devices!r} names something that is not a device; use e.g. cuda:0,cuda:1") from exc
    if len(kinds) > 1:
        raise DeviceError(f"--devices {devices!r} mixes the CPU and GPUs; give GPUs only (the CPU lane is "
                          "--cpu-experts)")
    out = [resolve_device(torch.device("cuda", 0) if str(n) == "cuda" else n) for n in names]
    cuda = [d for d in out if d.type == "cuda"]
    if len(set(cuda)) != len(cuda):
        raise DeviceError(f"--devices {devices!r} names a GPU twice; name each GPU once")
    return out


class Runtime:
    """An offloaded Mixtral: non-expert weights on the device, experts in host memory.

    One decode token, hop by hop: ``generate`` puts the token on the device; ``OffloadedMixtral``
    runs each layer's attention (the policy heard ``layer_started`` just before, so the prefill
    window's copies overlap it); ``ExpertExecutor`` routes (one device->host sync) and hands the
    top-k to the ``LayerStep``, which acquires slots through ``ExpertCache`` (misses and the policy's
    prefetches become copies on ``TransferEngine``'s copy stream) and queues each expert's kernels
    after its copy's event; the outputs are summed in ascending expert order; after the last layer
    the token is sampled. ``events`` tells the timeline and any other observer what happened.
    """

    def __init__(self, source: TensorSource, *, device: str | torch.device | None = "auto", quant: str = "nf4",
                 memory_budget: str | int | None = None, knobs: PolicyKnobs = PolicyKnobs(),
                 dtype: torch.dtype | None = None, max_context: int | None = None,
                 tokenizer: PreTrainedTokenizerBase | None = None, record_timeline: bool = True,
                 routing_trace: str | Path | None = None, attention_quant: str = "none", max_batch: int = 1,
                 devices=None, gpus: int | str | None = None, cuda_graphs: bool | None = None,
                 device_routing: bool = True):
        self.devices = resolve_devices(device, devices, gpus)
        self.device = self.devices[0]
        check_max_batch(max_batch)
        self.source, self.config, self.tokenizer = source, source.config, tokenizer
        self.dtype = resolve_dtype(dtype) or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        if max_context is not None and (isinstance(max_context, bool) or not isinstance(max_context, int)
                                        or max_context < 1):
            raise PromptError(f"max_context must be a whole number of tokens, at least 1, got {max_context!r}")
        self.quant = quant
        model_context = self.config.max_position_embeddings
        self.max_context = min(max_context or DEFAULT_MAX_CONTEXT, model_context)
        if max_context and max_context > model_context:
            raise PromptError(f"max_context {max_context} exceeds the model's context of {model_context} tokens")

        self.routing_trace = str(routing_trace) if routing_trace is not None else None
        replay = None  # read before anything heavy, so a mismatched trace fails at once
        if routing_trace is not None:
            c = self.config
            replay = RoutingReplay(read_trace(routing_trace), c.num_hidden_layers, c.num_local_experts,
                                   c.num_experts_per_tok)
        self.attention_quant = attention_quant
        # decode steps' dense part (norms, attention) and one-token expert calls replayed from CUDA graphs
        # (``decode_graph``, ``experts/slot_graph``); on the CPU the same static functions run eagerly
        self.cuda_graphs = resolve_cuda_graphs(cuda_graphs, self.devices)
        self.device_routing = device_routing  # resident decode routed on the device where it can be (``_device_routed``)
        skeleton = build_skeleton(source, self.dtype, attention_quant)
        self._dense_bytes = dense_bytes(skeleton)
        checkpoint_dtype = getattr(source, "dtype", None) or self.config.dtype or torch.float32
        if isinstance(checkpoint_dtype, str):
            checkpoint_dtype = getattr(torch, checkpoint_dtype)
        self.format = make_format(quant, self.config.hidden_size, self.config.intermediate_size, checkpoint_dtype,
                                  knobs.cpu_split)
        self.memory_budget = memory_budget
        self.plan: MemoryPlan = self._plan(memory_budget, self.max_context, max_batch)  # fail before anything heavy
        self.knobs, self.replay = knobs, replay
        self.policy = self._load_policy(knobs)

        cuda = self.device.type == "cuda"
        self.events = EventBus()
        self.timeline = Timeline(self.devices, enabled=record_timeline)
        self.events.subscribe(self.timeline.on_event)
        self.store = HostExpertStore(self.config.num_hidden_layers, self.config.num_local_experts,
                                     self.format.nbytes, pin=cuda)
        t0 = time.perf_counter()
        self._load_experts()
        self.expert_load_s = time.perf_counter() - t0
        if cuda:
            torch.cuda.empty_cache()
        materialize(skeleton, source, self.device)
        self.skeleton = skeleton
        self.engine = None
        self._build_scheduler()

    def configure(self, *, memory_budget: str | int | None = None, max_context: int | None = None,
                  max_batch: int | None = None, knobs: PolicyKnobs | None = None, **knob_changes) -> "Runtime":
        """Change the budget, the policy or its knobs (``PolicyKnobs`` fields) without reloading the model.

        The host store and the dense weights stay; the expert slots are reallocated for the new
        budget and the policy and cache start empty. This is what makes a sweep, or a notebook
        slider, cost a run instead of a 26 GB reload. Knobs left ``None`` keep their values
        (so a predictor, once given, stays until another replaces it); ``knobs`` replaces them all
        (then ``knob_changes`` apply on top). Observers subscribed to
        ``events`` stay subscribed. If the new setting cannot be built, the old one is restored.
        """
        knobs = (knobs or self.knobs).changed(**knob_changes)
        if knobs.cpu_split != self.knobs.cpu_split:
            raise KnobError(f"cpu_split {knobs.cpu_split} differs from this runtime's {self.knobs.cpu_split}: it is the "
                            "layout of the expert records in host memory, fixed when they are packed; build a new "
                            "runtime (duoserve_core.load(..., cpu_split=...)) to change it")
        budget = self.memory_budget if memory_budget is None else memory_budget
        context = self.max_context
        if max_context is not None:
            if max_context > self.config.max_position_embeddings:
                raise PromptError(f"max_context {max_context} exceeds the model's context of "
                                  f"{self.config.max_position_embeddings} tokens")
            context = max_context
        if max_batch is not None:
            check_max_batch(max_batch)
        plan = self._plan(budget, context, self.plan.max_batch if max_batch is None else max_batch)
        new_policy = self._load_policy(knobs)
        before = (self.plan, self.policy, self.max_context, self.knobs, self.memory_budget)
        self.plan, self.policy, self.max_context, self.knobs, self.memory_budget = plan, new_policy, context, knobs, budget
        try:
            self._build_scheduler()
        except Exception:  # e.g. 'resident' refusing a budget that cannot hold every expert
            self.plan, self.policy, self.max_context, self.knobs, self.memory_budget = before
            self._build_scheduler()
            raise
        return self

    def _plan(self, memory_budget: str | int | None, max_context: int, max_batch: int = 1) -> MemoryPlan:
        unbounded = plan_memory(self.config, self._dense_bytes, self.format, None, max_context, self.dtype,
                                self.device.type, max_batch)
        return plan_memory(self.config, self._dense_bytes, self.format, self._budget_bytes(memory_budget, unbounded),
                           max_context, self.dtype, self.device.type, max_batch, len(self.devices))

    def _load_policy(self, knobs: PolicyKnobs) -> Policy:
        c = self.config
        return load_policy(knobs, (routing_source(self.source.name, self.replay, c.num_hidden_layers),
                                   c.num_hidden_layers, c.num_local_experts, c.num_experts_per_tok))

    def _build_scheduler(self) -> None:
        """Slots, cache, layer step and executor for the current plan; the old slots are freed first. The KV
        cache (and the decode graphs, which read and write it) stay while its rows and context do: a new
        policy or budget needs neither reallocated nor the graphs captured again."""
        old = getattr(self, "model", None)
        kept = (old.kv, old.graphs) if old is not None and (old.kv.rows, old.kv.max_context) == \
            (self.plan.max_batch, self.max_context) else None
        if self.engine is not None:
            # Free the slots now: the old policy and cache refer to each other, so without this the
            # buffer would live until the garbage collector ran, on top of the new one.
            self.engine.release_buffers()
            self.engine = self.cache = self.executor = self.model = None
            if self.device.type == "cuda":
                for device in self.devices:
                    with torch.cuda.device(device):
                        torch.cuda.empty_cache()
        c = self.config
        slots = self.plan.device_slots or [self.plan.num_slots]
        fmt = self.format
        tail = None
        if isinstance(fmt, SplitInt4Format):  # a shared expert's tail lands on the first device
            tail = TailLayout(fmt.tail_offset, fmt.tail_bytes, fmt.tail.arrive if fmt.relayouts_on(self.device) else None)
        self.engine = TransferEngines([TransferEngine(self.store, n, device, self.events,
                                                      fmt.arrive if fmt.relayouts_on(device) else None, d,
                                                      tail if d == 0 else None)
                                       for d, (n, device) in enumerate(zip(slots, self.devices))])
        self.cache = ExpertCache(self.engine, self.policy, c.num_hidden_layers, c.num_local_experts, self.events)
        self.policy.attach(self.cache)
        if kept is None:
            kv = RowKVCache(c, self.plan.max_batch, self.max_context, self.dtype, self.device)
            kept = kv, DecodeGraphs(self.skeleton, kv, capture=self.device.type == "cuda") if self.cuda_graphs else None
        self.host_lane = self._build_host_lane()
        self.layer_step = LayerStep(self.cache, self.policy, self.events, self.host_lane)
        layers = self.skeleton.model.layers
        self.executor = ExpertExecutor(self.layer_step, self.engine, self.format, self.events, c.num_experts_per_tok,
                                       [layer.mlp.gate for layer in layers], self.replay,
                                       self.host_worker if self.host_lane.enabled else None, self._slot_graphs())
        for layer in layers:
            layer.mlp.executor = self.executor
        routed, self.decode_routing = self._device_routed(kept[1] is not None)
        self.model = OffloadedMixtral(self.skeleton, self.events, self.layer_step.layer_started, *kept, routed)

    def _slot_graphs(self) -> SlotGraphs | None:
        """``--cuda-graphs``' one-token expert calls (``experts/slot_graph.py``) over the first device's
        slots, made again with the slots; captured on a GPU where the format computes one token in
        place, else (on the CPU) the same static function run eagerly."""
        cuda = self.device.type == "cuda"
        if not self.cuda_graphs or (cuda and not self.format.computes_in_place(self.device, self.dtype)):
            return None
        return SlotGraphs(self.format, self.engine.slot, self.device, capture=cuda)

    def _device_routed(self, graphs: bool) -> tuple[DeviceRoutedMoE | None, str]:
        """Resident one-row decode steps routed on the device, without a host sync inside the step
        (``experts/device_routing``), where this runtime can, and what ``describe()`` says: ``device``, or
        ``host`` and why not."""
        plan = self.plan
        why = host_routing_reason(
            enabled=self.device_routing, graphs=graphs, policy=self.policy, devices=len(self.devices),
            lane_on=self.host_lane.enabled, top_k=self.config.num_experts_per_tok, expert_bytes=plan.expert_bytes,
            dequantizes=self.device.type == "cuda" and not self.format.computes_in_place(self.device, self.dtype),
            headroom_bytes=plan.headroom_bytes)
        if why is not None:
            return None, f"host ({why})"
        return DeviceRoutedMoE(self.executor, self.dtype, capture=self.device.type == "cuda"), "device"

    def _build_host_lane(self) -> HostLane:
        """The CPU lane the knobs ask for. ``auto`` measures its costs here (one expert on the lane at
        1/4/16 tokens while copies run, one copy, one expert from a slot); on a CPU device there is
        nothing to split, so ``auto`` is off and ``describe()`` says why. The worker thread is kept
        while the thread count stays."""
        mode, threads = self.knobs.cpu_experts, self.knobs.cpu_threads
        self.host_lane_note = None
        if mode == "auto" and not splits_experts(self.device):
            self.host_lane_note = "auto on a CPU device: the experts already run on the host, nothing to split"
            mode = "off"
        worker = getattr(self, "host_worker", None)
        if mode == "off" or (worker is not None and worker.threads != threads):
            if worker is not None:
                worker.close()  # its jobs finish and post, so every hold still queued on a stream passes
                if self.device.type == "cuda":  # and has returned before the worker's semaphore goes
                    torch.cuda.synchronize(self.device)
            self.host_worker = worker = None
        if mode == "off":
            return HostLane("off")
        if worker is None:
            self.host_worker = worker = HostLaneWorker(self.format, threads)
        costs = measure_costs(worker, self.store, self.engine, self.dtype) if mode == "auto" else None
        return HostLane(mode, costs, split=self.format.fraction)

    # -- loading -----------------------------------------------------------------------------
    def _budget_bytes(self, memory_budget: str | int | None, unbounded: MemoryPlan) -> int | None:
        """``memory_budget`` in bytes (any spelling of ``memory.resolve_budget``), checked against the GPU."""
        free = None
        if self.device.type == "cuda":  # the budget applies to each device: the one with least free room bounds it
            engines = self.engine.engines if getattr(self, "engine", None) is not None else None
            frees = []
            for d, device in enumerate(self.devices):
                room = torch.cuda.mem_get_info(device)[0]
                if engines is not None:  # configure(): count what this runtime holds
                    room += engines[d].buffer.numel() + (self._dense_bytes if d == 0 else 0)
                frees.append(room)
            free = min(frees)
        if memory_budget is None:
            return None if free is None else int(free * 0.9)
        budget = resolve_budget(memory_budget, unbounded.fixed_bytes, self.format.nbytes, unbounded.total_experts,
                                self.full_model_bytes())
        if free is not None:
            if budget > free:
                raise DeviceError(f"memory budget {format_bytes(budget)} exceeds the GPU's free memory "
                                  f"{format_bytes(free)}; lower --memory-budget")
        return budget

    def full_model_bytes(self) -> int:
        """The whole model at this quantization: what "15%" of the model is taken of."""
        c = self.config
        return c.num_hidden_layers * c.num_local_experts * self.format.nbytes + self._dense_bytes

    def _load_experts(self) -> None:
        """Read each expert once, convert it to the storage format, write it into the host store.

        Each expert is checked for NaN and infinity on the device that packs it (one reduction over
        weights already on their way there): a corrupt checkpoint would otherwise decode tokens of 0."""
        work = self.device
        for layer in range(self.config.num_hidden_layers):
            for expert in range(self.config.num_local_experts):
                read = self.source.expert(layer, expert)
                tensors = ExpertTensors(read.w1.to(work), read.w3.to(work), read.w2.to(work))
                for name, w in (("w1", tensors.w1), ("w3", tensors.w3), ("w2", tensors.w2)):
                    if not bool(torch.isfinite(w).all()):
                        raise CheckpointError(f"{self.source.name}: expert {expert} of layer {layer} ({name}) holds NaN "
                                              "or infinite weights; the checkpoint is corrupt: save or download it again")
                self.format.pack(tensors, self.store.record(layer, expert), work)
        if work.type == "cuda":
            torch.cuda.synchronize(work)

    # -- generation --------------------------------------------------------------------------
    def encode(self, prompt: str | None, prompt_ids: list[int] | None) -> list[int]:
        if (prompt is None) == (prompt_ids is None):
            raise PromptError("give exactly one of prompt (text) or prompt_ids (token ids)")
        if prompt is not None:
            if not prompt.strip():
                raise PromptError("the prompt is empty; pass some text")
            if self.tokenizer is None:
                raise PromptError(f"{self.source.name} has no tokenizer; pass token ids (--prompt-ids 1,2,3)")
            ids = self.tokenizer(prompt)["input_ids"]
        else:
            if any(isinstance(i, bool) or int(i) != i for i in prompt_ids):
                raise PromptError(f"token ids must be whole numbers, got {list(prompt_ids)[:5]}")
            ids = [int(i) for i in prompt_ids]
        if not ids:
            raise PromptError("the prompt is empty; pass at least one token")
        bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
        if bad:
            raise PromptError(f"token ids {bad[:5]} are outside the vocabulary (0..{self.config.vocab_size - 1})")
        return ids

    def _begin_run(self, stop_at_eos: bool) -> set[int]:
        """A measured run starts: the device idle with fresh peak-memory figures, the timeline's clock from
        now, observers told; returns the token ids that end a request."""
        if self.device.type == "cuda":
            for device in self.devices:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
        self.timeline.reset()
        self.events.emit(StepEvent("request_started"))
        return self.eos_ids(stop_at_eos)

    def eos_ids(self, stop_at_eos: bool = True) -> set[int]:
        """The token ids that end a request (none when ``stop_at_eos`` is False)."""
        eos = self.config.eos_token_id if stop_at_eos else None
        return set(eos if isinstance(eos, list) else [eos]) - {None}

    def check_request(self, ids: list[int], max_new_tokens: int, temperature: float, seed: int, where: str = "") -> None:
        """A ``PromptError`` naming what is wrong with a request (encoded ``ids``) before anything runs."""
        if max_new_tokens < 1:
            raise PromptError("max_new_tokens must be at least 1")
        if not temperature >= 0 or temperature == float("inf"):  # NaN fails the comparison
            raise PromptError(f"temperature must be 0 (greedy) or a finite positive number, got {temperature}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise PromptError(f"seed must be a whole number from 0 to 2**63 - 1, got {seed!r}")
        if len(ids) + max_new_tokens > self.max_context:
            raise PromptError(
                f"{where}the prompt has {len(ids)} tokens and max_new_tokens is {max_new_tokens}: "
                f"{len(ids) + max_new_tokens} exceed the context of {self.max_context} tokens this runtime was built "
                f"for; shorten the prompt, lower max_new_tokens, or load with a larger max_context (the model allows "
                f"{self.config.max_position_embeddings})"
            )

    def empty_expert_cache(self) -> None:
        """Drop every expert from the device (released slots included): the next request starts cold."""
        self.cache.empty()

    def warm_up(self, prompt_tokens: int = 16, new_tokens: int = 2) -> None:
        """On a GPU, one short generation whose timings are discarded, then an empty expert cache.

        The first run in a process pays for CUDA kernel loading, library handles and allocator
        growth (hundreds of ms on an H200, more than a whole prefill at small scale); a measured run
        after this one times the schedule instead. Does nothing on the CPU, where nothing warms up.
        """
        if self.device.type != "cuda":
            return
        ids = [3 + i % (self.config.vocab_size - 3) for i in range(prompt_tokens)]
        self.generate(prompt_ids=ids, max_new_tokens=new_tokens, stop_at_eos=False)
        self.empty_expert_cache()

    def generate(self, prompt: str | None = None, *, prompt_ids: list[int] | None = None, max_new_tokens: int = 32,
                 temperature: float = 0.0, seed: int = 0, stop_at_eos: bool = True,
                 return_logits: bool = False, recorder=None, request_id: int = 0) -> GenerationResult:
        """Generate up to ``max_new_tokens`` tokens; greedy when ``temperature`` is 0.

        ``recorder`` (a ``traces.TraceRecorder``) is told every token's routing at every layer.
        """
        ids = self.encode(prompt, prompt_ids)
        self.check_request(ids, max_new_tokens, temperature, seed)
        eos = self._begin_run(stop_at_eos)
        cuda = self.device.type == "cuda"
        if recorder is not None:
            self.executor.observers.append(recorder)
        try:
            with long_lived_objects_frozen(), CollectorMeter() as collector:
                run = self._decode_loop(ids, max_new_tokens, temperature, torch.Generator().manual_seed(seed), eos,
                                        return_logits, recorder, request_id)
        finally:
            if recorder is not None:
                self.executor.observers.remove(recorder)
        tokens, logits_out, phases, ttft, e2e = run
        copies = [r for r in self.timeline.rows() if r["kind"] == "h2d"]
        copy_ms = sum(r["duration_ms"] for r in copies)
        total = phases["total"]
        return GenerationResult(
            tokens=tokens, prompt_tokens=len(ids), ttft_s=ttft,
            tpot_s=(e2e - ttft) / (len(tokens) - 1) if len(tokens) > 1 else None, e2e_s=e2e,
            peak_gpu_bytes=torch.cuda.max_memory_allocated(self.device) if cuda else None,
            h2d_bytes=total["h2d_bytes"], h2d_copies=total["h2d_copies"],
            h2d_bandwidth_gbps=(sum(r["nbytes"] for r in copies) / copy_ms / 1e6) if copy_ms > 0 else None,
            expert_hits=total["hits"], expert_misses=total["misses"], host_computes=total["host_computes"],
            device=self.device_names(), policy={**self.policy.describe(), **self._lane_description()},
            phases={"prefill": phases["prefill"], "decode": phases["decode"]},
            text=self.tokenizer.decode(tokens) if self.tokenizer is not None else None,
            logits=logits_out if return_logits else None, peak_gpu_bytes_by_device=self._peaks(),
            gc_pause_s=collector.seconds, gc_longest_pause_s=collector.longest_s,
        )

    def generate_many(self, prompts: list[str | list[int]], *, max_batch: int | None = None, max_new_tokens: int = 32,
                      temperature: float = 0.0, seed: int = 0, stop_at_eos: bool = True,
                      return_logits: bool = False, arrivals: list[float] | None = None,
                      prefill_schedule: str = DEFAULT_SCHEDULE, prefill_chunk: int | None = None) -> BatchRun:
        """Generate for every prompt (text, or a list of token ids), up to ``max_batch`` requests at once.

        ``max_batch``: at most the memory plan's (``load(..., max_batch=N)``, whose plan holds N
        requests' KV caches), which is the default. ``arrivals``: when each request arrives, in seconds
        from the call (replayed in real time; default: all at once); a request's queueing, TTFT and E2E
        count from its arrival, and requests join in the order they arrive. ``prefill_schedule`` and
        ``prefill_chunk``: how a newcomer's prompt meets the others' decode (``batching.Batcher``).

        Continuous batching (``batching.Batcher``): whenever fewer than ``max_batch`` requests decode, the
        next waiting request's prompt runs (``mixed``, the default: in the same forward as one decode
        token of every active request; ``prefill-first``: alone) and it joins; else every active request decodes one
        token in one forward (``OffloadedMixtral.decode``: attention over each request's own KV row, the
        MoE over all of them, so each expert is copied once per step for every request that needs it);
        a request leaves at EOS or its token limit. Request ``i`` samples with the generator of
        ``seed`` and keeps request id ``i`` (a routing trace replays its request ``i``), so alone
        (``generate(..., seed=seed, request_id=i)``) it gives the same tokens, up to the rounding
        of matmuls over more rows (``tests/test_batching.py`` says how near-ties are told apart).
        """
        max_batch = self.plan.max_batch if max_batch is None else max_batch
        check_max_batch(max_batch)
        if max_batch > self.plan.max_batch:
            more = kv_cache_bytes(self.config, self.max_context, self.dtype, max_batch - self.plan.max_batch)
            raise BudgetError(f"max_batch {max_batch}: this runtime's memory plan holds the KV caches of "
                              f"{self.plan.max_batch} request(s) at {self.max_context} tokens; load or configure it "
                              f"with max_batch={max_batch} (its KV caches need {format_bytes(more)} more, taken "
                              "from the expert slots)")
        if not prompts:
            raise PromptError("no prompts given; pass at least one")
        arrivals = check_arrivals(arrivals, len(prompts))
        encoded = [self.encode(p, None) if isinstance(p, str) else self.encode(None, list(p)) for p in prompts]
        for i, ids in enumerate(encoded):
            self.check_request(ids, max_new_tokens, temperature, seed, f"prompt {i}: ")
        eos = self._begin_run(stop_at_eos)
        cuda = self.device.type == "cuda"
        start = self.cache.stats.as_dict()
        t0 = time.perf_counter()
        batcher = self.batcher(max_batch, eos, return_logits, lambda: time.perf_counter() - t0, prefill_schedule,
                               prefill_chunk)
        with long_lived_objects_frozen(), CollectorMeter() as collector:
            done = batcher.run([Request(i, ids, max_new_tokens, temperature, seed, arrivals[i])
                                for i, ids in enumerate(encoded)],
                               wait=lambda t: time.sleep(max(0.0, t - batcher.clock())))  # real time
        e2e = time.perf_counter() - t0
        total = stats_delta(start, self.cache.stats.as_dict())
        results = [request_result(done[i], self.tokenizer) for i in range(len(encoded))]
        return BatchRun(
            requests=results, max_batch=max_batch, e2e_s=e2e,
            tokens_per_s=sum(len(r.tokens) for r in results) / e2e if e2e > 0 else 0.0,
            decode_steps=batcher.decode_steps, mean_batch=batcher.mean_batch, decode_s=batcher.decode_s,
            prompt_steps=batcher.prompt_steps, prompt_s=batcher.prompt_s,
            decode_tokens_per_s=batcher.decode_tokens_per_s,
            prefill_schedule=prefill_schedule if prefill_chunk is None else f"{prefill_schedule}, chunks of {prefill_chunk}",
            peak_gpu_bytes=torch.cuda.max_memory_allocated(self.device) if cuda else None,
            h2d_bytes=total["h2d_bytes"], h2d_copies=total["h2d_copies"], expert_hits=total["hits"],
            expert_misses=total["misses"], host_computes=total["host_computes"], device=self.device_names(),
            policy={**self.policy.describe(), **self._lane_description()}, peak_gpu_bytes_by_device=self._peaks(),
            gc_pause_s=collector.seconds, gc_longest_pause_s=collector.longest_s)

    def batcher(self, max_batch: int, eos: set[int], keep_logits: bool = False,
                clock=time.perf_counter, prefill_schedule: str = DEFAULT_SCHEDULE,
                prefill_chunk: int | None = None) -> Batcher:
        """A continuous batcher over this runtime's model (``generate_many`` and the server drive one)."""
        return Batcher(_ModelStep(self), max_batch, eos, keep_logits, clock, prefill_schedule, prefill_chunk)

    def _decode_loop(self, ids: list[int], max_new_tokens: int, temperature: float, generator: torch.Generator,
                     eos: set[int], return_logits: bool, recorder, request_id: int):
        """Prefill, then one token per step; returns tokens, logits, per-phase cache counts, TTFT, E2E."""
        tokens, logits_out = [], []
        counts = PhaseCounts(self.cache)
        t0 = time.perf_counter()
        ttft = 0.0
        try:
            for step in range(max_new_tokens):
                phase = Phase.PREFILL if step == 0 else Phase.DECODE
                if step == 0:
                    self.executor.begin_step(step, phase, [(request_id, 0, len(ids))])
                    logits = self.model.prefill(ids, row=0)
                else:
                    self.executor.begin_step(step, phase, [(request_id, len(ids) + step - 1, 1)])
                    logits = self.model.decode([tokens[-1]], rows=[0])
                token = sample(logits[0], temperature, generator)
                tokens.append(token)
                self.events.emit(StepEvent("step_done", step, phase.value))
                if return_logits:
                    logits_out.append(logits[0].cpu())
                if step == 0:
                    ttft = time.perf_counter() - t0
                    counts.mark()
                if token in eos:
                    break
        finally:
            self.model.kv.release(0)
        e2e = time.perf_counter() - t0
        counts.mark()
        return tokens, logits_out, counts.phases(), ttft, e2e

    def device_names(self) -> str:
        """The device's name; on several, every device's, comma-separated (the first runs the dense part)."""
        return ", ".join(device_name(d) for d in self.devices)

    def _peaks(self) -> list[int] | None:
        if self.device.type != "cuda" or len(self.devices) == 1:
            return None
        return [torch.cuda.max_memory_allocated(d) for d in self.devices]

    def describe(self) -> dict:
        """The runtime's configuration, for result files."""
        return {
            "model": self.source.name, "layers": self.config.num_hidden_layers,
            "experts": self.config.num_local_experts, "top_k": self.config.num_experts_per_tok,
            "quant": self.quant, "attention_quant": self.attention_quant, "cuda_graphs": self.cuda_graphs,
            "expert_format": self.format.name,
            "expert_format_detail": self.format.describe(), "compute_dtype": str(self.dtype).split(".")[-1],
            "device": self.device_names(), "devices": [str(d) for d in self.devices], "max_context": self.max_context,
            "memory_plan": self.plan.as_dict(), "memory_plan_by_device": self.plan.describe_devices(), "host_store_bytes": self.store.allocated_bytes,
            "host_store_pinned": self.store.pinned, "expert_load_s": self.expert_load_s,
            "full_model_bytes": self.full_model_bytes(), "routing_trace": self.routing_trace,
            "decode_routing": self.decode_routing,
            **self.policy.describe(), **self._lane_description(),
        }

    def _lane_description(self) -> dict:
        out = self.host_lane.describe()
        out["cpu_experts"] = self.knobs.cpu_experts  # as asked; ``cpu_lane`` says what runs
        out["cpu_split"] = self.format.fraction  # the records' layout: the lane's share of a shared expert
        out["cpu_lane"] = self.host_lane.mode if self.host_lane_note is None else f"off ({self.host_lane_note})"
        return out


class _ModelStep:
    """A batcher step on the runtime: the executor learns the step's segments, the model runs it."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime

    def __call__(self, step, phase, segments, decode, chunk):
        self.runtime.executor.begin_step(step, phase, segments)
        model = self.runtime.model
        if chunk is None:
            return model.decode(*decode), None
        if decode is None:
            return None, model.prefill(*chunk)
        logits, last = model.mixed(*decode, *chunk)
        return logits, last

    def release(self, row: int) -> None:
        self.runtime.model.kv.release(row)


def request_result(active, tokenizer) -> RequestResult:
    """A finished request of ``generate_many`` (a ``batching.ActiveRequest``), its times from its arrival."""
    return RequestResult(tokens=active.tokens, prompt_tokens=len(active.request.ids), **active.latencies(),
                         text=tokenizer.decode(active.tokens) if tokenizer is not None else None,
                         logits=active.logits or None)


def load(model: str | Path, *, device: str | torch.device | None = "auto", quant: str = "nf4",
         memory_budget: str | int | None = None, num_layers: int | None = None, dtype: torch.dtype | None = None,
         max_context: int | None = None, seed: int = 0, synth_device: str | torch.device | None = None,
         record_timeline: bool = True, routing_trace: str | Path | None = None, attention_quant: str = "none",
         max_batch: int = 1, knobs: PolicyKnobs | None = None, devices=None, gpus: int | str | None = None,
         cuda_graphs: bool | None = None, device_routing: bool = True,
         **knob_values) -> Runtime:
    """Load a Mixtral checkpoint folder, or ``synthetic:<preset>``, as an offloaded runtime.

    The schedule: ``knobs``, or its fields as keywords (``policy="duoserve", predictor=...,
    prefetch_depth=2, predictor_threshold=0.5, speculative_gate=False``; see ``PolicyKnobs``).
    ``synth_device`` chooses where synthesized weights are generated (default: the runtime's
    device, which keeps full-size synthesis fast on a GPU). ``routing_trace`` replays each
    token's top-k experts and weights from a trace instead of the router's choice.
    ``attention_quant="nf4"`` stores the attention projections in NF4 too. ``max_batch``: the requests
    ``generate_many`` decodes at once; the memory plan holds their KV caches (out of the budget).
    ``devices`` (``["cuda:0", "cuda:1"]`` or ``"cuda:0,cuda:1"``) or ``gpus`` (``N`` or ``"auto"``): expert
    slots and copy links on every device, ``memory_budget`` on each (``resolve_devices``).
    ``cuda_graphs``: each decode step's dense part (norms, attention) replays CUDA graphs, one launch a
    layer instead of about forty (``decode_graph``), and so does each one-token expert call, one a slot
    (``experts/slot_graph``); the tokens are the eager run's. ``None`` (the default): on where the runtime
    has one GPU (``resolve_cuda_graphs``); ``False`` runs decode eagerly, ``True`` also runs the graphs'
    static functions on the CPU (what the CPU tests check). ``device_routing``: with the graphs, a policy
    that holds every expert and one request decoding, each step's routing is decided on the device and
    heard by the host once the step is queued (``experts/device_routing``), the same tokens; ``False``
    routes every layer on the host (the calibration's host terms, comparisons).
    """
    knobs = (knobs or PolicyKnobs()).changed(**knob_values)  # checked before anything is read
    devs = resolve_devices(device, devices, gpus)
    source = open_source(model, num_layers=num_layers, seed=seed, synth_device=synth_device or devs[0])
    tokenizer = _load_tokenizer(source.path) if source.path is not None else None
    return Runtime(source, devices=devs, quant=quant, memory_budget=memory_budget, knobs=knobs, dtype=dtype,
                   max_context=max_context, tokenizer=tokenizer, record_timeline=record_timeline,
                   routing_trace=routing_trace, attention_quant=attention_quant, max_batch=max_batch,
                   cuda_graphs=cuda_graphs, device_routing=device_routing)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def has_tokenizer(model: str | Path) -> bool:
    """Whether ``model`` (a checkpoint folder, or ``synthetic:...``) has tokenizer files: checked before
    any weight is read, so a text prompt without a tokenizer fails at once."""
    path = Path(model)
    return not str(model).startswith("synthetic:") and any((path / n).is_file() for n in TOKENIZER_FILES)


def _load_tokenizer(path: Path) -> PreTrainedTokenizerBase | None:
    if not has_tokenizer(path):
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # transformers and tokenizers raise many types for a malformed file
        raise CheckpointError(f"the tokenizer files in {path} cannot be read ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); fix or remove them, "
                              "or pass token ids (--prompt-ids)") from exc


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"
