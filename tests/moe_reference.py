"""A plain per-token MoE loop: the independent reference the executor is checked against."""

from __future__ import annotations

import torch


def keep_mask_reference(top_k_index_TK: torch.Tensor, num_experts: int, capacity: int | None, group_size: int | None) -> torch.Tensor:
    """Capacity rule spelled out: per group, first choices in token order, then second ones."""
    num_tokens, top_k = top_k_index_TK.shape
    keep = torch.ones(num_tokens, top_k, dtype=torch.bool)
    if capacity is None:
        return keep
    group_size = group_size or max(num_tokens, 1)
    for start in range(0, num_tokens, group_size):
        taken = [0] * num_experts
        for k in range(top_k):
            for t in range(start, min(start + group_size, num_tokens)):
                e = int(top_k_index_TK[t, k])
                keep[t, k] = taken[e] < capacity
                taken[e] += 1
    return keep


def moe_reference(hidden_TH, top_k_index_TK, top_k_weights_TK, w_in_EOH, w_out_EHI, b_in_EO=None, b_out_EH=None,
                  *, gated=True, act=torch.nn.functional.silu, keep_TK=None):
    """out[t] = sum_k w[t,k] * expert_{e(t,k)}(hidden[t]), one token at a time."""
    rows = []
    for t in range(hidden_TH.shape[0]):
        acc_H = hidden_TH.new_zeros(hidden_TH.shape[1])
        for k in range(top_k_index_TK.shape[1]):
            if keep_TK is not None and not keep_TK[t, k]:
                continue
            e = int(top_k_index_TK[t, k])
            pre_O = w_in_EOH[e] @ hidden_TH[t]
            if b_in_EO is not None:
                pre_O = pre_O + b_in_EO[e]
            if gated:
                gate_I, up_I = pre_O.chunk(2)
                act_I = act(gate_I) * up_I
            else:
                act_I = act(pre_O)
            y_H = w_out_EHI[e] @ act_I
            if b_out_EH is not None:
                y_H = y_H + b_out_EH[e]
            acc_H = acc_H + top_k_weights_TK[t, k] * y_H
        rows.append(acc_H)
    if not rows:
        return hidden_TH.new_zeros(0, hidden_TH.shape[1]) + 0 * hidden_TH.sum()
    return torch.stack(rows)


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5, what: str = "",
                     floor: float = 1e-12) -> None:
    """|actual - expected| <= rel * max(max|expected|, floor) (elementwise), with a clear message."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    scale = expected.abs().max().clamp_min(floor)
    err = (actual - expected).abs().max()
    assert err <= rel * scale, f"{what}: max abs error {err:.3e} > {rel:g} x max|expected| {scale:.3e}"


def random_expert_weights(num_experts: int, hidden: int, inter: int, gated: bool, bias: bool, seed: int) -> dict:
    """HF fused-layout expert weights (and biases) at a scale that keeps activations O(1)."""
    gen = torch.Generator().manual_seed(seed)
    width = 2 * inter if gated else inter
    weights = {
        "w_in_EOH": torch.randn(num_experts, width, hidden, generator=gen) / hidden**0.5,
        "w_out_EHI": torch.randn(num_experts, hidden, inter, generator=gen) / inter**0.5,
    }
    if bias:
        weights["b_in_EO"] = torch.randn(num_experts, width, generator=gen) * 0.1
        weights["b_out_EH"] = torch.randn(num_experts, hidden, generator=gen) * 0.1
    return weights
