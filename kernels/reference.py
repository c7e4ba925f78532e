"""Pure-PyTorch reference implementations of the token-permutation and grouped-GEMM ops.

These are the plain paths that every fast kernel is tested against, and what the executor
runs on CPU. Autograd comes from the torch ops they are built of.

Shape legend: T tokens, K top-k, S permuted rows (slots, possibly padded), H model dim,
E experts (local), O output features of a grouped GEMM, D its input features.
"""

from __future__ import annotations

import torch

__all__ = ["permute_reference", "unpermute_reference", "grouped_mm_reference"]


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
