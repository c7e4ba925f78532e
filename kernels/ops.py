"""The custom ops `mpipemoe::*`: permute, unpermute and grouped GEMM, with fake and autograd.

Being `torch.library.custom_op`s, they are opaque to `torch.compile` (the fake functions give
it shapes) and their gradients come from the formulas registered here, which call the
backward ops. Each op runs on the backend of its inputs' device (`backends.backend_for`):
`CpuBackend` on CPU, Triton on CUDA.

Outside `torch.compile` the public functions skip the custom ops' Python dispatch (tens of
microseconds a call, a dozen calls per layer call: a few percent of a small model's step) and
run the same backend kernels with the same autograd formulas through a plain
`autograd.Function`; under `torch.compile` they call the custom ops, which keep the kernels
opaque to the compiler. Both paths give bit-identical results (tests/test_kernels.py).

Saved for backward, and nothing more: permute keeps only its index tensors; unpermute keeps
the rows only when the routing weights need a gradient; grouped_mm keeps x only when w needs
a gradient and w only when x does.

Shape legend: T tokens, K top-k, S permuted rows, H model dim, E experts, O/D output/input
features of the grouped GEMM.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backends import backend_for

__all__ = ["grouped_mm", "grouped_mm_weight_grad", "permute", "unpermute"]


def _call(eager: bool, op, method: str, *args, device: torch.device | None = None):
    """The backend's `method` directly when `eager` (no dispatch), else the custom op."""
    if not eager:
        return op(*args)
    return getattr(backend_for(device if device is not None else args[0].device), method)(*args)


# --- permute -------------------------------------------------------------------------------


@torch.library.custom_op("mpipemoe::permute", mutates_args=())
def permute_op(hidden_TH: Tensor, src_row_S: Tensor, pos_TK: Tensor | None = None) -> Tensor:
    return backend_for(hidden_TH.device).permute(hidden_TH, src_row_S, pos_TK)


@permute_op.register_fake
def _(hidden_TH, src_row_S, pos_TK=None):
    return hidden_TH.new_empty(src_row_S.shape[0], hidden_TH.shape[1])


@torch.library.custom_op("mpipemoe::permute_backward", mutates_args=())
def permute_backward_op(grad_rows_SH: Tensor, src_row_S: Tensor, pos_TK: Tensor | None, num_tokens: int) -> Tensor:
    return backend_for(grad_rows_SH.device).permute_backward(grad_rows_SH, src_row_S, pos_TK, num_tokens)


@permute_backward_op.register_fake
def _(grad_rows_SH, src_row_S, pos_TK, num_tokens):
    return grad_rows_SH.new_empty(num_tokens, grad_rows_SH.shape[1])


def _permute_setup(ctx, inputs, output):
    hidden_TH, src_row_S, pos_TK = inputs
    ctx.save_for_backward(src_row_S, pos_TK)
    ctx.num_tokens = hidden_TH.shape[0]


def _permute_backward(ctx, grad_rows_SH, eager=False):
    src_row_S, pos_TK = ctx.saved_tensors
    grad_TH = _call(eager, permute_backward_op, "permute_backward", grad_rows_SH, src_row_S, pos_TK, ctx.num_tokens)
    return grad_TH, None, None


permute_op.register_autograd(_permute_backward, setup_context=_permute_setup)


# --- unpermute -----------------------------------------------------------------------------


@torch.library.custom_op("mpipemoe::unpermute", mutates_args=())
def unpermute_op(rows_SH: Tensor, pos_TK: Tensor, weights_TK: Tensor) -> Tensor:
    return backend_for(rows_SH.device).unpermute(rows_SH, pos_TK, weights_TK)


@unpermute_op.register_fake
def _(rows_SH, pos_TK, weights_TK):
    return rows_SH.new_empty(pos_TK.shape[0], rows_SH.shape[1])


@torch.library.custom_op("mpipemoe::unpermute_backward", mutates_args=())
def unpermute_backward_op(
    grad_out_TH: Tensor, pos_TK: Tensor, weights_TK: Tensor, rows_SH: Tensor | None, num_rows: int
) -> tuple[Tensor, Tensor]:
    return backend_for(grad_out_TH.device).unpermute_backward(grad_out_TH, pos_TK, weights_TK, rows_SH, num_rows)


@unpermute_backward_op.register_fake
def _(grad_out_TH, pos_TK, weights_TK, rows_SH, num_rows):
    return grad_out_TH.new_empty(num_rows, grad_out_TH.shape[1]), torch.empty_like(weights_TK)


def _unpermute_setup(ctx, inputs, output):
    rows_SH, pos_TK, weights_TK = inputs
    ctx.save_for_backward(pos_TK, weights_TK, rows_SH if ctx.needs_input_grad[2] else None)
    ctx.num_rows = rows_SH.shape[0]


def _unpermute_backward(ctx, grad_out_TH, eager=False):
    pos_TK, weights_TK, rows_SH = ctx.saved_tensors
    grad_rows_SH, grad_weights_TK = _call(
        eager, unpermute_backward_op, "unpermute_backward", grad_out_TH, pos_TK, weights_TK, rows_SH, ctx.num_rows
    )
    return (
        grad_rows_SH if ctx.needs_input_grad[0] else None,
        None,
        grad_weights_TK if ctx.needs_input_grad[2] else None,
    )


unpermute_op.register_autograd(_unpermute_backward, setup_context=_unpermute_setup)


# --- grouped GEMM --------------------------------------------------------------------------


@torch.library.custom_op("mpipemoe::grouped_mm", mutates_args=())
def grouped_mm_op(x_SD: Tensor, w_EOD: Tensor, offsets_E: Tensor) -> Tensor:
    return backend_for(x_SD.device).grouped_mm(x_SD, w_EOD, offsets_E)


@grouped_mm_op.register_fake
def _(x_SD, w_EOD, offsets_E):
    return x_SD.new_empty(x_SD.shape[0], w_EOD.shape[1])


@torch.library.custom_op("mpipemoe::grouped_mm_weight_grad", mutates_args=())
def grouped_mm_weight_grad_op(
    grad_y_SO: Tensor, x_SD: Tensor, offsets_E: Tensor, out_dtype: torch.dtype | None = None
) -> Tensor:
    return backend_for(x_SD.device).grouped_mm_weight_grad(grad_y_SO, x_SD, offsets_E, out_dtype)


@grouped_mm_weight_grad_op.register_fake
def _(grad_y_SO, x_SD, offsets_E, out_dtype=None):
    return x_SD.new_empty(offsets_E.shape[0], grad_y_SO.shape[1], x_SD.shape[1], dtype=out_dtype or x_SD.dtype)


@torch.library.custom_op("mpipemoe::grouped_mm_weight_grad_add_", mutates_args=("grad_w_EOD",))
def grouped_mm_weight_grad_add_op(grad_w_EOD: Tensor, grad_y_SO: Tensor, x_SD: Tensor, offsets_E: Tensor) -> None:
    backend_for(x_SD.device).grouped_mm_weight_grad_add_(grad_w_EOD, grad_y_SO, x_SD, offsets_E)


@grouped_mm_weight_grad_add_op.register_fake
def _(grad_w_EOD, grad_y_SO, x_SD, offsets_E):
    return None


def _grouped_mm_setup(ctx, inputs, output):
    x_SD, w_EOD, offsets_E = inputs
    needs_x, needs_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    ctx.save_for_backward(x_SD if needs_w else None, w_EOD if needs_x else None, offsets_E)


def _grouped_mm_backward(ctx, grad_y_SO, eager=False):
    x_SD, w_EOD, offsets_E = ctx.saved_tensors
    grad_x_SD = grad_w_EOD = None
    if ctx.needs_input_grad[0]:
        grad_x_SD = _call(eager, grouped_mm_op, "grouped_mm", grad_y_SO, w_EOD.transpose(1, 2), offsets_E)
    if ctx.needs_input_grad[1]:
        grad_w_EOD = _call(eager, grouped_mm_weight_grad_op, "grouped_mm_weight_grad", grad_y_SO, x_SD, offsets_E, None,
                           device=x_SD.device)
    return grad_x_SD, grad_w_EOD, None


grouped_mm_op.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


# --- eager: the same kernels and formulas without the custom-op dispatch -------------------


def _eager_function(method: str, setup, formula) -> type[torch.autograd.Function]:
    """The backend's `method` as an autograd Function with the op's `setup` and backward
    `formula`. Old-style `forward(ctx, ...)`: a Function with a separate `setup_context` binds
    its arguments through `inspect.signature` on every call, which costs as much as the
    dispatch saved here."""

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            out = getattr(backend_for(inputs[0].device), method)(*inputs)
            setup(ctx, inputs, out)
            return out

        @staticmethod
        def backward(ctx, grad):
            return formula(ctx, grad, eager=True)

    Eager.__name__ = Eager.__qualname__ = f"Eager_{method}"
    return Eager


_EagerPermute = _eager_function("permute", _permute_setup, _permute_backward)
_EagerUnpermute = _eager_function("unpermute", _unpermute_setup, _unpermute_backward)
_EagerGroupedMM = _eager_function("grouped_mm", _grouped_mm_setup, _grouped_mm_backward)


def _eager() -> bool:
    """Outside torch.compile (whose tracing needs the opaque custom ops)."""
    return not torch.compiler.is_compiling()


# --- the public functions (argument checks, then the op) -----------------------------------


def _check_index(name: str, index: Tensor, dim: int, device: torch.device) -> None:
    if index.dim() != dim or index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise TypeError(f"{name} must be a {dim}-D integer tensor, got {index.dtype} of shape {tuple(index.shape)}")
    if index.device != device:
        raise ValueError(f"{name} is on {index.device} but the data is on {device}")


def permute(hidden_TH: Tensor, src_row_S: Tensor, pos_TK: Tensor | None = None) -> Tensor:
    """`rows[i] = hidden[src_row[i]]`, zeros where `src_row[i] == -1` (padding rows).

    `pos_TK` is the optional inverse map: `pos[t, k]` is the row holding token t's k-th copy
    (-1 when none), as the dispatch plan has it. With it, the CUDA kernel reads each token
    once and stores its K copies, and the backward is a gather-sum; without it, the CUDA
    forward reads a token once per copy and the backward derives the map (a sort, one sync).
    The result never depends on `pos_TK`, which must be the exact inverse of `src_row_S`.
    """
    if hidden_TH.dim() != 2:
        raise ValueError(f"hidden must be [T, H], got shape {tuple(hidden_TH.shape)}")
    _check_index("src_row", src_row_S, 1, hidden_TH.device)
    if pos_TK is not None:
        _check_index("pos", pos_TK, 2, hidden_TH.device)
    if _eager():
        return _EagerPermute.apply(hidden_TH, src_row_S, pos_TK)
    return permute_op(hidden_TH, src_row_S, pos_TK)


def unpermute(rows_SH: Tensor, pos_TK: Tensor, weights_TK: Tensor) -> Tensor:
    """`out[t] = sum_k weights[t, k] * rows[pos[t, k]]`, -1 positions contribute zero.

    Products and the sum are in the promoted dtype (weights are often fp32, rows bf16); the
    result has the rows' dtype. Each row may appear at most once in `pos_TK`.
    """
    if rows_SH.dim() != 2:
        raise ValueError(f"rows must be [S, H], got shape {tuple(rows_SH.shape)}")
    _check_index("pos", pos_TK, 2, rows_SH.device)
    if weights_TK.shape != pos_TK.shape or not weights_TK.is_floating_point():
        raise ValueError(
            f"weights must be a floating tensor shaped like pos {tuple(pos_TK.shape)}, "
            f"got {weights_TK.dtype} {tuple(weights_TK.shape)}"
        )
    if _eager():
        return _EagerUnpermute.apply(rows_SH, pos_TK, weights_TK)
    return unpermute_op(rows_SH, pos_TK, weights_TK)


def grouped_mm(x_SD: Tensor, w_EOD: Tensor, offsets_E: Tensor) -> Tensor:
    """Per expert e, rows `offsets[e-1]:offsets[e]` of x times `w[e].T`; rows past the end are zero.

    `w_EOD` is `[E, out, in]` (Hugging Face's layout); `offsets_E` the cumulative segment ends
    (torch `grouped_mm`'s `offs`), on x's device. Under autocast both operands take the autocast
    dtype, as they would for `torch.matmul`.
    """
    device_type = x_SD.device.type
    if torch.is_autocast_enabled(device_type) and x_SD.is_floating_point() and w_EOD.is_floating_point():
        dtype = torch.get_autocast_dtype(device_type)
        x_SD, w_EOD = x_SD.to(dtype), w_EOD.to(dtype)
    if x_SD.dim() != 2 or w_EOD.dim() != 3 or x_SD.shape[1] != w_EOD.shape[2]:
        raise ValueError(f"need x [S, D] and w [E, O, D]; got x {tuple(x_SD.shape)}, w {tuple(w_EOD.shape)}")
    if x_SD.dtype != w_EOD.dtype:
        raise TypeError(f"x is {x_SD.dtype} but w is {w_EOD.dtype}")
    _check_index("offsets", offsets_E, 1, x_SD.device)
    if offsets_E.shape[0] != w_EOD.shape[0]:
        raise ValueError(f"offsets has {offsets_E.shape[0]} entries for {w_EOD.shape[0]} experts")
    if _eager():
        return _EagerGroupedMM.apply(x_SD, w_EOD, offsets_E)
    return grouped_mm_op(x_SD, w_EOD, offsets_E)


def grouped_mm_weight_grad(
    grad_y_SO: Tensor,
    x_SD: Tensor,
    offsets_E: Tensor,
    *,
    out_dtype: torch.dtype | None = None,
    accumulate: Tensor | None = None,
) -> Tensor:
    """Per expert e, `grad_y[rows of e].T @ x[rows of e]` `[E, O, D]` (zeros for an expert
    without rows): the weight gradient of `grouped_mm`, one op for all experts.

    `out_dtype` (default: the operands' dtype) is the dtype of the result; `torch.float32`
    with bf16 operands returns the GEMMs' fp32 accumulators unrounded, so that callers
    summing several calls (the pipeline's partitions) round once, at the end. With
    `accumulate` (an `[E, O, D]` tensor, any floating dtype) the result is added into it in
    place and it is returned (on CPU inside the GEMMs, no temporary).
    """
    if grad_y_SO.dim() != 2 or x_SD.dim() != 2 or grad_y_SO.shape[0] != x_SD.shape[0]:
        raise ValueError(
            f"need grad_y [S, O] and x [S, D] with the same S; got {tuple(grad_y_SO.shape)}, {tuple(x_SD.shape)}"
        )
    if grad_y_SO.dtype != x_SD.dtype:
        raise TypeError(f"grad_y is {grad_y_SO.dtype} but x is {x_SD.dtype}")
    if out_dtype is not None and not out_dtype.is_floating_point:
        raise TypeError(f"out_dtype must be a floating dtype, got {out_dtype}")
    _check_index("offsets", offsets_E, 1, x_SD.device)
    if accumulate is not None:
        expected = (offsets_E.shape[0], grad_y_SO.shape[1], x_SD.shape[1])
        if tuple(accumulate.shape) != expected or not accumulate.is_floating_point():
            raise ValueError(f"accumulate must be a floating tensor of shape {expected}, got "
                             f"{accumulate.dtype} {tuple(accumulate.shape)}")
        _call(_eager(), grouped_mm_weight_grad_add_op, "grouped_mm_weight_grad_add_", accumulate, grad_y_SO, x_SD,
              offsets_E, device=x_SD.device)
        return accumulate
    return _call(_eager(), grouped_mm_weight_grad_op, "grouped_mm_weight_grad", grad_y_SO, x_SD, offsets_E, out_dtype,
                 device=x_SD.device)
