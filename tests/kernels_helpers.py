"""Helpers for the kernel tests: routing layouts and dtype-aware comparisons.

Shape legend: T tokens, K top-k, S permuted rows, E experts.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@contextmanager
def poisoned_empty() -> Iterator[None]:
    """`torch.empty` fills with NaN while deterministic mode is on (warn-only here, so ops that
    have no deterministic variant still run): an output row a kernel forgets to write can then
    never pass for a zero."""
    before, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


@dataclass
class Routing:
    """An expert-sorted dispatch of T tokens with K choices each, some slots dropped."""

    top_k_index_TK: torch.Tensor
    src_row_S: torch.Tensor  # token of each kept slot, sorted by expert (stable in token order)
    pos_TK: torch.Tensor  # row of slot (t, k), -1 when dropped
    counts_E: torch.Tensor  # kept rows per expert

    @property
    def offsets_E(self) -> torch.Tensor:
        return torch.cumsum(self.counts_E, 0)


def make_routing(
    num_tokens: int, top_k: int, num_experts: int, *, empty_experts=(), drop_every: int = 0, seed: int = 0
) -> Routing:
    """Random distinct top-k choices avoiding `empty_experts`; every `drop_every`-th slot dropped."""
    gen = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(num_experts) if e not in set(empty_experts)])
    if len(allowed) < top_k:
        raise ValueError("not enough non-empty experts for top_k distinct choices")
    scores = torch.rand(num_tokens, len(allowed), generator=gen)
    top_k_index_TK = allowed[torch.topk(scores, top_k, dim=1).indices]
    expert_X = top_k_index_TK.reshape(-1)
    keep_X = torch.ones_like(expert_X, dtype=torch.bool)
    if drop_every:
        keep_X[drop_every - 1 :: drop_every] = False
    kept_X = torch.nonzero(keep_X).squeeze(1)
    order = torch.argsort(expert_X[kept_X], stable=True)
    slot_S = kept_X[order]
    pos_X = torch.full_like(expert_X, -1)
    pos_X[slot_S] = torch.arange(len(slot_S))
    counts_E = torch.bincount(expert_X[kept_X], minlength=num_experts)
    return Routing(top_k_index_TK, slot_S // top_k, pos_X.view(num_tokens, top_k), counts_E)


def tolerance(dtype: torch.dtype) -> float:
    return {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}[dtype]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Compare with an fp32 reference, at the rounding error of `dtype` (scaled to the values)."""
    tol = tolerance(dtype)
    actual, expected = actual.detach(), expected.detach().float()
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.float().cpu(), expected.cpu(), atol=tol * scale, rtol=tol, msg=lambda m: f"{what}: {m}"
    )
