"""The checkpoint methods of `MPipeMoEStrategy`: what a Lightning checkpoint holds when each
rank holds only its experts.

DDP sharding: one directory per checkpoint, written atomically, with the dense state and one
shard file per EP rank (`checkpointing.py`), name-keyed optimizer state (so that a resume at
another EP size can cut and join the experts' rows), and the executors' tuned state. FSDP
sharding: torch.distributed.checkpoint (`dcp_checkpoint.py`). A mixin, so that the strategy
module keeps to the run's set-up and steps; it reads the strategy's attributes (`_groups`,
`_expert_keys`, `_packed_keys`, `_units`, `_fsdp`, `_sharding`, `_checkpoint_group`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.utilities.optimizer import _optimizer_to_device
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_mpipemoe import dcp_checkpoint, fsdp
from lightning_mpipemoe.atomic_dir import commit_directory, prepare_temporary_directory
from lightning_mpipemoe.checkpointing import (
    META_FILE,
    SECTION,
    checkpoint_barrier,
    gather_full_state_dict,
    optimizer_state_by_index,
    optimizer_state_by_name,
    read_checkpoint,
    record_files,
    shard_file,
    split_checkpoint,
)
from lightning_mpipemoe.discovery import load_executor_state, pack_experts, read_executor_state, unpack_experts

__all__ = ["ExpertCheckpointMethods"]


class ExpertCheckpointMethods:
    """Checkpoint save / load / consolidation for a strategy whose ranks hold expert shards
    (mixed into `MPipeMoEStrategy`, before `DDPStrategy`)."""

    def _param_names(self) -> dict[int, str]:
        assert self.lightning_module is not None
        return {id(p): name for name, p in self.lightning_module.named_parameters()}

    def _relayout(self, state: dict[str, Any], to_checkpoint: bool) -> dict[str, Any]:
        """Packed expert tensors (peft's LoRA A `[r*L, in]`, B `[out, r*L]` on fused experts) to
        the unpacked form checkpoints hold (`[L, r, in]`, `[L, out, r]`: dim 0 the expert, so
        that the checkpoint code cuts and joins them like any expert shard), or back."""
        if not self._packed_keys:
            return state
        ep = self.moe_groups.ep_size
        out = dict(state)
        for key, (num_experts, layout) in self._packed_keys.items():
            if key in out:
                value = out[key]
                out[key] = (
                    unpack_experts(value, num_experts // ep, layout) if to_checkpoint else pack_experts(value, layout)
                )
        return out

    @property
    @override
    def lightning_restore_optimizer(self) -> bool:
        return self._fsdp is None  # FSDP: restored with the model in `load_checkpoint` (DCP)

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        if self._fsdp is not None:
            return {}  # saved by DCP from the sharded module (`dcp_checkpoint.save`)
        return self._relayout(super().lightning_module_state_dict(), to_checkpoint=True)

    def _relayout_optimizer(self, named: dict[str, Any], to_checkpoint: bool) -> dict[str, Any]:
        if not self._packed_keys:
            return named
        shapes = {name: tuple(p.shape) for name, p in self.lightning_module.named_parameters()}
        state = dict(named["state"])
        for key in self._packed_keys.keys() & state.keys():
            param_state = dict(state[key])
            for name, value in param_state.items():
                # Tensors shaped like the parameter (Adam's moments) move with it; scalars stay.
                if not isinstance(value, Tensor):
                    continue
                if (tuple(value.shape) == shapes[key]) if to_checkpoint else value.dim() == 3:
                    param_state[name] = self._relayout({key: value}, to_checkpoint)[key]
            state[key] = param_state
        return {**named, "state": state}

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """Name-keyed optimizer state (`checkpointing.optimizer_state_by_name`)."""
        if self._fsdp is not None:
            return {}  # saved by DCP (`dcp_checkpoint.save`)
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        return self._relayout_optimizer(optimizer_state_by_name(optimizer, self._param_names()), to_checkpoint=True)

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        names = self._param_names()
        for optimizer, named in zip(self.optimizers, checkpoint["optimizer_states"]):
            named = self._relayout_optimizer(named, to_checkpoint=False)
            optimizer.load_state_dict(optimizer_state_by_index(named, optimizer, names))
            _optimizer_to_device(optimizer, self.root_device)

    def _executor_state(self) -> dict[str, dict]:
        return {name: read_executor_state(view) for name, view in self.moe_executors.items()}

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Optional[Any] = None
    ) -> None:
        """Collective: the checkpoint directory (`checkpointing.py`), written atomically."""
        if storage_options is not None:
            raise TypeError("MPipeMoEStrategy.save_checkpoint does not take storage_options")
        if self._fsdp is not None:
            return dcp_checkpoint.save(self, checkpoint, Path(filepath))
        if self._groups is None:
            raise RuntimeError(
                "MPipeMoEStrategy saves checkpoints from the training processes (e.g. ModelCheckpoint or a callback); "
                "this process never set the strategy up (the main process of a spawn run holds the consolidated "
                "weights only: trainer.lightning_module.state_dict())"
            )
        groups = self.moe_groups
        path, tmp, token = prepare_temporary_directory(
            filepath, self.broadcast, self.is_global_zero,
            lambda: checkpoint_barrier(self._checkpoint_group, "strategy.save_checkpoint.mkdir"),
        )  # fmt: skip
        meta, shard = split_checkpoint(
            checkpoint, self._expert_keys, groups.ep_size, self.world_size, self._executor_state()
        )
        written = []
        if self.is_global_zero:
            self.checkpoint_io.save_checkpoint(meta, tmp / META_FILE)
            written.append(META_FILE)
        if groups.expert_dp_rank == 0:
            name = shard_file(groups.ep_rank, groups.ep_size)
            self.checkpoint_io.save_checkpoint(shard, tmp / name)
            written.append(name)
        record_files(tmp, written)  # size + SHA-256 beside each file, then fsync
        checkpoint_barrier(self._checkpoint_group, "strategy.save_checkpoint.written")
        if self.is_global_zero:
            commit_directory(tmp, path, token)
        checkpoint_barrier(self._checkpoint_group, "strategy.save_checkpoint.committed")

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: Optional[bool] = None) -> dict[str, Any]:
        if self._fsdp is not None:  # loads model and optimizer state here (DCP), returns the rest
            return dcp_checkpoint.load(self, Path(checkpoint_path))
        path = Path(self.broadcast(str(checkpoint_path)))
        groups = self.moe_groups
        checkpoint = read_checkpoint(path, groups.ep_size, groups.ep_rank, self.checkpoint_io, weights_only)
        saved = checkpoint[SECTION]["expert_keys"]
        if saved != self._expert_keys:
            differ = sorted(k for k in set(saved) | set(self._expert_keys) if saved.get(k) != self._expert_keys.get(k))
            raise ValueError(
                f"{path}: the checkpoint's expert parameters do not match the model's (key: checkpoint experts vs "
                f"model experts): {[(k, saved.get(k), self._expert_keys.get(k)) for k in differ[:5]]}"
            )
        return checkpoint

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        if self._packed_keys and self._fsdp is None:
            checkpoint = {**checkpoint, "state_dict": self._relayout(checkpoint["state_dict"], to_checkpoint=False)}
        if self._fsdp is None:  # FSDP: loaded in `load_checkpoint` (DCP)
            super().load_model_state_dict(checkpoint, strict=strict)
        saved = dict(checkpoint.get(SECTION, {}).get("executor_state", {}))
        for name, view in self.moe_executors.items():
            load_executor_state(view, saved.pop(name, {}), name)
        leftover = sorted(name for name, state in saved.items() if state)
        if leftover:
            rank_zero_warn(f"the checkpoint holds executor state for MoE layers the model does not have: {leftover}")

    def consolidated_state_dict(self, unconverted: bool = False) -> dict[str, Tensor] | None:
        """Collective over the EP group: the LightningModule's state dict with every expert, on
        EP rank 0 of each EP group (None elsewhere). `unconverted=True` maps Hugging Face units
        back to their original keys (what an unsharded copy of the module loads)."""
        groups = self.moe_groups
        # FSDP: every DTensor gathered over its mesh first (collective over the world).
        local = fsdp.full_state_dict(self.lightning_module) if self._sharding == "fsdp" else None
        full = gather_full_state_dict(
            self.lightning_module, self._expert_keys, groups, device=self.root_device, local=local
        )
        if full is None:
            return full
        for key, (num_experts, layout) in self._packed_keys.items():  # shards were joined along dim 0: redo
            pieces = [unpack_experts(p, num_experts // groups.ep_size, layout) for p in full[key].chunk(groups.ep_size)]
            full[key] = pack_experts(torch.cat(pieces), layout)
        if not unconverted:
            return full
        for unit in self._units:
            prefix = f"{unit.name}." if unit.name else ""
            inner = {k[len(prefix) :]: full.pop(k) for k in [k for k in full if k.startswith(prefix)]}
            full.update({prefix + k: v for k, v in unit.kind.to_unconverted(unit.module, inner).items()})
        return full
