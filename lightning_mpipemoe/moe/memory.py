"""Memory accounting of one MoE layer call: measured, and analytic beside it.

Three figures per call (DESIGN.md §1.3, generalised to top-k and gated experts):

- device bytes held for backward: what autograd keeps from the end of forward until
  backward. Measured with saved-tensor hooks (each storage once; parameters excluded).
- host bytes held: what the restore strategy offloaded (the host store's own record).
- peak temporary bytes: the most bytes the schedule's buffers hold at once during forward
  and during backward (the buffer pool's records; on CUDA also the allocator's
  `max_memory_allocated`, which sees every allocation, op-internal ones included).

Analytic model. B tokens on this rank, k top-k, M model dim, I expert hidden,
O = 2I (gated) or I, s bytes per element, R = B*k dispatched rows (balanced routing: a rank
receives as many rows as it sends), r = R / n rows per partition.

    held on device   T_I  B*M        the layer input (router GEMM; re-communication)
                     T_O  R*M        combined expert outputs (gradient of the routing weights)
                     T_DI R*M        only under `none` (kept per partition)
                     T_M  R*O        only under `none`
    held on host     T_DI R*M  under s1, s3;   T_M R*O  under s1, s2
    peak temporary   the schedule's buffers (see `forward_phases` / `backward_phases`): with
                     reuse T_DI, T_M and T_DO each take 1-2 buffers of r rows instead of n.

DESIGN.md's `M_act = 4BM + BH` (top-1, ReLU) counts T_DO as an activation; no backward step
reads T_DO (the combine's backward is an all-to-all of the gradient), so here T_DO is a
temporary in every strategy and held memory has no T_DO term. With that, the saving of
`s4` over `none` is exactly DESIGN's `ΔM_act` with the shared buffers moved to the
temporary column: `R*(M + O)`. The plain autograd reference keeps, in addition, the
activation outputs (`R*I`, twice for gated experts: act(gate) and the product), which the
pipelined Function recomputes in backward instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

__all__ = [
    "AnalyticMemory",
    "LayerShape",
    "MeasuredMemory",
    "PipelineRecord",
    "SavedTensorMeter",
    "analytic_memory",
    "measure_call",
]


@dataclass
class PipelineRecord:
    """What one pipelined call reports about itself (buffer-pool peaks, host store, wire time).

    Pass one to the pipelined executor to fill it; `trace=True` also logs the schedule's
    events `(what, partition, perf_counter time)` in order, for tests of the overlap.
    """

    forward_peak_temp_bytes: int = 0
    backward_peak_temp_bytes: int = 0
    forward_peak_slots: dict = field(default_factory=dict)
    backward_peak_slots: dict = field(default_factory=dict)
    host_bytes: int = 0
    forward_wire_s: float = 0.0
    backward_wire_s: float = 0.0
    trace: list | None = None

    @classmethod
    def tracing(cls) -> "PipelineRecord":
        return cls(trace=[])

    def event(self, what: str, partition: int) -> None:
        if self.trace is not None:
            self.trace.append((what, partition, time.perf_counter()))


def _plain_tensors(tensor: torch.Tensor):
    """The plain tensors that hold a (possibly wrapper-subclass) tensor's memory, e.g. the
    buffer inside a functional collective's pending result."""
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        for name in names:
            yield from _plain_tensors(getattr(tensor, name))
    else:
        yield tensor


class SavedTensorMeter:
    """Counts the storages autograd saves while active: the bytes held for backward.

    Each storage counts once, whole (a saved slice holds its whole storage). Storages of
    `exclude` (the parameters) are not activations and are left out. Tensors a Function
    keeps outside `save_for_backward` are invisible here: the pipelined executor saves
    everything through it for that reason.
    """

    def __init__(self, exclude: tuple[torch.Tensor, ...] | list[torch.Tensor] = ()) -> None:
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude if t is not None}
        self._storages: dict[tuple[str, int], int] = {}
        self._hooks = saved_tensors_hooks(self._pack, lambda tensor: tensor)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        for inner in _plain_tensors(tensor):
            storage = inner.untyped_storage()
            ptr = storage.data_ptr()
            if storage.nbytes() and ptr not in self._exclude:
                self._storages[(inner.device.type, ptr)] = storage.nbytes()
        return tensor

    def __enter__(self) -> "SavedTensorMeter":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    def bytes_on(self, device_type: str) -> int:
        return sum(nbytes for (kind, _), nbytes in self._storages.items() if kind == device_type)


@dataclass
class MeasuredMemory:
    device_held_bytes: int
    host_held_bytes: int
    forward_peak_temp_bytes: int | None
    backward_peak_temp_bytes: int | None
    cuda_forward_peak_bytes: int | None = None
    cuda_backward_peak_bytes: int | None = None


def measure_call(
    forward: Callable[[], torch.Tensor],
    backward: Callable[[torch.Tensor], None],
    *,
    parameters: list[torch.Tensor],
    record: PipelineRecord | None = None,
    device: torch.device = torch.device("cpu"),
) -> MeasuredMemory:
    """Run `forward()` under the saved-tensor meter, then `backward(output)`; report memory.

    On CPU, device and host are the same memory: saved tensors count as device bytes and the
    host store (the record's `host_bytes`) as host bytes. On CUDA the allocator's peaks,
    above what was allocated before the call, are reported too.
    """
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    with SavedTensorMeter(parameters) as meter:
        out = forward()
    cuda_fwd = cuda_bwd = None
    if cuda:
        torch.cuda.synchronize(device)
        cuda_fwd = torch.cuda.max_memory_allocated(device) - base
        after_forward = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    backward(out)
    if cuda:
        torch.cuda.synchronize(device)
        cuda_bwd = torch.cuda.max_memory_allocated(device) - after_forward
    device_type = device.type
    host = record.host_bytes if record is not None else 0
    if cuda:
        host += meter.bytes_on("cpu")
    return MeasuredMemory(
        device_held_bytes=meter.bytes_on(device_type),
        host_held_bytes=host,
        forward_peak_temp_bytes=record.forward_peak_temp_bytes if record is not None else None,
        backward_peak_temp_bytes=record.backward_peak_temp_bytes if record is not None else None,
        cuda_forward_peak_bytes=cuda_fwd,
        cuda_backward_peak_bytes=cuda_bwd,
    )


@dataclass(frozen=True)
class LayerShape:
    """One rank's share of one MoE layer call.

    `host_is_device`: the layer's device is the host (CPU), so what s1-s3 "offload" stays in the
    same memory; a budget must then count the host bytes too (`cost_model.footprint_bytes`).
    """

    tokens: int
    top_k: int
    hidden: int
    intermediate: int
    gated: bool = True
    ep_size: int = 2
    dtype_bytes: int = 4
    host_is_device: bool = False

    @property
    def width(self) -> int:
        return 2 * self.intermediate if self.gated else self.intermediate

    @property
    def rows(self) -> int:
        return self.tokens * self.top_k


@dataclass
class AnalyticMemory:
    device_held_bytes: int
    host_held_bytes: int
    forward_peak_temp_bytes: int | None
    backward_peak_temp_bytes: int | None
    terms: dict


def _offloaded(restore: str) -> tuple[bool, bool]:
    return restore in ("s1", "s3"), restore in ("s1", "s2")


def forward_phases(shape: LayerShape, restore: str, has_prev: bool, has_next: bool) -> list[int]:
    """Elements per partition row live at each step of the forward schedule (EP > 1).

    Mirrors `pipeline._PipelinedExperts.forward`: `prev` is the combine of i-1 in flight
    (T_DO_comm), `next` the dispatch of i+1 (send and recv), T_DI / T_M are buffers only
    under reuse (under `none` they are held, not temporary).
    """
    M, O, I = shape.hidden, shape.width, shape.intermediate
    reuse = restore != "none"
    prev = M if has_prev else 0
    nxt = 2 * M if has_next else 0
    di, m = (M, O) if reuse else (0, 0)
    return [
        prev + M + di,  # regroup: recv(i) and T_DI(i)
        prev + di + nxt + m,  # GEMM1 with the next dispatch in flight
        prev + nxt + m + I,  # activation
        prev + nxt + I + M,  # GEMM2 -> T_DO
        nxt + 2 * M,  # unregroup: T_DO and T_DO_comm(i)
    ]


def backward_phases(shape: LayerShape, restore: str, has_prev: bool, has_next: bool) -> list[int]:
    """Elements per partition row live at each step of the backward schedule (EP > 1).

    `prev` is the input-gradient all-to-all of i-1 in flight (send and receive rows); `next`
    what partition i+1 waits for: its output-gradient rows, and by strategy the
    re-communicated T_DI (send and receive) or the fetched T_DI / T_M.
    """
    M, O, I = shape.hidden, shape.width, shape.intermediate
    reuse = restore != "none"
    prev = 2 * M if has_prev else 0
    off_di, off_m = _offloaded(restore)
    restore_next = M + (2 * M if restore in ("s2", "s4") else 0) + (M if off_di else 0) + (O if off_m else 0)
    nxt = restore_next if has_next else 0
    di, m = (M, O) if reuse else (0, 0)
    return [
        prev + nxt + M + di + m + 2 * I,  # activation and grad_act, dY alive
        prev + nxt + di + m + 2 * I + O,  # grad_pre beside act, grad_act, T_M
        prev + nxt + O + M,  # grad_x beside grad_pre
        nxt + 2 * M,  # unregroup: grad_x and its send copy, then send copy and receive rows
    ]


def _peak(phases: Callable, shape: LayerShape, restore: str, n: int) -> int:
    cases = {(False, False)} if n == 1 else {(False, True), (True, False)}
    if n >= 3:
        cases.add((True, True))
    return max(max(phases(shape, restore, prev, nxt)) for prev, nxt in cases)


def analytic_memory(shape: LayerShape, num_partitions: int, restore: str) -> AnalyticMemory:
    """DESIGN.md's memory model for one layer call; `restore="reference"` is the plain
    autograd path (n = 1, no reuse, activation outputs kept by autograd)."""
    s, R = shape.dtype_bytes, shape.rows
    M, O, I = shape.hidden, shape.width, shape.intermediate
    terms = {"T_I": shape.tokens * M * s, "T_O": R * M * s}
    host = {}
    if restore in ("none", "reference"):
        terms["T_DI"], terms["T_M"] = R * M * s, R * O * s
    if restore == "reference":
        terms["activation outputs"] = R * I * s * (2 if shape.gated else 1)
    off_di, off_m = _offloaded(restore)
    if off_di:
        host["T_DI"] = R * M * s
    if off_m:
        host["T_M"] = R * O * s
    fwd = bwd = None
    if shape.ep_size > 1 and restore != "reference":
        r = R / num_partitions
        fwd = int(r * _peak(forward_phases, shape, restore, num_partitions) * s)
        bwd = int(r * _peak(backward_phases, shape, restore, num_partitions) * s)
    return AnalyticMemory(
        device_held_bytes=sum(terms.values()),
        host_held_bytes=sum(host.values()),
        forward_peak_temp_bytes=fwd,
        backward_peak_temp_bytes=bwd,
        terms={**terms, **{f"host {k}": v for k, v in host.items()}},
    )
