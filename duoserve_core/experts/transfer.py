"""GPU expert slots and the copy stream that fills them.

The slots are one buffer, allocated once, ``num_slots x record_bytes``: the budget is spent up
front and never grows. Each slot has two CUDA events:

- ``ready``: recorded on the copy stream after the copy into the slot; the compute stream
  waits on it before reading the slot (no expert is computed before its copy has landed);
- ``free``: recorded on the compute stream after the last kernel that reads the slot; the copy
  stream waits on it before overwriting the slot (no slot is overwritten while read).

Waits are stream-on-event, so the host never blocks on the hot path. On the CPU the same
calls run synchronously and the events are not needed.
"""

from __future__ import annotations

import torch

from ..events import EventBus, ExpertKey, SpanEvent
from .host_store import HostExpertStore


class TransferEngine:
    """Moves expert records from the host store into device slots."""

    def __init__(self, store: HostExpertStore, num_slots: int, device: torch.device, events: EventBus):
        self.store, self.device, self.events = store, device, events
        self.num_slots = num_slots
        self.buffer = torch.empty((num_slots, store.record_bytes), dtype=torch.uint8, device=device)
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(device)
            self._ready = [torch.cuda.Event() for _ in range(num_slots)]
            self._free = [torch.cuda.Event() for _ in range(num_slots)]
        self._free_recorded = [False] * num_slots

    def slot(self, index: int) -> torch.Tensor:
        return self.buffer[index]

    def copy_in(self, index: int, key: ExpertKey) -> None:
        """Start copying expert ``key`` into slot ``index`` (asynchronous on CUDA)."""
        src, dst = self.store.record(*key), self.buffer[index]
        stream = self.copy_stream if self.cuda else None
        if self.cuda and self._free_recorded[index]:
            stream.wait_event(self._free[index])
        self.events.emit(SpanEvent("begin", "copy", "h2d", key[0], key[1], dst.numel(), cuda_stream=stream))
        if not self.cuda:
            dst.copy_(src)
        else:
            with torch.cuda.stream(stream):
                dst.copy_(src, non_blocking=True)
        self.events.emit(SpanEvent("end", "copy", "h2d", key[0], key[1], dst.numel(), cuda_stream=stream))
        if self.cuda:
            self._ready[index].record(stream)

    def wait_ready(self, index: int) -> None:
        """Make the compute stream wait until slot ``index`` holds its expert."""
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self._ready[index])

    def mark_read(self, index: int) -> None:
        """Record that the compute stream's kernels queued so far are the slot's last readers."""
        if self.cuda:
            self._free[index].record(torch.cuda.current_stream(self.device))
            self._free_recorded[index] = True
