"""Generic adapter for every family whose experts use transformers' `@use_experts_implementation`.

Mixtral, Qwen2-MoE (with its shared expert), Qwen3-MoE, OLMoE and the other families with
the standard fused layout keep their own router, shared experts and auxiliary loss; only
the experts call changes. Converting a model:

1. finds the decorated experts modules and checks their layout;
2. shards their parameters to this rank's `L = E / ep` experts (a copy of the slice: the
   other experts' storage is freed, not kept alive by a view);
3. attaches an `ExecutorBinding` (groups, executor config, routing stats) to each;
4. switches the model to the `"mpipemoe"` experts implementation.

State-dict keys stay Hugging Face's (`...experts.gate_up_proj`, now `[L, 2I, H]` per rank),
so consolidation is a concatenation along dim 0 in EP-rank order. peft's LoRA on the fused
experts (`target_parameters`) is sharded with them (`peft_lora.py`).
"""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping

from lightning_mpipemoe.config import ExecutorConfig
from lightning_mpipemoe.groups import MoEProcessGroups
from lightning_mpipemoe.moe import RoutingStats

from .experts_interface import (
    BINDING_ATTR,
    EXPERTS_IMPLEMENTATION,
    ExecutorBinding,
    check_experts_layout,
    is_hf_experts_module,
)
from .peft_lora import expert_lora_keys, shard_expert_lora

__all__ = ["MixtralStyleAdapter", "expert_param_names", "find_experts_modules"]


def find_experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """`(qualified name, module)` of every `@use_experts_implementation` experts module."""
    return [(name, module) for name, module in model.named_modules() if is_hf_experts_module(module)]


def expert_param_names(module: nn.Module) -> list[str]:
    """The expert-sharded parameters of one experts module (dim 0 is the expert)."""
    names = ["gate_up_proj" if module.has_gate else "up_proj", "down_proj"]
    if module.has_bias:
        names += ["gate_up_proj_bias" if module.has_gate else "up_proj_bias", "down_proj_bias"]
    return names


def _shard_dim0(module: nn.Module, param_name: str, start: int, end: int) -> None:
    """Replace `param_name` by a fresh parameter holding rows `start:end` (works on meta too)."""
    old = module._parameters[param_name]
    local = old.detach()[start:end].clone()
    module._parameters[param_name] = nn.Parameter(local, requires_grad=old.requires_grad)


class MixtralStyleAdapter:
    """One adapter for all families with HF's standard fused experts layout."""

    name = "mixtral_style"

    def convert(
        self,
        model: nn.Module,
        groups: MoEProcessGroups,
        config: ExecutorConfig,
        track_stats: bool = True,
    ) -> nn.Module:
        found = find_experts_modules(model)
        if not found:
            raise ValueError(
                f"{type(model).__name__} has no experts module decorated with transformers' "
                "@use_experts_implementation; nothing to run on the mpipemoe executor"
            )
        for name, module in found:
            check_experts_layout(module, name)
        for name, module in found:
            previous = getattr(module, BINDING_ATTR, None)
            if previous is not None:
                num_experts = previous.num_experts
                if (previous.groups.ep_size, previous.groups.ep_rank) != (groups.ep_size, groups.ep_rank):
                    raise ValueError(
                        f"experts module {name!r} is already sharded for EP rank {previous.groups.ep_rank}/"
                        f"{previous.groups.ep_size}; cannot re-shard it for {groups.ep_rank}/{groups.ep_size}"
                    )
            else:
                num_experts = module.num_experts
            binding = ExecutorBinding(
                num_experts=num_experts,
                groups=groups,
                config=config,
                stats=RoutingStats() if track_stats else None,
            )
            if previous is None and groups.ep_size > 1:
                start, end = binding.local_range
                for param_name in expert_param_names(module):
                    _shard_dim0(module, param_name, start, end)
                shard_expert_lora(model, module, num_experts, start, end)  # peft's target_parameters LoRA
                # HF's own convention after expert sharding (see transformers' MoEParamShard): the
                # module counts its local experts; the binding keeps the global count.
                module.num_experts = binding.num_local_experts
                module._is_expert_parallel = True
            setattr(module, BINDING_ATTR, binding)
        _set_implementation(model, found)
        return model

    def sharded_keys(self, model: nn.Module) -> dict[str, int]:
        """State-dict key -> global expert count, for every expert-sharded parameter."""
        keys = {}
        for name, module in find_experts_modules(model):
            binding = getattr(module, BINDING_ATTR, None)
            num_experts = binding.num_experts if binding is not None else module.num_experts
            for param_name in expert_param_names(module):
                keys[f"{name}.{param_name}" if name else param_name] = num_experts
            keys.update({key: count for key, (count, _) in expert_lora_keys(model, module, num_experts).items()})
        return keys

    def packed_expert_keys(self, model: nn.Module) -> dict[str, tuple[int, str]]:
        """The expert-sharded keys that pack their experts into 2-D (peft's LoRA on the fused
        experts, `peft_lora.py`) -> (global expert count, layout of `discovery.unpack_experts`)."""
        keys = {}
        for name, module in find_experts_modules(model):
            binding = getattr(module, BINDING_ATTR, None)
            num_experts = binding.num_experts if binding is not None else module.num_experts
            keys.update(expert_lora_keys(model, module, num_experts))
        return keys

    def to_hf_state_dict(self, model: nn.Module, state_dict: dict) -> dict:
        """Converted keys are already HF's fused keys."""
        return dict(state_dict)

    def checkpoint_transforms(self, model: nn.Module) -> list:
        """HF's own checkpoint-key conversions for the model (per-expert `experts.{i}.w1` -> fused)."""
        if not isinstance(model, PreTrainedModel):
            return []
        return list(get_model_conversion_mapping(model))


def _set_implementation(model: nn.Module, found: list[tuple[str, nn.Module]]) -> None:
    # The outermost transformers model (the model itself, or the one inside a wrapper such as PEFT's).
    top = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if top is not None:
        top.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    stale = [name for name, module in found if module.config._experts_implementation != EXPERTS_IMPLEMENTATION]
    if stale:
        raise RuntimeError(
            f"set_experts_implementation({EXPERTS_IMPLEMENTATION!r}) did not reach the experts modules {stale}; "
            "their config is not the model's (or a sub-model's) config"
        )
