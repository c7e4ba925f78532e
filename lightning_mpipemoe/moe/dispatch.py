"""Routing plan: which rows go to which rank and expert, and how they come back.

The plan is computed once per layer call (one exchange of per-expert counts, for all
micro-partitions together) and flows as values from dispatch to combine; nothing of it is
kept on a module, so partitions in flight never overwrite each other.

Shape legend: T tokens, K top-k, S kept slots (token copies) of one partition, E global
experts, L experts per rank, R ranks of the expert-parallel group, P partitions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

__all__ = ["DispatchPlan", "check_routing", "partition_bounds", "plan_dispatch", "group_size"]


def group_size(group: ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


@dataclass(frozen=True)
class DispatchPlan:
    """Routing metadata of one micro-partition (tokens `token_start:token_end`).

    `src_token_S` (partition-local token of each kept slot, sorted by global expert) drives
    the permute; `pos_TK` (row of slot (t, k) in that order, -1 when dropped) drives the
    weighted unpermute. Received rows arrive rank-major; `regroup_S` reorders them
    local-expert-major for the grouped GEMM, whose segments end at `expert_offsets_L`.
    """

    token_start: int
    token_end: int
    src_token_S: torch.Tensor
    pos_TK: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]
    regroup_S: torch.Tensor
    unregroup_S: torch.Tensor
    expert_offsets_L: torch.Tensor
    sent_per_expert_E: torch.Tensor
    num_dropped: int

    @property
    def num_sent(self) -> int:
        return sum(self.send_splits)

    @property
    def num_received(self) -> int:
        return sum(self.recv_splits)


def check_routing(
    hidden_TH: torch.Tensor, top_k_index_TK: torch.Tensor, top_k_weights_TK: torch.Tensor, num_experts: int, hidden_size: int
) -> None:
    """Raise a clear error for malformed routing inputs, before any collective can hang."""
    if hidden_TH.dim() != 2:
        raise ValueError(f"hidden must be [T, H], got shape {tuple(hidden_TH.shape)}")
    if hidden_TH.shape[1] != hidden_size:
        raise ValueError(f"hidden has H={hidden_TH.shape[1]} but the experts expect H={hidden_size}")
    if not hidden_TH.is_floating_point():
        raise TypeError(f"hidden must be a floating-point tensor, got {hidden_TH.dtype}")
    if top_k_index_TK.dtype != torch.int64:
        raise TypeError(f"top_k_index must be torch.int64, got {top_k_index_TK.dtype}")
    if top_k_index_TK.dim() != 2 or top_k_index_TK.shape[0] != hidden_TH.shape[0]:
        raise ValueError(
            f"top_k_index must be [T, K] with T={hidden_TH.shape[0]}, got shape {tuple(top_k_index_TK.shape)}"
        )
    if top_k_weights_TK.shape != top_k_index_TK.shape:
        raise ValueError(
            f"top_k_weights shape {tuple(top_k_weights_TK.shape)} must equal top_k_index shape "
            f"{tuple(top_k_index_TK.shape)}"
        )
    if not top_k_weights_TK.is_floating_point():
        raise TypeError(f"top_k_weights must be a floating-point tensor, got {top_k_weights_TK.dtype}")
    if top_k_index_TK.numel():
        low, high = int(top_k_index_TK.min()), int(top_k_index_TK.max())
        if low < 0 or high >= num_experts:
            bad = low if low < 0 else high
            raise ValueError(f"top_k_index holds expert {bad}; valid experts are 0..{num_experts - 1}")


def partition_bounds(num_tokens: int, num_partitions: int) -> list[int]:
    """Token boundaries of `num_partitions` near-equal contiguous partitions (some may be empty)."""
    if not isinstance(num_partitions, int) or num_partitions < 1:
        raise ValueError(f"num_partitions must be a positive int, got {num_partitions!r}")
    return [(p * num_tokens) // num_partitions for p in range(num_partitions + 1)]


def _keep_mask(expert_S: torch.Tensor, top_k: int, num_experts: int, capacity: int, group_tokens: int) -> torch.Tensor:
    """Slots kept under a per-expert capacity, counted per group of `group_tokens` tokens.

    Priority inside a group: all first choices in token order, then all second choices
    (GShard); for top-1 this is Switch Transformers' token order.
    """
    num_slots = expert_S.numel()
    num_tokens = num_slots // top_k
    slot_S = torch.arange(num_slots)
    token_S, choice_S = slot_S // top_k, slot_S % top_k
    group_S = token_S // group_tokens
    by_priority_S = torch.argsort((group_S * top_k + choice_S) * num_tokens + token_S)
    run_key_S = (group_S * num_experts + expert_S)[by_priority_S]
    within = torch.argsort(run_key_S, stable=True)
    sorted_slot_S = by_priority_S[within]
    sorted_key_S = run_key_S[within]
    run_start_S = torch.ones(num_slots, dtype=torch.bool)
    run_start_S[1:] = sorted_key_S[1:] != sorted_key_S[:-1]
    start_index_S = torch.cummax(torch.where(run_start_S, slot_S, torch.zeros_like(slot_S)), dim=0).values
    keep_S = torch.empty(num_slots, dtype=torch.bool)
    keep_S[sorted_slot_S] = (slot_S - start_index_S) < capacity
    return keep_S


def _regroup_index(recv_counts_RL: torch.Tensor) -> torch.Tensor:
    """Index that turns rank-major received rows into local-expert-major order."""
    counts_flat = recv_counts_RL.reshape(-1)
    starts_RL = (torch.cumsum(counts_flat, 0) - counts_flat).view_as(recv_counts_RL)
    counts_LR = recv_counts_RL.t().reshape(-1)
    starts_LR = starts_RL.t().reshape(-1)
    total = int(counts_LR.sum())
    seg_start_S = torch.repeat_interleave(starts_LR, counts_LR, output_size=total)
    seg_base_S = torch.repeat_interleave(torch.cumsum(counts_LR, 0) - counts_LR, counts_LR, output_size=total)
    return seg_start_S + torch.arange(total) - seg_base_S


def _exchange_counts(send_PE: torch.Tensor, group: ProcessGroup | None, ep_size: int) -> torch.Tensor:
    """All partitions' per-expert counts in one all-to-all: returns recv counts `[P, R, L]`."""
    num_partitions, num_experts = send_PE.shape
    local = num_experts // ep_size
    send_RPL = send_PE.view(num_partitions, ep_size, local).permute(1, 0, 2).contiguous()
    if ep_size == 1:
        recv_RPL = send_RPL
    else:
        recv_RPL = torch.empty_like(send_RPL)
        dist.all_to_all_single(recv_RPL.view(-1), send_RPL.view(-1), group=group)
    return recv_RPL.permute(1, 0, 2)


def plan_dispatch(
    top_k_index_TK: torch.Tensor,
    num_experts: int,
    ep_group: ProcessGroup | None = None,
    *,
    num_partitions: int = 1,
    capacity: int | None = None,
    capacity_group_size: int | None = None,
) -> list[DispatchPlan]:
    """Plan the dispatch of one layer call, split into `num_partitions` token ranges.

    `capacity` limits the slots each expert takes from each group of `capacity_group_size`
    consecutive tokens of this rank (default: all of them); overflow slots are dropped and
    contribute zero. Drops are decided on the whole call, so the result does not depend on
    `num_partitions`.
    """
    ep_size = group_size(ep_group)
    if num_experts % ep_size:
        raise ValueError(f"num_experts={num_experts} is not divisible by the expert-parallel size {ep_size}")
    num_tokens, top_k = top_k_index_TK.shape
    cpu_index_TK = top_k_index_TK.detach().to("cpu")
    expert_S = cpu_index_TK.reshape(-1)
    num_slots = expert_S.numel()
    if capacity is not None:
        if not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"capacity must be a non-negative int or None, got {capacity!r}")
        group_tokens = capacity_group_size or max(num_tokens, 1)
        if num_tokens % group_tokens:
            raise ValueError(
                f"capacity_group_size={capacity_group_size} must divide the token count {num_tokens}"
            )
        keep_S = _keep_mask(expert_S, top_k, num_experts, capacity, group_tokens)
    else:
        keep_S = torch.ones(num_slots, dtype=torch.bool)

    bounds = partition_bounds(num_tokens, num_partitions)
    token_S = torch.arange(num_slots) // top_k
    partition_S = torch.bucketize(token_S, torch.tensor(bounds[1:-1]), right=True)
    kept_slot_S = torch.nonzero(keep_S).squeeze(1)
    key_S = partition_S[kept_slot_S] * num_experts + expert_S[kept_slot_S]
    order = torch.argsort(key_S, stable=True)
    sorted_slot_S = kept_slot_S[order]
    counts_PE = torch.bincount(key_S, minlength=num_partitions * num_experts).view(num_partitions, num_experts)
    recv_PRL = _exchange_counts(counts_PE, ep_group, ep_size)

    local = num_experts // ep_size
    send_splits_PR = counts_PE.view(num_partitions, ep_size, local).sum(-1).tolist()
    recv_splits_PR = recv_PRL.sum(-1).tolist()
    rows_per_partition = counts_PE.sum(-1).tolist()
    position_S = torch.full((num_slots,), -1, dtype=torch.int64)
    plans, row = [], 0
    for p in range(num_partitions):
        t0, t1 = bounds[p], bounds[p + 1]
        slots_p = sorted_slot_S[row : row + rows_per_partition[p]]
        position_S[slots_p] = torch.arange(len(slots_p))
        regroup_S = _regroup_index(recv_PRL[p])
        unregroup_S = torch.empty_like(regroup_S)
        unregroup_S[regroup_S] = torch.arange(len(regroup_S))
        device = top_k_index_TK.device
        plans.append(
            DispatchPlan(
                token_start=t0,
                token_end=t1,
                src_token_S=(slots_p // top_k - t0).to(device),
                pos_TK=position_S[t0 * top_k : t1 * top_k].view(t1 - t0, top_k).to(device),
                send_splits=send_splits_PR[p],
                recv_splits=recv_splits_PR[p],
                regroup_S=regroup_S.to(device),
                unregroup_S=unregroup_S.to(device),
                expert_offsets_L=torch.cumsum(recv_PRL[p].sum(0), 0).to(device),
                sent_per_expert_E=counts_PE[p],
                num_dropped=int((~keep_S[t0 * top_k : t1 * top_k]).sum()),
            )
        )
        row += rows_per_partition[p]
    return plans
