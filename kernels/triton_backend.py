"""The CUDA backend: Triton permute kernels, and a grouped GEMM by Triton or torch's `grouped_mm`.

Both grouped GEMMs are correct; which is faster depends on the GPU, the dtype and the shape.
With `grouped_mm_impl="auto"` the backend measures both the first time it meets a shape class
and keeps the winner, as Triton's autotuner does for block sizes. torch's `grouped_mm` is a
candidate only where it applies (CUDA, bf16, 16-byte aligned operands), and it leaves rows past
the last offset uninitialised, so a small kernel zeroes them (the op contract says zeros).

The kernel modules are imported when the backend is built (first CUDA call). In a process
started with TRITON_INTERPRET=1 the same backend runs on CPU tensors, which is how the tests
check the kernels without a GPU.

Shape legend: T tokens, K top-k, S permuted rows, H model dim, E experts, O/D output/input
features of the grouped GEMM.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from .index import invert_src_rows

__all__ = ["GROUPED_MM_IMPLS", "TritonBackend", "torch_grouped_mm_applies"]

GROUPED_MM_IMPLS = ("auto", "triton", "torch")


def torch_grouped_mm_applies(*mats: torch.Tensor) -> bool:
    """Whether `torch.nn.functional.grouped_mm` takes these operands (CUDA, bf16, aligned)."""
    if not hasattr(torch.nn.functional, "grouped_mm"):
        return False
    for mat in mats:
        if not mat.is_cuda or mat.dtype != torch.bfloat16 or mat.data_ptr() % 16 or mat.shape[-2] == 0:
            return False
        row, col = mat.stride()[-2:]
        if not ((col == 1 and row % 8 == 0) or (row == 1 and col % 8 == 0)):
            return False
    return True


def _time_cuda(fn: Callable[[], object], reps: int = 3) -> float:
    """Mean milliseconds of `fn` after two warm-up calls (which compile and autotune)."""
    fn()
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def _on_tensor_device(method):
    """Triton launches on the current CUDA device: switch to the tensors' one when they differ."""

    @functools.wraps(method)
    def wrapper(self, first, *args):
        if first.is_cuda and first.device.index != torch.cuda.current_device():
            with torch.cuda.device(first.device):
                return method(self, first, *args)
        return method(self, first, *args)

    return wrapper


class TritonBackend:
    """Triton kernels for CUDA tensors (or CPU tensors, under TRITON_INTERPRET=1).

    `grouped_mm_impl`: "auto" (measure, keep the faster), "triton", or "torch" (always
    `torch.nn.functional.grouped_mm`, wherever torch runs it).
    """

    def __init__(self, *, grouped_mm_impl: str = "auto") -> None:
        if grouped_mm_impl not in GROUPED_MM_IMPLS:
            raise ValueError(f"grouped_mm_impl must be one of {GROUPED_MM_IMPLS}, got {grouped_mm_impl!r}")
        from . import triton_grouped_gemm as gemm_kernels
        from . import triton_permute as permute_kernels

        self.permute_kernels = permute_kernels
        self.gemm_kernels = gemm_kernels
        self.grouped_mm_impl = grouped_mm_impl
        self.choices: dict[tuple, str] = {}

    # --- permutation --------------------------------------------------------------------

    @_on_tensor_device
    def permute(self, hidden_TH, src_row_S, pos_TK):
        if pos_TK is None:
            return self.permute_kernels.gather_slots(hidden_TH, src_row_S)
        rows_SH, _ = self.permute_kernels.scatter_rows(hidden_TH, pos_TK, src_row_S)
        return rows_SH

    @_on_tensor_device
    def permute_backward(self, grad_rows_SH, src_row_S, pos_TK, num_tokens):
        if pos_TK is None:
            # Without the caller's inverse map, build one (a sort and one host sync).
            live_S = src_row_S[src_row_S >= 0]
            max_copies = int(torch.bincount(live_S).max()) if live_S.numel() else 1
            pos_TK = invert_src_rows(src_row_S, num_tokens, max_copies)
        return self.permute_kernels.gather_rows(grad_rows_SH, pos_TK)

    @_on_tensor_device
    def unpermute(self, rows_SH, pos_TK, weights_TK):
        return self.permute_kernels.gather_rows(rows_SH, pos_TK, weights_TK)

    @_on_tensor_device
    def unpermute_backward(self, grad_out_TH, pos_TK, weights_TK, rows_SH, num_rows):
        # Rows that no (token, k) reads get a zero gradient: flag them (-1) for the kernel.
        flag_S = torch.full((num_rows + 1,), -1, dtype=torch.int32, device=grad_out_TH.device)
        flag_S.index_fill_(0, torch.where(pos_TK >= 0, pos_TK, num_rows).reshape(-1), 0)
        grad_rows_SH, grad_w_TK = self.permute_kernels.scatter_rows(
            grad_out_TH, pos_TK, flag_S[:num_rows], weights_TK=weights_TK, rows_SH=rows_SH
        )
        return grad_rows_SH, grad_w_TK if grad_w_TK is not None else torch.zeros_like(weights_TK)

    # --- grouped GEMM ------------------------------------------------------------------

    @_on_tensor_device
    def grouped_mm(self, x_SD, w_EOD, offsets_E):
        key = ("mm", x_SD.dtype, _bucket(x_SD.shape[0]), tuple(w_EOD.shape), w_EOD.stride(-1) == 1)
        impl = self._pick(
            key,
            lambda: self._torch_grouped_mm(x_SD, w_EOD, offsets_E),
            lambda: self.gemm_kernels.grouped_mm(x_SD, w_EOD, offsets_E),
            x_SD.shape[0] > 0 and torch_grouped_mm_applies(x_SD, w_EOD),
        )
        if impl == "torch":
            return self._torch_grouped_mm(x_SD, w_EOD, offsets_E)
        return self.gemm_kernels.grouped_mm(x_SD, w_EOD, offsets_E)

    @_on_tensor_device
    def grouped_mm_weight_grad(self, grad_y_SO, x_SD, offsets_E, out_dtype=None):
        out_dtype = out_dtype or x_SD.dtype
        key = ("wgrad", x_SD.dtype, out_dtype, _bucket(x_SD.shape[0]), offsets_E.shape[0], grad_y_SO.shape[1],
               x_SD.shape[1])
        impl = self._pick(
            key,
            lambda: self._torch_weight_grad(grad_y_SO, x_SD, offsets_E, out_dtype),
            lambda: self.gemm_kernels.grouped_mm_weight_grad(grad_y_SO, x_SD, offsets_E, out_dtype),
            x_SD.shape[0] > 0 and torch_grouped_mm_applies(grad_y_SO.transpose(0, 1), x_SD),
        )
        if impl == "torch":
            return self._torch_weight_grad(grad_y_SO, x_SD, offsets_E, out_dtype)
        return self.gemm_kernels.grouped_mm_weight_grad(grad_y_SO, x_SD, offsets_E, out_dtype)

    def grouped_mm_weight_grad_add_(self, grad_w_EOD, grad_y_SO, x_SD, offsets_E):
        # The grouped GEMM's accumulator in the target's dtype, then one add (an in-kernel
        # accumulate would save that pass over the weights).
        grad_w_EOD.add_(self.grouped_mm_weight_grad(grad_y_SO, x_SD, offsets_E, grad_w_EOD.dtype))

    def _pick(self, key: tuple, run_torch: Callable, run_triton: Callable, torch_applies: bool) -> str:
        if self.grouped_mm_impl != "auto":
            return self.grouped_mm_impl
        if not torch_applies:
            return "triton"
        choice = self.choices.get(key)
        if choice is None:
            if torch.cuda.is_current_stream_capturing():
                return "torch"  # no timing inside a CUDA-graph capture; decide on an eager call
            choice = "torch" if _time_cuda(run_torch) <= _time_cuda(run_triton) else "triton"
            self.choices[key] = choice
        return choice

    def _torch_grouped_mm(self, x_SD, w_EOD, offsets_E):
        if x_SD.shape[0] == 0 or offsets_E.shape[0] == 0:
            return self.gemm_kernels.grouped_mm(x_SD, w_EOD, offsets_E)
        y_SO = torch.nn.functional.grouped_mm(x_SD, w_EOD.transpose(1, 2), offs=offsets_E.to(torch.int32))
        return self.gemm_kernels.zero_tail_rows(y_SO.contiguous(), offsets_E)

    def _torch_weight_grad(self, grad_y_SO, x_SD, offsets_E, out_dtype):
        if x_SD.shape[0] == 0 or offsets_E.shape[0] == 0:
            return self.gemm_kernels.grouped_mm_weight_grad(grad_y_SO, x_SD, offsets_E, out_dtype)
        return torch.nn.functional.grouped_mm(
            grad_y_SO.transpose(0, 1), x_SD, offs=offsets_E.to(torch.int32), out_dtype=out_dtype
        )


def _bucket(num_rows: int) -> int:
    """Shape class of a row count: the next power of two (token counts vary every step)."""
    return 1 << max(num_rows - 1, 0).bit_length()
