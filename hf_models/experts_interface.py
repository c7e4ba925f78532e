"""The "mpipemoe" experts implementation for Hugging Face's `ExpertsInterface`.

Families whose experts module is decorated with transformers' `@use_experts_implementation`
call `experts(hidden [T, H], top_k_index [T, K], top_k_weights [T, K])` and dispatch on
`config._experts_implementation`. Registering `mpipemoe_experts_forward` under
`EXPERTS_IMPLEMENTATION` (done when this module is imported, which `import lightning_mpipemoe`
does) makes `from_pretrained(..., experts_implementation="mpipemoe")` and
`model.set_experts_implementation("mpipemoe")` run the experts on the MoE executor. Routing,
shared experts and the auxiliary loss stay Hugging Face's: only the experts call changes.

What the executor needs beyond HF's arguments (process groups, executor config, routing
stats, the global expert count) travels as an `ExecutorBinding` attached to the experts
module; a module without one runs locally (EP = 1) with the default `ExecutorConfig`, which
still applies partitioning and memory reuse.

Shape legend: T tokens, K top-k, H model dim, L local experts, I expert hidden dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.moe import ExpertsInterface, _default_apply_gate

from lightning_mpipemoe.config import ExecutorConfig
from lightning_mpipemoe.groups import MoEProcessGroups
from lightning_mpipemoe.moe import ExpertWeights, RoutingStats, expert_parallel_forward
from lightning_mpipemoe.moe.tuner import LayerTuner, TunerOwner

__all__ = [
    "BINDING_ATTR",
    "EXPERTS_IMPLEMENTATION",
    "ExecutorBinding",
    "UnsupportedExpertsLayout",
    "check_experts_layout",
    "expert_weights_of",
    "get_binding",
    "is_hf_experts_module",
    "mpipemoe_experts_forward",
    "register_experts_implementation",
]

EXPERTS_IMPLEMENTATION = "mpipemoe"
BINDING_ATTR = "_mpipemoe_binding"
LOCAL_BINDING_ATTR = "_mpipemoe_local_binding"  # the implicit EP = 1 binding of an unconverted module


class UnsupportedExpertsLayout(ValueError):
    """The experts module stores its weights in a layout the executor does not take."""


@dataclass
class ExecutorBinding(TunerOwner):
    """What one experts module runs with: process groups, executor config, routing stats.

    `num_experts` is the global expert count; the module's parameters hold experts
    `groups.ep_rank * L .. groups.ep_rank * L + L - 1` with `L = num_experts / groups.ep_size`.
    Attached as a plain attribute (not a submodule), so it never enters a state dict.
    """

    num_experts: int
    groups: MoEProcessGroups = field(default_factory=MoEProcessGroups.local)
    config: ExecutorConfig = field(default_factory=ExecutorConfig)
    stats: RoutingStats | None = None
    tuner: LayerTuner = field(default_factory=LayerTuner)

    def __post_init__(self) -> None:
        if self.num_experts % self.groups.ep_size:
            raise ValueError(
                f"{self.num_experts} experts cannot be split evenly over an expert-parallel group of "
                f"{self.groups.ep_size}; valid sizes divide {self.num_experts}"
            )

    def __deepcopy__(self, memo) -> "ExecutorBinding":
        # Process groups are shared handles (and cannot be copied); the copy gets its own stats.
        stats = RoutingStats() if self.stats is not None else None
        return ExecutorBinding(self.num_experts, self.groups, self.config, stats)

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.groups.ep_size

    @property
    def local_range(self) -> tuple[int, int]:
        """`[start, end)` of the global experts this rank holds."""
        start = self.groups.ep_rank * self.num_local_experts
        return start, start + self.num_local_experts


def is_hf_experts_module(module: nn.Module) -> bool:
    """Whether `module` is an instance of a class decorated with `@use_experts_implementation`."""
    return all(hasattr(module, name) for name in ("has_gate", "is_transposed", "is_concatenated", "_apply_gate")) and (
        hasattr(module, "_is_expert_parallel")
    )


def check_experts_layout(module: nn.Module, name: str = "") -> None:
    """Raise `UnsupportedExpertsLayout` unless the executor can run `module`'s experts.

    Taken: `gate_up_proj [E, 2I, H]` (or `up_proj [E, I, H]` without gate) and
    `down_proj [E, H, I]`, or both transposed (`[E, H, 2I]`, `[E, I, H]`, e.g. GPT-OSS: the
    executor reads transposed views), optional biases, any `_apply_gate` (interleaved
    gate/up rows come with their own, e.g. GPT-OSS's clamped SwiGLU). Not taken:
    interleaved gate/up rows with the default (chunking) gate, a norm after each expert.
    """
    where = f"{type(module).__name__}{f' at {name!r}' if name else ''}"
    if not module.is_concatenated and type(module)._apply_gate is _default_apply_gate:
        raise UnsupportedExpertsLayout(
            f"{where} interleaves gate and up rows but uses the default gate; the mpipemoe executor "
            "takes concatenated [gate; up] rows, or interleaved ones with the module's own _apply_gate"
        )
    if getattr(module, "has_post_expert_norm", False):
        raise UnsupportedExpertsLayout(f"{where} applies a norm after each expert, which the mpipemoe executor lacks")
    input_name = "gate_up_proj" if module.has_gate else "up_proj"
    layout = "[E, in, out]" if module.is_transposed else "[E, out, in]"
    for param in (input_name, "down_proj"):
        weight = getattr(module, param, None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 3:
            raise UnsupportedExpertsLayout(f"{where} has no 3-D {param!r} parameter {layout}")


def get_binding(module: nn.Module) -> ExecutorBinding:
    """The module's binding, or a local (EP = 1) one with the default config."""
    binding = getattr(module, BINDING_ATTR, None)
    if binding is not None:
        return binding
    if module._is_expert_parallel:
        raise ValueError(
            f"{type(module).__name__} is sharded by transformers' own expert parallelism "
            "(DistributedConfig(ep_size=...)); the mpipemoe implementation shards experts itself: load the "
            "model without HF expert parallelism and use lightning_mpipemoe.hf_models.convert_model"
        )
    # Kept on the module, so that its tuner's decisions last from call to call; under its own
    # attribute, so that a later convert_model (which shards) does not take it for a previous one.
    binding = getattr(module, LOCAL_BINDING_ATTR, None)
    if binding is None:
        binding = ExecutorBinding(num_experts=module.num_experts)
        setattr(module, LOCAL_BINDING_ATTR, binding)
    return binding


def expert_weights_of(module: nn.Module) -> ExpertWeights:
    """Views of the module's local expert parameters in the executor's layout (no copies).

    The weights are read through the module's attributes, so a parametrization on them is
    applied: under peft's `target_parameters` LoRA (`ParamWrapper`) the executor sees
    `W + scaling * B @ A` per expert, and autograd carries the gradient to A and B.
    """
    if module.has_gate:
        w_in, b_in = module.gate_up_proj, getattr(module, "gate_up_proj_bias", None)
    else:
        w_in, b_in = module.up_proj, getattr(module, "up_proj_bias", None)
    w_out, b_out = module.down_proj, getattr(module, "down_proj_bias", None)
    if module.is_transposed:  # [E, H, O] and [E, I, H] (GPT-OSS): transposed views, not copies
        w_in, w_out = w_in.transpose(1, 2), w_out.transpose(1, 2)
    if not module.has_bias:
        b_in = b_out = None
    custom_gate = module.has_gate and type(module)._apply_gate is not _default_apply_gate
    activation = getattr(module, "act_fn", None)
    return ExpertWeights(
        w_in_EOH=w_in,
        w_out_EHI=w_out,
        b_in_EO=b_in,
        b_out_EH=b_out,
        gated=module.has_gate,
        activation=F.silu if activation is None else activation,
        gate_fn=module._apply_gate if custom_gate else None,
    )


def mpipemoe_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """`ExpertsInterface` entry: HF's experts call, run by `expert_parallel_forward`."""
    check_experts_layout(self)
    binding = get_binding(self)
    experts = expert_weights_of(self)
    if experts.num_local_experts != binding.num_local_experts:
        raise ValueError(
            f"{type(self).__name__} holds {experts.num_local_experts} experts but its binding expects "
            f"{binding.num_local_experts} ({binding.num_experts} over EP={binding.groups.ep_size})"
        )
    groups = binding.groups
    return expert_parallel_forward(
        hidden_states,
        top_k_index.long(),
        top_k_weights,
        experts,
        ep_group=groups.ep,
        combine_group=groups.ep_combine,
        config=binding.config,
        stats=binding.stats,
        tuner=binding.tuner,
    )


def register_experts_implementation() -> None:
    """Register `mpipemoe_experts_forward` under `EXPERTS_IMPLEMENTATION` (idempotent)."""
    ExpertsInterface.register(EXPERTS_IMPLEMENTATION, mpipemoe_experts_forward)


register_experts_implementation()
