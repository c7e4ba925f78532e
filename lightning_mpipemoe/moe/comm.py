"""Asynchronous all-to-all for the pipelined executor: one interface on gloo and on CUDA.

The schedule issues a collective, does other work, and waits for it later. How "later"
overlaps depends on the device:

- CPU / gloo: `all_to_all_single(..., async_op=True)` runs in gloo's own threads and
  `wait()` blocks the caller until it is done.
- CUDA: every collective is issued from a *lane*, a side stream of its own (dispatch,
  combine), after that lane waited for the compute stream; ProcessGroupNCCL puts the kernel
  on its communicator's stream behind the lane. `wait()` makes the lane wait for the
  communicator and the compute stream wait for the lane (events, no host block). Dispatch
  and combine use two process groups, hence two communicators that can run at the same
  time. Copies (offload) have a lane too (see `buffers.HostStore`).

The simulated link (`config.SimulatedLink`) models a slow wire on machines that have none.
Wire model: each rank has ONE full-duplex wire that all of its all-to-alls share, dispatch
and combine alike (one NIC; it also matches DESIGN.md's lower bound, where all bytes of a
layer cross one link). An all-to-all occupies the wire for `bytes / bandwidth`, where bytes
is the larger of what this rank sends to and receives from *other* ranks (its own chunk
never crosses the wire); transfers take the wire in issue order, and each completes
`latency` after it leaves the wire (latency is in flight, it does not hold the wire). A
`wait()` returns no earlier than that completion time: it sleeps, holding no core, so
compute issued meanwhile runs on. The real gloo transfer runs concurrently with the
simulated one (the wait returns at the later of the two). The same link applies to the
reference path (`linked_all_to_all`), so n = 1 and n > 1 pay the same wire.

Shape legend: S rows, H row width.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from lightning_mpipemoe import collectives
from lightning_mpipemoe.config import SimulatedLink

__all__ = ["AllToAllHandle", "Lanes", "LinkClock", "linked_all_to_all", "start_all_to_all", "wire_bytes"]


def _group_size(group: ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def wire_bytes(output_splits: list[int], input_splits: list[int], row_bytes: int, group: ProcessGroup | None) -> int:
    """Bytes of one all-to-all that cross this rank's wire: max(sent to, received from) others."""
    me = dist.get_rank(group) if _group_size(group) > 1 else 0
    sent = sum(rows for rank, rows in enumerate(input_splits) if rank != me)
    received = sum(rows for rank, rows in enumerate(output_splits) if rank != me)
    return max(sent, received) * row_bytes


class LinkClock:
    """The simulated wire of one rank during one pass (forward or backward) of one call.

    Holds when the wire is next free; `reserve` books a transfer and returns the wall-clock
    time (`time.perf_counter`) at which it completes. Every collective is waited before the
    pass ends, so a fresh clock per pass loses nothing.
    """

    def __init__(self, link: SimulatedLink) -> None:
        self.link = link
        self.free_at = 0.0
        self.busy_s = 0.0  # total simulated wire time booked (reported by benchmarks)

    def reserve(self, num_bytes: int) -> float:
        start = max(time.perf_counter(), self.free_at)
        busy = self.link.transfer_seconds(num_bytes)
        self.free_at = start + busy
        self.busy_s += busy + self.link.latency_s
        return start + busy + self.link.latency_s


def _sleep_until(deadline: float | None) -> None:
    if deadline is None:
        return
    delay = deadline - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


class Lanes:
    """The streams of one pipelined pass: compute (the caller's), dispatch, combine, copy.

    On CPU there are no streams: every lane is the calling thread and the methods do nothing,
    which keeps the schedule code identical on both devices.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.compute = torch.cuda.current_stream(device)
            # Collectives' lanes at high priority: their kernels start as soon as they may,
            # ahead of queued GEMMs, as Megatron-Core's and DeepEP's communication streams do.
            # (A lower number is a higher priority; torch clamps -1 to the device's highest.)
            self.dispatch = torch.cuda.Stream(device, priority=-1)
            self.combine = torch.cuda.Stream(device, priority=-1)
            self.copy = torch.cuda.Stream(device)

    def stream(self, lane: str):
        return getattr(self, lane) if self.cuda else None

    def on(self, lane: str):
        """Context that makes `lane` the current stream, after it waited for the compute stream."""
        if not self.cuda:
            return contextlib.nullcontext()
        stream = self.stream(lane)
        stream.wait_stream(self.compute)
        return torch.cuda.stream(stream)

    def join(self, lane: str) -> None:
        """Make the compute stream wait for everything queued on `lane` so far."""
        if self.cuda:
            self.compute.wait_stream(self.stream(lane))

    def record(self, lane: str):
        """An event at the current end of `lane` (None on CPU)."""
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(self.stream(lane))
        return event

    def compute_waits(self, event) -> None:
        if event is not None:
            self.compute.wait_event(event)


class AllToAllHandle:
    """An all-to-all in flight. `wait()` returns its output rows, usable on the compute stream.

    Holds the input and output until then, so no allocator can hand their memory to anyone
    else while the communicator may still read or write it.
    """

    def __init__(
        self,
        output_SH: torch.Tensor,
        input_SH: torch.Tensor | None,
        work,
        lanes: Lanes | None,
        lane: str,
        ready_at: float | None,
        on_wait: Callable[[], None] | None = None,
    ) -> None:
        self._output_SH = output_SH
        self._input_SH = input_SH
        self._work = work
        self._lanes = lanes
        self._lane = lane
        self._ready_at = ready_at
        self._on_wait = on_wait
        self.done = work is None and ready_at is None

    @property
    def output(self) -> torch.Tensor:
        """The rows being received into (valid to read only after `wait()`)."""
        return self._output_SH

    def wait(self) -> torch.Tensor:
        if not self.done:
            if self._work is not None:
                if self._lanes is not None and self._lanes.cuda:
                    with torch.cuda.stream(self._lanes.stream(self._lane)):
                        self._work.wait()
                    self._lanes.join(self._lane)
                else:
                    self._work.wait()
            _sleep_until(self._ready_at)
            self.done = True
            self._work, self._input_SH = None, None
            if self._on_wait is not None:
                self._on_wait()
        return self._output_SH


def start_all_to_all(
    input_SH: torch.Tensor,
    output_splits: list[int],
    input_splits: list[int],
    group: ProcessGroup | None,
    *,
    lanes: Lanes | None = None,
    lane: str = "dispatch",
    clock: LinkClock | None = None,
    output_SH: torch.Tensor | None = None,
    on_wait: Callable[[], None] | None = None,
) -> AllToAllHandle:
    """Issue `all_to_all_single` with uneven splits and return its handle.

    `output_SH` (rows `sum(output_splits)`, contiguous) receives the rows; by default a new
    tensor. On a group of one the input is the output (copied into `output_SH` when given)
    and no link is charged: nothing crosses a wire. `on_wait` runs once the rows are there
    (schedule traces).
    """
    num_rows = sum(output_splits)
    if _group_size(group) == 1:
        if output_SH is not None:
            output_SH.copy_(input_SH)
            input_SH = output_SH
        return AllToAllHandle(input_SH, None, None, lanes, lane, None, on_wait)
    input_SH = input_SH.contiguous()
    if output_SH is None:
        output_SH = input_SH.new_empty(num_rows, *input_SH.shape[1:])
    ready_at = None
    if clock is not None:
        row_bytes = math.prod(input_SH.shape[1:]) * input_SH.element_size()
        ready_at = clock.reserve(wire_bytes(output_splits, input_splits, row_bytes, group))
    context = lanes.on(lane) if lanes is not None else contextlib.nullcontext()
    with context:
        work = collectives.all_to_all_single(output_SH, input_SH, output_splits, input_splits, group=group,
                                             async_op=True, site=f"executor.{lane}")
    return AllToAllHandle(output_SH, input_SH, work, lanes, lane, ready_at, on_wait)


class _LinkedAllToAll(torch.autograd.Function):
    """All-to-all (through the checked collectives), over a simulated link when one is given,
    in forward and in backward."""

    @staticmethod
    def forward(ctx, rows_SH, output_splits, input_splits, group, link):
        ctx.splits, ctx.group, ctx.link = (output_splits, input_splits), group, link
        clock = LinkClock(link) if link is not None else None
        return start_all_to_all(rows_SH, output_splits, input_splits, group, clock=clock, lane="reference").wait()

    @staticmethod
    def backward(ctx, grad_SH):
        output_splits, input_splits = ctx.splits
        clock = LinkClock(ctx.link) if ctx.link is not None else None
        grad = start_all_to_all(grad_SH.contiguous(), input_splits, output_splits, ctx.group, clock=clock,
                                lane="reference_backward").wait()
        return grad, None, None, None, None


def linked_all_to_all(
    rows_SH: torch.Tensor,
    output_splits: list[int],
    input_splits: list[int],
    group: ProcessGroup | None,
    link: SimulatedLink | None,
) -> torch.Tensor:
    """Differentiable all-to-all, over `link` when given (the reference path's form; one
    transfer at a time)."""
    if _group_size(group) == 1:
        return rows_SH
    return _LinkedAllToAll.apply(rows_SH, output_splits, input_splits, group, link)
