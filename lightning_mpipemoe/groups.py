"""The process groups of an expert-parallel run, built once and passed explicitly.

Rank layout (world = dp_size x ep_size, EP innermost so that an EP group stays within a
node whenever ep_size divides the devices of one node):

    ep group        ranks {d*ep + 0, ..., d*ep + ep-1}   hold disjoint expert shards
    expert-dp group ranks {j, j+ep, j+2ep, ...}           hold the same expert shard
    dp group        every rank                            replicated (non-expert) parameters

Every group is created with a timeout, so a dead or diverged peer ends in an error instead
of a hang.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from lightning_mpipemoe import collectives

__all__ = ["DEFAULT_TIMEOUT", "MoEProcessGroups", "build_process_groups", "check_parallel_sizes", "warm_up_groups"]

DEFAULT_TIMEOUT = timedelta(minutes=5)


def check_parallel_sizes(world_size: int, expert_parallel_size: int, num_experts: int | None = None) -> None:
    """Raise a ValueError naming the bad value; call before any collective."""
    if not isinstance(expert_parallel_size, int) or isinstance(expert_parallel_size, bool) or expert_parallel_size < 1:
        raise ValueError(f"expert_parallel_size must be a positive int, got {expert_parallel_size!r}")
    if world_size % expert_parallel_size != 0:
        divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
        raise ValueError(
            f"expert_parallel_size={expert_parallel_size} does not divide the world size {world_size}; "
            f"valid sizes: {divisors}"
        )
    if num_experts is not None and num_experts % expert_parallel_size != 0:
        divisors = [d for d in range(1, num_experts + 1) if num_experts % d == 0 and world_size % d == 0]
        raise ValueError(
            f"expert_parallel_size={expert_parallel_size} does not divide the number of experts {num_experts}; "
            f"valid sizes for this world: {divisors}"
        )


@dataclass(frozen=True)
class MoEProcessGroups:
    """The groups one rank belongs to. `None` groups mean a single-process run.

    `ep_combine` spans the same ranks as `ep`: a second communicator, so that the combine
    all-to-all of one micro-partition can run while the dispatch of the next is in flight.
    """

    ep: ProcessGroup | None
    ep_combine: ProcessGroup | None
    expert_dp: ProcessGroup | None
    dp: ProcessGroup | None
    ep_size: int
    ep_rank: int
    expert_dp_size: int
    expert_dp_rank: int
    timeout: timedelta = DEFAULT_TIMEOUT

    @classmethod
    def local(cls) -> "MoEProcessGroups":
        """Single process: every expert is local, nothing is communicated."""
        return cls(None, None, None, None, ep_size=1, ep_rank=0, expert_dp_size=1, expert_dp_rank=0)

    @property
    def world_size(self) -> int:
        return self.ep_size * self.expert_dp_size


def build_process_groups(expert_parallel_size: int, *, timeout: timedelta = DEFAULT_TIMEOUT,
                         backend: str | None = None) -> MoEProcessGroups:
    """Create the ep / ep-combine / expert-dp / dp groups on an initialised default group.

    Every rank must call this with the same arguments (group creation is collective).
    `backend` is `torch.distributed.new_group`'s: None takes the default group's (NCCL under
    Lightning on GPUs, which serves CUDA tensors only: every collective of the package runs on
    the tokens' device, see `collectives.py`); "cpu:gloo,cuda:nccl" serves both, for a
    process that truly needs host tensors on these groups.
    """
    if not dist.is_available() or not dist.is_initialized():
        check_parallel_sizes(1, expert_parallel_size)
        if expert_parallel_size != 1:
            raise ValueError(
                f"expert_parallel_size={expert_parallel_size} needs torch.distributed to be initialised; "
                "without it only expert_parallel_size=1 is valid"
            )
        return MoEProcessGroups.local()
    world_size, rank = dist.get_world_size(), dist.get_rank()
    check_parallel_sizes(world_size, expert_parallel_size)
    if not isinstance(timeout, timedelta):
        raise TypeError(f"timeout must be a datetime.timedelta, got {timeout!r}")
    ep = expert_parallel_size
    dp_size = world_size // ep
    mine: dict[str, ProcessGroup] = {}
    # Group creation is collective over the world: every rank creates every group in order.
    for d in range(dp_size):
        ranks = list(range(d * ep, (d + 1) * ep))
        dispatch = dist.new_group(ranks, timeout=timeout, backend=backend)
        combine = dist.new_group(ranks, timeout=timeout, backend=backend)
        if rank in ranks:
            mine["ep"], mine["ep_combine"] = dispatch, combine
    for j in range(ep):
        ranks = list(range(j, world_size, ep))
        group = dist.new_group(ranks, timeout=timeout, backend=backend)
        if rank in ranks:
            mine["expert_dp"] = group
    mine["dp"] = dist.new_group(list(range(world_size)), timeout=timeout, backend=backend)
    return MoEProcessGroups(
        ep=mine["ep"],
        ep_combine=mine["ep_combine"],
        expert_dp=mine["expert_dp"],
        dp=mine["dp"],
        ep_size=ep,
        ep_rank=rank % ep,
        expert_dp_size=dp_size,
        expert_dp_rank=rank // ep,
        timeout=timeout,
    )


def warm_up_groups(groups: MoEProcessGroups, device: torch.device) -> None:
    """One tiny all-reduce on each MoE group at set-up, on `device` (the device the groups
    serve): NCCL creates a communicator lazily at a group's first collective, which would
    otherwise land inside the first pipelined forward (seconds, and a skew between ranks)."""
    for name in ("ep", "ep_combine", "expert_dp", "dp"):
        group = getattr(groups, name)
        if group is not None and dist.get_world_size(group) > 1:
            collectives.all_reduce(torch.zeros(1, device=device), group=group, site=f"strategy.warm_up.{name}")
