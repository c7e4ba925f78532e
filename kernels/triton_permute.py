"""Triton kernels for token permutation: the CUDA side of `permute` and `unpermute`.

Two token-major kernels do the work, and each reads a token's data once (which is what makes
the permute top-k aware: a token routed to K experts is loaded once and stored K times):

- `scatter_rows`: token t's row, times an optional weight per copy, is stored to the rows
  `pos[t, k]`. It is the permute forward (unit weights) and the unpermute backward (routing
  weights; the weight gradient is fused as a dot product against the kept rows).
- `gather_rows`: `out[t] = sum_k w[t, k] * rows[pos[t, k]]`, accumulated in fp32. It is the
  unpermute forward and the permute backward (unit weights).

Every output row has a single writer, so nothing needs atomics. `gather_slots` is the
row-major permute for callers that have no inverse map (each copy reads its token again).

To run them on CPU tensors, TRITON_INTERPRET=1 must be set before Triton is first imported
(Triton's own language helpers are defined then, compiled or interpreted), so in practice
when the process starts.

Shape legend: T tokens, K copies per token, S permuted rows, H model dim, R a block of rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["gather_rows", "gather_slots", "scatter_rows"]

_TILE = 8192  # elements of one register tile ([tokens, copies, hidden chunk] or [rows, hidden chunk])
_ZERO_SPAN = 256  # padding flags one zeroing program checks


def _tile(copies: int, hidden: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_K, BLOCK_H): all copies at once, hidden in chunks, and as many tokens per
    program as fit (one token at large H; many at small H, so small problems launch few programs)."""
    block_k = triton.next_power_of_2(max(copies, 1))
    block_h = min(triton.next_power_of_2(max(hidden, 1)), max(_TILE // block_k, 16))
    block_t = max(_TILE // (block_k * block_h), 1)
    return block_t, block_k, block_h


def _num_warps(tile_elements: int) -> int:
    return 8 if tile_elements >= 4096 else 4


@triton.jit
def _token_slots(pos_ptr, weight_ptr, t_T, num_tokens, top_k, HAS_WEIGHTS: tl.constexpr, BLOCK_K: tl.constexpr):
    """The K slots of tokens `t_T`: token mask, slot mask and offset, which slots were kept
    (position >= 0), the rows they occupy, and their weights in fp32 (1 without weights)."""
    t_mask_T = t_T < num_tokens
    k_K = tl.arange(0, BLOCK_K)
    tk_mask_TK = t_mask_T[:, None] & (k_K < top_k)[None, :]
    tk_offset_TK = t_T[:, None] * top_k + k_K[None, :]
    pos_TK = tl.load(pos_ptr + tk_offset_TK, mask=tk_mask_TK, other=-1)
    live_TK = pos_TK >= 0
    row_TK = tl.where(live_TK, pos_TK, 0).to(tl.int64)
    if HAS_WEIGHTS:
        w_TK = tl.load(weight_ptr + tk_offset_TK, mask=tk_mask_TK, other=0.0).to(tl.float32)
    else:
        w_TK = live_TK.to(tl.float32)
    return t_mask_T, tk_mask_TK, tk_offset_TK, live_TK, row_TK, w_TK


# Row and token counts change every step: not specialising on them keeps one compiled kernel.
@triton.jit(do_not_specialize=["num_tokens", "num_rows"])
def _scatter_rows_kernel(
    x_ptr,
    pos_ptr,
    weight_ptr,
    out_ptr,
    zero_flag_ptr,
    rows_ptr,
    grad_weight_ptr,
    num_tokens,
    num_rows,
    hidden,
    top_k,
    HAS_WEIGHTS: tl.constexpr,
    WEIGHT_GRAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
    ZERO_ROWS: tl.constexpr,
    ZERO_SPAN: tl.constexpr,
):
    pid = tl.program_id(0)
    token_programs = tl.cdiv(num_tokens, BLOCK_T)
    if pid < token_programs:
        # BLOCK_T tokens: load each row once, store it (weighted) to each of its K rows.
        t_T = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        t_mask_T, tk_mask_TK, tk_offset_TK, live_TK, row_TK, w_TK = _token_slots(
            pos_ptr, weight_ptr, t_T, num_tokens, top_k, HAS_WEIGHTS, BLOCK_K
        )
        dot_TK = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
        for h0 in range(0, hidden, BLOCK_H):
            h_H = h0 + tl.arange(0, BLOCK_H)
            h_mask_H = h_H < hidden
            x_TH = tl.load(
                x_ptr + t_T[:, None] * hidden + h_H[None, :], mask=t_mask_T[:, None] & h_mask_H[None, :], other=0.0
            )
            mask_TKH = live_TK[:, :, None] & h_mask_H[None, None, :]
            row_ptrs_TKH = row_TK[:, :, None] * hidden + h_H[None, None, :]
            if HAS_WEIGHTS:
                val_TKH = x_TH.to(tl.float32)[:, None, :] * w_TK[:, :, None]
            else:
                val_TKH = tl.broadcast_to(x_TH[:, None, :], (BLOCK_T, BLOCK_K, BLOCK_H))
            tl.store(out_ptr + row_ptrs_TKH, val_TKH.to(out_ptr.dtype.element_ty), mask=mask_TKH)
            if WEIGHT_GRAD:
                rows_TKH = tl.load(rows_ptr + row_ptrs_TKH, mask=mask_TKH, other=0.0)
                dot_TK += tl.sum(rows_TKH.to(tl.float32) * x_TH.to(tl.float32)[:, None, :], axis=2)
        if WEIGHT_GRAD:
            tl.store(grad_weight_ptr + tk_offset_TK, dot_TK.to(grad_weight_ptr.dtype.element_ty), mask=tk_mask_TK)
    else:
        # The programs past the tokens zero the rows no token writes (flag < 0: padding). Each
        # looks at ZERO_SPAN flags and, only if one is set, stores ZERO_ROWS rows at a time.
        base = (pid - token_programs).to(tl.int64) * ZERO_SPAN
        span_S = base + tl.arange(0, ZERO_SPAN)
        flag_S = tl.load(zero_flag_ptr + span_S, mask=span_S < num_rows, other=0)
        if tl.max((flag_S < 0).to(tl.int32), axis=0) > 0:
            for r0 in range(0, ZERO_SPAN, ZERO_ROWS):
                row_R = base + r0 + tl.arange(0, ZERO_ROWS)
                zero_R = tl.load(zero_flag_ptr + row_R, mask=row_R < num_rows, other=0) < 0
                for h0 in range(0, hidden, BLOCK_H):
                    h_H = h0 + tl.arange(0, BLOCK_H)
                    tl.store(
                        out_ptr + row_R[:, None] * hidden + h_H[None, :],
                        tl.zeros([ZERO_ROWS, BLOCK_H], dtype=out_ptr.dtype.element_ty),
                        mask=zero_R[:, None] & (h_H < hidden)[None, :],
                    )


@triton.jit(do_not_specialize=["num_tokens"])
def _gather_rows_kernel(
    rows_ptr,
    pos_ptr,
    weight_ptr,
    out_ptr,
    num_tokens,
    hidden,
    top_k,
    HAS_WEIGHTS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    t_T = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask_T, _, _, live_TK, row_TK, w_TK = _token_slots(
        pos_ptr, weight_ptr, t_T, num_tokens, top_k, HAS_WEIGHTS, BLOCK_K
    )
    for h0 in range(0, hidden, BLOCK_H):
        h_H = h0 + tl.arange(0, BLOCK_H)
        h_mask_H = h_H < hidden
        rows_TKH = tl.load(
            rows_ptr + row_TK[:, :, None] * hidden + h_H[None, None, :],
            mask=live_TK[:, :, None] & h_mask_H[None, None, :],
            other=0.0,
        ).to(tl.float32)
        if HAS_WEIGHTS:
            rows_TKH = rows_TKH * w_TK[:, :, None]
        out_TH = tl.sum(rows_TKH, axis=1)
        tl.store(
            out_ptr + t_T[:, None] * hidden + h_H[None, :],
            out_TH.to(out_ptr.dtype.element_ty),
            mask=t_mask_T[:, None] & h_mask_H[None, :],
        )


@triton.jit(do_not_specialize=["num_rows"])
def _gather_slots_kernel(
    x_ptr,
    src_ptr,
    out_ptr,
    num_rows,
    hidden,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row_R = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask_R = row_R < num_rows
    src_R = tl.load(src_ptr + row_R, mask=row_mask_R, other=-1)
    live_R = src_R >= 0
    src_R = tl.where(live_R, src_R, 0).to(tl.int64)
    for h0 in range(0, hidden, BLOCK_H):
        h_H = h0 + tl.arange(0, BLOCK_H)
        h_mask_H = h_H < hidden
        vals_RH = tl.load(
            x_ptr + src_R[:, None] * hidden + h_H[None, :],
            mask=live_R[:, None] & h_mask_H[None, :],
            other=0.0,
        )
        tl.store(
            out_ptr + row_R[:, None] * hidden + h_H[None, :],
            vals_RH,
            mask=row_mask_R[:, None] & h_mask_H[None, :],
        )


def scatter_rows(
    x_TH: torch.Tensor,
    pos_TK: torch.Tensor,
    zero_flag_S: torch.Tensor,
    *,
    weights_TK: torch.Tensor | None = None,
    rows_SH: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`out[pos[t, k]] = w[t, k] * x[t]`, zeros where `zero_flag < 0`; `len(zero_flag_S)` rows.

    Every row must be either named once in `pos_TK` or flagged (else it stays uninitialised).
    With `rows_SH`, also returns `grad_w[t, k] = <x[t], rows[pos[t, k]]>` (the unpermute
    weight gradient, in the weights' dtype); otherwise the second result is None.
    """
    x_TH, pos_TK, zero_flag_S = x_TH.contiguous(), pos_TK.contiguous(), zero_flag_S.contiguous()
    num_tokens, hidden = x_TH.shape
    num_rows, top_k = zero_flag_S.shape[0], pos_TK.shape[1]
    out_SH = torch.empty(num_rows, hidden, dtype=x_TH.dtype, device=x_TH.device)
    weight_grad = rows_SH is not None
    if weight_grad and weights_TK is None:
        raise ValueError("the weight gradient needs the weights")
    grad_w_TK = torch.empty_like(weights_TK) if weight_grad else None
    if weight_grad and hidden == 0:
        grad_w_TK.zero_()
    block_t, block_k, block_h = _tile(top_k, hidden)
    zero_rows = max(_TILE // block_h, 1)
    zero_span = max(zero_rows, _ZERO_SPAN)
    grid = (triton.cdiv(num_tokens, block_t) + triton.cdiv(num_rows, zero_span),)
    if hidden == 0 or grid[0] == 0:
        return out_SH, grad_w_TK
    weights_TK = weights_TK.contiguous() if weights_TK is not None else None
    _scatter_rows_kernel[grid](
        x_TH,
        pos_TK,
        weights_TK if weights_TK is not None else x_TH,
        out_SH,
        zero_flag_S,
        rows_SH.contiguous() if weight_grad else x_TH,
        grad_w_TK if weight_grad else x_TH,
        num_tokens,
        num_rows,
        hidden,
        top_k,
        HAS_WEIGHTS=weights_TK is not None,
        WEIGHT_GRAD=weight_grad,
        BLOCK_T=block_t,
        BLOCK_K=block_k,
        BLOCK_H=block_h,
        ZERO_ROWS=zero_rows,
        ZERO_SPAN=zero_span,
        num_warps=_num_warps(block_t * block_k * block_h),
    )
    return out_SH, grad_w_TK


def gather_rows(rows_SH: torch.Tensor, pos_TK: torch.Tensor, weights_TK: torch.Tensor | None = None) -> torch.Tensor:
    """`out[t] = sum_k w[t, k] * rows[pos[t, k]]` (w = 1 without weights), fp32 sums, rows' dtype."""
    rows_SH, pos_TK = rows_SH.contiguous(), pos_TK.contiguous()
    num_tokens, top_k = pos_TK.shape
    hidden = rows_SH.shape[1]
    out_TH = torch.empty(num_tokens, hidden, dtype=rows_SH.dtype, device=rows_SH.device)
    if num_tokens == 0 or hidden == 0:
        return out_TH
    block_t, block_k, block_h = _tile(top_k, hidden)
    _gather_rows_kernel[(triton.cdiv(num_tokens, block_t),)](
        rows_SH,
        pos_TK,
        weights_TK.contiguous() if weights_TK is not None else rows_SH,
        out_TH,
        num_tokens,
        hidden,
        top_k,
        HAS_WEIGHTS=weights_TK is not None,
        BLOCK_T=block_t,
        BLOCK_K=block_k,
        BLOCK_H=block_h,
        num_warps=_num_warps(block_t * block_k * block_h),
    )
    return out_TH


def gather_slots(x_TH: torch.Tensor, src_row_S: torch.Tensor) -> torch.Tensor:
    """`out[s] = x[src[s]]`, zero where `src < 0`: the permute without an inverse map."""
    x_TH, src_row_S = x_TH.contiguous(), src_row_S.contiguous()
    num_rows, hidden = src_row_S.shape[0], x_TH.shape[1]
    out_SH = torch.empty(num_rows, hidden, dtype=x_TH.dtype, device=x_TH.device)
    if num_rows == 0 or hidden == 0:
        return out_SH
    block_h = min(triton.next_power_of_2(hidden), max(_TILE // 2, 16))
    block_r = max(_TILE // block_h, 1)
    _gather_slots_kernel[(triton.cdiv(num_rows, block_r),)](
        x_TH, src_row_S, out_SH, num_rows, hidden, BLOCK_R=block_r, BLOCK_H=block_h, num_warps=_num_warps(block_r * block_h)
    )
    return out_SH
