"""GPU expert slots and the copy stream that fills them.

The slots are one buffer, allocated once, ``num_slots x record_bytes``: the budget is spent up
front and never grows. Each slot has two CUDA events:

- ``ready``: recorded on the copy stream after the copy into the slot (on the relayout stream
  after its relayout, for a format that has one); the compute stream waits on it before reading
  the slot (no expert is computed before its copy has landed);
- ``free``: recorded on the compute stream after the last kernel that reads the slot; the copy
  stream waits on it before overwriting the slot (no slot is overwritten while read).

Waits are stream-on-event, so the host never blocks on the hot path. On the CPU the same
calls run synchronously and the events are not needed.

A format whose device kernel reads another layout than the host record (``ExpertFormat.arrive``:
int4) relays each landed record in place on a third stream, the relayout stream: it waits for
the copy, and the copy stream goes on with the next copy meanwhile (the DMA engine and the SMs
work at once), so the relayout adds to a layer's last copy only, not to every copy in a row.

A shared expert's tail (``--cpu-split``: the CPU lane computes the expert's head) is copied into a
buffer of its own, outside the slots (``copy_tail``), on the same copy stream, with the same two
events: the cache never holds a part of an expert.

On several GPUs each device has its own engine: its slots, its copy stream (its own PCIe link) and
its events; ``TransferEngines`` numbers all their slots as one pool (device 0's first), so the cache
sees one set of slots and reads each slot's device from ``device_of_slot``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..events import EventBus, ExpertKey, SpanEvent
from .host_store import HostExpertStore


@dataclass(frozen=True)
class TailLayout:
    """A shared expert's tail in a record (``experts.formats.SplitInt4Format``): its offset and size, and the
    relayout a landed tail needs on the engine's device (``None``: none)."""

    offset: int
    nbytes: int
    arrive: Callable[[torch.Tensor], None] | None = None


class TransferEngine:
    """Moves expert records from the host store into device slots."""

    def __init__(self, store: HostExpertStore, num_slots: int, device: torch.device, events: EventBus,
                 arrive: Callable[[torch.Tensor], None] | None = None, device_index: int = 0,
                 tail: TailLayout | None = None):
        self.store, self.device, self.events = store, device, events
        self.tail = tail  # where a shared expert's tail lies in a record, and its relayout (None: no sharing)
        self.tail_bytes = tail.nbytes if tail is not None else 0
        self.tail_buffer = torch.empty(self.tail_bytes, dtype=torch.uint8, device=device) if tail is not None else None
        self.arrive = arrive  # the format's in-place relayout of a landed record (``ExpertFormat.arrive``)
        self.num_slots, self.device_index = num_slots, device_index
        self.device_of_slot = [device_index] * num_slots
        self.buffer = torch.empty((num_slots, store.record_bytes), dtype=torch.uint8, device=device)
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(device)
            self.relayout_stream = torch.cuda.Stream(device) if arrive is not None else None
            self._landed = torch.cuda.Event()
            self._ready = [torch.cuda.Event() for _ in range(num_slots)]
            self._free = [torch.cuda.Event() for _ in range(num_slots)]
            self._tail_ready, self._tail_free = torch.cuda.Event(), torch.cuda.Event()
        self._tail_read = False
        self._free_recorded = [False] * num_slots
        self._copied = [False] * num_slots
        self._all_read = False  # the compute stream may read any slot: the next copy waits for it (``wait_all_ready``)
        if self.cuda and arrive is not None and num_slots:
            # The first relayout compiles the format's fused kernels (``int4._FusedOnCuda``, seconds once
            # a process): done here, on an empty slot, so no request's first copy waits for it.
            arrive(self.buffer[0])
            torch.cuda.synchronize(device)

    def slot(self, index: int) -> torch.Tensor:
        return self.buffer[index]

    def _copy_stream(self):
        """The copy stream, made to wait for the compute stream where ``wait_all_ready`` asked (CUDA)."""
        stream = self.copy_stream
        if self._all_read:
            stream.wait_stream(torch.cuda.current_stream(self.device))
            self._all_read = False
        return stream

    def copy_in(self, index: int, key: ExpertKey) -> None:
        """Start copying expert ``key`` into slot ``index`` (asynchronous on CUDA)."""
        stream = self._copy_stream() if self.cuda else None
        if self.cuda and self._free_recorded[index]:
            stream.wait_event(self._free[index])
        if self.cuda and self.arrive is not None and self._copied[index]:
            stream.wait_event(self._ready[index])  # a relayout never read (a prefetch evicted unused) ends first
        self._copy_and_relay(self.store.record(*key), self.buffer[index], key, stream, self.arrive,
                             self._ready[index] if self.cuda else None)
        self._copied[index] = True

    def copy_tail(self, key: ExpertKey) -> None:
        """Start copying expert ``key``'s tail into the tail buffer, then its relayout (asynchronous on CUDA);
        the copy waits for the previous tail's last reader."""
        stream = self._copy_stream() if self.cuda else None
        if self.cuda and self._tail_read:
            stream.wait_event(self._tail_free)
        src = self.store.record(*key)[self.tail.offset:self.tail.offset + self.tail_bytes]
        self._copy_and_relay(src, self.tail_buffer, key, stream, self.tail.arrive,
                             self._tail_ready if self.cuda else None)

    def _copy_and_relay(self, src: torch.Tensor, dst: torch.Tensor, key: ExpertKey, stream, arrive, ready) -> None:
        """``src`` into ``dst`` on ``stream`` (at once on the CPU), then ``arrive`` (the format's relayout, or
        None) on the relayout stream behind it; ``ready`` (a CUDA event) is recorded where ``dst`` is usable."""
        d = self.device_index
        self.events.emit(SpanEvent("begin", "copy", "h2d", key[0], key[1], dst.numel(), cuda_stream=stream, device=d))
        if not self.cuda:
            dst.copy_(src)
        else:
            with torch.cuda.stream(stream):
                dst.copy_(src, non_blocking=True)
        self.events.emit(SpanEvent("end", "copy", "h2d", key[0], key[1], dst.numel(), cuda_stream=stream, device=d))
        if self.cuda and arrive is not None:
            self._landed.record(stream)
            relayout = self.relayout_stream
            relayout.wait_event(self._landed)
            self.events.emit(SpanEvent("begin", "relayout", "relayout", key[0], key[1], cuda_stream=relayout, device=d))
            with torch.cuda.stream(relayout):
                arrive(dst)
            self.events.emit(SpanEvent("end", "relayout", "relayout", key[0], key[1], cuda_stream=relayout, device=d))
            ready.record(relayout)
        elif self.cuda:
            ready.record(stream)
        elif arrive is not None:
            arrive(dst)

    def wait_ready(self, index: int) -> None:
        """Make the compute stream wait until slot ``index`` holds its expert."""
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self._ready[index])

    def mark_read(self, index: int) -> None:
        """Record that the compute stream's kernels queued so far are the slot's last readers."""
        if self.cuda:
            self._free[index].record(torch.cuda.current_stream(self.device))
            self._free_recorded[index] = True

    def wait_tail_ready(self) -> None:
        """Make the compute stream wait until the tail buffer holds the last tail copied."""
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self._tail_ready)

    def mark_tail_read(self) -> None:
        """The compute stream's kernels queued so far are the tail buffer's last readers."""
        if self.cuda:
            self._tail_free.record(torch.cuda.current_stream(self.device))
            self._tail_read = True

    def wait_all_ready(self) -> None:
        """For work that may read any slot (``device_routing``): the compute stream waits until every
        copy issued so far has landed, and the next copy waits for the compute stream's kernels queued
        until then (one stream wait each way instead of an event per slot)."""
        if self.cuda:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_stream(self.copy_stream)
            if self.relayout_stream is not None:
                compute.wait_stream(self.relayout_stream)
            self._all_read = True


class TransferEngines:
    """The engines of several devices as one pool of slots: device 0's slots first, then device 1's.

    The cache and the layer step address slots by their pool index; each call goes to the engine that
    owns the slot, so a copy runs on that device's copy stream and link, and ``wait_ready`` /
    ``mark_read`` act on that device's current (compute) stream."""

    def __init__(self, engines: list[TransferEngine]):
        self.engines = engines
        self.store = engines[0].store
        self.device_of_slot = [d for d, engine in enumerate(engines) for _ in range(engine.num_slots)]
        self._local = [i for engine in engines for i in range(engine.num_slots)]
        self.num_slots = len(self.device_of_slot)
        first = engines[0]  # the first device's, for what measures one copy (``experts.host_lane``)
        self.device, self.cuda, self.arrive = first.device, first.cuda, first.arrive
        self.tail_bytes = first.tail_bytes  # a shared expert's tail goes to the first device's tail buffer
        self.copy_tail, self.wait_tail_ready, self.mark_tail_read = first.copy_tail, first.wait_tail_ready, first.mark_tail_read

    def tail(self) -> torch.Tensor:
        return self.engines[0].tail_buffer

    def _engine(self, index: int) -> tuple[TransferEngine, int]:
        return self.engines[self.device_of_slot[index]], self._local[index]

    def slot(self, index: int) -> torch.Tensor:
        engine, local = self._engine(index)
        return engine.slot(local)

    def copy_in(self, index: int, key: ExpertKey) -> None:
        engine, local = self._engine(index)
        engine.copy_in(local, key)

    def wait_ready(self, index: int) -> None:
        engine, local = self._engine(index)
        engine.wait_ready(local)

    def mark_read(self, index: int) -> None:
        engine, local = self._engine(index)
        engine.mark_read(local)

    def release_buffers(self) -> None:
        """Drop every device's slot buffer (before a new plan allocates its own)."""
        for engine in self.engines:
            engine.buffer = engine.tail_buffer = None
