"""Routing plan: which rows go to which rank and expert, and how they come back.

The plan is computed once per layer call (one exchange of per-expert counts, for all
micro-partitions together) and flows as values from dispatch to combine; nothing of it is
kept on a module, so partitions in flight never overwrite each other.

Everything is built on the device of the tokens (stable sorts and scatters, no host
round trip), with ONE device-to-host transfer per call: the copy of the per-expert counts
after their exchange, which `all_to_all_single` needs as host split sizes. What else the
host must know rides along in that copy: each rank's range of expert ids (so a bad routing
index raises on every rank at once, before any data all-to-all can hang), the capacity
drops, and small vectors of callers (`HostRider`: the tuner's load exchange). On CUDA the
copy is non-blocking into pinned memory, followed by one event wait: the one synchronisation
of the layer's forward; the backward has none.

Shape legend: T tokens, K top-k, S kept slots (token copies) of one partition, E global
experts, L experts per rank, R ranks of the expert-parallel group, P partitions.
"""

from __future__ import annotations

from dataclasses import dataclass

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from lightning_mpipemoe import collectives

__all__ = ["DispatchPlan", "HostRider", "check_routing", "partition_bounds", "plan_dispatch", "group_size"]


def group_size(group: ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


@dataclass(frozen=True)
class DispatchPlan:
    """Routing metadata of one micro-partition (tokens `token_start:token_end`).

    `src_token_S` (partition-local token of each kept slot, sorted by global expert) drives
    the permute; `pos_TK` (row of slot (t, k) in that order, -1 when dropped) drives the
    weighted unpermute. Received rows arrive rank-major; `regroup_S` reorders them
    local-expert-major for the grouped GEMM, whose segments end at `expert_offsets_L`
    (`expert_ends` is its host copy). Index tensors live on the tokens' device; split sizes
    and counts are host ints (from the call's one copy of counts).
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
    expert_ends: tuple[int, ...]

    @property
    def num_sent(self) -> int:
        return sum(self.send_splits)

    @property
    def num_received(self) -> int:
        return sum(self.recv_splits)


class HostRider:
    """A small int64 device vector that rides to the host in a plan's one copy of counts.

    `ready` (e.g. the wait of the collective that produced the values) runs before the copy
    is assembled; after `plan_dispatch`, `host` holds the values as Python ints.
    """

    def __init__(self, values_X: torch.Tensor, ready: Callable[[], None] | None = None) -> None:
        if values_X.dim() != 1 or values_X.dtype != torch.int64:
            raise TypeError(f"a HostRider carries a 1-D int64 tensor, got {values_X.dtype} {tuple(values_X.shape)}")
        self.values_X = values_X
        self._ready = ready
        self.host: list[int] | None = None

    def prepare(self, device: torch.device) -> torch.Tensor:
        if self._ready is not None:
            self._ready()
            self._ready = None
        return self.values_X.to(device)


def check_routing(
    hidden_TH: torch.Tensor, top_k_index_TK: torch.Tensor, top_k_weights_TK: torch.Tensor, num_experts: int, hidden_size: int
) -> None:
    """Raise a clear error for malformed routing inputs (shapes and dtypes: host metadata, no
    sync). The expert ids' range is checked by `plan_dispatch` from its one copy of counts,
    on every rank of the group at once."""
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
    if top_k_index_TK.device != hidden_TH.device:
        raise ValueError(f"top_k_index is on {top_k_index_TK.device} but hidden is on {hidden_TH.device}")


def partition_bounds(num_tokens: int, num_partitions: int) -> list[int]:
    """Token boundaries of `num_partitions` near-equal contiguous partitions (some may be empty)."""
    if not isinstance(num_partitions, int) or num_partitions < 1:
        raise ValueError(f"num_partitions must be a positive int, got {num_partitions!r}")
    return [(p * num_tokens) // num_partitions for p in range(num_partitions + 1)]


def _partition_of(token_S: torch.Tensor, num_tokens: int, num_partitions: int) -> torch.Tensor:
    """The partition of each token under `partition_bounds`: the largest p with p*T//n <= t,
    i.e. ((t + 1) * n - 1) // T (device arithmetic, no boundary tensor)."""
    return ((token_S + 1) * num_partitions - 1) // max(num_tokens, 1)


def _keep_mask(expert_S: torch.Tensor, top_k: int, num_experts: int, capacity: int, group_tokens: int) -> torch.Tensor:
    """Slots kept under a per-expert capacity, counted per group of `group_tokens` tokens.

    Priority inside a group: all first choices in token order, then all second choices
    (GShard); for top-1 this is Switch Transformers' token order.
    """
    num_slots = expert_S.numel()
    num_tokens = num_slots // top_k
    slot_S = torch.arange(num_slots, device=expert_S.device)
    token_S, choice_S = slot_S // top_k, slot_S % top_k
    group_S = token_S // group_tokens
    by_priority_S = torch.argsort((group_S * top_k + choice_S) * num_tokens + token_S)
    run_key_S = (group_S * num_experts + expert_S)[by_priority_S]
    within = torch.argsort(run_key_S, stable=True)
    sorted_slot_S = by_priority_S[within]
    sorted_key_S = run_key_S[within]
    run_start_S = torch.ones(num_slots, dtype=torch.bool, device=expert_S.device)
    run_start_S[1:] = sorted_key_S[1:] != sorted_key_S[:-1]
    start_index_S = torch.cummax(torch.where(run_start_S, slot_S, torch.zeros_like(slot_S)), dim=0).values
    keep_S = torch.empty(num_slots, dtype=torch.bool, device=expert_S.device)
    keep_S[sorted_slot_S] = (slot_S - start_index_S) < capacity
    return keep_S


def _regroup_index(recv_counts_RL: torch.Tensor, total: int) -> torch.Tensor:
    """Index that turns rank-major received rows into local-expert-major order (device;
    `total`, the host row count, keeps `repeat_interleave` free of a sync)."""
    counts_flat = recv_counts_RL.reshape(-1)
    starts_RL = (torch.cumsum(counts_flat, 0) - counts_flat).view_as(recv_counts_RL)
    counts_LR = recv_counts_RL.t().reshape(-1)
    starts_LR = starts_RL.t().reshape(-1)
    seg_start_S = torch.repeat_interleave(starts_LR, counts_LR, output_size=total)
    seg_base_S = torch.repeat_interleave(torch.cumsum(counts_LR, 0) - counts_LR, counts_LR, output_size=total)
    return seg_start_S + torch.arange(total, device=recv_counts_RL.device) - seg_base_S


def _exchange_counts(send_PE: torch.Tensor, range_2: torch.Tensor, group: ProcessGroup | None,
                     ep_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All partitions' per-expert counts in one all-to-all, on their device, with each rank's
    range of expert ids riding along: returns recv counts `[P, R, L]` and ranges `[R, 2]`."""
    num_partitions, num_experts = send_PE.shape
    local = num_experts // ep_size
    send_RPL = send_PE.view(num_partitions, ep_size, local).permute(1, 0, 2).reshape(ep_size, -1)
    send_RX = torch.cat([send_RPL, range_2.view(1, 2).expand(ep_size, 2)], dim=1).contiguous()
    if ep_size == 1:
        recv_RX = send_RX
    else:
        recv_RX = torch.empty_like(send_RX)
        collectives.all_to_all_single(recv_RX.view(-1), send_RX.view(-1), group=group, site="dispatch.count_exchange")
    recv_PRL = recv_RX[:, :-2].reshape(ep_size, num_partitions, local).permute(1, 0, 2)
    return recv_PRL, recv_RX[:, -2:]


def _to_host(values_X: torch.Tensor) -> torch.Tensor:
    """The one device-to-host copy of a call: non-blocking into pinned memory, then one event
    wait on CUDA (the documented sync of the layer's forward)."""
    host_X = values_X.to("cpu", non_blocking=True)
    if values_X.device.type == "cuda":
        done = torch.cuda.Event()
        done.record()
        done.synchronize()
    return host_X


def _raise_bad_routing(ranges: list[list[int]], num_experts: int, rank: int) -> None:
    """Every rank sees every rank's expert-id range: all raise together, naming the value."""
    order = [rank] + [r for r in range(len(ranges)) if r != rank]
    for r in order:
        low, high = ranges[r]
        if low < 0 or high >= num_experts:
            bad = low if low < 0 else high
            where = "" if r == rank else f" (on rank {r} of the expert-parallel group)"
            raise ValueError(f"top_k_index holds expert {bad}; valid experts are 0..{num_experts - 1}{where}")


def plan_dispatch(
    top_k_index_TK: torch.Tensor,
    num_experts: int,
    ep_group: ProcessGroup | None = None,
    *,
    num_partitions: int = 1,
    capacity: int | None = None,
    capacity_group_size: int | None = None,
    riders: Sequence[HostRider] = (),
) -> list[DispatchPlan]:
    """Plan the dispatch of one layer call, split into `num_partitions` token ranges.

    `capacity` limits the slots each expert takes from each group of `capacity_group_size`
    consecutive tokens of this rank (default: all of them); overflow slots are dropped and
    contribute zero. Drops are decided on the whole call, so the result does not depend on
    `num_partitions`. `riders` travel to the host in the call's one copy (see the module).
    """
    ep_size = group_size(ep_group)
    if num_experts % ep_size:
        raise ValueError(f"num_experts={num_experts} is not divisible by the expert-parallel size {ep_size}")
    num_tokens, top_k = top_k_index_TK.shape
    bounds = partition_bounds(num_tokens, num_partitions)
    device = top_k_index_TK.device
    expert_S = top_k_index_TK.detach().reshape(-1)
    num_slots = expert_S.numel()
    valid_S = (expert_S >= 0) & (expert_S < num_experts)
    safe_S = torch.where(valid_S, expert_S, 0)  # out-of-range ids never index anything
    if capacity is not None:
        if not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"capacity must be a non-negative int or None, got {capacity!r}")
        group_tokens = capacity_group_size or max(num_tokens, 1)
        if num_tokens % group_tokens:
            raise ValueError(
                f"capacity_group_size={capacity_group_size} must divide the token count {num_tokens}"
            )
        keep_S = valid_S & _keep_mask(safe_S, top_k, num_experts, capacity, group_tokens)
    else:
        keep_S = valid_S

    # Kept slots sorted by (partition, expert), dropped ones last (stable: token order within).
    slot_S = torch.arange(num_slots, device=device)
    partition_S = _partition_of(slot_S // top_k, num_tokens, num_partitions)
    dropped_key = num_partitions * num_experts
    key_S = torch.where(keep_S, partition_S * num_experts + safe_S, dropped_key)
    order_S = torch.argsort(key_S, stable=True)
    counts_PE = torch.zeros(dropped_key + 1, dtype=torch.int64, device=device)
    counts_PE = counts_PE.scatter_add_(0, key_S, torch.ones_like(key_S))[:dropped_key].view(num_partitions, num_experts)
    dropped_P = torch.zeros(num_partitions, dtype=torch.int64, device=device)
    dropped_P.scatter_add_(0, partition_S, (valid_S & ~keep_S).to(torch.int64))
    if num_slots:
        range_2 = torch.stack(torch.aminmax(expert_S))
    else:
        range_2 = torch.zeros(2, dtype=torch.int64, device=device)
    recv_PRL, ranges_R2 = _exchange_counts(counts_PE, range_2, ep_group, ep_size)

    # The one copy to the host: counts, exchanged counts, ranges, drops, riders.
    pieces = [counts_PE.reshape(-1), recv_PRL.reshape(-1), ranges_R2.reshape(-1), dropped_P]
    pieces += [rider.prepare(device) for rider in riders]
    host_X = _to_host(torch.cat(pieces))
    local = num_experts // ep_size
    sizes = [num_partitions * num_experts, num_partitions * ep_size * local, 2 * ep_size, num_partitions]
    sizes += [rider.values_X.numel() for rider in riders]
    host_counts_PE, host_recv_PRL, host_ranges, host_dropped, *host_riders = torch.split(host_X, sizes)
    for rider, values in zip(riders, host_riders):
        rider.host = values.tolist()
    rank = dist.get_rank(ep_group) if ep_size > 1 else 0
    _raise_bad_routing(host_ranges.view(ep_size, 2).tolist(), num_experts, rank)
    host_recv_PRL = host_recv_PRL.view(num_partitions, ep_size, local)
    send_splits_PR = host_counts_PE.view(num_partitions, ep_size, local).sum(-1).tolist()
    recv_splits_PR = host_recv_PRL.sum(-1).tolist()
    expert_ends_PL = torch.cumsum(host_recv_PRL.sum(1), dim=1).tolist()
    dropped = host_dropped.tolist()

    # Positions on the device: slot -> row of its partition's send order (-1 when dropped).
    rows_P = counts_PE.sum(-1)
    row_start_P = torch.cumsum(rows_P, 0) - rows_P
    rank_S = torch.empty_like(order_S).scatter_(0, order_S, slot_S)
    position_S = torch.where(keep_S, rank_S - row_start_P[partition_S], -1)
    recv_offsets_PL = torch.cumsum(recv_PRL.sum(1), dim=1)
    plans, row = [], 0
    for p in range(num_partitions):
        t0, t1 = bounds[p], bounds[p + 1]
        num_sent, num_received = sum(send_splits_PR[p]), sum(recv_splits_PR[p])
        regroup_S = _regroup_index(recv_PRL[p], num_received)
        unregroup_S = torch.empty_like(regroup_S).scatter_(
            0, regroup_S, torch.arange(num_received, device=device))
        plans.append(
            DispatchPlan(
                token_start=t0,
                token_end=t1,
                src_token_S=order_S[row : row + num_sent] // top_k - t0,
                pos_TK=position_S[t0 * top_k : t1 * top_k].view(t1 - t0, top_k),
                send_splits=send_splits_PR[p],
                recv_splits=recv_splits_PR[p],
                regroup_S=regroup_S,
                unregroup_S=unregroup_S,
                expert_offsets_L=recv_offsets_PL[p],
                sent_per_expert_E=counts_PE[p],
                num_dropped=dropped[p],
                expert_ends=tuple(expert_ends_PL[p]),
            )
        )
        row += num_sent
    return plans
