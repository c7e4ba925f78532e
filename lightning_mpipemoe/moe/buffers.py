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

On CUDA that reuse needs the asynchronous offload copies to be waited for before a slot is
freed (`CopyFences`; no `record_stream`, which would let the allocator hand out fresh blocks
while copies are in flight, so that n partitions' worth could be live). Offloaded rows go
into one grow-only host pool per process (`HostPool`, pinned on CUDA), reused by every layer
and call instead of fresh (pinned) allocations per layer per call.

Shape legend: S rows, W row width.
"""

from __future__ import annotations

import weakref

import torch

from lightning_mpipemoe.moe.comm import Lanes

__all__ = ["COPY_FENCES", "BufferPool", "CopyFences", "HostPool", "HostStore", "host_pool"]


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
        """Empty the slots; a tensor an offload copy still reads is waited for first."""
        for name in names:
            tensor = self._slots.pop(name, None)
            if tensor is not None:
                COPY_FENCES.settle(tensor)

    def clear(self) -> None:
        for tensor in self._slots.values():
            COPY_FENCES.settle(tensor)
        self._slots.clear()

    def live_bytes(self) -> int:
        seen: dict[int, int] = {}
        for tensor in self._slots.values():
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return sum(seen.values())


class CopyFences:
    """Device tensors an asynchronous copy (an offload) still reads, each with the event that
    ends the copy. The host store adds one per offload; the buffer pool settles it when the
    slot is dropped: the compute stream waits for the copy before the tensor is freed, so the
    caching allocator hands its block to the next partition only once the copy has read it.
    That keeps the buffers fixed (the memory of one slot, not one per partition in flight)
    without `record_stream`, which lets the allocator hand out fresh blocks instead. On CPU
    copies are synchronous: the events are None and settling only does the bookkeeping.

    The price on CUDA: the forward drops T_DI right after the GEMM that reads it, so compute
    waits there for T_DI's device-to-host copy; T_M's copy overlaps the activation. (Keeping
    T_DI one step longer would hide its copy too, at one more T_DI buffer than the analytic
    model's schedule.)
    """

    def __init__(self) -> None:
        self._pending: dict[tuple[str, int], object] = {}

    @staticmethod
    def _key(tensor: torch.Tensor) -> tuple[str, int]:
        return tensor.device.type, tensor.untyped_storage().data_ptr()

    def add(self, tensor: torch.Tensor, event) -> None:
        self._pending[self._key(tensor)] = event

    def settle(self, tensor: torch.Tensor) -> bool:
        """Before `tensor` is freed: the current stream waits for its copy. True if it had one."""
        key = self._key(tensor)
        if key not in self._pending:
            return False
        event = self._pending.pop(key)
        if event is not None:
            torch.cuda.current_stream(tensor.device).wait_event(event)
        return True

    def __len__(self) -> int:
        return len(self._pending)


#: One per process: `HostStore.offload` adds, `BufferPool.drop` settles.
COPY_FENCES = CopyFences()


class _Chunk:
    """One block of the host pool: `data` (uint8), and the event after which it is free."""

    def __init__(self, nbytes: int, pin: bool) -> None:
        self.data = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        self.nbytes = nbytes
        self.in_use = False
        self.event = None  # the last copy that reads or writes it (CUDA)


class HostPool:
    """The host memory of every offload of one process: grow-only blocks (pinned on CUDA),
    reused by every layer and call. A block is handed out whole to one store (best fit among
    the free ones, else a new one) and returned by it after backward (or when the store is
    collected); with the same shapes step after step, the pool stops growing after the first.
    """

    #: Blocks are sized in multiples of this, so that slightly different token counts reuse them.
    GRANULE = 64 * 1024

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self.chunks: list[_Chunk] = []

    def acquire(self, nbytes: int) -> _Chunk:
        free = [c for c in self.chunks if not c.in_use and c.nbytes >= nbytes]
        chunk = min(free, key=lambda c: c.nbytes) if free else None
        if chunk is None:
            chunk = _Chunk(-(-nbytes // self.GRANULE) * self.GRANULE, self.pin)
            self.chunks.append(chunk)
        chunk.in_use = True
        return chunk

    @staticmethod
    def release(chunks: list[_Chunk], event=None) -> None:
        for chunk in chunks:
            if event is not None:
                chunk.event = event
            chunk.in_use = False
        chunks.clear()

    @property
    def reserved_bytes(self) -> int:
        return sum(c.nbytes for c in self.chunks)

    @property
    def in_use_bytes(self) -> int:
        return sum(c.nbytes for c in self.chunks if c.in_use)


_HOST_POOLS: dict[bool, HostPool] = {}


def host_pool(pinned: bool) -> HostPool:
    """The process's host pool (pinned for CUDA offload, pageable on CPU)."""
    if pinned not in _HOST_POOLS:
        _HOST_POOLS[pinned] = HostPool(pinned)
    return _HOST_POOLS[pinned]


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
    `T_M`), a row range per partition, carved out of the process's `HostPool` (no
    allocation per layer or call once the pool has grown to a step's need).

    CUDA: pinned blocks, written and read on the copy lane with non-blocking copies, so the
    transfers overlap compute. The device tensor being offloaded is fenced (`COPY_FENCES`):
    its buffer-pool slot is not freed before the copy has read it. A reused block is written
    only after the copies of its previous user (an event). CPU: the same code with plain
    copies (there is no separate device memory, so the bytes are accounted as host bytes and
    the fetch copies them back out, as a device would).
    """

    def __init__(self, device: torch.device, lanes: Lanes) -> None:
        self.device = device
        self.lanes = lanes
        self.pool = host_pool(device.type == "cuda")
        self._host: dict[str, torch.Tensor] = {}
        self._chunks: list[_Chunk] = []
        self._offload_done = None
        self._last_copy_lanes: Lanes = lanes
        # Blocks go back to the pool when backward releases them, or when the store is
        # collected without a backward (e.g. a forward whose graph is dropped).
        self._finalizer = weakref.finalize(self, HostPool.release, self._chunks, None)

    def allocate(self, name: str, rows: int, width: int, dtype: torch.dtype) -> None:
        nbytes = rows * width * dtype.itemsize
        if nbytes == 0:
            self._host[name] = torch.empty(rows, width, dtype=dtype)
            return
        chunk = self.pool.acquire(nbytes)
        self._chunks.append(chunk)
        if self.lanes.cuda and chunk.event is not None:
            self.lanes.copy.wait_event(chunk.event)  # the previous user's last copy read it
        self._host[name] = chunk.data[:nbytes].view(dtype).view(rows, width)

    @property
    def host_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._host.values())

    def offload(self, name: str, row_start: int, rows_SW: torch.Tensor) -> None:
        target = self._host[name][row_start : row_start + rows_SW.shape[0]]
        if not self.lanes.cuda:
            target.copy_(rows_SW)
            COPY_FENCES.add(rows_SW, None)
            return
        with self.lanes.on("copy"):
            target.copy_(rows_SW, non_blocking=True)
        COPY_FENCES.add(rows_SW, self.lanes.record("copy"))

    def finish_offload(self) -> None:
        """Mark the end of the forward's copies; backward fetches wait for it."""
        self._offload_done = self.lanes.record("copy")
        for chunk in self._chunks:  # what a collected store's blocks wait for
            chunk.event = self._offload_done

    def fetch(self, name: str, row_start: int, num_rows: int, lanes: Lanes) -> _Fetch:
        """Start copying rows back to the device on `lanes` (the backward pass's lanes)."""
        source = self._host[name][row_start : row_start + num_rows]
        rows_SW = torch.empty(source.shape, dtype=source.dtype, device=self.device)
        self._last_copy_lanes = lanes
        if not lanes.cuda:
            rows_SW.copy_(source)
            return _Fetch(rows_SW, None, lanes)
        if self._offload_done is not None:
            lanes.copy.wait_event(self._offload_done)
        with lanes.on("copy"):  # after the compute stream's last use of the block it may reuse
            rows_SW.copy_(source, non_blocking=True)
        return _Fetch(rows_SW, lanes.record("copy"), lanes)

    def release(self) -> None:
        """Give the blocks back to the pool (after the last fetch's copy has read them)."""
        self._host.clear()
        HostPool.release(self._chunks, self._last_copy_lanes.record("copy"))
        self._finalizer.detach()
