"""Buffers of the pipelined executor: device temporaries shared by the partitions, host store for offload.

Reuse in PyTorch is a matter of liveness. A slot of the `BufferPool` holds one partition's
tensor at a time and is emptied before the next partition's takes its place, so the
allocator (CUDA's caching allocator, or malloc on CPU) hands the same memory back: T_M lives
in one slot; T_DI in two (`recv`, the communication side, where partition i+1 lands while
`T_DI`, the compute side, feeds the GEMM of partition i); T_DO in two (`T_DO`, written by
the GEMM of partition i, and `T_DO_comm`, read by the combine of partition i-1). Without
reuse (`restore="none"`) T_DI and T_M of each partition are kept for backward instead, n of
each. The pool records live and peak bytes: the measured "peak temporary bytes" of the
memory accounting.

Shape legend: S rows, W row width.
"""

from __future__ import annotations

import torch

from lightning_mpipemoe.moe.comm import Lanes

__all__ = ["BufferPool", "HostStore"]


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().nbytes()


class BufferPool:
    """Named slots for the temporaries of one pass (forward or backward) of one call.

    `put` refuses a slot that still holds a tensor: dropping first is what makes two
    partitions' buffers never live at once, and the refusal keeps the schedule honest.
    Live bytes count each storage once (a slot may alias another, e.g. on one rank the
    dispatched rows are the permuted rows).
    """

    def __init__(self) -> None:
        self._slots: dict[str, torch.Tensor] = {}
        self.peak_bytes = 0
        self.peak_slots: dict[str, int] = {}

    def put(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name in self._slots:
            raise RuntimeError(f"buffer slot {name!r} still holds a tensor; drop it before reusing the slot")
        self._slots[name] = tensor
        live = self.live_bytes()
        if live > self.peak_bytes:
            self.peak_bytes = live
            self.peak_slots = {slot: _nbytes(t) for slot, t in self._slots.items()}
        return tensor

    def get(self, name: str) -> torch.Tensor:
        return self._slots[name]

    def drop(self, *names: str) -> None:
        for name in names:
            self._slots.pop(name, None)

    def clear(self) -> None:
        self._slots.clear()

    def live_bytes(self) -> int:
        seen: dict[int, int] = {}
        for tensor in self._slots.values():
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return sum(seen.values())


class _Fetch:
    """A host-to-device copy in flight; `wait()` returns the device rows."""

    def __init__(self, rows: torch.Tensor, event, lanes: Lanes) -> None:
        self.rows, self._event, self._lanes = rows, event, lanes

    def wait(self) -> torch.Tensor:
        self._lanes.compute_waits(self._event)
        self._event = None
        return self.rows


class HostStore:
    """Host copies of what a restore strategy offloads: one host tensor per kind (`T_DI`,
    `T_M`), a row range per partition.

    CUDA: pinned memory, written and read on the copy lane with non-blocking copies, so the
    transfers overlap compute; the device tensor being offloaded is marked as used by the
    copy lane (`record_stream`) so that the allocator does not recycle it while the copy
    reads it. CPU: a plain copy into the host tensor (there is no separate device memory,
    so the bytes are accounted as host bytes and the fetch copies them back out, as a
    device would).
    """

    def __init__(self, device: torch.device, lanes: Lanes) -> None:
        self.device = device
        self.lanes = lanes
        self._host: dict[str, torch.Tensor] = {}
        self._offload_done = None

    def allocate(self, name: str, rows: int, width: int, dtype: torch.dtype) -> None:
        pin = self.device.type == "cuda"
        self._host[name] = torch.empty(rows, width, dtype=dtype, pin_memory=pin)

    @property
    def host_bytes(self) -> int:
        return sum(_nbytes(t) for t in self._host.values())

    def offload(self, name: str, row_start: int, rows_SW: torch.Tensor) -> None:
        target = self._host[name][row_start : row_start + rows_SW.shape[0]]
        if not self.lanes.cuda:
            target.copy_(rows_SW)
            return
        with self.lanes.on("copy"):
            target.copy_(rows_SW, non_blocking=True)
        rows_SW.record_stream(self.lanes.copy)

    def finish_offload(self) -> None:
        """Mark the end of the forward's copies; backward fetches wait for it."""
        self._offload_done = self.lanes.record("copy")

    def fetch(self, name: str, row_start: int, num_rows: int, lanes: Lanes) -> _Fetch:
        """Start copying rows back to the device on `lanes` (the backward pass's lanes)."""
        source = self._host[name][row_start : row_start + num_rows]
        rows_SW = torch.empty(source.shape, dtype=source.dtype, device=self.device)
        if not lanes.cuda:
            rows_SW.copy_(source)
            return _Fetch(rows_SW, None, lanes)
        if self._offload_done is not None:
            lanes.copy.wait_event(self._offload_done)
        with lanes.on("copy"):
            rows_SW.copy_(source, non_blocking=True)
        return _Fetch(rows_SW, lanes.record("copy"), lanes)

    def release(self) -> None:
        self._host.clear()
