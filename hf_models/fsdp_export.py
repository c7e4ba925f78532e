"""Hugging Face export of a model trained with `MPipeMoEStrategy(sharding="fsdp")`: every rank
writes what it owns, nobody holds the model.

Under FSDP2 a parameter is a DTensor: a dense one is sharded over the whole world on dim 0, an
expert one (`[E/ep, ...]` on each EP rank) over the expert-data-parallel ranks on dim 0, so a
rank holds `E / (ep * expert_dp)` whole experts (torch.chunk's split when uneven). A safetensors
file must hold each tensor whole, so:

- experts (in a checkpoint format that stores one tensor per expert, as transformers' own
  `revert_weight_conversion` writes them): each rank writes its own experts, renumbered to
  their global index `ep_rank * E/ep + (first expert of its expert-dp chunk) + i`;
- dense tensors: each is given to one owner rank (greedy by bytes, the same on every rank);
  the tensor is gathered (`DTensor.full_tensor`, collective over the world) one at a time, in
  one global order, while the owners stream their files, and freed right after it is written.

Every rank writes one file, `model-rank00002-of-00004.safetensors`; `sharded_export` writes the
config and the index around it. Peak memory of a rank: its own shards, plus one gathered
tensor (the largest at most) and its conversion, plus a fixed overhead.

Formats that keep the experts fused (`save_original_format=False`, or a family whose saved
checkpoint stores `[E, ...]` tensors) are refused here: they would need an expert tensor
gathered across both meshes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel
from transformers.modeling_utils import remove_tied_weights_from_state_dict

from lightning_mpipemoe.groups import MoEProcessGroups

__all__ = ["expert_offset", "has_dtensors", "rank_file", "write_rank_file"]


def rank_file(rank: int, world: int) -> str:
    return f"model-rank{rank:05d}-of-{world:05d}.safetensors"


def has_dtensors(state: Mapping[str, torch.Tensor]) -> bool:
    return any(isinstance(v, DTensor) for v in state.values())


def _local(value: torch.Tensor) -> torch.Tensor:
    return value.to_local() if isinstance(value, DTensor) else value


def expert_offset(value: torch.Tensor, groups: MoEProcessGroups) -> int:
    """Global index of this rank's first expert of the expert parameter `value` (a DTensor
    `[E/ep, ...]` sharded on dim 0 over expert_dp, or a plain `[E/ep, ...]` tensor)."""
    per_ep = int(value.shape[0])
    offset = groups.ep_rank * per_ep
    if not isinstance(value, DTensor):
        return offset
    chunk = -(-per_ep // groups.expert_dp_size)  # torch.chunk: ceil(n / parts), the last ones short or empty
    start = min(groups.expert_dp_rank * chunk, per_ep)
    local = int(value.to_local().shape[0])
    if local != min(chunk, per_ep - start):
        raise RuntimeError(
            f"expert shard of {local} experts on expert-dp rank {groups.expert_dp_rank} of {groups.expert_dp_size} "
            f"does not match a dim-0 chunk of {per_ep} experts (placements {value.placements})"
        )
    return offset + start


def _owners(sizes: Mapping[str, int], world: int) -> dict[str, int]:
    """Each key's owner rank: the largest tensors first, each to the least loaded rank."""
    load = [0] * world
    owner = {}
    for key in sorted(sizes, key=lambda k: (-sizes[k], k)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owner[key] = rank
        load[rank] += sizes[key]
    return owner


class _Gatherer:
    """Gathers the dense DTensors one at a time in one global order (the same on every rank);
    a rank asking for key k first takes part in the gathers of the keys before it."""

    def __init__(self, order: list[str], state: Mapping[str, torch.Tensor]) -> None:
        self.order, self.state, self.done = order, state, 0

    def _gather(self, key: str) -> torch.Tensor:
        value = self.state[key]
        return value.full_tensor() if isinstance(value, DTensor) else value

    def get(self, key: str) -> torch.Tensor:
        while self.order[self.done] != key:
            self._gather(self.order[self.done])  # someone else's: gathered and dropped
            self.done += 1
        self.done += 1
        return self._gather(key)

    def finish(self) -> None:
        while self.done < len(self.order):
            self._gather(self.order[self.done])
            self.done += 1


def write_rank_file(
    tmp: Path,
    converter,
    local: Mapping[str, torch.Tensor],
    sharded: Mapping[str, int],
    groups: MoEProcessGroups,
    skeleton: PreTrainedModel,
) -> tuple[list[str], dict[str, str], int]:
    """Collective over the world: write this rank's file into `tmp` (its experts, the dense
    tensors it owns). Returns (files written, weight map, bytes of tensor data)."""
    from .sharded_export import write_safetensors

    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    expert_groups = []
    for key in sorted(sharded):
        value = local[key]
        group = converter.expert_group(key, _local(value), expert_offset(value, groups))
        if group is None:
            raise ValueError(
                f"export of a sharding='fsdp' model: {key!r} is saved as one fused [E, ...] tensor "
                "(save_original_format=False or the family's checkpoint format); only per-expert formats are exported"
            )
        expert_groups.append(group)
    dense = {k: v for k, v in local.items() if k not in sharded}
    kept = remove_tied_weights_from_state_dict({k: _local(v) for k, v in dense.items()}, skeleton)
    order = [k for k in dense if k in kept]
    sizes = {k: dense[k].numel() * dense[k].element_size() for k in order}
    owner = _owners(sizes, world)
    gatherer = _Gatherer(order, dense)
    dense_groups = []
    for key in order:
        if owner[key] == rank:
            declared, _ = converter.dense_group(
                key, torch.empty(dense[key].shape, dtype=dense[key].dtype, device="meta")
            )
            dense_groups.append((declared, lambda key=key: converter.revert({key: gatherer.get(key)})))
    name = rank_file(rank, world)
    groups_out = expert_groups + dense_groups
    total = write_safetensors(tmp / name, groups_out) if groups_out else 0
    gatherer.finish()
    if not groups_out:
        return [], {}, 0
    weight_map = dict.fromkeys((n for declared, _ in groups_out for n in declared), name)
    return [name], weight_map, total
