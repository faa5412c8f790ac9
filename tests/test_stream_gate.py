"""The CPU lane's hand-off (``experts.stream_gate``): the compute stream, not the host, waits for the lane.

Holds pair with posts in order, a failed job still posts (nothing hangs) and raises on the host, a
run stopped between a layer's submits and its holds leaves nothing that would pair a later hold with
an old job, and on a GPU a held stream runs nothing queued after the hold until the post.
"""

from __future__ import annotations

import sys
import threading
import time

import pytest
import torch

import duoserve_core
from duoserve_core.experts import executor as executor_module
from duoserve_core.experts.host_lane import LANE_SWITCH_INTERVAL_S, HostLaneWorker
from duoserve_core.experts.stream_gate import StreamGate
from test_layer_step import DATA


def test_a_hold_waits_for_its_post():
    gate = StreamGate()
    posted = []

    def worker():
        for i in range(3):
            time.sleep(0.02)
            posted.append(i)
            gate.post()

    thread = threading.Thread(target=worker)
    thread.start()
    for i in range(3):
        gate.hold()
        assert len(posted) >= i + 1  # never before the i-th post
    thread.join()


def test_a_failed_job_posts_and_raises_on_the_host():
    runtime = duoserve_core.load("synthetic:tiny", device="cpu", memory_budget="all")
    worker = HostLaneWorker(runtime.format, 1)
    try:
        record = runtime.store.record(0, 0)
        bad = torch.zeros(2, runtime.format.hidden + 1)  # the wrong width: the kernel raises
        out = torch.empty(2, runtime.format.hidden)
        future = worker.submit(record, bad, torch.ones(2), out)
        done = threading.Event()
        threading.Thread(target=lambda: (worker.hold(None), done.set()), daemon=True).start()
        assert done.wait(10), "the hold of a failed job never returned"
        with pytest.raises(RuntimeError):
            future.result()
        assert worker.unheld == 0
    finally:
        worker.close()


class _GatedFormat:
    """A format whose lane job waits until the test lets it finish."""

    def __init__(self, fmt):
        self.fmt, self.go, self.optimizing = fmt, threading.Event(), []

    def __getattr__(self, name):
        return getattr(self.fmt, name)

    def host_job(self, record, x, weights, out):
        self.optimizing.append(torch._C._get_graph_executor_optimize())
        assert self.go.wait(10)
        self.fmt.host_job(record, x, weights, out)


def test_the_lanes_thread_frees_none_of_a_jobs_tensors():
    """Freeing a pinned buffer is a CUDA call, and the lane's thread must make none (a stream may be
    holding for its next post): every tensor of a job is freed on the host thread, at a hold, even when
    the caller dropped its own references while the job ran (fails where the job's end frees them)."""
    import weakref

    runtime = duoserve_core.load("synthetic:tiny", device="cpu", memory_budget="all")
    gated = _GatedFormat(runtime.format)
    worker = HostLaneWorker(gated, 1)
    freed_on = []
    try:
        x, weights, out = torch.randn(2, runtime.format.hidden), torch.ones(2), torch.empty(2, runtime.format.hidden)
        for tensor in (x, weights, out):
            weakref.finalize(tensor, lambda: freed_on.append(threading.current_thread().name))
        future = worker.submit(runtime.store.record(0, 0), x, weights, out)
        del x, weights, out, tensor  # the job holds the only references now
        gated.go.set()
        future.result(timeout=10)
        time.sleep(0.05)  # past the job: the lane's thread is back waiting for work
        assert freed_on == []
        worker.hold(None)
        assert freed_on == [threading.current_thread().name] * 3
    finally:
        worker.close()


def test_the_lanes_thread_runs_torchscript_unoptimized():
    """The lane's thread runs scripted jobs in TorchScript's plain interpreter (no profiling and
    re-specializing inside a job on each new token count); the host thread's setting is its own."""
    runtime = duoserve_core.load("synthetic:tiny", device="cpu", memory_budget="all")
    gated = _GatedFormat(runtime.format)
    gated.go.set()
    worker = HostLaneWorker(gated, 1)
    try:
        hidden = runtime.format.hidden
        worker.submit(runtime.store.record(0, 0), torch.randn(1, hidden), torch.ones(1), torch.empty(1, hidden))
        worker.hold(None)
    finally:
        worker.close()
    assert gated.optimizing == [False] and torch._C._get_graph_executor_optimize()


def test_a_run_stopped_mid_layer_leaves_no_stray_post(monkeypatch):
    """Ctrl-C between a layer's submits and its holds: the next run's holds must pair with its own jobs."""
    kw = dict(device="cpu", quant="nf4", memory_budget="6slots", max_context=64)
    runtime = duoserve_core.load(DATA / "small-moe", cpu_experts="all", **kw)
    reference = duoserve_core.load(DATA / "small-moe", **kw).generate(prompt_ids=[1, 5, 9], max_new_tokens=4,
                                                                        stop_at_eos=False)
    finish = executor_module._TorchLayer.finish_host

    def interrupted(self):
        monkeypatch.setattr(executor_module._TorchLayer, "finish_host", finish)
        raise KeyboardInterrupt

    monkeypatch.setattr(executor_module._TorchLayer, "finish_host", interrupted)
    with pytest.raises(KeyboardInterrupt):
        runtime.generate(prompt_ids=[1, 5, 9], max_new_tokens=4, stop_at_eos=False)
    assert runtime.host_worker.unheld > 0  # the stopped layer's jobs: posted, never held
    again = runtime.generate(prompt_ids=[1, 5, 9], max_new_tokens=4, stop_at_eos=False)
    assert again.tokens == reference.tokens and runtime.host_worker.unheld == 0
    assert again.host_computes > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_held_stream_runs_nothing_after_the_hold_until_the_post():
    gate = StreamGate()
    assert gate.holds_streams
    stream = torch.cuda.Stream()
    target = torch.zeros(1024, device="cuda")
    done = torch.cuda.Event()
    with torch.cuda.stream(stream):
        gate.hold(stream)
        target.fill_(1.0)
        done.record()
    time.sleep(0.2)  # the host went on at once; the stream is still held (read nothing on the device
    assert not done.query()  # here: a stream that waits for the held one would wait for the post)
    gate.post()
    done.synchronize()
    assert float(target.sum()) == 1024.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_several_lane_experts_a_layer_finish_on_a_gpu():
    """On the H200 every run with several lane experts in a layer hung (2026-12-02: the lane's thread
    freed a pinned buffer while the stream held for its next post); a prompt and a batch with half of
    the experts on the lane must finish, every hold paired."""
    kw = dict(device="cuda", quant="int4", memory_budget="6slots", max_context=64, max_batch=4)
    runtime = duoserve_core.load(DATA / "small-moe", cpu_experts="half", cpu_threads=4, **kw)
    runs = []

    def work():
        runs.append(runtime.generate(prompt_ids=[1, 5, 9, 2, 7, 3, 8, 4], max_new_tokens=4, stop_at_eos=False))
        runs.append(runtime.generate_many([[1, 5, 9, 2], [3, 4, 5], [7, 8, 9, 10, 11], [2, 2]], max_batch=4,
                                          max_new_tokens=4, stop_at_eos=False))

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(120)
    assert not thread.is_alive(), "a run with the lane forced on half of the experts hung"
    assert len(runs) == 2 and all(r.host_computes > 0 for r in runs) and runtime.host_worker.unheld == 0


@pytest.mark.parametrize("schedule", ["mixed", "prefill-first"])
def test_batched_serving_with_the_lane_pairs_every_hold(schedule):
    """Batched steps (decode rows, prompt chunks, both in one forward) hand off as single requests do:
    the tokens are the lane-less run's and no job is left without its hold or off the timeline."""
    kw = dict(device="cpu", quant="nf4", memory_budget="6slots", max_context=64, max_batch=4)
    prompts = [[1, 5, 9, 2], [3, 4, 5], [7, 8, 9, 10, 11], [2, 2]]
    lane = duoserve_core.load(DATA / "small-moe", cpu_experts="half", **kw)
    off = duoserve_core.load(DATA / "small-moe", **kw)
    run = lane.generate_many(prompts, max_batch=4, max_new_tokens=6, stop_at_eos=False, prefill_schedule=schedule)
    reference = off.generate_many(prompts, max_batch=4, max_new_tokens=6, stop_at_eos=False, prefill_schedule=schedule)
    assert [r.tokens for r in run.requests] == [r.tokens for r in reference.requests]
    assert run.host_computes > 0 and lane.host_worker.unheld == 0 and not lane.executor.lane_jobs
    assert (lane.timeline.to_dataframe()["stream"] == "cpu").sum() == run.host_computes


def test_the_gil_switch_interval_is_short_while_a_lane_worker_lives():
    """The lane's thread takes the GIL back after every kernel; with the host thread running Python it
    would wait 5 ms each time (benchmarks/diagnostics/lane_gil.py), so a worker shortens the interval
    while it lives and the last one to close puts it back."""
    runtime = duoserve_core.load("synthetic:tiny", device="cpu", memory_budget="all")
    before = sys.getswitchinterval()
    first, second = HostLaneWorker(runtime.format, 1), HostLaneWorker(runtime.format, 1)
    assert sys.getswitchinterval() <= LANE_SWITCH_INTERVAL_S
    first.close()
    first.close()  # closing twice releases once
    assert sys.getswitchinterval() <= LANE_SWITCH_INTERVAL_S
    second.close()
    assert sys.getswitchinterval() == before
