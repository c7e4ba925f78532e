"""bf16 against fp32 runs of the same weights, at tolerances derived from bf16's unit roundoff
(`tests/bf16_check.py` says how): the executor (plain and pipelined) against the per-token
loop, every Hugging Face MoE layer of a converted bf16 (or autocast) model against Hugging
Face's own experts module in fp32 on the inputs the layer received, and whole models where
no routing can flip.
"""

from __future__ import annotations

import copy

import lightning_mpipemoe  # noqa: F401  isort: skip
import pytest
import torch
import torch.nn.functional as F

from lightning_mpipemoe import ExecutorConfig, ExpertWeights
from lightning_mpipemoe.hf_models.api import convert_model
from lightning_mpipemoe.hf_models.experts_interface import is_hf_experts_module
from lightning_mpipemoe.moe.executor import expert_parallel_forward
from tests.bf16_check import LAYER_STAGES, U, assert_bf16_close, relative_error
from tests.hf_tiny import FAMILIES, NUM_EXPERTS, tiny_batch, tiny_model
from tests.moe_reference import moe_reference, random_expert_weights

EXECUTOR_CASES = [(1, "none", True, False), (4, "s2", True, False), (2, "s4", False, True), (3, "s1", True, True)]


@pytest.mark.parametrize("num_partitions, restore, gated, bias", EXECUTOR_CASES)
def test_executor_bf16_matches_fp32_per_token_loop(num_partitions, restore, gated, bias):
    """Output and all four gradients of the executor in bf16 against the fp32 per-token loop on
    the same (bf16-representable) values; top-2 of 8 experts, 61 tokens, H = 32, I = 24."""
    tokens, hidden, inter, experts, top_k = 61, 32, 24, 8, 2
    gen = torch.Generator().manual_seed(num_partitions)
    weights = {k: v.bfloat16() for k, v in random_expert_weights(experts, hidden, inter, gated, bias, seed=1).items()}
    hidden_TH = torch.randn(tokens, hidden, generator=gen).bfloat16()
    index_TK = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    weights_TK = torch.rand(tokens, top_k, generator=gen).bfloat16()
    probe_TH = torch.randn(tokens, hidden, generator=gen).bfloat16()
    act = F.silu if gated else F.gelu

    def run(dtype, forward):
        leaves = {k: v.to(dtype).clone().requires_grad_() for k, v in weights.items()}
        h, w = hidden_TH.to(dtype).clone().requires_grad_(), weights_TK.to(dtype).clone().requires_grad_()
        out = forward(h, w, leaves)
        (out * probe_TH.to(dtype)).sum().backward()
        return {"out": out, "d hidden": h.grad, "d routing weights": w.grad,
                **{f"d {k}": v.grad for k, v in leaves.items()}}

    def ours(h, w, leaves):
        experts_ = ExpertWeights(leaves["w_in_EOH"], leaves["w_out_EHI"], leaves.get("b_in_EO"),
                                 leaves.get("b_out_EH"), gated=gated, activation=act)
        return expert_parallel_forward(h, index_TK, w, experts_, config=ExecutorConfig(num_partitions, restore))

    def reference(h, w, leaves):
        return moe_reference(h, index_TK, w, **leaves, gated=gated, act=act)

    got, expected = run(torch.bfloat16, ours), run(torch.float32, reference)
    for what, value in got.items():
        assert value.dtype == torch.bfloat16, what
        assert_bf16_close(value, expected[what], f"n={num_partitions} {restore} {what}", reduction=tokens)


def _moe_modules(model) -> dict[str, torch.nn.Module]:
    """Hugging Face experts modules (called with hidden, top-k index, top-k weights), and Switch's
    sparse MLPs (router and experts, called with hidden; converted as a whole)."""
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

    from lightning_mpipemoe.hf_models.switch import MPipeSwitchSparseMLP

    kinds = (SwitchTransformersSparseMLP, MPipeSwitchSparseMLP)
    return {name: m for name, m in model.named_modules() if is_hf_experts_module(m) or isinstance(m, kinds)}


def _capture_calls(model) -> tuple[dict, list]:
    """Forward hooks on every MoE module: {name: [(args, output), ...]}."""
    calls: dict[str, list] = {}
    handles = []
    for name, module in _moe_modules(model).items():
        def hook(mod, args, output, name=name):
            calls.setdefault(name, []).append((tuple(a.detach() for a in args), output.detach()))

        handles.append(module.register_forward_hook(hook))
    return calls, handles


def _reference_grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameter gradients by name; Switch's per-expert `experts.expert_{i}.{wi,wo}.weight`
    also stacked as the converted layer's `experts.wi` / `experts.wo`."""
    grads = {name: p.grad if p.grad is not None else torch.zeros_like(p) for name, p in module.named_parameters()}
    for proj in ("wi", "wo"):  # an expert no token reached has no gradient: zero
        per_expert = sorted((int(n.split(".")[1].split("_")[1]), g) for n, g in grads.items()
                            if n.startswith("experts.expert_") and n.endswith(f".{proj}.weight"))
        if per_expert:
            grads[f"experts.{proj}"] = torch.stack([g for _, g in per_expert])
    return grads


def check_layers_against_hf(model, reference, batch, *, autocast: bool = False, groups=None) -> dict[str, float]:
    """Run `model` (converted, bf16 or under bf16 autocast) on `batch`; every MoE layer's output,
    and the gradients of a probe through it, against `reference`'s fp32 Hugging Face module on
    the inputs the layer received. Returns the errors in units of u.

    Expert parallel (`groups`, every rank calls this with its own batch): an expert shard's
    gradient sums every rank's tokens, so the reference's full gradient is summed over the EP
    group and this rank's rows taken."""
    calls, handles = _capture_calls(model)
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    assert calls and set(calls) == set(_moe_modules(reference)), sorted(calls)
    errors = {}
    for name, layer_calls in calls.items():
        ours, theirs = model.get_submodule(name), reference.get_submodule(name)
        for args, output in layer_calls:
            probe = torch.randn(output.shape, generator=torch.Generator().manual_seed(len(errors))).to(output.dtype)
            leaves = [a.clone().requires_grad_() if a.is_floating_point() else a for a in args]
            leaves32 = [a.float().requires_grad_() if a.is_floating_point() else a for a in args]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = ours(*leaves)
            (out.float() * probe.float()).sum().backward()
            out32 = theirs(*leaves32)
            (out32 * probe.float()).sum().backward()
            pairs = {"out (in the model)": (output, out32), "out": (out, out32)}
            for i, (a, e) in enumerate(zip(leaves, leaves32)):
                if a.is_floating_point():
                    pairs[f"d input {i}"] = (a.grad, e.grad)
            grads32 = _reference_grads(theirs)
            for pname, param in ours.named_parameters():
                expected = grads32[pname]
                if groups is not None and param.shape[0] != expected.shape[0]:  # an expert shard
                    expected = expected.clone()
                    torch.distributed.all_reduce(expected, group=groups.ep)
                    local = param.shape[0]
                    expected = expected[groups.ep_rank * local : (groups.ep_rank + 1) * local]
                pairs[f"d {pname}"] = (param.grad, expected)
            for what, (a, e) in pairs.items():
                assert_bf16_close(a, e, f"{name} {what}", reduction=args[0].numel() // args[0].shape[-1])
                errors[f"{name} {what}"] = relative_error(a, e) / U
            ours.zero_grad(set_to_none=True)
            theirs.zero_grad(set_to_none=True)
    return errors


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("num_partitions", [1, 4])
def test_hf_layers_in_bf16_match_fp32_hf(family, num_partitions):
    """bf16 weights (the converted model) vs Hugging Face's fp32 experts on the same values."""
    reference = tiny_model(family).to(torch.bfloat16).float()
    model = convert_model(copy.deepcopy(reference).to(torch.bfloat16), config=ExecutorConfig(num_partitions))
    check_layers_against_hf(model, reference, tiny_batch(family))


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_hf_layers_under_bf16_autocast_match_fp32_hf(family):
    """fp32 weights under bf16 autocast (the GEMMs round their inputs and weights to bf16)."""
    reference = tiny_model(family)
    model = convert_model(copy.deepcopy(reference), config=ExecutorConfig(2))
    errors = check_layers_against_hf(model, reference, tiny_batch(family), autocast=True)
    experts = [p for name, p in model.named_parameters() if "experts" in name]
    assert experts and all(p.grad is None for p in experts)  # zeroed after each layer's check
    assert errors


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_whole_bf16_model_matches_fp32_when_no_routing_can_flip(family):
    """Every expert chosen (top-k = E): no routing decision to flip, so the logits and the expert
    gradients of the whole converted bf16 model stay within the bound of its layers in sequence
    (2 decoder layers and the head: 3 x LAYER_STAGES for logits, twice that for gradients, which
    run back through the forward's chain)."""
    reference = tiny_model(family, num_experts_per_tok=NUM_EXPERTS).to(torch.bfloat16).float()
    model = convert_model(copy.deepcopy(reference).to(torch.bfloat16), config=ExecutorConfig(2))
    batch = tiny_batch(family)
    out, out32 = model(**batch), reference(**batch)
    assert out.logits.dtype == torch.bfloat16
    assert_bf16_close(out.logits, out32.logits, f"{family} logits", stages=3 * LAYER_STAGES)
    out.loss.backward()
    out32.loss.backward()
    params32 = dict(reference.named_parameters())
    experts = [(name, p) for name, p in model.named_parameters() if ".experts." in name]
    assert experts
    for name, param in experts:
        assert param.grad.dtype == torch.bfloat16
        assert_bf16_close(param.grad, params32[name].grad, f"{family} {name}", stages=6 * LAYER_STAGES)
