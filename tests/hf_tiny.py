"""Tiny random Hugging Face MoE models for tests (no hub access: built from configs).

Every builder is deterministic for a seed, fp32, two layers, eight experts, small widths,
so that a forward + backward takes milliseconds. The initialiser range is larger than the
families' defaults so that routing is decisive (no near-ties) and logits, losses and
gradients are O(1): an equivalence check at 1e-5 then means something.

Reused by the strategy and recipe tests: `tiny_model(family)`, `tiny_batch(family, ...)`.
"""

from __future__ import annotations

import re

# Before transformers: with the repository root on sys.path, transformers' probe for Hugging
# Face's `kernels` package finds the repo's kernels/ shim, which imports lightning_mpipemoe;
# if transformers.activations is mid-import at that moment, the import is circular.
import lightning_mpipemoe  # noqa: F401  isort: skip
import torch
from transformers import (
    GptOssConfig,
    GptOssForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    PreTrainedModel,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    SwitchTransformersConfig,
    SwitchTransformersForConditionalGeneration,
)

__all__ = [
    "CAUSAL_FAMILIES",
    "FAMILIES",
    "NUM_EXPERTS",
    "VOCAB",
    "check_against_hf",
    "comparable_outputs",
    "freeze_experts",
    "is_expert_key",
    "is_seq2seq",
    "local_grads_as_hf",
    "named_grads",
    "tiny_batch",
    "tiny_config",
    "tiny_model",
]

VOCAB = 64
NUM_EXPERTS = 8
CAUSAL_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
FAMILIES = CAUSAL_FAMILIES + ("switch_transformers",)

_DECODER_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    num_experts_per_tok=2,
    initializer_range=0.2,
    router_aux_loss_coef=0.05,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_config(family: str, **overrides):
    """The config of a tiny `family` model; keyword overrides win."""
    if family == "mixtral":
        kwargs = dict(_DECODER_COMMON, intermediate_size=24, num_local_experts=NUM_EXPERTS, router_jitter_noise=0.0)
        return MixtralConfig(**{**kwargs, **overrides})
    if family == "qwen2_moe":
        kwargs = dict(
            _DECODER_COMMON,
            intermediate_size=40,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
            num_experts=NUM_EXPERTS,
            norm_topk_prob=False,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
        return Qwen2MoeConfig(**{**kwargs, **overrides})
    if family == "qwen3_moe":
        kwargs = dict(
            _DECODER_COMMON,
            head_dim=8,
            intermediate_size=40,
            moe_intermediate_size=24,
            num_experts=NUM_EXPERTS,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
        return Qwen3MoeConfig(**{**kwargs, **overrides})
    if family == "olmoe":
        kwargs = dict(_DECODER_COMMON, intermediate_size=24, num_experts=NUM_EXPERTS, norm_topk_prob=False)
        return OlmoeConfig(**{**kwargs, **overrides})
    if family == "gpt_oss":
        # A small swiglu_limit, so that the clamps of GPT-OSS's activation bind on some rows.
        kwargs = dict(
            _DECODER_COMMON,
            head_dim=8,
            intermediate_size=24,
            num_local_experts=NUM_EXPERTS,
            swiglu_limit=0.5,
            sliding_window=4,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
        return GptOssConfig(**{**kwargs, **overrides})
    if family == "switch_transformers":
        kwargs = dict(
            vocab_size=VOCAB,
            d_model=32,
            d_kv=8,
            d_ff=48,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            num_experts=NUM_EXPERTS,
            # Small enough that tokens are dropped (8-token sequences over 8 experts).
            expert_capacity=1,
            # Sparse step 2 puts one MoE layer in each stack and makes HF compute the z- and aux losses.
            encoder_sparse_step=2,
            decoder_sparse_step=2,
            router_jitter_noise=0.0,
            dropout_rate=0.0,
            router_z_loss_coef=0.01,
            router_aux_loss_coef=0.05,
            initializer_factor=0.25,
            tie_word_embeddings=False,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
        return SwitchTransformersConfig(**{**kwargs, **overrides})
    raise ValueError(f"unknown tiny family {family!r}; known: {FAMILIES}")


_MODEL_CLASSES = {
    "mixtral": MixtralForCausalLM,
    "qwen2_moe": Qwen2MoeForCausalLM,
    "qwen3_moe": Qwen3MoeForCausalLM,
    "olmoe": OlmoeForCausalLM,
    "gpt_oss": GptOssForCausalLM,
    "switch_transformers": SwitchTransformersForConditionalGeneration,
}


def is_seq2seq(family: str) -> bool:
    return family == "switch_transformers"


def tiny_model(family: str, seed: int = 0, **overrides) -> PreTrainedModel:
    """A freshly initialised tiny `family` model (fp32, CPU, eval-free: caller sets the mode)."""
    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = _MODEL_CLASSES[family](config)
    if family == "gpt_oss":  # its biases start at zero: make them count
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, 0.2)
    return model.float()


def tiny_batch(family: str, seed: int = 0, batch_size: int = 2, seq_len: int = 8) -> dict[str, torch.Tensor]:
    """A random batch with labels (and decoder inputs for seq2seq families)."""
    generator = torch.Generator().manual_seed(1000 + seed)
    input_ids = torch.randint(2, VOCAB, (batch_size, seq_len), generator=generator)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if is_seq2seq(family):
        batch["labels"] = torch.randint(2, VOCAB, (batch_size, seq_len), generator=generator)
    else:
        batch["labels"] = input_ids.clone()
    return batch


# ----------------------------------------------------------------------------- comparison helpers


def named_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameter name -> gradient (zeros where autograd left None), for trainable parameters."""
    return {
        name: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def is_expert_key(hf_key: str, sharded_keys) -> bool:
    """Whether an unmodified-model parameter holds experts (fused `[E, ...]` or per-expert)."""
    return hf_key in sharded_keys or ".experts.expert_" in hf_key


def local_grads_as_hf(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, tuple[int, int] | None]]:
    """A converted model's gradients keyed like the unmodified model's parameters.

    Value: `(grad, rows)`; `rows = (start, end)` means the grad is rows start:end of the
    reference's fused `[E, ...]` gradient (this rank's experts), None means the whole tensor.
    """
    from lightning_mpipemoe.hf_models.experts_interface import BINDING_ATTR

    out = {}
    modules = dict(model.named_modules())
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        grad = p.grad.detach() if p.grad is not None else torch.zeros_like(p)
        owner_name, _, leaf = name.rpartition(".")
        owner = modules[owner_name]
        binding = getattr(owner, BINDING_ATTR, None)
        if binding is not None:  # fused experts module of a Mixtral-style family
            out[name] = (grad, binding.local_range)
            continue
        parent_name = owner_name.rpartition(".")[0]
        parent = modules.get(parent_name) if owner_name.endswith("experts") else None
        switch_binding = getattr(parent, BINDING_ATTR, None)
        if switch_binding is not None and leaf in ("wi", "wo"):
            start = switch_binding.local_range[0]
            for j in range(grad.shape[0]):
                out[f"{owner_name}.expert_{start + j}.{leaf}.weight"] = (grad[j], None)
            continue
        out[name] = (grad, None)
    return out


_PER_EXPERT = re.compile(r"\.experts\.expert_(\d+)\.")
_OUTPUT_FIELDS = (
    "loss", "logits", "aux_loss", "encoder_z_loss", "encoder_aux_loss", "decoder_z_loss", "decoder_aux_loss",
)  # fmt: skip


def comparable_outputs(out) -> dict[str, torch.Tensor]:
    """Logits, loss and every router loss a model output carries (as detached tensors)."""
    return {k: getattr(out, k).detach() for k in _OUTPUT_FIELDS if isinstance(getattr(out, k, None), torch.Tensor)}


def freeze_experts(model: torch.nn.Module) -> None:
    for name, p in model.named_parameters():
        if ".experts." in name:
            p.requires_grad_(False)


def check_against_hf(
    family: str,
    groups=None,
    config=None,
    *,
    gradient_checkpointing: bool | dict = False,
    frozen_experts: bool = False,
    jitter_seed: int | None = None,
    atol: float = 1e-5,
    rtol: float = 0.0,
    **overrides,
) -> dict:
    """Compare a converted model at `groups` (EP rank r feeds batch r) with the unmodified one.

    Checks logits, loss and router losses of this rank, and every trainable parameter's
    gradient: non-expert ones against the reference gradient of this rank's loss, expert
    ones (this rank's slice) against the sum over all ranks' losses. For Switch, also checks
    that the executor kept exactly the tokens HF's router kept. `gradient_checkpointing`:
    True, or the kwargs dict of HF's `activation_checkpointing_enable` (the new name of
    `gradient_checkpointing_enable`). Returns what was compared.
    """
    from lightning_mpipemoe.groups import MoEProcessGroups
    from lightning_mpipemoe.hf_models.api import convert_model, routing_stats, sharded_expert_keys

    groups = groups or MoEProcessGroups.local()
    world, rank = groups.ep_size, groups.ep_rank
    ref = tiny_model(family, **overrides)
    if frozen_experts:
        freeze_experts(ref)
    ref.train()
    gc_kwargs = gradient_checkpointing if isinstance(gradient_checkpointing, dict) else None
    if gradient_checkpointing is not False:
        ref.activation_checkpointing_enable(activation_checkpointing_kwargs=gc_kwargs)
    kept_by_hf: dict[str, torch.Tensor] = {}
    hooks = []
    if is_seq2seq(family) and gradient_checkpointing is False:
        for name, module in ref.named_modules():
            if name.endswith("mlp.router"):
                mlp = name.rpartition(".")[0]
                record = lambda m, i, o, mlp=mlp: kept_by_hf.__setitem__(mlp, o[0].sum((0, 1)))  # noqa: E731
                hooks.append(module.register_forward_hook(record))
    ref_grads, ref_out, kept = [], None, None
    for r in range(world):
        ref.zero_grad(set_to_none=True)
        kept_by_hf.clear()
        if jitter_seed is not None:
            torch.manual_seed(jitter_seed + r)
        out = ref(**tiny_batch(family, seed=r), output_router_logits=True)
        out.loss.backward()
        ref_grads.append(named_grads(ref))
        if r == rank:
            ref_out, kept = comparable_outputs(out), dict(kept_by_hf)
    for hook in hooks:
        hook.remove()

    model = tiny_model(family, **overrides)
    if frozen_experts:
        freeze_experts(model)
    convert_model(model, groups, config)
    model.train()
    if gradient_checkpointing is not False:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=gc_kwargs)
    if jitter_seed is not None:
        torch.manual_seed(jitter_seed + rank)
    out = model(**tiny_batch(family, seed=rank), output_router_logits=True)
    got = comparable_outputs(out)
    assert set(got) == set(ref_out), (sorted(got), sorted(ref_out))
    for key in ref_out:
        torch.testing.assert_close(got[key], ref_out[key], atol=atol, rtol=rtol, msg=lambda m: f"{family} {key}: {m}")
    stats = routing_stats(model)
    if kept:
        for mlp, kept_E in kept.items():
            assert torch.equal(stats[mlp].tokens_per_expert_E, kept_E.long()), (mlp, stats[mlp], kept_E)
        assert sum(s.dropped for s in stats.values()) > 0, "the Switch config should drop tokens"
    out.loss.backward()

    sharded = sharded_expert_keys(model)
    local = local_grads_as_hf(model)
    # Every reference parameter is compared, except other ranks' per-expert (Switch) tensors.
    local_experts = range(rank * NUM_EXPERTS // world, (rank + 1) * NUM_EXPERTS // world)
    not_here = {k for k in ref_grads[0] if (m := _PER_EXPERT.search(k)) and int(m.group(1)) not in local_experts}
    assert set(local) == set(ref_grads[0]) - not_here, sorted(set(local) ^ (set(ref_grads[0]) - not_here))
    for key, (grad, rows) in local.items():
        expected = sum(g[key] for g in ref_grads) if is_expert_key(key, sharded) else ref_grads[rank][key]
        if rows is not None:
            expected = expected[rows[0] : rows[1]]
        torch.testing.assert_close(grad, expected, atol=atol, rtol=rtol, msg=lambda m: f"{family} grad {key}: {m}")
    if frozen_experts:
        assert all(p.grad is None for n, p in model.named_parameters() if ".experts." in n)
    return {"outputs": sorted(got), "grads": len(local), "dropped": sum(s.dropped for s in stats.values())}
