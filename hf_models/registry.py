"""Adapters keyed by `config.model_type`, and the entry point that converts a model.

An adapter turns a Hugging Face MoE model into one that runs its experts on the MoE
executor, and knows how its keys look in a checkpoint and in an export:

- `convert(model, groups, config, track_stats)`: shard the experts to this EP rank, bind the
  executor;
- `sharded_keys(model)`: state-dict key -> global expert count, for expert-sharded tensors
  (dim 0 is the expert);
- `to_hf_state_dict(model, full_state_dict)`: converted keys -> HF-native keys;
- `checkpoint_transforms(model)`: how checkpoint keys map onto the converted model's keys
  (transformers `WeightRenaming` / `WeightConverter` objects).
"""

from __future__ import annotations

from typing import Protocol

from torch import nn

from lightning_mpipemoe.config import ExecutorConfig
from lightning_mpipemoe.groups import MoEProcessGroups
from lightning_mpipemoe.moe import RoutingStats

from .experts_interface import BINDING_ATTR
from .gpt_oss import GptOssAdapter
from .mixtral_style import MixtralStyleAdapter
from .output_capturing import restore_output_capturing
from .switch import SwitchAdapter

__all__ = [
    "ADAPTER_ATTR",
    "Adapter",
    "UnsupportedModelError",
    "adapter_for",
    "convert_model",
    "covered_model_types",
    "packed_expert_keys",
    "register_adapter",
    "routing_stats",
    "sharded_expert_keys",
]

ADAPTER_ATTR = "_mpipemoe_adapter"


class Adapter(Protocol):
    name: str

    def convert(
        self, model: nn.Module, groups: MoEProcessGroups, config: ExecutorConfig, track_stats: bool = True
    ) -> nn.Module: ...

    def sharded_keys(self, model: nn.Module) -> dict[str, int]: ...

    def to_hf_state_dict(self, model: nn.Module, state_dict: dict) -> dict: ...

    def checkpoint_transforms(self, model: nn.Module) -> list: ...


class UnsupportedModelError(ValueError):
    """The model's family has no adapter."""


_MIXTRAL_STYLE = MixtralStyleAdapter()

#: Families whose experts module uses `@use_experts_implementation` with the standard fused
#: layout (gate_up_proj [E, 2I, H], down_proj [E, H, I]; up_proj without gate), at top level
#: and, for composite models, the text model that holds the experts. Tested on tiny random
#: models: mixtral, qwen2_moe, qwen3_moe, olmoe. The others share the same experts contract;
#: the adapter still checks each experts module's layout when it converts.
MIXTRAL_STYLE_MODEL_TYPES = (
    "mixtral", "qwen2_moe", "qwen3_moe", "olmoe",
    "afmoe", "axk1", "axk2", "bailing_hybrid", "beam", "cohere2_moe", "deepseek_v2", "deepseek_v3",
    "deepseek_v32", "deepseek_v4", "dots1", "dots3_note", "dots3_note_text", "ernie4_5_moe", "exaone_moe",
    "flex_olmo", "flint", "gemma4", "gemma4_text", "glm4_moe", "glm4_moe_lite", "glm4v_moe",
    "glm4v_moe_text", "glm5_next", "glm5_next_text", "glm_moe_dsa", "granitemoe", "granitemoe_swa",
    "granitemoehybrid", "granitemoeshared", "hunyuan_v1_moe", "hy_v3", "hy_v4", "jamba", "kimi_linear",
    "kolibri1", "laguna", "lara_mini", "lfm2_moe", "mellum", "mimo_v2_flash", "minimax", "minimax_m2",
    "mistral4", "mistral_large4", "mistral_large4_text", "nemotron_h", "phimoe", "qwen3_5_moe",
    "qwen3_5_moe_text", "qwen3_next", "qwen3_omni_moe", "qwen3_omni_moe_thinker", "qwen3_omni_moe_text",
    "qwen3_vl_moe", "qwen3_vl_moe_text", "qwen4_exp", "qwen4_exp_text", "solar_open", "zaya",
)  # fmt: skip

#: Known MoE families that are not covered, with the reason.
_NOT_COVERED_REASONS = {
    "aria": "its transposed experts layout is not tested yet (the executor takes it, as for gpt_oss)",
    "aria_text": "its transposed experts layout is not tested yet (the executor takes it, as for gpt_oss)",
    "openai_privacy_filter": "its transposed experts layout is not tested yet (the executor takes it, as for gpt_oss)",
    "muse_spark": "its experts apply a norm after each expert",
    "muse_spark_text": "its experts apply a norm after each expert",
}

_ADAPTERS: dict[str, Adapter] = {model_type: _MIXTRAL_STYLE for model_type in MIXTRAL_STYLE_MODEL_TYPES}
_ADAPTERS["switch_transformers"] = SwitchAdapter()
_ADAPTERS["gpt_oss"] = GptOssAdapter()


def register_adapter(model_type: str, adapter: Adapter, *, overwrite: bool = False) -> None:
    """Cover another family (keyed by `config.model_type`)."""
    if model_type in _ADAPTERS and not overwrite:
        raise ValueError(f"model_type {model_type!r} already has the {_ADAPTERS[model_type].name!r} adapter")
    _ADAPTERS[model_type] = adapter


def covered_model_types() -> list[str]:
    return sorted(_ADAPTERS)


def adapter_for(model_or_config) -> Adapter:
    """The adapter for a model (or config), by `config.model_type`; a clear error if none."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    adapter = _ADAPTERS.get(model_type)
    if adapter is None:
        reason = _NOT_COVERED_REASONS.get(model_type)
        why = f" ({reason})" if reason else ""
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not covered by lightning_mpipemoe.hf_models{why}. "
            f"Covered model types: {', '.join(covered_model_types())}. "
            "A family whose experts module uses transformers' @use_experts_implementation with the standard fused "
            "layout can be added with register_adapter(model_type, MixtralStyleAdapter())."
        )
    return adapter


def convert_model(
    model: nn.Module,
    groups: MoEProcessGroups | None = None,
    config: ExecutorConfig | None = None,
    *,
    track_stats: bool = True,
) -> nn.Module:
    """Run the model's experts on the MoE executor, sharded over `groups.ep` (in place; returns it).

    Without `groups` the model runs locally (EP = 1). Each experts module keeps only this
    rank's `E / ep_size` experts; build optimizers after converting. Calling it again with the
    same EP layout only rebinds (e.g. a new `ExecutorConfig`). `track_stats` attaches one
    `RoutingStats` per MoE layer (see `routing_stats`).
    """
    adapter = adapter_for(model)
    restore_output_capturing(model)  # a model unpickled in a spawned worker lost it (router aux loss)
    adapter.convert(model, groups or MoEProcessGroups.local(), config or ExecutorConfig(), track_stats)
    setattr(model, ADAPTER_ATTR, adapter)
    return model


def routing_stats(model: nn.Module) -> dict[str, RoutingStats]:
    """Module name -> `RoutingStats` of every bound MoE layer that tracks them."""
    out = {}
    for name, module in model.named_modules():
        binding = getattr(module, BINDING_ATTR, None)
        if binding is not None and binding.stats is not None:
            out[name] = binding.stats
    return out


def packed_expert_keys(model: nn.Module) -> dict[str, tuple[int, str]]:
    """The subset of `sharded_expert_keys` that pack their experts into 2-D (peft's LoRA on
    fused experts, see `peft_lora.py`) -> (global expert count, layout); stored unpacked in
    checkpoints (`lightning_mpipemoe.discovery.unpack_experts`)."""
    adapter = getattr(model, ADAPTER_ATTR, None) or adapter_for(model)
    read = getattr(adapter, "packed_expert_keys", None)
    return read(model) if callable(read) else {}


def sharded_expert_keys(model: nn.Module) -> dict[str, int]:
    """Parameter / state-dict name -> global expert count, for every expert-sharded tensor.

    These are reduced over the expert-data-parallel group (not the whole world), and
    concatenated along dim 0 in EP-rank order to consolidate.
    """
    adapter = getattr(model, ADAPTER_ATTR, None) or adapter_for(model)
    return adapter.sharded_keys(model)
