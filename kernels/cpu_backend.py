"""The CPU backend: the reference formulas without their extra copies.

What the executor runs on CPU. Every op computes what `reference.py` computes, with the same
elementwise products and the same reductions over the same shapes, so results are bit-identical
to the reference except for the sign of some zeros (the reference accumulates gradients into
zero buffers, 0.0 + -0.0 = +0.0, where these copy them). What is gone:

- the zero row appended to every gathered tensor so that index -1 reads zeros (a full copy of
  the rows per call): `index_select` when no index is negative (one cheap check), else
  `index_select` of the clamped index and `index_fill_` of the few padding rows;
- the grouped GEMM's per-expert pieces, `torch.cat` and zero-filled output: each expert's
  segment is written in place (`torch.mm(..., out=out[start:end])`) into an uninitialised
  output and only rows past the last offset are zeroed; the weight gradient likewise;
- the unpermute backward's `[T, K, H]` scatter-add into a zero buffer: each row is read by at
  most one (token, k) (the op's contract), so a row's gradient is a gather of its token's
  output gradient times its routing weight, and the weight gradient reuses that gather;
- the permute backward's zero buffer and scatter-add when no token has two rows (the regroup
  permutations of the expert-parallel path): a gather through the inverse index.

Shape legend: T tokens, K top-k, S permuted rows, H model dim, E experts, O/D output/input
features of the grouped GEMM.
"""

from __future__ import annotations

import torch

from . import reference

__all__ = ["CpuBackend"]


def _negative_rows(index_S: torch.Tensor) -> torch.Tensor | None:
    """The positions of negative (padding / dropped) entries, or None when there are none."""
    if index_S.numel() == 0 or int(index_S.min()) >= 0:
        return None
    return torch.nonzero(index_S < 0).squeeze(1)


def _gather_rows(x_RD: torch.Tensor, index_S: torch.Tensor) -> torch.Tensor:
    """`x[index]` along dim 0, zero rows where the index is negative (the reference's -1 row)."""
    missing = _negative_rows(index_S)
    if missing is None:
        return torch.index_select(x_RD, 0, index_S)
    if x_RD.shape[0] == 0:  # every index is padding: nothing to read
        return x_RD.new_zeros(index_S.shape[0], *x_RD.shape[1:])
    out_SD = torch.index_select(x_RD, 0, index_S.clamp(min=0))
    return out_SD.index_fill_(0, missing, 0)


def _inverse(index_S: torch.Tensor, size: int) -> torch.Tensor | None:
    """The inverse of an injective index: `inv[index[s]] = s`, -1 where no entry points.

    Negative entries are skipped. Returns None when two entries share a target (not injective).
    """
    index_S = index_S.to(torch.int64)
    source_S = torch.arange(index_S.shape[0], dtype=torch.int64, device=index_S.device)
    missing = _negative_rows(index_S)
    if missing is not None:
        live = index_S >= 0
        index_S, source_S = index_S[live], source_S[live]
    inverse_R = torch.full((size,), -1, dtype=torch.int64, device=index_S.device)
    if index_S.numel() == 0:
        return inverse_R
    inverse_R.index_put_((index_S,), source_S)
    if index_S.shape[0] == size:  # a bijection iff every target was hit
        injective = bool((inverse_R >= 0).all())
    else:
        injective = int((inverse_R >= 0).sum()) == index_S.shape[0]
    return inverse_R if injective else None


class CpuBackend:
    """Lean CPU implementations of the six primitive ops (see the module docstring).

    The inverse map `pos_TK` of permute is not needed: the forward is a gather either way.
    """

    # --- permutation --------------------------------------------------------------------

    def permute(self, hidden_TH, src_row_S, pos_TK):
        return _gather_rows(hidden_TH, src_row_S)

    def permute_backward(self, grad_rows_SH, src_row_S, pos_TK, num_tokens):
        if src_row_S.shape[0] <= num_tokens:
            # At most one row per token (regroup permutations, top-1): a gather, no zero buffer.
            inverse_T = _inverse(src_row_S, num_tokens)
            if inverse_T is not None:
                return _gather_rows(grad_rows_SH, inverse_T)
        missing = _negative_rows(src_row_S)
        if missing is None:
            grad_TH = grad_rows_SH.new_zeros(num_tokens, grad_rows_SH.shape[1])
            return grad_TH.index_add_(0, src_row_S, grad_rows_SH)
        # Padding rows go to a spare row past the end, as in the reference (same summation order).
        index_S = torch.where(src_row_S >= 0, src_row_S, num_tokens)
        grad_TH = grad_rows_SH.new_zeros(num_tokens + 1, grad_rows_SH.shape[1])
        return grad_TH.index_add_(0, index_S, grad_rows_SH)[:num_tokens]

    def unpermute(self, rows_SH, pos_TK, weights_TK):
        num_tokens, top_k = pos_TK.shape
        gathered_TKH = _gather_rows(rows_SH, pos_TK.reshape(-1)).view(num_tokens, top_k, rows_SH.shape[1])
        out_TH = (gathered_TKH * weights_TK.unsqueeze(-1)).sum(dim=1)
        return out_TH.to(rows_SH.dtype)

    def unpermute_backward(self, grad_out_TH, pos_TK, weights_TK, rows_SH, num_rows):
        num_tokens, top_k = pos_TK.shape
        promoted = torch.promote_types(grad_out_TH.dtype, weights_TK.dtype)
        grad_TH = grad_out_TH.to(promoted)
        pos_X = pos_TK.reshape(-1)
        slot_S = _inverse(pos_X, num_rows)
        if slot_S is None:  # a row read twice breaks the op's contract: take the reference's sum
            return reference.unpermute_backward_reference(grad_out_TH, pos_TK, weights_TK, rows_SH, num_rows)
        token_S = torch.div(slot_S, top_k, rounding_mode="floor")  # -1 stays -1
        # Row s holds slot (t, k): its gradient is grad_out[t] * weights[t, k], as in the reference.
        grad_SH = _gather_rows(grad_TH, token_S)
        weight_S1 = _gather_rows(weights_TK.reshape(-1, 1), slot_S)
        grad_rows_SH = (grad_SH * weight_S1).to(grad_out_TH.dtype)
        if rows_SH is None:
            return grad_rows_SH, torch.zeros_like(weights_TK)
        # d weights[t, k] = <grad_out[t], rows[pos[t, k]]>: the same products and row sums as
        # the reference's [T, K, H] form, taken in row order, then moved to slot order.
        grad_weight_S1 = (grad_SH * rows_SH).sum(dim=-1, keepdim=True)
        grad_weights_TK = _gather_rows(grad_weight_S1, pos_X).view(num_tokens, top_k)
        return grad_rows_SH, grad_weights_TK.to(weights_TK.dtype)

    # --- grouped GEMM ------------------------------------------------------------------

    def grouped_mm(self, x_SD, w_EOD, offsets_E):
        out_SO = x_SD.new_empty(x_SD.shape[0], w_EOD.shape[1])
        start = 0
        for expert, end in enumerate(offsets_E.tolist()):
            if end > start:
                torch.mm(x_SD[start:end], w_EOD[expert].transpose(0, 1), out=out_SO[start:end])
            start = max(start, end)
        if start < x_SD.shape[0]:
            out_SO[start:].zero_()
        return out_SO

    def grouped_mm_weight_grad(self, grad_y_SO, x_SD, offsets_E, out_dtype=None):
        ends = offsets_E.tolist()
        out_dtype = out_dtype or x_SD.dtype
        grad_w_EOD = x_SD.new_empty(len(ends), grad_y_SO.shape[1], x_SD.shape[1], dtype=out_dtype)
        start = 0
        for expert, end in enumerate(ends):
            if end > start:
                # torch.mm has no output dtype: a wider result takes operands upcast (exactly).
                grad_y, x = grad_y_SO[start:end].to(out_dtype), x_SD[start:end].to(out_dtype)
                torch.mm(grad_y.transpose(0, 1), x, out=grad_w_EOD[expert])
            else:
                grad_w_EOD[expert].zero_()
            start = end
        return grad_w_EOD

    def grouped_mm_weight_grad_add_(self, grad_w_EOD, grad_y_SO, x_SD, offsets_E):
        """Accumulated inside each expert's GEMM (`addmm_`), no temporary."""
        dtype = grad_w_EOD.dtype
        start = 0
        for expert, end in enumerate(offsets_E.tolist()):
            if end > start:
                grad_y, x = grad_y_SO[start:end].to(dtype), x_SD[start:end].to(dtype)
                grad_w_EOD[expert].addmm_(grad_y.transpose(0, 1), x)
            start = end
