"""Which implementation the custom ops run, chosen by the device type of their inputs.

A backend implements the six primitive ops (three forwards, three backwards); the custom ops
in `ops.py` and their autograd formulas are written once on top of it. CPU runs `CpuBackend`
(`cpu_backend.py`: the reference's formulas without its extra copies, tested against it); any
other device without a registered backend runs the pure-PyTorch reference; CUDA runs
`TritonBackend`, created on first use so that importing the package never imports Triton.

`use_backend` swaps the backend of one device type for a block: the tests route CPU tensors
through the Triton kernels under TRITON_INTERPRET that way, and the benchmark pins one
grouped-GEMM implementation.

Shape legend: T tokens, K top-k, S permuted rows, H model dim, E experts, O/D output/input
features of the grouped GEMM.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

import torch

from . import reference
from .cpu_backend import CpuBackend

__all__ = ["CpuBackend", "KernelBackend", "ReferenceBackend", "backend_for", "set_backend", "use_backend"]


class KernelBackend(Protocol):
    """The primitive ops; every tensor is on the backend's device, index tensors are integer."""

    def permute(self, hidden_TH: torch.Tensor, src_row_S: torch.Tensor, pos_TK: torch.Tensor | None) -> torch.Tensor: ...

    def permute_backward(
        self, grad_rows_SH: torch.Tensor, src_row_S: torch.Tensor, pos_TK: torch.Tensor | None, num_tokens: int
    ) -> torch.Tensor: ...

    def unpermute(self, rows_SH: torch.Tensor, pos_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor: ...

    def unpermute_backward(
        self,
        grad_out_TH: torch.Tensor,
        pos_TK: torch.Tensor,
        weights_TK: torch.Tensor,
        rows_SH: torch.Tensor | None,
        num_rows: int,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def grouped_mm(self, x_SD: torch.Tensor, w_EOD: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor: ...

    def grouped_mm_weight_grad(
        self, grad_y_SO: torch.Tensor, x_SD: torch.Tensor, offsets_E: torch.Tensor, out_dtype: torch.dtype | None = None
    ) -> torch.Tensor: ...

    def grouped_mm_weight_grad_add_(
        self, grad_w_EOD: torch.Tensor, grad_y_SO: torch.Tensor, x_SD: torch.Tensor, offsets_E: torch.Tensor
    ) -> None:
        """`grad_w_EOD += grouped_mm_weight_grad(...)`, products in `grad_w_EOD`'s dtype or wider."""


class ReferenceBackend:
    """The pure-PyTorch reference (any device); the inverse map `pos_TK` of permute is unused."""

    def permute(self, hidden_TH, src_row_S, pos_TK):
        return reference.permute_reference(hidden_TH, src_row_S)

    def permute_backward(self, grad_rows_SH, src_row_S, pos_TK, num_tokens):
        return reference.permute_backward_reference(grad_rows_SH, src_row_S, num_tokens)

    def unpermute(self, rows_SH, pos_TK, weights_TK):
        return reference.unpermute_reference(rows_SH, pos_TK, weights_TK)

    def unpermute_backward(self, grad_out_TH, pos_TK, weights_TK, rows_SH, num_rows):
        return reference.unpermute_backward_reference(grad_out_TH, pos_TK, weights_TK, rows_SH, num_rows)

    def grouped_mm(self, x_SD, w_EOD, offsets_E):
        return reference.grouped_mm_reference(x_SD, w_EOD, offsets_E)

    def grouped_mm_weight_grad(self, grad_y_SO, x_SD, offsets_E, out_dtype=None):
        return reference.grouped_mm_weight_grad_reference(grad_y_SO, x_SD, offsets_E, out_dtype)

    def grouped_mm_weight_grad_add_(self, grad_w_EOD, grad_y_SO, x_SD, offsets_E):
        grad_w_EOD.add_(reference.grouped_mm_weight_grad_reference(grad_y_SO, x_SD, offsets_E, grad_w_EOD.dtype))


def _make_triton_backend() -> KernelBackend:
    from .triton_backend import TritonBackend

    return TritonBackend()


_REFERENCE = ReferenceBackend()
_backends: dict[str, KernelBackend] = {}
_factories: dict[str, Callable[[], KernelBackend]] = {"cpu": CpuBackend, "cuda": _make_triton_backend}


def backend_for(device: torch.device) -> KernelBackend:
    """The backend for tensors on `device`: the registered one, else the device type's default
    (`CpuBackend` on CPU, `TritonBackend` on CUDA), else the reference."""
    kind = device.type
    backend = _backends.get(kind)
    if backend is None:
        factory = _factories.get(kind)
        backend = factory() if factory is not None else _REFERENCE
        _backends[kind] = backend
    return backend


def set_backend(device_type: str, backend: KernelBackend | None) -> None:
    """Register `backend` for a device type (None: back to the default, built on next use)."""
    if backend is None:
        _backends.pop(device_type, None)
    else:
        _backends[device_type] = backend


@contextmanager
def use_backend(device_type: str, backend: KernelBackend) -> Iterator[KernelBackend]:
    """Run the ops of one device type on `backend` inside the block, then restore the previous one."""
    previous = _backends.get(device_type)
    _backends[device_type] = backend
    try:
        yield backend
    finally:
        set_backend(device_type, previous)
