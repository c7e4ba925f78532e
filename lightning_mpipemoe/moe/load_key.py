"""The key a tuner decides by: the load of one MoE call, agreed over the expert-parallel group.

The rows of the busiest rank of the EP group: `max_r max(sent_r, received_r)`
(top-k copies, after capacity drops). The call's time is the slowest rank's (every
all-to-all waits for it), and that rank's compute and wire bytes scale with its rows, so
its rows decide where the pipeline's balance, hence the best n, lies. The published code
keys on the largest per-(rank, expert) count, which is this key when every rank holds one
expert (its setting); with L > 1 local experts a rank's GEMMs run over all of its experts'
rows, so their sum is the right measure. Total tokens ignore routing imbalance and top-k.
Every rank gets the same key from an all-reduce (sum) of an int64 vector of E + 2P entries
(per-expert kept counts, and each rank's sent rows and tokens in its own slot): a few
hundred bytes, latency-bound. It never stalls a call: a call decides by the latest key
already agreed, while its own load travels in the background (async all-reduce, waited at
a later call), on every call while a profiling session runs and on every
`LayerTuner.EXCHANGE_EVERY`-th call otherwise (a steady run's load moves slowly, and on a loaded
2-core gloo machine even a background collective costs ~1% of a step). Only the first call
waits for its own, and a group of one exchanges nothing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from lightning_mpipemoe.moe.cost_model import all_reduce
from lightning_mpipemoe.moe.dispatch import group_size
from lightning_mpipemoe.moe.profiling import ProfileSample

__all__ = ["LoadExchange", "agree_load", "kept_counts", "load_of", "load_packet", "routing_digest"]


def kept_counts(top_k_index_TK: torch.Tensor, num_experts: int, capacity: int | None,
                capacity_group_size: int | None) -> torch.Tensor:
    """Slots each expert keeps on this rank (int64 `[E]`, CPU): `plan_dispatch`'s capacity rule
    (first `capacity` slots per expert in each group of `capacity_group_size` tokens)."""
    index_S = top_k_index_TK.detach().reshape(-1).cpu()
    if capacity is None:
        return torch.bincount(index_S, minlength=num_experts)
    tokens, top_k = top_k_index_TK.shape
    group_tokens = capacity_group_size or max(tokens, 1)
    group_S = torch.arange(index_S.numel()) // top_k // group_tokens
    num_groups = max(-(-tokens // group_tokens), 1)
    per_group = torch.bincount(group_S * num_experts + index_S, minlength=num_groups * num_experts)
    per_group = per_group.view(num_groups, num_experts)
    return per_group.clamp(max=capacity).sum(0)


def load_packet(top_k_index_TK: torch.Tensor, num_experts: int, ep_group: ProcessGroup | None,
                capacity: int | None = None, capacity_group_size: int | None = None) -> torch.Tensor:
    """This rank's share of the load vector (int64 `[E + 2P]`): per-expert kept counts, and its
    sent rows and tokens in its own slots; summed over the EP group it gives `load_of`."""
    ep_size = group_size(ep_group)
    counts_E = kept_counts(top_k_index_TK, num_experts, capacity, capacity_group_size)
    rank = dist.get_rank(ep_group) if ep_size > 1 else 0
    packet = torch.zeros(num_experts + 2 * ep_size, dtype=torch.int64)
    packet[:num_experts] = counts_E
    packet[num_experts + rank] = counts_E.sum()
    packet[num_experts + ep_size + rank] = top_k_index_TK.shape[0]
    return packet


def load_of(summed: torch.Tensor, num_experts: int, ep_size: int) -> tuple[int, int]:
    """(key, tokens) from the summed packet: the busiest rank's rows `max_r max(sent, received)`
    and the most tokens on a rank."""
    received_R = summed[:num_experts].view(ep_size, -1).sum(1)
    sent_R = summed[num_experts : num_experts + ep_size]
    return int(torch.maximum(received_R, sent_R).max()), int(summed[num_experts + ep_size :].max())


def agree_load(top_k_index_TK: torch.Tensor, num_experts: int, ep_group: ProcessGroup | None,
               capacity: int | None = None, capacity_group_size: int | None = None) -> tuple[int, int]:
    """(key, tokens) identical on every rank, now: one all-reduce (sum) over `ep_group`."""
    packet = load_packet(top_k_index_TK, num_experts, ep_group, capacity, capacity_group_size)
    return load_of(all_reduce(packet, ep_group), num_experts, group_size(ep_group))


class LoadExchange:
    """One call's load packet in an all-reduce (sum), synchronous or in flight; its call's
    sample learns its key when it completes. `extra` slots ride along (summed too)."""

    def __init__(self, packet: torch.Tensor, group: ProcessGroup | None, num_experts: int, wait: bool,
                 extra: tuple[int, ...] = ()) -> None:
        self._num_experts, self._ep_size, self._extra = num_experts, group_size(group), len(extra)
        self._work, self._key = None, None
        self.sample: ProfileSample | None = None
        if extra:
            packet = torch.cat([packet, torch.tensor(extra, dtype=torch.int64)])
        if self._ep_size == 1:
            self._summed = packet
            return
        if dist.get_backend(group) == "nccl":
            packet = packet.to(torch.device("cuda", torch.cuda.current_device()))
        self._summed = packet
        self._work = dist.all_reduce(packet, group=group, async_op=not wait)
        if wait:
            self._work = None

    def key(self) -> int:
        if self._key is None:
            if self._work is not None:
                self._work.wait()
                self._work = None
            self._summed = self._summed.cpu()
            self._key = load_of(self._summed[: len(self._summed) - self._extra], self._num_experts, self._ep_size)[0]
        return self._key

    def extra(self) -> list[int]:
        self.key()
        return self._summed[len(self._summed) - self._extra :].tolist()


def routing_digest(top_k_index_TK: torch.Tensor) -> tuple:
    """A cheap fingerprint of a call's routing, to recognise its recomputation (which routes
    identically) on this rank."""
    flat = top_k_index_TK.detach().reshape(-1)
    if not flat.numel():
        return tuple(top_k_index_TK.shape), 0
    mult = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.int64) * 2654435761 % 2147483647
    return tuple(top_k_index_TK.shape), int((flat * mult).sum())
