"""Module adapter for Switch Transformers (encoder-decoder, top-1 router, expert capacity).

Switch keeps its experts as a `ModuleDict` of `expert_{i}.wi / .wo` linears and applies the
capacity mask inside its router, so its experts never see the expert of a dropped token.
The adapter replaces each `SwitchTransformersSparseMLP` with `MPipeSwitchSparseMLP`, which

- keeps HF's router module as is (jitter, fp32 classifier, the recorded router logits that
  HF turns into the z-loss and the aux loss);
- holds this rank's experts stacked as `wi [L, I, H]`, `wo [L, H, I]`;
- hands the router's top-1 choice to the executor with `capacity = expert_capacity` counted
  per sequence in token order, which reproduces HF's `cumsum(one_hot) <= capacity` mask, so
  dropped tokens are never dispatched.

Checkpoint and export keys map back to HF's `experts.expert_{i}.wi.weight` form.

Shape legend: B batch, S sequence, T = B*S tokens, H model dim, I expert hidden dim,
L local experts, E global experts.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import MergeModulelist, WeightConverter
from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

from lightning_mpipemoe.config import ExecutorConfig
from lightning_mpipemoe.groups import MoEProcessGroups
from lightning_mpipemoe.moe import ExpertWeights, RoutingStats, expert_parallel_forward

from .experts_interface import BINDING_ATTR, ExecutorBinding

__all__ = ["MPipeSwitchSparseMLP", "SwitchAdapter", "SwitchStackedExperts"]

_STACKED_KEY = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<proj>wi|wo)$")


class SwitchStackedExperts(nn.Module):
    """This rank's Switch experts as stacked parameters (plain ReLU-style FFN, no bias)."""

    def __init__(self, wi_LIH: torch.Tensor, wo_LHI: torch.Tensor, activation: nn.Module, dropout_rate: float) -> None:
        super().__init__()
        self.wi = nn.Parameter(wi_LIH)
        self.wo = nn.Parameter(wo_LHI)
        self.act = activation
        self.dropout = nn.Dropout(dropout_rate)

    @classmethod
    def from_hf(cls, experts: nn.ModuleDict, start: int, end: int) -> "SwitchStackedExperts":
        """Stack experts `start:end` of HF's `expert_{i}` modules (copies; the rest is dropped)."""
        chosen = [experts[f"expert_{index}"] for index in range(start, end)]
        for expert in chosen:
            if expert.wi.bias is not None or expert.wo.bias is not None:
                raise ValueError("Switch experts with biases are not supported by the mpipemoe adapter")
        wi = torch.stack([expert.wi.weight.detach() for expert in chosen])
        wo = torch.stack([expert.wo.weight.detach() for expert in chosen])
        stacked = cls(wi, wo, chosen[0].act, chosen[0].dropout.p)
        stacked.wi.requires_grad_(all(expert.wi.weight.requires_grad for expert in chosen))
        stacked.wo.requires_grad_(all(expert.wo.weight.requires_grad for expert in chosen))
        return stacked

    def weights(self) -> ExpertWeights:
        """The stacked experts as the executor takes them (dropout as a `gate_fn` in training)."""
        gate_fn = None
        if self.training and self.dropout.p > 0:
            # HF applies dropout between the activation and `wo`. The pipelined executor
            # replays this draw when it recomputes the activation in backward.
            def gate_fn(pre_SI: torch.Tensor) -> torch.Tensor:
                return self.dropout(self.act(pre_SI))

        return ExpertWeights(w_in_EOH=self.wi, w_out_EHI=self.wo, gated=False, activation=self.act, gate_fn=gate_fn)


class MPipeSwitchSparseMLP(nn.Module):
    """`SwitchTransformersSparseMLP` on the MoE executor: HF's router, stacked local experts."""

    def __init__(self, router: nn.Module, experts: SwitchStackedExperts, binding: ExecutorBinding) -> None:
        super().__init__()
        self.router = router
        self.experts = experts
        setattr(self, BINDING_ATTR, binding)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, seq_len, hidden_dim = hidden_states.shape
        # HF's router: jitter (in place on the input when dtypes match, as in HF), capacity mask
        # (unused here: the executor drops by the same rule), logits recorded for the losses.
        _, top_prob_BS1, router_logits_BSE = self.router(hidden_states)
        # The router's choice before its capacity mask: the same ops as in HF's router.
        router_probs_BSE = F.softmax(router_logits_BSE, dim=-1, dtype=self.router.dtype).to(self.router.input_dtype)
        index_T1 = torch.argmax(router_probs_BSE, dim=-1).reshape(-1, 1)
        binding: ExecutorBinding = getattr(self, BINDING_ATTR)
        config, tuner = binding.config, binding.tuner
        out_TH = expert_parallel_forward(
            hidden_states.reshape(-1, hidden_dim),
            index_T1,
            top_prob_BS1.reshape(-1, 1),
            self.experts.weights(),
            ep_group=binding.groups.ep,
            combine_group=binding.groups.ep_combine,
            config=config,
            capacity=int(self.router.expert_capacity),
            capacity_group_size=seq_len,
            stats=binding.stats,
            tuner=tuner,
        )
        return out_TH.reshape(batch_size, seq_len, hidden_dim)


class SwitchAdapter:
    """Replaces every Switch sparse MLP; keys map back to `experts.expert_{i}.{wi,wo}.weight`."""

    name = "switch"

    def convert(
        self, model: nn.Module, groups: MoEProcessGroups, config: ExecutorConfig, track_stats: bool = True
    ) -> nn.Module:
        converted = [(name, m) for name, m in model.named_modules() if isinstance(m, MPipeSwitchSparseMLP)]
        for name, module in converted:
            previous = getattr(module, BINDING_ATTR)
            if (previous.groups.ep_size, previous.groups.ep_rank) != (groups.ep_size, groups.ep_rank):
                raise ValueError(
                    f"sparse MLP {name!r} is already sharded for EP rank {previous.groups.ep_rank}/"
                    f"{previous.groups.ep_size}; cannot re-shard it for {groups.ep_rank}/{groups.ep_size}"
                )
            stats = RoutingStats() if track_stats else None
            setattr(module, BINDING_ATTR, ExecutorBinding(previous.num_experts, groups, config, stats))
        targets = [(name, m) for name, m in model.named_modules() if isinstance(m, SwitchTransformersSparseMLP)]
        if not targets and not converted:
            raise ValueError(f"{type(model).__name__} has no SwitchTransformersSparseMLP to convert")
        for name, sparse in targets:
            num_experts = sparse.router.num_experts
            binding = ExecutorBinding(num_experts, groups, config, RoutingStats() if track_stats else None)
            start, end = binding.local_range
            experts = SwitchStackedExperts.from_hf(sparse.experts, start, end)
            replacement = MPipeSwitchSparseMLP(sparse.router, experts, binding)
            replacement.train(sparse.training)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
        return model

    def sharded_keys(self, model: nn.Module) -> dict[str, int]:
        keys = {}
        for name, module in model.named_modules():
            if isinstance(module, MPipeSwitchSparseMLP):
                num_experts = getattr(module, BINDING_ATTR).num_experts
                keys[f"{name}.experts.wi"] = num_experts
                keys[f"{name}.experts.wo"] = num_experts
        return keys

    def to_hf_state_dict(self, model: nn.Module, state_dict: dict) -> dict:
        """Full (consolidated) converted keys -> HF's per-expert keys."""
        out = {}
        for key, value in state_dict.items():
            match = _STACKED_KEY.match(key)
            if match is None:
                out[key] = value
                continue
            for index in range(value.shape[0]):
                out[f"{match['prefix']}.expert_{index}.{match['proj']}.weight"] = value[index]
        return out

    def checkpoint_transforms(self, model: nn.Module) -> list:
        """HF's own conversions plus per-expert `expert_{i}.wi.weight` -> stacked `wi`."""
        transforms = list(get_model_conversion_mapping(model)) if isinstance(model, PreTrainedModel) else []
        for proj in ("wi", "wo"):
            transforms.append(
                WeightConverter(
                    source_patterns=f"experts.expert_*.{proj}.weight",
                    target_patterns=f"experts.{proj}",
                    operations=[MergeModulelist(dim=0)],
                )
            )
        return transforms
