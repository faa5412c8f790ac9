"""A counting semaphore that a CUDA stream waits on: the CPU lane hands its results to the GPU
without the host thread waiting for them.

Why by hand: a stream can wait on a CUDA event, but only on one recorded before the wait is queued,
and the lane's result is not ready when the host wants to queue the work that reads it (its copy
into the layer's rows, the combine, the next layer's attention). Waiting on the host instead, as
the lane first did, kept the host from queueing the next layer's attention and router while the
lane ran (about 1.8 ms a layer on the H200: docs/cpu_lane.md). ``cuLaunchHostFunc`` queues a host
function in stream order, and the function here is libc's ``sem_wait`` on a semaphore that the
lane's worker posts once per expert: the stream stalls at that point until the expert is done,
while the host runs on. No Python runs on the driver's callback thread (no GIL to wait for).
torch has no host-function launch, so it goes through ctypes into libcuda (the driver API, whose
stream handles are the runtime's).

Posts and holds pair up in order: the worker runs its experts one after another and posts after
each (also when one fails, so the stream never hangs; the error is raised on the host from the
expert's future), and the host queues one hold per expert in the order it submitted them. On a
CPU device ``hold(None)`` waits on the calling thread: the same semaphore, the same pairing.

A signal delivered to the driver's thread can end a ``sem_wait`` early (``EINTR``); on the host the
wait is retried, on a stream it cannot be. Ctrl-C is the only signal this process expects, and it
ends the run. The semaphore lives as long as the gate (glibc's ``sem_destroy`` frees nothing), and
the gate as long as its worker, which the runtime replaces only between runs, when no hold is
pending.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import threading

import torch


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name, use_errno=True) if name else None


class StreamGate:
    """``post`` from the worker, ``hold`` from the host: on a stream (queued, the host goes on) or here."""

    def __init__(self):
        self._libc = _libc()
        self._sem = (ctypes.c_long * 8)()  # sem_t: 32 bytes, long-aligned, on glibc's 64-bit targets
        if self._libc is None or self._libc.sem_init(self._sem, 0, 0) != 0:
            self._libc = None  # no POSIX semaphores (macOS): a Python one serves the host-side wait
            self._python = threading.Semaphore(0)
        else:  # what each stream hold passes to the driver: the function and its argument
            self._wait_fn = ctypes.cast(self._libc.sem_wait, ctypes.c_void_p)
            self._sem_ptr = ctypes.cast(self._sem, ctypes.c_void_p)

    @property
    def holds_streams(self) -> bool:
        """Whether ``hold`` can stall a CUDA stream (POSIX semaphores and a CUDA driver are here)."""
        return self._libc is not None and _cuda_driver() is not None

    def post(self) -> None:
        """One expert's result is in its buffer (ctypes releases the GIL for the call)."""
        if self._libc is None:
            self._python.release()
        else:
            self._libc.sem_post(self._sem)

    def hold(self, stream: torch.cuda.Stream | None = None) -> None:
        """Stall ``stream`` at this point of its queue until the next post; ``None``: wait here."""
        if stream is None:
            self._wait_here()
            return
        driver = _cuda_driver()
        if driver is None or self._libc is None:
            raise RuntimeError("a CUDA stream can wait on the CPU lane only with libcuda and POSIX semaphores")
        with torch.cuda.device(stream.device):  # the driver call runs in the stream's device's context
            status = driver.cuLaunchHostFunc(ctypes.c_void_p(stream.cuda_stream), self._wait_fn, self._sem_ptr)
        if status != 0:
            raise RuntimeError(f"cuLaunchHostFunc failed with CUresult {status}")

    def _wait_here(self) -> None:
        if self._libc is None:
            self._python.acquire()
            return
        while self._libc.sem_wait(self._sem) != 0:
            if ctypes.get_errno() != errno.EINTR:
                raise OSError(ctypes.get_errno(), "sem_wait failed")


@functools.cache
def _cuda_driver() -> ctypes.CDLL | None:
    """libcuda, loaded once (``None`` without a CUDA driver)."""
    try:
        return ctypes.CDLL("libcuda.so.1") if torch.cuda.is_available() else None
    except OSError:
        return None
