"""Pure-PyTorch reference implementations of the token-permutation and grouped-GEMM ops.

These are the plain paths that every fast kernel is tested against (the CPU backend of
`cpu_backend.py`, which the executor runs on CPU, included). Autograd of the forward functions
comes from the torch ops they are built of; the explicit backward functions below are what
`ReferenceBackend` calls, and the tests check them against that autograd.

Shape legend: T tokens, K top-k, S permuted rows (slots, possibly padded), H model dim,
E experts (local), O output features of a grouped GEMM, D its input features.
"""

from __future__ import annotations

import torch

__all__ = [
    "grouped_mm_reference",
    "grouped_mm_weight_grad_reference",
    "permute_backward_reference",
    "permute_reference",
    "unpermute_backward_reference",
    "unpermute_reference",
]


def _with_zero_row(x_RD: torch.Tensor) -> torch.Tensor:
    """Append one zero row so that index -1 reads zeros (padding / dropped slots)."""
    return torch.cat([x_RD, x_RD.new_zeros(1, x_RD.shape[1])], dim=0)


def permute_reference(hidden_TH: torch.Tensor, src_row_S: torch.Tensor) -> torch.Tensor:
    """Gather `hidden_TH[src_row_S]`; a source index of -1 yields a zero (padding) row.

    The backward is a scatter-add, so a token routed to K experts receives the sum of its
    K slot gradients.
    """
    return _with_zero_row(hidden_TH)[src_row_S]


def unpermute_reference(
    rows_SH: torch.Tensor, pos_TK: torch.Tensor, weights_TK: torch.Tensor
) -> torch.Tensor:
    """`out[t] = sum_k weights[t, k] * rows[pos[t, k]]`; a position of -1 contributes zero.

    The product is taken in the promoted dtype (routing weights are usually fp32) and summed
    over k before casting back to the rows' dtype, as Hugging Face's grouped experts do.
    """
    num_tokens, top_k = pos_TK.shape
    gathered_TKH = _with_zero_row(rows_SH)[pos_TK.reshape(-1)].view(num_tokens, top_k, rows_SH.shape[1])
    out_TH = (gathered_TKH * weights_TK.unsqueeze(-1)).sum(dim=1)
    return out_TH.to(rows_SH.dtype)


def grouped_mm_reference(x_SD: torch.Tensor, w_EOD: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """Per-expert `x[rows of e] @ w[e].T` over contiguous row segments.

    `offsets_E` holds the cumulative end row of each expert's segment (the `offs` convention
    of `torch.nn.functional.grouped_mm`); rows past the last offset are left zero.
    """
    ends = offsets_E.tolist()
    out_SO = x_SD.new_zeros(x_SD.shape[0], w_EOD.shape[1])
    pieces, start = [], 0
    for expert, end in enumerate(ends):
        pieces.append(x_SD[start:end] @ w_EOD[expert].transpose(0, 1))
        start = end
    if not pieces:
        return out_SO
    used_SO = torch.cat(pieces, dim=0)
    if start == x_SD.shape[0]:
        return used_SO
    return torch.cat([used_SO, out_SO[start:]], dim=0)


# --- Backward formulas, written out so that every backend implements the same ops. ---------


def permute_backward_reference(grad_rows_SH: torch.Tensor, src_row_S: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Gradient of `permute_reference` w.r.t. hidden: scatter-add each row's gradient to its token."""
    index_S = torch.where(src_row_S >= 0, src_row_S, num_tokens)
    grad_TH = grad_rows_SH.new_zeros(num_tokens + 1, grad_rows_SH.shape[1])
    grad_TH.index_add_(0, index_S, grad_rows_SH)
    return grad_TH[:num_tokens]


def unpermute_backward_reference(
    grad_out_TH: torch.Tensor,
    pos_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    rows_SH: torch.Tensor | None,
    num_rows: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `unpermute_reference` w.r.t. rows and weights.

    Products are taken in the promoted dtype, as in the forward. Without `rows_SH` (weights
    need no gradient, so the rows were not kept) the weight gradient is returned as zeros.
    """
    num_tokens, top_k = pos_TK.shape
    hidden = grad_out_TH.shape[1]
    promoted = torch.promote_types(grad_out_TH.dtype, weights_TK.dtype)
    grad_TH = grad_out_TH.to(promoted)
    grad_gathered_TKH = (grad_TH.unsqueeze(1) * weights_TK.unsqueeze(-1)).to(grad_out_TH.dtype)
    index_X = torch.where(pos_TK >= 0, pos_TK, num_rows).reshape(-1)
    grad_rows_SH = grad_out_TH.new_zeros(num_rows + 1, hidden)
    grad_rows_SH.index_add_(0, index_X, grad_gathered_TKH.reshape(-1, hidden))
    if rows_SH is None:
        return grad_rows_SH[:num_rows], torch.zeros_like(weights_TK)
    gathered_TKH = _with_zero_row(rows_SH)[index_X].view(num_tokens, top_k, hidden)
    grad_weights_TK = (grad_TH.unsqueeze(1) * gathered_TKH).sum(dim=-1)
    return grad_rows_SH[:num_rows], grad_weights_TK.to(weights_TK.dtype)


def grouped_mm_weight_grad_reference(
    grad_y_SO: torch.Tensor, x_SD: torch.Tensor, offsets_E: torch.Tensor, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Gradient of `grouped_mm_reference` w.r.t. w: `grad_y[rows of e].T @ x[rows of e]` per expert,
    computed and returned in `out_dtype` (default: the operands' dtype)."""
    ends = offsets_E.tolist()
    out_dtype = out_dtype or x_SD.dtype
    grad_w_EOD = x_SD.new_zeros(len(ends), grad_y_SO.shape[1], x_SD.shape[1], dtype=out_dtype)
    start = 0
    for expert, end in enumerate(ends):
        if end > start:
            grad_w_EOD[expert] = grad_y_SO[start:end].to(out_dtype).transpose(0, 1) @ x_SD[start:end].to(out_dtype)
        start = end
    return grad_w_EOD
