"""Index maps for the permutation ops: block-padded expert segments and inverse row maps.

Everything here is built with device-side torch ops and no host synchronisation, so it can
run between kernels of a pipelined step. The price is a static size: a padded layout has
room for the worst case (`S + E * (block - 1)` rows) unless told its exact size.

Shape legend: S rows before padding (expert-sorted), P rows after padding, T tokens,
K copies of a token (top-k), E experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PaddedSegments", "invert_src_rows", "pad_segments", "segment_counts"]


def segment_counts(offsets_E: torch.Tensor) -> torch.Tensor:
    """Rows per expert from cumulative segment ends (the grouped GEMM's `offsets`)."""
    return torch.diff(offsets_E.to(torch.int64), prepend=offsets_E.new_zeros(1, dtype=torch.int64))


@dataclass(frozen=True)
class PaddedSegments:
    """An expert-sorted row layout whose segments are padded to a multiple of `block`.

    `src_row_P` is the permute index (-1 on padding rows, which permute fills with zeros),
    `offsets_E` the padded cumulative segment ends, and `row_map_S` the padded row of each
    unpadded row. Rows past `offsets_E[-1]` are spare room; the grouped GEMM writes zeros there.
    """

    src_row_P: torch.Tensor
    offsets_E: torch.Tensor
    row_map_S: torch.Tensor
    block: int

    def pad_pos(self, pos_TK: torch.Tensor) -> torch.Tensor:
        """Move an inverse map (row of each token copy, -1 for none) to the padded rows."""
        if self.row_map_S.numel() == 0:
            return pos_TK.clone()
        return torch.where(pos_TK >= 0, self.row_map_S[pos_TK.clamp(min=0)], pos_TK)


def pad_segments(
    src_row_S: torch.Tensor, counts_E: torch.Tensor, block: int, *, num_rows: int | None = None
) -> PaddedSegments:
    """Pad each expert's segment of an expert-sorted permutation to a multiple of `block` rows.

    `counts_E` must sum to `len(src_row_S)`. `num_rows` fixes the padded length; the default,
    `S + E * (block - 1)`, always fits and needs no host sync (pass the exact
    `int(offsets_E[-1])` to trim the spare rows, at the cost of one sync).
    """
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive int, got {block!r}")
    if counts_E.dim() != 1:
        raise ValueError(f"counts must be 1-D [E], got shape {tuple(counts_E.shape)}")
    device = src_row_S.device
    num_slots, num_experts = src_row_S.shape[0], counts_E.shape[0]
    if num_rows is None:
        num_rows = num_slots + num_experts * (block - 1)
    counts_E = counts_E.to(device=device, dtype=torch.int64)
    padded_E = (counts_E + block - 1) // block * block
    padded_ends_E = torch.cumsum(padded_E, 0)
    shift_E = (padded_ends_E - padded_E) - (torch.cumsum(counts_E, 0) - counts_E)
    expert_S = torch.repeat_interleave(torch.arange(num_experts, device=device), counts_E, output_size=num_slots)
    row_map_S = torch.arange(num_slots, device=device) + shift_E[expert_S]
    src_row_P = torch.full((num_rows,), -1, dtype=src_row_S.dtype, device=device)
    src_row_P[row_map_S] = src_row_S
    return PaddedSegments(src_row_P=src_row_P, offsets_E=padded_ends_E, row_map_S=row_map_S, block=block)


def invert_src_rows(src_row_S: torch.Tensor, num_tokens: int, max_copies: int) -> torch.Tensor:
    """The inverse of a permute index: `pos[t, j]` is the j-th row (in row order) holding token t.

    Missing copies are -1. The copy order is row order, not routing-choice order, so the result
    serves unweighted sums (the permute backward); `max_copies` must be at least the largest
    number of rows that hold one token.
    """
    num_slots = src_row_S.shape[0]
    device = src_row_S.device
    token_S = torch.where(src_row_S >= 0, src_row_S, num_tokens).to(torch.int64)
    order_S = torch.argsort(token_S, stable=True)
    sorted_token_S = token_S[order_S]
    count_T = torch.bincount(token_S, minlength=num_tokens + 1)
    first_T = torch.cumsum(count_T, 0) - count_T
    rank_S = torch.arange(num_slots, device=device) - first_T[sorted_token_S]
    # Padding rows all land in the dropped row `num_tokens`, column 0.
    rank_S = torch.where(sorted_token_S < num_tokens, rank_S, 0)
    pos_TK = torch.full((num_tokens + 1, max_copies), -1, dtype=torch.int64, device=device)
    pos_TK[sorted_token_S, rank_S] = order_S
    return pos_TK[:num_tokens]
