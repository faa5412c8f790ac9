"""The host's speed at the kind of work a policy does on it, measured the same way wherever it is needed.

A calibration stores it (its host's figure) and the simulator measures it again where it runs, so that a
policy's decision time, timed as it runs in the simulator, is charged at the calibrated host's speed; a bench
result stores it too, so that a comparison with the simulator can tell whether the calibration priced the host
the run had (machines of one kind have measured up to 1.8x apart).
"""

from __future__ import annotations

import functools
import statistics
import time

import torch


def host_reference_s(repeats: int = 5) -> float:
    """Seconds for a fixed mix of what a policy does on the host: small CPU tensor ops, dict updates,
    sorting keys. Stored in the calibration and measured again where the simulator runs, so that a
    policy's decision time, timed as it runs in the simulator, is charged at the calibrated host's speed."""
    x, w = torch.ones(1, 64), torch.full((64, 64), 0.01)
    scores: dict[tuple[int, int], float] = {}

    def work() -> None:
        for i in range(64):
            y = torch.nn.functional.linear(x, w).sigmoid()
            scores[(i % 8, i % 13)] = float(y[0, i])
            sorted(scores, key=scores.get)

    work()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        work()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


@functools.lru_cache(maxsize=1)
def local_host_reference_s() -> float:
    return host_reference_s()


def hosts(calibration_s: float | None, files: dict[str, float | None]) -> dict:
    """The calibration's host speed beside each result file's that recorded one (seconds): a simulator
    pricing a faster or slower host than a run had misses by the host work's share of that run."""
    return {"calibration": calibration_s, "files": {name: s for name, s in files.items() if s}}


def hosts_line(host: dict) -> str | None:
    """``hosts``' Markdown sentence (each run's speed and its ratio to the calibration's), or ``None``
    when either side lacks a figure."""
    if not host["files"] or not host["calibration"]:
        return None
    runs = ", ".join(f"`{name}` {1e3 * s:.2f} ms ({s / host['calibration']:.2f}x)" for name, s in host["files"].items())
    return (f"Hosts (`host_reference_s`, a policy's kind of host work): the calibration's "
            f"{1e3 * host['calibration']:.2f} ms; the runs': {runs}.")
