"""MoE layer discovery: what the strategy needs from every kind of MoE module.

The strategy handles MoE layers it did not build: this project's `MoELayer`, and Hugging
Face MoE models that `lightning_mpipemoe.hf_models` has an adapter for. A `LayerKind`
answers, for one kind of module, the five questions the strategy asks: is this module
yours, how many experts does it hold (checked against the EP size before any collective),
how to shard its experts over the EP group and bind the executor with a config, which
parameters are expert-sharded (dim 0 is the expert; with the global expert count), and
which executor layers it contains (config, routing stats, executor state for checkpoints).

Two optional hooks on a layer's executor owner (the `MoELayer`, or the Hugging Face
experts module's binding) reach the tuner without the strategy knowing it:
`executor_state_dict()` / `load_executor_state_dict(state)` (saved in and restored from
checkpoints) and `executor_metrics()` (numbers logged every step).

Adding a kind means writing one class and listing it in `KINDS`; the strategy itself does
not change. A kind may also report `packed_expert_parameters(module)`: expert-sharded
parameters that pack their experts into 2-D (peft's LoRA A `[r*E, in]` and B `[out, r*E]` on
fused experts), which checkpoints store unpacked, dim 0 the expert (`unpack_experts`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from lightning_mpipemoe.config import ExecutorConfig, for_placement
from lightning_mpipemoe.groups import MoEProcessGroups
from lightning_mpipemoe.moe import MoELayer, RoutingStats

__all__ = [
    "KINDS",
    "ExecutorView",
    "HFModelKind",
    "LayerKind",
    "MoELayerKind",
    "MoEUnit",
    "PACKED_LAYOUTS",
    "find_moe_units",
    "pack_experts",
    "unpack_experts",
    "load_executor_state",
    "read_executor_metrics",
    "read_executor_state",
]


@dataclass
class ExecutorView:
    """One MoE layer's executor: its config, routing statistics, the object that owns its
    (tuner) state (what `read_executor_state` / `load_executor_state` ask) and its global
    expert count."""

    config: ExecutorConfig
    stats: RoutingStats | None
    owner: Any
    num_experts: int


class LayerKind(Protocol):
    name: str

    def claims(self, module: nn.Module) -> bool:
        """Whether `module` is an MoE unit of this kind (its submodules are not searched further)."""

    def num_experts(self, module: nn.Module) -> list[int]:
        """Global expert counts of the unit's layers, for the EP-size check (may be empty when
        the kind checks divisibility itself, before sharding anything)."""

    def shard(self, module: nn.Module, groups: MoEProcessGroups, overrides: dict[str, Any],
              device_type: str | None = None) -> None:
        """Keep this EP rank's experts (the others are freed), bind the executor, apply the
        config `overrides` (ExecutorConfig field -> value) and `config.for_placement` on
        `device_type` (the device the layer will run on). Sharded before for the same EP
        layout (an earlier run), it only rebinds."""

    def expert_parameters(self, module: nn.Module) -> dict[str, int]:
        """Parameter name (relative to the unit) -> global expert count, for every expert-sharded
        parameter."""

    def executors(self, module: nn.Module) -> dict[str, ExecutorView]:
        """Layer name (relative to the unit, "" for the unit itself) -> its executor."""

    def to_unconverted(self, module: nn.Module, full_state_dict: dict) -> dict:
        """A consolidated (full-expert) state dict of the unit, keyed like the module before
        `shard` (what an unsharded copy of the model loads)."""


#: How a packed expert tensor holds its E experts in 2-D (peft's LoRA on fused experts):
#: "rows": `[k*E, in]`, expert-major rows (`lora_A`: `reshape(E, k, in)`);
#: "columns": `[out, k*E]`, expert-minor columns (`lora_B`: `reshape(out, k, E)`).
PACKED_LAYOUTS = ("rows", "columns")


def unpack_experts(packed: torch.Tensor, num_experts: int, layout: str) -> torch.Tensor:
    """A packed `[k*E, in]` / `[out, k*E]` tensor -> `[E, k, in]` / `[E, out, k]`: dim 0 the
    expert, like every other expert-sharded tensor (what checkpoints cut and join)."""
    if layout not in PACKED_LAYOUTS:
        raise ValueError(f"packed expert layout must be one of {PACKED_LAYOUTS}, got {layout!r}")
    dim = 0 if layout == "rows" else 1
    if packed.dim() != 2 or packed.shape[dim] % num_experts:
        raise ValueError(f"a {layout}-packed tensor of shape {tuple(packed.shape)} cannot hold {num_experts} experts")
    if layout == "rows":
        return packed.reshape(num_experts, packed.shape[0] // num_experts, packed.shape[1])
    out, width = packed.shape
    return packed.reshape(out, width // num_experts, num_experts).permute(2, 0, 1).contiguous()


def pack_experts(unpacked: torch.Tensor, layout: str) -> torch.Tensor:
    """The inverse of `unpack_experts`."""
    num_experts, a, b = unpacked.shape
    if layout == "rows":
        return unpacked.reshape(num_experts * a, b)
    return unpacked.permute(1, 2, 0).reshape(a, b * num_experts)


def _with_overrides(config: ExecutorConfig, overrides: dict[str, Any], ep_size: int,
                    device_type: str | None) -> ExecutorConfig:
    return for_placement(dataclasses.replace(config, **overrides) if overrides else config, ep_size, device_type)


class MoELayerKind:
    """This project's standalone `MoELayer`."""

    name = "mpipemoe_layer"

    def claims(self, module: nn.Module) -> bool:
        return isinstance(module, MoELayer)

    def num_experts(self, module: MoELayer) -> list[int]:
        return [module.num_experts]

    def shard(self, module: MoELayer, groups: MoEProcessGroups, overrides: dict[str, Any],
              device_type: str | None = None) -> None:
        held = module.groups
        if module.num_local_experts == module.num_experts and held.ep_size == 1:
            module.shard_experts(groups)
        elif (held.ep_size, held.ep_rank) == (groups.ep_size, groups.ep_rank):
            module.groups = groups  # sharded before for the same layout (an earlier run): rebind
        else:
            raise RuntimeError(
                f"MoELayer is already sharded for EP rank {held.ep_rank}/{held.ep_size}, not for "
                f"{groups.ep_rank}/{groups.ep_size}; let the strategy shard it (do not call shard_experts yourself)"
            )
        module.config = _with_overrides(module.config, overrides, groups.ep_size, device_type)

    def expert_parameters(self, module: MoELayer) -> dict[str, int]:
        expert_ids = {id(p) for p in module.expert_parameters()}
        return {name: module.num_experts for name, p in module.named_parameters() if id(p) in expert_ids}

    def executors(self, module: MoELayer) -> dict[str, ExecutorView]:
        return {"": ExecutorView(module.config, module.stats, module, module.num_experts)}

    def to_unconverted(self, module: MoELayer, full_state_dict: dict) -> dict:
        return dict(full_state_dict)


class HFModelKind:
    """A Hugging Face `PreTrainedModel` whose family `lightning_mpipemoe.hf_models` covers.

    Dense models are not claimed; an MoE model of a family without an adapter is an error
    (training it as plain DDP would all-reduce and replicate every expert silently).
    """

    name = "hf_model"

    def claims(self, module: nn.Module) -> bool:
        from transformers import PreTrainedModel

        from lightning_mpipemoe.hf_models.api import UnsupportedModelError, adapter_for

        if not isinstance(module, PreTrainedModel):
            return False
        try:
            adapter_for(module)
        except UnsupportedModelError:
            if _looks_like_moe(module):
                raise
            return False
        return True

    def num_experts(self, module: nn.Module) -> list[int]:
        # The adapters check divisibility per layer before sharding anything (ExecutorBinding).
        return []

    def shard(self, module: nn.Module, groups: MoEProcessGroups, overrides: dict[str, Any],
              device_type: str | None = None) -> None:
        from lightning_mpipemoe.hf_models.api import convert_model

        views = self.executors(module)
        base = next(iter(views.values())).config if views else ExecutorConfig()
        convert_model(module, groups, _with_overrides(base, overrides, groups.ep_size, device_type))

    def expert_parameters(self, module: nn.Module) -> dict[str, int]:
        from lightning_mpipemoe.hf_models.api import sharded_expert_keys

        params = dict(module.named_parameters())
        keys = sharded_expert_keys(module)
        missing = sorted(set(keys) - set(params))
        if missing:
            raise RuntimeError(f"hf_models reported expert keys that are not parameters of the model: {missing[:5]}")
        return keys

    def packed_expert_parameters(self, module: nn.Module) -> dict[str, tuple[int, str]]:
        from lightning_mpipemoe.hf_models.api import packed_expert_keys

        return packed_expert_keys(module)

    def executors(self, module: nn.Module) -> dict[str, ExecutorView]:
        from lightning_mpipemoe.hf_models.experts_interface import BINDING_ATTR

        views = {}
        for name, sub in module.named_modules():
            binding = getattr(sub, BINDING_ATTR, None)
            if binding is not None:
                views[name] = ExecutorView(binding.config, binding.stats, binding, binding.num_experts)
        return views

    def to_unconverted(self, module: nn.Module, full_state_dict: dict) -> dict:
        from lightning_mpipemoe.hf_models.api import to_hf_state_dict

        return to_hf_state_dict(module, full_state_dict)


def _looks_like_moe(model: nn.Module) -> bool:
    from lightning_mpipemoe.hf_models.experts_interface import is_hf_experts_module

    config = getattr(model, "config", None)
    if any(getattr(config, attr, None) for attr in ("num_local_experts", "num_experts", "n_routed_experts")):
        return True
    return any(is_hf_experts_module(m) for m in model.modules())


#: Kinds in the order they are tried on each module.
KINDS: tuple[LayerKind, ...] = (MoELayerKind(), HFModelKind())


@dataclass
class MoEUnit:
    """A module the strategy manages: `name` is its qualified name in the LightningModule."""

    name: str
    module: nn.Module
    kind: LayerKind

    def qualify(self, relative: str) -> str:
        return ".".join(part for part in (self.name, relative) if part)

    def expert_parameters(self) -> dict[str, int]:
        return {self.qualify(name): count for name, count in self.kind.expert_parameters(self.module).items()}

    def executors(self) -> dict[str, ExecutorView]:
        return {self.qualify(name): view for name, view in self.kind.executors(self.module).items()}

    def packed_expert_parameters(self) -> dict[str, tuple[int, str]]:
        """The subset of `expert_parameters` that pack their experts into 2-D (peft's LoRA on
        fused experts) -> (global expert count, layout): a kind's optional
        `packed_expert_parameters`."""
        read = getattr(self.kind, "packed_expert_parameters", None)
        found = read(self.module) if callable(read) else {}
        return {self.qualify(name): spec for name, spec in found.items()}


def find_moe_units(root: nn.Module, kinds: tuple[LayerKind, ...] = KINDS) -> list[MoEUnit]:
    """Every outermost module of `root` that one of `kinds` claims, in `named_modules` order."""
    units: list[MoEUnit] = []

    def inside_unit(name: str) -> bool:
        return any(u.name == "" or name == u.name or name.startswith(f"{u.name}.") for u in units)

    for name, module in root.named_modules():
        if inside_unit(name):
            continue
        for kind in kinds:
            if kind.claims(module):
                units.append(MoEUnit(name, module, kind))
                break
    return units


def read_executor_metrics(view: ExecutorView) -> dict[str, float]:
    """Numbers the executor reports about itself (e.g. the tuner's chosen n and strategy)."""
    read = getattr(view.owner, "executor_metrics", None)
    metrics = read() if callable(read) else {}
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def read_executor_state(view: ExecutorView) -> dict:
    """The executor's persistable state (e.g. tuner decisions); {} for executors without any."""
    read = getattr(view.owner, "executor_state_dict", None)
    return dict(read()) if callable(read) else {}


def load_executor_state(view: ExecutorView, state: dict, layer_name: str) -> None:
    """Give a layer back what `read_executor_state` saved; a clear error if it cannot take it."""
    load = getattr(view.owner, "load_executor_state_dict", None)
    if callable(load):
        load(dict(state))
    elif state:
        raise RuntimeError(
            f"the checkpoint holds executor state for MoE layer {layer_name!r} ({sorted(state)}), but the layer "
            "has no load_executor_state_dict() to restore it"
        )
