"""Policies side by side in one process, each against the bounds of its own run.

    python -m duoserve_core.bench --model synthetic:mixtral-8x7b --quant nf4 --quant-attention nf4 \\
        --memory-budget 15% --prompt-len 512 --gen 128 \\
        --policies duoserve,uniform,on-demand,lru-speculative,resident --json

For every policy: TTFT, TPOT, E2E, peak GPU memory, bytes moved, hit rate, prefetch accuracy, and
three bounds computed from the run itself:

- transfer floor: the bytes of the experts the prefill uses (none is resident at the start),
  over the H2D bandwidth the run's own copies achieved;
- compute floor: the compute stream's busy time (attention, routers, experts), per phase;
- oracle (decode): Belady's loads over the routing the run took, at the same number of slots,
  every copy overlapped: max(oracle bytes / bandwidth, decode compute) per token.

Belady's count is a lower bound on copies for the whole run (prefill + decode), not for decode
alone: a policy that loads experts during prefill which the prompt never routes to (the prefill
window loads layers whole) can carry them into decode and copy fewer there than Belady's decode
loads. ``oracle_total_loads`` is the whole run's bound; ``oracle_decode_loads`` times the decode.

TTFT is compared with max(transfer floor, prefill compute floor), TPOT with the oracle bound.
A policy that does not fit the budget (``resident``, usually) is reported as skipped. Results go
to ``benchmarks/results/bench_<device>_<date>.json`` with the device, date and command;
``--peer`` adds the accelerate peer's figures (``benchmarks/accelerate_peer.py``) and duoserve's
speed-up over it, ``--timelines DIR`` each policy's timeline (with ``--max-batch`` or ``--arrival-rate``,
each row's), ``--record-trace`` the routing taken.

The model is loaded once; each policy, budget and knob setting is applied with
``Runtime.configure``. This module holds the measurement as functions with typed arguments
(``run_policy``, ``compare_policies``, ``sweep_rows``, ``bounds``, ``derived``, ``targets``), which the
simulator's runner and the notebooks call too; ``__main__`` parses the command line. The sweep, the second command of the issue:

    python -m duoserve_core.bench --sweep ... --prompt-lens 128,512,2048 --budgets 2slots,15%,all \
        --depths 1,2,3 --thresholds 0.2,0.5,0.8

writes ``benchmarks/results/sweep_<device>_<date>.json``, one row per measurement.
"""

from __future__ import annotations

import datetime
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..batching import DEFAULT_SCHEDULE
from ..errors import BudgetError, KnobError
from ..host_reference import host_reference_s
from ..memory import MemoryPlan, kv_cache_bytes
from ..oracle import belady_loads, expert_groups
from ..policy import PolicyKnobs
from ..progress import progress_bar
from ..runtime import GenerationResult, Runtime, device_name, load, resolve_devices
from ..timeline import step_split
from ..units import format_bytes

REPEATS = 3
# A batch sweep's warm-up generates this many tokens: its prefills and first decode steps load every
# kernel and grow the allocator to the batch's size, and the rest of a full-length warm-up (at batch 64
# and 128 tokens, a minute per policy) would only repeat them. That holds while no kernel costs more the
# first time it meets a shape: cuDNN's attention did (a plan per key length), and the measured steps
# paid for it; attention no longer runs on cuDNN (``mixtral.GPU_ATTENTION_BACKENDS``).
WARMUP_TOKENS = 4


def bounds(rows: list[dict], num_slots: int, expert_bytes: int, decode_tokens: int, devices: int = 1) -> dict:
    """The three bounds of one run, from its timeline rows (times in seconds). On several ``devices``
    (``num_slots`` over all of them) each has its own link and compute stream: the copies' floors are
    over ``devices`` links at the run's bandwidth of one, the compute floor the busiest device's."""
    copies = [r for r in rows if r["kind"] == "h2d"]
    copy_s = sum(r["duration_ms"] for r in copies) / 1e3
    bandwidth = sum(r["nbytes"] for r in copies) / copy_s if copy_s > 0 else None

    def busiest(phase: str) -> float:
        busy: dict[int, float] = {}
        for r in rows:
            if r["stream"] == "compute" and r["phase"] == phase:
                busy[r.get("device", 0)] = busy.get(r.get("device", 0), 0.0) + r["duration_ms"] / 1e3
        return max(busy.values(), default=0.0)

    compute = {phase: busiest(phase) for phase in ("prefill", "decode")}
    prefill_experts = {(r["layer"], r["expert"]) for r in rows if r["kind"] == "expert" and r["phase"] == "prefill"}
    # Prefill experts are computed one after another, so each is its own step; decode pins a layer's set.
    prefill_steps = [{key} for key in sorted(prefill_experts)]
    decode_steps = expert_groups(rows, "decode")
    oracle_loads = belady_loads(prefill_steps + decode_steps, num_slots, count_from=len(prefill_steps))
    out = {"h2d_bandwidth_Bps": bandwidth, "compute_prefill_s": compute["prefill"],
           "compute_decode_s": compute["decode"], "oracle_decode_loads": oracle_loads,
           # each prefill expert is used once: Belady loads each once, then the decode loads above
           "oracle_total_loads": len(prefill_steps) + oracle_loads}
    if bandwidth:
        links = bandwidth * devices
        out["transfer_floor_s"] = len(prefill_experts) * expert_bytes / links
        out["ttft_floor_s"] = max(out["transfer_floor_s"], compute["prefill"])
        if decode_tokens:
            out["oracle_tpot_s"] = max(oracle_loads * expert_bytes / links, compute["decode"]) / decode_tokens
    return out


def derived(*, ttft_s: float, tpot_s: float | None, decode_tokens: int, phases: dict, rows: list[dict],
            plan: MemoryPlan, peak_gpu_bytes: int | None, peak_gpu_bytes_by_device: list[int] | None = None) -> dict:
    """What a run's record adds to its raw figures, the same for a measured and a simulated run:
    the bounds, hit rate, prefetch precision and recall, the budget check, the two ratios and where a
    decode step's time went (``timeline.step_split``). On
    several devices the budget applies to each: every device's peak (``peak_gpu_bytes_by_device``) is checked."""
    total = phases["total"]
    b = bounds(rows, plan.num_slots, plan.expert_bytes, decode_tokens, plan.devices)
    peaks = peak_gpu_bytes_by_device or ([] if peak_gpu_bytes is None else [peak_gpu_bytes])
    decode = phases["decode"]
    uses, decode_uses = total["hits"] + total["misses"], decode["hits"] + decode["misses"]
    out = {"bounds": b,
           "hit_rate": total["hits"] / uses if uses else None,
           "prefetch_precision": decode["prefetch_hits"] / decode["prefetches"] if decode["prefetches"] else None,
           "prefetch_recall": decode["prefetch_hits"] / decode_uses if decode_uses else None,
           "within_budget": None if not peaks
           else plan.budget_bytes is None or max(peaks) <= plan.budget_bytes,
           "decode_split": step_split(rows, "decode", decode_tokens)}
    if "ttft_floor_s" in b:
        out["ttft_over_floor"] = ttft_s / b["ttft_floor_s"]
    if "oracle_tpot_s" in b and tpot_s:
        out["tpot_over_oracle"] = tpot_s / b["oracle_tpot_s"]
    return out


@dataclass(frozen=True)
class BenchSetup:
    """What the measured runtime is loaded with (everything but the budget and the schedule)."""

    model: str = "synthetic:mixtral-8x7b"
    quant: str = "nf4"
    attention_quant: str = "none"
    device: str = "auto"
    num_layers: int | None = None
    routing_trace: str | None = None
    devices: str | list[str] | None = None  # several devices (``cuda:0,cuda:1``), or
    gpus: int | str | None = None           # N GPUs from cuda:0 / "auto" (``runtime.resolve_devices``)
    cuda_graphs: bool | None = None         # ``load(cuda_graphs=...)``: decode's dense part and one-token experts
    device_routing: bool = True             # ``load(device_routing=...)``: resident one-request decode routed on the device
    cpu_split: float = 0.0                  # ``load(cpu_split=...)``: records laid out for a shared expert (the knob's value)


def open_runtime(setup: BenchSetup, memory_budget: str | int | None, max_context: int) -> Runtime:
    """One runtime for every configuration of a command: ``configure`` swaps budget and policy."""
    return load(setup.model, device=setup.device, devices=setup.devices, gpus=setup.gpus, quant=setup.quant, attention_quant=setup.attention_quant,
                memory_budget=memory_budget, policy="on-demand", num_layers=setup.num_layers,
                max_context=max_context, routing_trace=setup.routing_trace, cuda_graphs=setup.cuda_graphs,
                device_routing=setup.device_routing, cpu_split=setup.cpu_split)


@dataclass(frozen=True)
class _Run:
    """One measured generation and what the runtime was configured with when it ran."""

    result: GenerationResult
    rows: list[dict]        # its timeline
    runtime: dict           # Runtime.describe() for its configuration
    plan: MemoryPlan


def _run_once(runtime: Runtime, knobs: PolicyKnobs, prompt_ids: list[int], gen: int,
              memory_budget: str | int | None, recorder=None) -> _Run:
    """Configure ``runtime`` for ``knobs`` (a fresh policy: nothing it learned in an earlier run of the
    same replayed routing carries over) and generate once: cold, as the transfer floor assumes, except
    for a policy that keeps every expert on the device, which is measured as a server runs it, loaded
    (by a one-token generation first, untimed)."""
    runtime.configure(memory_budget=memory_budget, knobs=knobs.effective())
    prompt_ids = [t % runtime.config.vocab_size for t in prompt_ids]
    if runtime.policy.holds_every_expert:
        runtime.generate(prompt_ids=prompt_ids[:1], max_new_tokens=1, stop_at_eos=False)
    else:
        runtime.empty_expert_cache()
    result = runtime.generate(prompt_ids=prompt_ids, max_new_tokens=gen, stop_at_eos=False, recorder=recorder)
    return _Run(result, runtime.timeline.rows(), runtime.describe(), runtime.plan)


def _median_run(runs: list[_Run]) -> dict:
    """The figures of the run with the median E2E, with every run's E2E and decode split beside them
    (fastest first). Why every run's split: on the H200 the CPU lane's runs spread up to 1.28x in E2E
    where GPU-only runs spread 1.01-1.09x, and only the runs' own splits say whether a slow one was
    slow throughout (the lane's time per expert) or stalled (``stall_s``), and each run's longest garbage
    collection whether a stall was the collector's; each run's TTFT, since the median E2E's run's TTFT
    moved -7% to +9% between lane-off and lane-on runs whose prompts made the same decisions."""
    runs = sorted(runs, key=lambda r: r.result.e2e_s)
    run = runs[len(runs) // 2]
    result = run.result
    phases = {**result.phases, "total": {k: result.phases["prefill"][k] + result.phases["decode"][k]
                                         for k in result.phases["prefill"]}}
    return {**result.as_dict(), "runtime": run.runtime,
            **derived(ttft_s=result.ttft_s, tpot_s=result.tpot_s, decode_tokens=len(result.tokens) - 1,
                      phases=phases, rows=run.rows, plan=run.plan, peak_gpu_bytes=result.peak_gpu_bytes,
                      peak_gpu_bytes_by_device=result.peak_gpu_bytes_by_device),
            "repeats_e2e_s": [r.result.e2e_s for r in runs],
            "repeats_decode_split": [step_split(r.rows, "decode", len(r.result.tokens) - 1) for r in runs],
            "repeats_gc_longest_pause_s": [r.result.gc_longest_pause_s for r in runs],
            "repeats_ttft_s": [r.result.ttft_s for r in runs],
            "timeline": run.rows}


def run_policy(runtime: Runtime, knobs: PolicyKnobs, prompt_ids: list[int], gen: int, *,
               memory_budget: str | int | None = None, repeats: int = REPEATS, recorder=None,
               on_run=None) -> dict:
    """Measure ``knobs`` (the knobs its policy does not use are ignored): one warm-up, then the median
    of ``repeats`` runs by E2E. ``on_run()`` hears the end of each run, the warm-up's included (a
    progress bar's tick)."""
    runs = []
    for attempt in range(repeats + 1):  # the first run warms kernels, the allocator and the clocks
        runs.append(_run_once(runtime, knobs, prompt_ids, gen, memory_budget, recorder if attempt == 0 else None))
        if on_run is not None:
            on_run()
    return _median_run(runs[1:])


def compare_policies(runtime: Runtime, knobs: PolicyKnobs, policies: list[str], prompt_ids: list[int], gen: int, *,
                     memory_budget: str | int | None = None, repeats: int = REPEATS,
                     recorder=None, quiet: bool = False) -> tuple[dict[str, dict], dict[str, str]]:
    """Every policy at one budget and prompt: (results by policy, skipped policies with the reason).

    The runs are interleaved: a warm-up round, then ``repeats`` rounds that each run every policy
    once. A lent GPU varies over minutes (the same command's on-demand TPOT moved 138 -> 147 ms
    between two H200 machines, and its three runs on one spread over 18.0-20.3 s E2E), so each
    policy's median is taken over the same stretch of time instead of a block of its own. ``recorder`` (a
    ``TraceRecorder``) hears the first policy's warm-up run. A bar counts the runs (policies x
    (1 + repeats)) on a terminal unless ``quiet``."""
    runs: dict[str, list[_Run]] = {policy: [] for policy in policies}
    skipped: dict[str, str] = {}
    with progress_bar(desc="bench", total=len(policies) * (repeats + 1), unit="run", quiet=quiet) as tick:
        for attempt in range(repeats + 1):
            for policy in policies:
                if policy in skipped:
                    continue
                first = attempt == 0 and not any(runs.values())
                try:
                    runs[policy].append(_run_once(runtime, knobs.changed(policy=policy), prompt_ids, gen,
                                                  memory_budget, recorder if first else None))
                    tick()
                except BudgetError as exc:
                    skipped[policy] = str(exc)
                    tick(repeats + 1 - attempt)
    results = {policy: _median_run(r[1:]) for policy, r in runs.items() if policy not in skipped}
    if "duoserve" in results:
        mine = results["duoserve"]["e2e_s"]
        for r in results.values():
            r["duoserve_speedup_e2e"] = r["e2e_s"] / mine
    return results, skipped


def sweep_rows(runtime: Runtime, knobs: PolicyKnobs, policies: list[str], gen: int, *, prompt_len: int,
               prompt_lens: list[int], memory_budget: str | int, budgets: list[str], depths: list[int],
               thresholds: list[float], repeats: int = REPEATS, progress=print, quiet: bool = False) -> list[dict]:
    """Prompt lengths, then budgets, then depth x threshold (duoserve), on one loaded runtime.
    ``progress`` hears a line per measurement; a bar counts the runs on a terminal unless ``quiet``."""
    policies = [p for p in policies if p != "resident"]
    rows = []
    measurements = (len(prompt_lens) * len(policies) + len(depths) * len(thresholds)
                    + sum(len(policies) + (budget == "all") for budget in budgets))

    def measure(sweep_name: str, policy: str, length: int, budget, **changes) -> None:
        try:
            r = run_policy(runtime, knobs.changed(policy=policy, **changes), make_prompt(length), gen,
                           memory_budget=budget, repeats=repeats, on_run=tick)
        except BudgetError as exc:
            rows.append({"sweep": sweep_name, "policy": policy, "prompt_len": length, "skipped": str(exc)})
            tick(repeats + 1)
            return
        r.pop("timeline")
        rows.append({"sweep": sweep_name, "policy": policy, "prompt_len": length, **summary(r)})
        last = rows[-1]
        progress(f"{sweep_name:<10} {policy:<16} prompt {length:>5}  slots {last['slots']:>4}  "
                 f"depth {last['prefetch_depth'] or '-'}  thr {last['predictor_threshold'] or '-'}  "
                 f"TTFT {last['ttft_s'] * 1e3:8.1f} ms ({last['ttft_over_floor'] or 0:.2f}x floor)  "
                 f"TPOT {(last['tpot_s'] or 0) * 1e3:7.2f} ms ({last['tpot_over_oracle'] or 0:.2f}x oracle)")

    with progress_bar(desc="sweep", total=measurements * (repeats + 1), unit="run", quiet=quiet) as tick:
        for n in prompt_lens:
            for policy in policies:
                measure("prompt", policy, n, memory_budget)
        for budget in budgets:
            for policy in policies + (["resident"] if budget == "all" else []):
                measure("budget", policy, prompt_len, budget)
        for depth in depths:
            for threshold in thresholds:
                measure("knobs", "duoserve", prompt_len, memory_budget, prefetch_depth=depth,
                        predictor_threshold=threshold)
    return rows


def make_prompt(length: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 1000, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def batch_rows(runtime: Runtime, knobs: PolicyKnobs, policies: list[str], batches: list[int], prompt_len: int,
               gen: int, *, memory_budget: str | int | None, repeats: int = REPEATS, quiet: bool = False,
               schedules: tuple[str, ...] = ("prefill-first",), prefill_chunk: int | None = None,
               keep_timelines: bool = False, on_row: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Throughput and latency by batch size: for each batch size B and policy, B requests (distinct
    prompts of ``prompt_len`` tokens, ``gen`` tokens each) submitted at once and decoded together
    (``Runtime.generate_many``), a short warm-up (``WARMUP_TOKENS``) then the median of ``repeats`` runs
    by E2E. The budget of a row is what ``memory_budget`` buys at batch 1 plus the KV caches of the
    B - 1 other requests (stated in the row), so every batch size keeps the same expert slots.

    ``copy_floor_tokens_per_s``: B tokens a step over the time to copy the step's distinct experts
    (experts computed per decode step x the run's mean copy time, over the links that copied: one
    per GPU): what the links allow if every expert a step uses had to cross once. ``schedules``: prefill-first by default, so that every decode
    step holds all B requests (the mixed schedule staggers them: the first ones finish earlier).
    ``on_row``: called with the rows so far after each one (the CLI keeps them on disk as it goes).
    ``keep_timelines``: each row also holds its reported run's timeline rows (``timeline``)."""
    runtime.configure(memory_budget=memory_budget, max_batch=1)
    base = runtime.plan.budget_bytes
    rows: list[dict] = []
    with progress_bar(desc="batches", total=len(batches) * len(policies) * len(schedules) * (repeats + 1), unit="run",
                      quiet=quiet) as tick:
        for b, schedule, policy in itertools.product(batches, schedules, policies):
            extra = kv_cache_bytes(runtime.config, runtime.max_context, runtime.dtype, b - 1)
            budget = None if base is None else base + extra
            prompts = [[t % runtime.config.vocab_size for t in make_prompt(prompt_len, seed=i)] for i in range(b)]
            runs = []
            try:
                runtime.configure(memory_budget=budget, max_batch=b, knobs=knobs.changed(policy=policy).effective())
                for attempt in range(repeats + 1):
                    if not runtime.policy.holds_every_expert:
                        runtime.empty_expert_cache()
                    runs.append((runtime.generate_many(prompts, max_batch=b, stop_at_eos=False,
                                                       max_new_tokens=gen if attempt else min(gen, WARMUP_TOKENS),
                                                       prefill_schedule=schedule, prefill_chunk=prefill_chunk),
                                 runtime.timeline.rows()))
                    tick()
            except (BudgetError, KnobError) as exc:
                rows.append({"max_batch": b, "policy": policy, "skipped": str(exc)})
                tick(repeats + 1 - len(runs))
                _report(on_row, rows)
                continue
            run, timeline = sorted(runs[1:], key=lambda r: r[0].e2e_s)[len(runs[1:]) // 2]
            rows.append({"max_batch": b, "policy": policy, "budget_bytes": budget, "kv_bytes_added": extra,
                         "slots": runtime.plan.num_slots, "device_slots": runtime.plan.device_slots,
                         **batch_summary(run, timeline),
                         "repeats_e2e_s": sorted(r.e2e_s for r, _ in runs[1:]),
                         **({"timeline": timeline} if keep_timelines else {})})
            _report(on_row, rows)
    return rows


def _report(on_row: Callable[[list[dict]], None] | None, rows: list[dict]) -> None:
    if on_row is not None:
        on_row(rows)


def arrival_rows(runtime: Runtime, knobs: PolicyKnobs, policies: list[str], rates: list[float], requests: int | None,
                 prompt_len: int, gen: int, *, max_batch: int, memory_budget: str | int | None, seed: int = 0,
                 duration_s: float | None = None,
                 slo_ttft_s: float | None = None, slo_tpot_s: float | None = None, quiet: bool = False,
                 schedules: tuple[str, ...] = (DEFAULT_SCHEDULE,), prefill_chunk: int | None = None,
                 keep_records: bool = False, keep_timelines: bool = False,
                 on_row: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Latency under load: for each arrival rate and policy, ``requests`` requests (or, with ``duration_s``, those
    arriving within that many seconds) arriving as a seeded
    Poisson process (``sim.qos.poisson_arrivals``, the simulator's QoS view's arrivals) replayed in real
    time, at most ``max_batch`` decoding together; TTFT/TPOT/latency percentiles and SLO attainment by
    the simulator's ``sim.qos.summarize``, so measured and simulated QoS read alike. ``keep_records``: each
    row also holds its requests' records (``records``, what ``summarize`` read), so other SLOs can re-count.
    ``on_row`` and ``keep_timelines``: as in ``batch_rows``."""
    from ..sim.qos import poisson_arrivals, poisson_arrivals_within, summarize

    runtime.configure(memory_budget=memory_budget, max_batch=1)
    runtime.warm_up()  # on a GPU: the first run of the process would time kernel loading (one run each here)
    base = runtime.plan.budget_bytes
    extra = kv_cache_bytes(runtime.config, runtime.max_context, runtime.dtype, max_batch - 1)
    budget = None if base is None else base + extra
    rows: list[dict] = []
    # Each policy and schedule first decodes a full batch briefly, untimed, then starts afresh: the
    # one-request warm-up above leaves the batched shapes' kernels cold, and on the H200 (2026-12-01) the
    # first measured row paid for them: duoserve's TPOT p50 at 0.5/s 621 ms against on-demand's 439.
    warmed: set[tuple[str, str]] = set()
    with progress_bar(desc="arrivals", total=len(rates) * len(policies) * len(schedules), unit="run",
                      quiet=quiet) as tick:
        for rate in rates:
            arrivals = (poisson_arrivals_within(rate, duration_s, seed) if duration_s is not None
                        else poisson_arrivals(rate, requests, seed))
            prompts = [[t % runtime.config.vocab_size for t in make_prompt(prompt_len, seed=i)]
                       for i in range(len(arrivals))]
            for schedule, policy in itertools.product(schedules, policies):
                try:
                    knobs_now = knobs.changed(policy=policy).effective()
                    runtime.configure(memory_budget=budget, max_batch=max_batch, knobs=knobs_now)
                    if (schedule, policy) not in warmed:  # see above
                        runtime.generate_many(prompts[:max_batch], max_batch=max_batch, stop_at_eos=False,
                                              max_new_tokens=min(gen, WARMUP_TOKENS), prefill_schedule=schedule,
                                              prefill_chunk=prefill_chunk)
                        warmed.add((schedule, policy))
                        runtime.configure(memory_budget=budget, max_batch=max_batch, knobs=knobs_now)  # afresh
                    if not runtime.policy.holds_every_expert:
                        runtime.empty_expert_cache()
                    run = runtime.generate_many(prompts, max_batch=max_batch, max_new_tokens=gen, stop_at_eos=False,
                                                arrivals=arrivals, prefill_schedule=schedule,
                                                prefill_chunk=prefill_chunk)
                except (BudgetError, KnobError) as exc:
                    rows.append({"arrival_rate": rate, "policy": policy, "skipped": str(exc)})
                    tick()
                    _report(on_row, rows)
                    continue
                timeline = runtime.timeline.rows()
                records = [{"arrival_s": r.arrival_s, "queued_s": r.queue_s, "ttft_s": r.ttft_s, "tpot_s": r.tpot_s,
                            "latency_s": r.e2e_s, "new_tokens": len(r.tokens)} for r in run.requests]
                rows.append({"arrival_rate": rate, "policy": policy, "prefill_schedule": run.prefill_schedule,
                             "max_batch": max_batch, "budget_bytes": budget,
                             "slots": runtime.plan.num_slots, "device_slots": runtime.plan.device_slots,
                             "mean_batch": run.mean_batch, "decode_steps": run.decode_steps, "decode_s": run.decode_s,
                             "prompt_steps": run.prompt_steps, "prompt_s": run.prompt_s,
                             "decode_split": step_split(timeline, "decode", run.decode_steps),
                             "h2d_copies": run.h2d_copies, **summarize(records, slo_ttft_s, slo_tpot_s),
                             **({"records": records} if keep_records else {}),
                             **({"timeline": timeline} if keep_timelines else {})})
                tick()
                _report(on_row, rows)
    return rows


def copy_floor(rows: list[dict], decode_steps: int, mean_batch: float) -> tuple[float | None, float, float | None]:
    """``(copy floor in tokens/s, experts computed per decode step, mean copy seconds)`` from a batched
    run's timeline rows: a step's B tokens over its experts times one copy, each GPU's link copying at
    once. The runtime's and the simulator's runs are read by this one function."""
    decode = [r for r in rows if r["phase"] == "decode"]
    copies = [r["duration_ms"] for r in decode if r["kind"] == "h2d"]
    experts = sum(1 for r in decode if r["kind"] == "expert")  # computed on the GPU or the CPU lane
    per_step = experts / decode_steps if decode_steps else 0.0
    copy_s = sum(copies) / len(copies) / 1e3 if copies else None
    links = len({r.get("device", 0) for r in decode if r["kind"] == "h2d"}) or 1  # one link per GPU, copying at once
    return (mean_batch * links / (per_step * copy_s) if copy_s and per_step else None), per_step, copy_s


def format_batch_table(rows: list[dict]) -> str:
    """Batch rows (the bench's or the simulator's ``--max-batch``) as a table."""
    lines = [f"{'batch':>5} {'policy':<16} {'tok/s':>9} {'decode tok/s':>12} {'/copy floor':>11} "
             f"{'TTFT p50/p99 ms':>17} {'TPOT p50/p99 ms':>17} {'mean batch':>10} {'copies':>7}"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['max_batch']:>5} {r['policy']:<16} skipped: {r['skipped']}")
            continue
        ratio = r["decode_tokens_per_s_over_copy_floor"]
        floor = "-" if ratio is None else f"{ratio:.2f}"
        tpot = "-" if r["tpot_p50_s"] is None else f"{r['tpot_p50_s'] * 1e3:.1f}/{r['tpot_p99_s'] * 1e3:.1f}"
        lines.append(f"{r['max_batch']:>5} {r['policy']:<16} {r['tokens_per_s']:>9.1f} {r['decode_tokens_per_s']:>12.1f} "
                     f"{floor:>11} {r['ttft_p50_s'] * 1e3:>8.1f}/{r['ttft_p99_s'] * 1e3:<8.1f} {tpot:>17} "
                     f"{r['mean_batch']:>10.2f} {r['h2d_copies']:>7}")
    return "\n".join(lines)


def batch_summary(run, rows: list[dict]) -> dict:
    """A ``BatchRun``'s figures for a table, with the copy floor read from its timeline."""
    floor, per_step, copy_s = copy_floor(rows, run.decode_steps, run.mean_batch)
    out = {k: v for k, v in run.as_dict().items() if k not in ("requests", "policy")}
    return {**out, "policy_detail": run.policy, "experts_per_decode_step": per_step, "copy_s": copy_s,
            "decode_split": step_split(rows, "decode", run.decode_steps),
            "copy_floor_tokens_per_s": floor,
            "decode_tokens_per_s_over_copy_floor": run.decode_tokens_per_s / floor if floor else None}


def summary(r: dict) -> dict:
    """One sweep row's figures from a ``run_policy`` result."""
    rt = r["runtime"]
    return {"slots": rt["memory_plan"]["num_slots"], "device_slots": rt["memory_plan"].get("device_slots"),
            "budget_bytes": rt["memory_plan"]["budget_bytes"],
            "prefetch_depth": rt.get("prefetch_depth"), "predictor_threshold": rt.get("predictor_threshold"),
            "speculative_gate": rt.get("speculative_gate"), "ttft_s": r["ttft_s"], "tpot_s": r["tpot_s"],
            "e2e_s": r["e2e_s"], "peak_gpu_bytes": r["peak_gpu_bytes"],
            "peak_gpu_bytes_by_device": r.get("peak_gpu_bytes_by_device"), "within_budget": r["within_budget"],
            "h2d_bytes": r["h2d_bytes"], "hit_rate": r["hit_rate"], "prefetch_precision": r["prefetch_precision"],
            "prefetch_recall": r["prefetch_recall"], "ttft_floor_s": r["bounds"].get("ttft_floor_s"),
            "oracle_tpot_s": r["bounds"].get("oracle_tpot_s"), "ttft_over_floor": r.get("ttft_over_floor"),
            "tpot_over_oracle": r.get("tpot_over_oracle"), "decode": r["phases"]["decode"]}


# The schedulers issue's targets for duoserve: ratio ceilings, and "fastest end to end".
TARGETS = {"ttft_over_floor": 1.10, "tpot_over_oracle": 1.15}


def targets(record: dict, mine: str = "duoserve") -> dict:
    """Each target for ``mine`` in a bench record: the figure, the limit, met or not, and for decode
    where the time goes (copies per token against Belady's, and the copying's share of a token)."""
    r, results = record["results"][mine], record["results"]
    b, plan = r["bounds"], r["runtime"]["memory_plan"]
    out = {"peak_within_budget": {"peak_bytes": r["peak_gpu_bytes"], "budget_bytes": plan["budget_bytes"],
                                  "met": r["within_budget"]}}
    if r.get("peak_gpu_bytes_by_device"):  # several devices: the budget is each one's
        out["peak_within_budget"]["peak_bytes_by_device"] = r["peak_gpu_bytes_by_device"]
    for key, limit in TARGETS.items():
        value = r.get(key)
        out[key] = {"value": value, "limit": limit, "met": None if value is None else value <= limit}
    others = {name: x["e2e_s"] for name, x in results.items() if name != mine}
    out["fastest_e2e"] = {"e2e_s": r["e2e_s"], "others_e2e_s": others, "met": all(r["e2e_s"] < v for v in others.values())}
    if record.get("peer"):
        out["fastest_e2e"]["peer_speedup"] = record["peer"].get("duoserve_speedup_e2e")
    decode_tokens = len(r["tokens"]) - 1
    if decode_tokens and b.get("h2d_bandwidth_Bps"):
        copies = r["phases"]["decode"]["h2d_copies"] / decode_tokens
        oracle = b["oracle_decode_loads"] / decode_tokens
        copy_s = copies * plan["expert_bytes"] / b["h2d_bandwidth_Bps"]
        out["decode_time"] = {"copies_per_token": copies, "oracle_copies_per_token": oracle,
                              "copies_over_oracle": copies / oracle if oracle else None,
                              "copy_s_per_token": copy_s, "tpot_s": r["tpot_s"],
                              "tpot_over_copy_time": r["tpot_s"] / copy_s if copy_s else None}
    return out


def peer_comparison(path: str, prompt_len: int, gen: int, duoserve: dict | None) -> dict:
    """The accelerate peer's E2E for this prompt and generation length, from its own result file."""
    peer = json.loads(Path(path).read_text())
    ttft, tpot = peer["ttft_s_scaled_to_full_depth"], peer["tpot_s_scaled_to_full_depth"]
    out = {"file": str(path), "device": peer["device"], "date": peer["date"], "ttft_s": ttft, "tpot_s": tpot,
           "e2e_s": ttft + (gen - 1) * tpot, "note": peer["scaling_note"], "prompt_len": peer["prompt_len"]}
    if peer["prompt_len"] != prompt_len:
        out["note"] += f"; the peer's prompt had {peer['prompt_len']} tokens, not {prompt_len}"
    if duoserve is not None:
        out["duoserve_speedup_e2e"] = out["e2e_s"] / duoserve["e2e_s"]
    return out


def bench_record(device: str, command: str, results: dict, cuda_graphs: bool | None = None) -> dict:
    """The envelope of a result file: device, date, command, torch, the host's speed at a policy's kind
    of work (``host_reference_s``, as a calibration stores it: machines of one kind differ by up to 1.8x,
    so a comparison with the simulator can tell whose host it is pricing), and whether decode ran from
    CUDA graphs (the runtime's resolved choice: the command may not say; ``ran_with_cuda_graphs``)."""
    record = {"device": device, "date": datetime.date.today().isoformat(), "command": command,
              "torch": torch.__version__, "host_reference_s": host_reference_s(), "results": results}
    if cuda_graphs is not None:
        record["cuda_graphs"] = cuda_graphs
    return record


def ran_with_cuda_graphs(record: dict) -> bool:
    """Whether a result file's runs replayed decode from CUDA graphs: its ``cuda_graphs``, else (files
    written before the graphs became the GPU's default, 2026-12-01) whether its command asked for them."""
    if "cuda_graphs" in record:
        return bool(record["cuda_graphs"])
    return re.search(r"--cuda-graphs\b", record.get("command", "")) is not None


def device_label(device: str = "auto", devices: str | list[str] | None = None, gpus: int | str | None = None) -> str:
    """The devices' names, as the runtime's results give them: ``NVIDIA H200``, ``NVIDIA H200, NVIDIA H200``."""
    return ", ".join(device_name(d) for d in resolve_devices(device, devices, gpus))


def default_out(device: str, kind: str) -> Path:
    """``benchmarks/results/<kind>_<device>_<today>.json``: where a run without ``--out`` writes (the date a
    ``bench_record`` made today holds)."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", device)
    return Path(f"benchmarks/results/{kind}_{slug}_{datetime.date.today().isoformat()}.json")


def format_table(results: dict, skipped: dict) -> str:
    """The policies side by side, as the bench and the simulator print them."""
    def fmt(v, spec):
        return format(v, spec) if v is not None else "-"

    lines = [f"{'policy':<16} {'TTFT ms':>9} {'/floor':>7} {'TPOT ms':>9} {'/oracle':>8} {'E2E s':>7} "
             f"{'peak':>11} {'H2D':>11} {'hit':>6} {'pf prec':>8}"]
    for name, r in results.items():
        lines.append(f"{name:<16} {r['ttft_s'] * 1e3:>9.1f} {fmt(r.get('ttft_over_floor'), '>7.2f')} "
                     f"{fmt(r['tpot_s'] and r['tpot_s'] * 1e3, '>9.2f')} {fmt(r.get('tpot_over_oracle'), '>8.2f')} "
                     f"{r['e2e_s']:>7.2f} {fmt(r['peak_gpu_bytes'] and format_bytes(r['peak_gpu_bytes']), '>11')} "
                     f"{format_bytes(r['h2d_bytes']):>11} {fmt(r['hit_rate'], '>6.2f')} "
                     f"{fmt(r['prefetch_precision'], '>8.2f')}")
    for name, why in skipped.items():
        lines.append(f"{name:<16} skipped: {why}")
    return "\n".join(lines)
