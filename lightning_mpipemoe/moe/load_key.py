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
waits for its own, and a group of one exchanges nothing (without capacity its key is its
slot count, known on the host).

Nothing here synchronises the host in a steady call: the packet is built and all-reduced on
the tokens' device (the device the EP group serves), and its sum reaches the host in the
call's one copy of counts (`dispatch.HostRider`), not in a copy of its own.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from lightning_mpipemoe import collectives
from lightning_mpipemoe.moe.dispatch import HostRider, group_size
from lightning_mpipemoe.moe.profiling import ProfileSample

__all__ = ["LoadExchange", "agree_load", "kept_counts", "load_of", "load_packet", "routing_digest"]


def kept_counts(top_k_index_TK: torch.Tensor, num_experts: int, capacity: int | None,
                capacity_group_size: int | None) -> torch.Tensor:
    """Slots each expert keeps on this rank (int64 `[E]`, on the index's device, no sync):
    `plan_dispatch`'s capacity rule (first `capacity` slots per expert in each group of
    `capacity_group_size` tokens). Out-of-range ids count nowhere (`plan_dispatch` raises)."""
    index_S = top_k_index_TK.detach().reshape(-1)
    device = index_S.device
    valid_S = (index_S >= 0) & (index_S < num_experts)
    tokens, top_k = top_k_index_TK.shape
    if capacity is None:
        bins_S = torch.where(valid_S, index_S, num_experts)
        return torch.zeros(num_experts + 1, dtype=torch.int64, device=device).scatter_add_(
            0, bins_S, torch.ones_like(bins_S))[:num_experts]
    group_tokens = capacity_group_size or max(tokens, 1)
    group_S = torch.arange(index_S.numel(), device=device) // top_k // group_tokens
    num_groups = max(-(-tokens // group_tokens), 1)
    bins = num_groups * num_experts
    bins_S = torch.where(valid_S, group_S * num_experts + index_S, bins)
    per_group = torch.zeros(bins + 1, dtype=torch.int64, device=device).scatter_add_(0, bins_S, torch.ones_like(bins_S))
    return per_group[:bins].view(num_groups, num_experts).clamp(max=capacity).sum(0)


def load_packet(top_k_index_TK: torch.Tensor, num_experts: int, ep_group: ProcessGroup | None,
                capacity: int | None = None, capacity_group_size: int | None = None) -> torch.Tensor:
    """This rank's share of the load vector (int64 `[E + 2P]`, on the index's device): per-expert
    kept counts, and its sent rows and tokens in its own slots; summed over the EP group it
    gives `load_of`."""
    ep_size = group_size(ep_group)
    counts_E = kept_counts(top_k_index_TK, num_experts, capacity, capacity_group_size)
    rank = dist.get_rank(ep_group) if ep_size > 1 else 0
    packet = torch.zeros(num_experts + 2 * ep_size, dtype=torch.int64, device=counts_E.device)
    packet[:num_experts] = counts_E
    packet[num_experts + rank] = counts_E.sum()
    packet[num_experts + ep_size + rank] = top_k_index_TK.shape[0]
    return packet


def load_of(summed: torch.Tensor | list[int], num_experts: int, ep_size: int) -> tuple[int, int]:
    """(key, tokens) from the summed packet (host values): the busiest rank's rows
    `max_r max(sent, received)` and the most tokens on a rank."""
    summed = torch.as_tensor(summed, dtype=torch.int64)
    received_R = summed[:num_experts].view(ep_size, -1).sum(1)
    sent_R = summed[num_experts : num_experts + ep_size]
    return int(torch.maximum(received_R, sent_R).max()), int(summed[num_experts + ep_size :].max())


def agree_load(top_k_index_TK: torch.Tensor, num_experts: int, ep_group: ProcessGroup | None,
               capacity: int | None = None, capacity_group_size: int | None = None) -> tuple[int, int]:
    """(key, tokens) identical on every rank, now: one all-reduce (sum) over `ep_group`, one
    copy to the host (a sync: for set-up and benchmarks, not the layer's hot path)."""
    packet = load_packet(top_k_index_TK, num_experts, ep_group, capacity, capacity_group_size)
    if group_size(ep_group) > 1:
        collectives.all_reduce(packet, group=ep_group, site="tuner.agree_load")
    return load_of(packet.to("cpu").tolist(), num_experts, group_size(ep_group))


class LoadExchange:
    """One call's load packet in an all-reduce (sum) on the packet's device, synchronous or in
    flight; its call's sample learns its key when it completes. `extra` slots ride along
    (summed too).

    The summed packet reaches the host in the dispatch plan's one copy (`rider()`, handed to
    `plan_dispatch`); `key()` copies it itself (a sync) only if no plan carried it, which is
    the case for a waited exchange (the first call)."""

    def __init__(self, packet: torch.Tensor, group: ProcessGroup | None, num_experts: int, wait: bool,
                 extra: tuple[int, ...] = ()) -> None:
        self._num_experts, self._ep_size, self._extra = num_experts, group_size(group), len(extra)
        self._work, self._key, self._host = None, None, None
        self.sample: ProfileSample | None = None
        if extra:
            packet = torch.cat([packet, torch.tensor(extra, dtype=torch.int64, device=packet.device)])
        self._summed = packet
        self._rider: HostRider | None = None
        if self._ep_size > 1:
            self._work = collectives.all_reduce(packet, group=group, async_op=not wait, site="tuner.load_exchange")
            if wait:
                self._work = None

    def _wait(self) -> None:
        if self._work is not None:
            self._work.wait()
            self._work = None

    def rider(self) -> HostRider:
        """The summed packet as a rider of the call's one copy to the host."""
        if self._rider is None:
            self._rider = HostRider(self._summed, ready=self._wait)
        return self._rider

    def _host_values(self) -> list[int]:
        if self._host is None:
            if self._rider is not None and self._rider.host is not None:
                self._host = self._rider.host
            else:
                self._wait()
                self._host = self._summed.to("cpu").tolist()
        return self._host

    def key(self) -> int:
        if self._key is None:
            values = self._host_values()
            self._key = load_of(values[: len(values) - self._extra], self._num_experts, self._ep_size)[0]
        return self._key

    def extra(self) -> list[int]:
        values = self._host_values()
        return values[len(values) - self._extra :]


def routing_digest(top_k_index_TK: torch.Tensor) -> tuple[tuple, torch.Tensor]:
    """A cheap fingerprint of a call's routing, to recognise its recomputation (which routes
    identically) on this rank: (shape, int64 `[1]` on the index's device; no sync)."""
    flat = top_k_index_TK.detach().reshape(-1)
    mult = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.int64) * 2654435761 % 2147483647
    return tuple(top_k_index_TK.shape), (flat * mult).sum().view(1)
