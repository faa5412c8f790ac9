"""The simulator served as the bench serves: B requests at once (``bench --max-batch``) or requests
arriving while others decode (``bench --arrival-rate`` with ``--max-batch``), through the runtime's own
batcher (``Simulator.generate_many``), its rows carrying the bench's fields so that a simulated row and a
measured one are read, printed and compared by the same code (``sim --max-batch``, notebook 07).

As the bench runs them: each row on a fresh simulator, so on an empty expert cache; the same slots at
every batch size (the bench's budget adds the other requests' KV caches, which the simulator's plan
for one request leaves out, so both keep the batch-1 plan's expert slots).
"""

from __future__ import annotations

from ..bench import copy_floor
from . import qos
from .simulator import Simulator


def records(requests: list[dict]) -> list[dict]:
    """A batch's requests (``SimBatch.requests``, or the runtime's ``RequestResult`` fields) in
    ``qos.summarize``'s shape: the measured and simulated runs are summarised by the same code."""
    return [{"arrival_s": r["arrival_s"], "queued_s": r["queue_s"], "ttft_s": r["ttft_s"], "tpot_s": r["tpot_s"],
             "latency_s": r["e2e_s"], "new_tokens": r["new_tokens"]} for r in requests]


def percentile_columns(recs: list[dict]) -> dict:
    """``ttft_p50_s``, ``ttft_p99_s``, ``tpot_p50_s``, ``tpot_p99_s``: the bench's batch-row columns."""
    s = qos.summarize(recs)
    return {f"{m}_{p}_s": s[f"{m}_s"][p] for m in ("ttft", "tpot") for p in ("p50", "p99")}


def batch_row(sim: Simulator, policy: str, requests: list[tuple[int, int]], prefill_schedule: str = "prefill-first",
              prefill_chunk: int | None = None) -> dict:
    """One ``bench.batch_rows`` row of the simulator: ``requests`` (``(prompt tokens, new tokens)``) submitted
    at once, all decoding together (``max_batch`` = their number)."""
    batch = len(requests)
    run = sim.generate_many(requests, batch, prefill_schedule=prefill_schedule, prefill_chunk=prefill_chunk)
    floor, per_step, copy_s = copy_floor(run.rows, run.decode_steps, run.mean_batch)
    return {"max_batch": batch, "policy": policy, "prefill_schedule": prefill_schedule,
            "slots": sim.model.plan.num_slots, "e2e_s": run.e2e_s, "tokens_per_s": run.tokens_per_s,
            "decode_tokens_per_s": run.decode_tokens_per_s, "decode_s": run.decode_s, "mean_batch": run.mean_batch,
            "decode_steps": run.decode_steps, "h2d_copies": run.counts["h2d_copies"],
            "experts_per_decode_step": per_step, "copy_s": copy_s, "copy_floor_tokens_per_s": floor,
            "decode_tokens_per_s_over_copy_floor": run.decode_tokens_per_s / floor if floor else None,
            **percentile_columns(records(run.requests))}


def served_under_load(sim: Simulator, requests: list[tuple[int, int]], arrivals: list[float], max_batch: int,
                      prefill_schedule: str, prefill_chunk: int | None = None) -> tuple[list[dict], float]:
    """``requests`` arriving at ``arrivals``, at most ``max_batch`` decoding together: each request's record
    (``qos.summarize``'s shape) and the mean batch of the decode steps."""
    run = sim.generate_many(requests, max_batch, arrivals=arrivals, prefill_schedule=prefill_schedule,
                            prefill_chunk=prefill_chunk)
    return records(run.requests), run.mean_batch
