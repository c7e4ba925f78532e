"""Checkpoints of `MPipeMoEStrategy(sharding="fsdp")` with `torch.distributed.checkpoint`.

Layout of a checkpoint `path` (a directory)::

    meta.pt        Lightning's checkpoint without the model and optimizer states (epoch,
                   loops, callbacks, schedulers, ...) and the executors' state; global rank 0
    .metadata      DCP's index of every tensor's global shape and chunks
    __<rank>_0.distcp   each rank's own shards (DCP's FileSystemWriter), nothing gathered

Model and optimizer state come from `get_state_dict` (sharded: DTensors keyed by parameter
name). FSDP describes an expert parameter over the expert-data-parallel ranks only, as an
`[E/ep, ...]` tensor; every EP rank holds a different one under the same name, which DCP
would take for replicas. So before saving (and before loading) each expert tensor (weights
and its optimizer moments) is re-described as the global `[E, ...]` tensor it is part of:
a DTensor over the whole `(ep, expert_dp)` mesh with placements (Shard(0), Shard(0)), the
same local shard (`fsdp.py` explains why that is the layout). DCP's planner then reshards on
load: another world size, another EP size, another expert-dp size.

The save goes to a temporary directory, renamed into place once every rank has written
(`atomic_dir.py`): a save killed half-way leaves the previous checkpoint at `path` intact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor, Shard

from lightning_mpipemoe.atomic_dir import commit_directory, prepare_temporary_directory
from lightning_mpipemoe.checkpointing import SECTION, checkpoint_barrier

__all__ = ["META_FILE", "load", "save"]

META_FILE = "meta.pt"
_OPTIONS = StateDictOptions(full_state_dict=False)


def _global_experts(state: dict[str, Any], expert_keys: dict[str, int], mesh) -> dict[str, Any]:
    """Expert DTensors (`[E/ep, ...]` over expert_dp) as global `[E, ...]` DTensors over `mesh`."""
    out = dict(state)
    for key, num_experts in expert_keys.items():
        value = out.get(key)
        if isinstance(value, DTensor):
            shape = torch.Size((num_experts, *value.shape[1:]))
            out[key] = DTensor.from_local(
                value.to_local(), mesh, [Shard(0), Shard(0)], run_check=False, shape=shape,
                stride=_contiguous_stride(shape),
            )  # fmt: skip
    return out


def _contiguous_stride(shape: torch.Size) -> tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= size
    return tuple(reversed(stride))


def _local_experts(state: dict[str, Any], like: dict[str, Any], expert_keys: dict[str, int]) -> dict[str, Any]:
    """Back from `_global_experts`: the loaded local shards in FSDP's own DTensors (`like`)."""
    out = dict(state)
    for key in expert_keys:
        value, original = out.get(key), like.get(key)
        if isinstance(value, DTensor) and isinstance(original, DTensor):
            out[key] = DTensor.from_local(
                value.to_local(), original.device_mesh, original.placements, run_check=False,
                shape=original.shape, stride=original.stride(),
            )  # fmt: skip
    return out


def _states(strategy: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(model state, optimizer state, both with global experts) of the strategy's module."""
    module = strategy.lightning_module
    model_sd, optim_sd = get_state_dict(module, strategy.optimizers, options=_OPTIONS)
    keys = strategy._expert_keys
    mesh = strategy._fsdp.expert_mesh
    state = {}
    for key, param_state in optim_sd.get("state", {}).items():
        # Adam's moments are shaped like their parameter: global over the mesh as it is.
        moments = {name: keys[key] for name in param_state} if key in keys else {}
        state[key] = _global_experts(param_state, moments, mesh)
    described = {"model": _global_experts(model_sd, keys, mesh), "optimizer": {**optim_sd, "state": state}}
    return model_sd, optim_sd, described


def save(strategy: Any, checkpoint: dict[str, Any], path: Path) -> None:
    """Collective: every rank writes its shards of model and optimizer state (DCP), rank 0
    the rest of Lightning's checkpoint; all into a temporary directory renamed on success."""
    group = strategy._checkpoint_group
    path, tmp, token = prepare_temporary_directory(
        path, strategy.broadcast, strategy.is_global_zero, lambda: checkpoint_barrier(group, "dcp_checkpoint.save.mkdir")
    )
    _, _, described = _states(strategy)
    dcp.save(described, checkpoint_id=tmp, process_group=group)
    if strategy.is_global_zero:
        meta = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
        meta[SECTION] = {"executor_state": strategy._executor_state(), "expert_keys": dict(strategy._expert_keys)}
        torch.save(meta, tmp / META_FILE)
    checkpoint_barrier(group, "dcp_checkpoint.save.written")
    if strategy.is_global_zero:
        commit_directory(tmp, path, token)
    checkpoint_barrier(group, "dcp_checkpoint.save.committed")


def load(strategy: Any, path: Path) -> dict[str, Any]:
    """Collective: load model and optimizer state into the (sharded) module and optimizers,
    resharding as needed; returns the rest of the checkpoint (for Lightning's loops)."""
    path = Path(strategy.broadcast(str(path)))
    if not (path / META_FILE).is_file() or not (path / ".metadata").is_file():
        raise FileNotFoundError(
            f"{path}: expected a torch.distributed.checkpoint directory with {META_FILE} and .metadata (a checkpoint "
            "saved with sharding='fsdp')"
        )
    meta = torch.load(path / META_FILE, weights_only=False)
    saved = meta.get(SECTION, {}).get("expert_keys", {})
    if saved != strategy._expert_keys:
        raise ValueError(
            f"{path}: the checkpoint's expert parameters {sorted(saved)[:5]} (expert counts {sorted(set(saved.values()))}) "
            f"do not match the model's {sorted(strategy._expert_keys)[:5]}"
        )
    model_sd, optim_sd, described = _states(strategy)
    dcp.load(described, checkpoint_id=path, process_group=strategy._checkpoint_group)
    keys = strategy._expert_keys
    model_sd = _local_experts(described["model"], model_sd, keys)
    state = {
        k: _local_experts(v, optim_sd["state"][k], {name: 0 for name in v} if k in keys else {})
        for k, v in described["optimizer"]["state"].items()
    }
    optim_sd = {**described["optimizer"], "state": state}
    set_state_dict(strategy.lightning_module, strategy.optimizers, model_state_dict=model_sd, optim_state_dict=optim_sd)
    return meta
