"""Hugging Face MoE models on the MoE executor: adapters, sharded loading, export.

- `convert_model(model, groups, config)`: run a transformers MoE model's experts on the
  executor, each EP rank holding its own experts (adapters keyed by `config.model_type`).
- `load_sharded(model_dir, groups, config)`: build the model from a local HF checkpoint
  directory, each EP rank reading only its own experts' slices.
- `gather_full_state_dict`, `consolidate_state_dicts`, `export_pretrained`,
  `export_from_state_dicts`: a consolidated `save_pretrained` directory that plain
  transformers loads.
- `MoECausalLMModule`, `MoESeq2SeqModule`: LightningModules for fine-tuning (imported lazily,
  so that `import lightning_mpipemoe` does not pull in Lightning).

Importing this module registers the `"mpipemoe"` experts implementation with transformers.
The `hf_models/` folder has no `__init__.py` (it installs as the namespace package
`lightning_mpipemoe.hf_models`, so it never shadows an installed `hf_models` from a clone's
root); its public names live here: `from lightning_mpipemoe.hf_models.api import ...`.
"""

from lightning_mpipemoe.hf_models.checkpoint_io import (
    LoadReport,
    consolidate_state_dicts,
    export_from_state_dicts,
    export_pretrained,
    gather_full_state_dict,
    load_sharded,
    to_hf_state_dict,
)
from lightning_mpipemoe.hf_models.experts_interface import (
    EXPERTS_IMPLEMENTATION,
    ExecutorBinding,
    UnsupportedExpertsLayout,
    mpipemoe_experts_forward,
    register_experts_implementation,
)
from lightning_mpipemoe.hf_models.gpt_oss import GptOssAdapter
from lightning_mpipemoe.hf_models.mixtral_style import MixtralStyleAdapter
from lightning_mpipemoe.hf_models.registry import (
    UnsupportedModelError,
    adapter_for,
    convert_model,
    covered_model_types,
    packed_expert_keys,
    register_adapter,
    routing_stats,
    sharded_expert_keys,
)
from lightning_mpipemoe.hf_models.switch import SwitchAdapter

_LAZY = {"MoECausalLMModule", "MoESeq2SeqModule", "MoEFineTuneModule"}

__all__ = [
    "EXPERTS_IMPLEMENTATION",
    "ExecutorBinding",
    "GptOssAdapter",
    "LoadReport",
    "MixtralStyleAdapter",
    "SwitchAdapter",
    "UnsupportedExpertsLayout",
    "UnsupportedModelError",
    "adapter_for",
    "consolidate_state_dicts",
    "convert_model",
    "covered_model_types",
    "export_from_state_dicts",
    "export_pretrained",
    "gather_full_state_dict",
    "load_sharded",
    "mpipemoe_experts_forward",
    "packed_expert_keys",
    "register_adapter",
    "register_experts_implementation",
    "routing_stats",
    "sharded_expert_keys",
    "to_hf_state_dict",
    *sorted(_LAZY),
]


def __getattr__(name: str):
    if name in _LAZY:
        from lightning_mpipemoe.hf_models import lightning_modules

        return getattr(lightning_modules, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
