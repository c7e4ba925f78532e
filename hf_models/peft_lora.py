"""peft's LoRA on the executor's experts: per-expert LoRA weights sharded with their experts.

peft adapts a fused experts parameter (`LoraConfig(target_parameters=["mlp.experts.gate_up_proj",
"mlp.experts.down_proj"])`) with a `peft.tuners.lora.layer.ParamWrapper` around the experts
module (nested, one wrapper per parameter). During the wrapper's forward the parameter is
parametrized to `W + scaling * B @ A` per expert, so the executor, which reads the weights
through the module's attributes (`experts_interface.expert_weights_of`), runs the adapted
experts and autograd carries their gradient to A and B. What the executor's sharding has to
add is that A and B hold E experts each, laid out as peft lays them out:

- `lora_A[adapter].weight [r*E, in]`: expert-major rows (`reshape(E, r, in)`), so this rank's
  experts are rows `start*r : end*r`;
- `lora_B[adapter].weight [out, r*E]`: expert-*minor* columns (`reshape(out, r, E)`), so this
  rank's experts are the strided columns `[:, :, start:end]` of that view.

`shard_expert_lora` cuts both to the rank's experts (and sets the wrapper's `num_experts`),
when the adapter converts the model. Both then count as expert-sharded parameters
(`expert_lora_keys`): excluded from DDP, reduced over the expert-data-parallel group, counted
once per EP rank by clipping. Checkpoints cut and join expert shards along dim 0, so the
strategy stores A and B unpacked (`discovery.unpack_experts`: `[E, r, in]`, `[E, out, r]`)
and packs them again when it loads.

Saving: `lora_state_dict` gathers every LoRA weight (all experts, peft's layout) to EP rank 0
one tensor at a time, moved to the CPU as it arrives; `save_lora_adapter` writes it as a
standard PEFT adapter directory (`PeftModel.save_pretrained`), which plain peft loads at EP 1.
A merged Hugging Face export is `peft_model.merge_and_unload()` on every rank (each merges
its own experts' LoRA into its own expert shards) followed by `export_pretrained`
(`export_merged`).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from lightning_mpipemoe import collectives
from lightning_mpipemoe.discovery import pack_experts, unpack_experts
from lightning_mpipemoe.groups import MoEProcessGroups

from .experts_interface import BINDING_ATTR

__all__ = [
    "LORA_TARGETS",
    "apply_peft",
    "check_peft_spec",
    "expert_lora_keys",
    "export_lora_run",
    "merged_state_dict",
    "expert_lora_wrappers",
    "export_merged",
    "lora_state_dict",
    "save_lora_adapter",
    "shard_expert_lora",
]


def _param_wrapper_class():
    try:
        from peft.tuners.lora.layer import ParamWrapper
    except ImportError:  # peft is optional: without it no model has LoRA wrappers
        return None
    return ParamWrapper


def expert_lora_wrappers(model: nn.Module, experts: nn.Module) -> list[tuple[str, nn.Module]]:
    """`(qualified name, wrapper)` of every peft `ParamWrapper` that adapts a parameter of `experts`."""
    wrapper_class = _param_wrapper_class()
    if wrapper_class is None:
        return []
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, wrapper_class) and module.get_base_layer() is experts
    ]


def _replace_weight(linear: nn.Linear, value: torch.Tensor) -> None:
    old = linear.weight
    linear.weight = nn.Parameter(value.contiguous().clone(), requires_grad=old.requires_grad)


def shard_expert_lora(model: nn.Module, experts: nn.Module, num_experts: int, start: int, end: int) -> None:
    """Cut the LoRA weights of every wrapper on `experts` to global experts `[start, end)`.

    A wrapper that already holds `end - start` experts (sharded before) is left as it is; one
    that holds neither that nor `num_experts` is an error naming both.
    """
    local = end - start
    for name, wrapper in expert_lora_wrappers(model, experts):
        if wrapper.num_experts == local:
            continue
        if wrapper.num_experts != num_experts:
            raise ValueError(
                f"LoRA wrapper {name!r} ({wrapper.parameter_name}) holds {wrapper.num_experts} experts; expected "
                f"{num_experts} (unsharded) or {local} (this rank's)"
            )
        for adapter in wrapper.lora_A:
            r = wrapper.r[adapter]
            a_linear, b_linear = wrapper.lora_A[adapter], wrapper.lora_B[adapter]
            if b_linear.bias is not None:
                raise ValueError(f"LoRA wrapper {name!r}: lora_bias is not supported on sharded experts")
            _replace_weight(a_linear, a_linear.weight.detach()[start * r : end * r])
            b_ORE = b_linear.weight.detach().view(b_linear.weight.shape[0], r, num_experts)
            _replace_weight(b_linear, b_ORE[:, :, start:end].reshape(b_ORE.shape[0], r * local))
            a_linear.out_features = b_linear.in_features = r * local
        wrapper.num_experts = local


def expert_lora_keys(model: nn.Module, experts: nn.Module, num_experts: int) -> dict[str, tuple[int, str]]:
    """The LoRA weights of `experts`' wrappers -> (global expert count, packed layout): A packs
    its experts as "rows", B as "columns" (`discovery.unpack_experts`)."""
    keys = {}
    for name, wrapper in expert_lora_wrappers(model, experts):
        prefix = f"{name}." if name else ""
        for adapter in wrapper.lora_A:
            keys[f"{prefix}lora_A.{adapter}.weight"] = (num_experts, "rows")
            keys[f"{prefix}lora_B.{adapter}.weight"] = (num_experts, "columns")
    return keys


# ------------------------------------------------------------------------------ saving


def _sharded_lora(peft_model: nn.Module) -> dict[str, tuple[int, str]]:
    """Sharded LoRA weight name (in `peft_model`) -> (global expert count, packed layout)."""
    wrapper_class = _param_wrapper_class()
    out = {}
    if wrapper_class is None:
        return out
    for name, module in peft_model.named_modules():
        if not isinstance(module, wrapper_class):
            continue
        binding = getattr(module.get_base_layer(), BINDING_ATTR, None)
        if binding is None or binding.groups.ep_size == 1:
            continue
        for adapter in module.lora_A:
            out[f"{name}.lora_A.{adapter}.weight"] = (binding.num_experts, "rows")
            out[f"{name}.lora_B.{adapter}.weight"] = (binding.num_experts, "columns")
    return out


def lora_state_dict(peft_model: nn.Module, groups: MoEProcessGroups | None = None) -> dict[str, torch.Tensor] | None:
    """Collective over `groups.ep`: every LoRA weight of `peft_model` with all experts, in
    peft's layout, on the CPU of EP rank 0 (None on the other EP ranks). Under
    `sharding="fsdp"` (LoRA weights are DTensors) also collective over the world: each one is
    gathered whole, one at a time.

    Sharded weights travel one at a time (a gather over the EP group on the tensor's own
    device) and move to the CPU as they arrive, so rank 0 never holds more than one full
    LoRA tensor on the device.
    """
    groups = groups or MoEProcessGroups.local()
    sharded = _sharded_lora(peft_model)
    mine = groups.ep_rank == 0
    out = {}
    for name, param in peft_model.named_parameters():
        if "lora_" not in name:
            continue
        if name not in sharded:
            value = param.detach()
            if isinstance(value, DTensor):  # sharding="fsdp": gathered over its mesh (every rank takes part)
                value = value.full_tensor()
            if mine:
                out[name] = value.to("cpu", copy=True)
            continue
        num_experts, layout = sharded[name]
        shard = param.detach().contiguous()
        pieces = [torch.empty_like(shard) for _ in range(groups.ep_size)] if mine else None
        dst = dist.get_global_rank(groups.ep, 0)
        collectives.gather(shard, pieces, dst=dst, group=groups.ep, site="peft_lora.lora_state_dict")
        if not mine:
            continue
        local = num_experts // groups.ep_size
        out[name] = pack_experts(torch.cat([unpack_experts(p.cpu(), local, layout) for p in pieces]), layout)
    return out if mine else None


def save_lora_adapter(
    peft_model: nn.Module, directory: str | os.PathLike, groups: MoEProcessGroups | None = None
) -> Path | None:
    """Collective over `groups.ep`: write `peft_model`'s adapters (all experts) as a standard
    PEFT adapter directory, on global rank 0; returns the directory there, None elsewhere.
    Plain peft loads it onto the unsharded model (`PeftModel.from_pretrained(base, directory)`)."""
    state_dict = lora_state_dict(peft_model, groups)
    writer = state_dict is not None and (not dist.is_initialized() or dist.get_rank() == 0)
    if not writer:
        return None
    peft_model.save_pretrained(str(directory), state_dict=state_dict)
    return Path(directory)


def export_merged(peft_model: nn.Module, out_dir: str | os.PathLike, groups: MoEProcessGroups | None = None, **kwargs):
    """Collective over `groups.ep`: merge the LoRA weights into the (sharded) base weights on
    every rank and write a plain-transformers export (`export_pretrained`'s keywords). The
    merged model replaces the adapters: returns `(merged model, export directory or None)`."""
    from .checkpoint_io import export_pretrained

    merged = peft_model.merge_and_unload()
    return merged, export_pretrained(merged, out_dir, groups, **kwargs)


# ------------------------------------------------------------------------------ recipe presets

#: What `apply_peft(model, {"method": "lora", "targets": ...})` adapts.
LORA_TARGETS = ("attention", "experts", "all")
_SPEC_KEYS = {"method", "targets", "r", "alpha", "dropout"}


def check_peft_spec(spec) -> dict | None:
    """Validate a recipe's `peft` section (`conf/peft/*.yaml`); returns it as a plain dict, or
    None for `method: none`. Raises a ValueError naming the bad value and what is valid."""
    if spec is None:
        return None
    spec = dict(spec)
    unknown = sorted(set(spec) - _SPEC_KEYS)
    if unknown:
        raise ValueError(f"peft: unknown keys {unknown}; valid keys: {sorted(_SPEC_KEYS)}")
    method = spec.get("method", "none")
    if method == "none":
        return None
    if method != "lora":
        raise ValueError(f"peft.method must be 'none' or 'lora', got {method!r}")
    if importlib.util.find_spec("peft") is None:
        raise ImportError("peft.method=lora needs the peft package: pip install 'lightning-mpipemoe[peft]'")
    if spec.get("targets") not in LORA_TARGETS:
        raise ValueError(f"peft.targets must be one of {LORA_TARGETS}, got {spec.get('targets')!r}")
    for key in ("r", "alpha"):
        value = spec.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"peft.{key} must be a positive number, got {value!r}")
    if not float(spec["r"]).is_integer():
        raise ValueError(f"peft.r must be an integer, got {spec['r']!r}")
    dropout = spec.get("dropout", 0.0)
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"peft.dropout must be in [0, 1), got {dropout!r}")
    return spec


def _attention_targets(model: nn.Module) -> list[str]:
    """Leaf names of the linear projections inside attention modules (q/k/v/o_proj, Switch's q/k/v/o)."""
    names = set()
    for name, module in model.named_modules():
        parent = name.rpartition(".")[0].rpartition(".")[2].lower()
        if isinstance(module, nn.Linear) and ("attn" in parent or "attention" in parent):
            names.add(name.rpartition(".")[2])
    return sorted(names)


def _expert_targets(model: nn.Module) -> tuple[list[str], list[str]]:
    """(target_parameters of the fused routed experts, target_modules of shared experts)."""
    from .mixtral_style import expert_param_names, find_experts_modules

    found = find_experts_modules(model)
    if not found:
        raise ValueError(
            f"peft.targets=experts needs fused experts (@use_experts_implementation); {type(model).__name__} has none "
            "(Switch Transformers' per-expert modules are not supported: use peft.targets=attention)"
        )
    params = sorted({f"experts.{p}" for _, m in found for p in expert_param_names(m) if not p.endswith("_bias")})
    shared = sorted(
        {
            f"{name.rpartition('.')[0].rpartition('.')[2]}.{name.rpartition('.')[2]}"
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and "shared_expert" in name.rpartition(".")[0]
        }
    )
    return params, shared


def apply_peft(model: nn.Module, spec) -> nn.Module:
    """The model with peft's LoRA per a recipe's `peft` section (unchanged for `method: none`).

    targets: "attention" (the attention projections), "experts" (the fused routed experts via
    `target_parameters`, and shared experts' projections), "all" (both). Works on a model that
    `load_sharded` / `convert_model` already sharded: the experts' LoRA is then created with this
    rank's experts (the strategy makes expert-data-parallel replicas equal).
    """
    spec = check_peft_spec(spec)
    if spec is None:
        return model
    import peft

    modules, params = [], []
    if spec["targets"] in ("attention", "all"):
        modules += _attention_targets(model)
    if spec["targets"] in ("experts", "all"):
        expert_params, shared = _expert_targets(model)
        params += expert_params
        modules += shared
    config = peft.LoraConfig(
        r=int(spec["r"]),
        lora_alpha=spec["alpha"],
        lora_dropout=spec.get("dropout", 0.0),
        target_modules=modules or None,
        target_parameters=params or None,
    )
    return peft.get_peft_model(model, config)


def export_lora_run(
    peft_model: nn.Module, export_dir: str | os.PathLike, groups: MoEProcessGroups | None, tokenizer_dir=None
) -> tuple[Path | None, Path | None]:
    """Collective, at the end of a LoRA run: the adapter directory (`{export_dir}_adapter`) and
    a merged Hugging Face export at `export_dir` (the adapters are merged into the model in
    place: call it last). Returns (export, adapter) on global rank 0, (None, None) elsewhere."""
    export_dir = Path(export_dir)
    adapter = save_lora_adapter(peft_model, export_dir.with_name(export_dir.name + "_adapter"), groups)
    _, written = export_merged(peft_model, export_dir, groups, tokenizer_dir=tokenizer_dir)
    return written, adapter


def merged_state_dict(state: dict[str, torch.Tensor], hf_config, spec) -> dict[str, torch.Tensor]:
    """Offline merge for `recipes.convert`: a consolidated checkpoint state dict of a LoRA run
    (the peft model's keys, experts' LoRA unpacked as the strategy stores it) -> the merged
    Hugging Face model's state dict (unconverted keys). Rebuilds the model on the CPU with the
    same `apply_peft(spec)`, loads, and lets peft merge (`merge_and_unload`)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = AutoModelForSeq2SeqLM if getattr(hf_config, "is_encoder_decoder", False) else AutoModelForCausalLM
    with torch.device("cpu"):
        model = apply_peft(auto.from_config(hf_config), spec)
    packed = {}
    for key, value in state.items():
        if "lora_" in key and value.dim() == 3:  # an expert LoRA weight as checkpoints hold it
            value = pack_experts(value, "rows" if ".lora_A." in key else "columns")
        packed[key] = value
    model.load_state_dict(packed, strict=True)
    return {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}
