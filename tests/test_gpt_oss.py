"""GPT-OSS on the executor: transposed `[E, H, 2I]` weights, interleaved gate/up, biases and
the clamped SwiGLU, equal to transformers' eager experts (logits, loss, aux loss, every
gradient) at EP 1 and 2, n in {1, 4}; also through `set_experts_implementation("mpipemoe")`.
"""

from __future__ import annotations

import copy

import lightning_mpipemoe  # noqa: F401  isort: skip  (first: registers "mpipemoe"; see tests/hf_tiny.py)
import pytest
import torch

from lightning_mpipemoe import ExecutorConfig, build_process_groups
from lightning_mpipemoe.hf_models.api import (
    EXPERTS_IMPLEMENTATION,
    UnsupportedExpertsLayout,
    adapter_for,
    convert_model,
    sharded_expert_keys,
)
from tests.dist_utils import run_distributed
from tests.hf_tiny import check_against_hf, named_grads, tiny_batch, tiny_model


def test_tiny_gpt_oss_exercises_every_difference():
    """The tiny model's experts are transposed, interleaved, biased, and its clamps bind
    (otherwise the equality tests below would not cover them)."""
    model = tiny_model("gpt_oss")
    experts = model.model.layers[0].mlp.experts
    assert experts.is_transposed and not experts.is_concatenated and experts.has_bias
    assert experts.gate_up_proj.shape == (8, 32, 48) and experts.down_proj.shape == (8, 24, 32)
    assert experts.gate_up_proj_bias.abs().sum() > 0 and experts.down_proj_bias.abs().sum() > 0
    batch = tiny_batch("gpt_oss")
    unclamped = tiny_model("gpt_oss", swiglu_limit=1e4)
    with torch.no_grad():
        delta = (model(**batch).logits - unclamped(**batch).logits).abs().max()
    assert delta > 1e-3, delta
    assert adapter_for(model).name == "gpt_oss"
    assert sharded_expert_keys(model)["model.layers.0.mlp.experts.gate_up_proj_bias"] == 8


@pytest.mark.parametrize("num_partitions", [1, 4])
def test_matches_transformers_locally(num_partitions):
    compared = check_against_hf("gpt_oss", None, ExecutorConfig(num_partitions=num_partitions))
    assert compared["outputs"] == ["aux_loss", "logits", "loss"] and compared["grads"] > 30


def test_set_experts_implementation_equals_eager():
    """Without convert_model: transformers' own switch runs GPT-OSS's experts on the executor."""
    ref = tiny_model("gpt_oss").train()
    ours = copy.deepcopy(ref)
    ours.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    batch = tiny_batch("gpt_oss")
    outs = []
    for model in (ref, ours):
        out = model(**batch, output_router_logits=True)
        out.loss.backward()
        outs.append((out.logits.detach(), out.loss.detach(), out.aux_loss.detach(), named_grads(model)))
    for a, b in zip(outs[0][:3], outs[1][:3]):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    assert outs[0][3].keys() == outs[1][3].keys()
    for name, grad in outs[0][3].items():
        torch.testing.assert_close(outs[1][3][name], grad, atol=1e-5, rtol=0, msg=lambda m: f"{name}: {m}")


def test_changed_layout_is_refused():
    model = tiny_model("gpt_oss")
    model.model.layers[1].mlp.experts.is_concatenated = True
    with pytest.raises(UnsupportedExpertsLayout, match="layers.1.mlp.experts"):
        convert_model(model)


def _ep_worker(rank: int, world_size: int) -> None:
    groups = build_process_groups(world_size)
    for n in (1, 4):
        check_against_hf("gpt_oss", groups, ExecutorConfig(num_partitions=n))


def test_matches_transformers_at_ep2():
    """EP rank r feeds batch r; expert gradients equal the sum over both ranks' losses."""
    run_distributed(_ep_worker, 2, timeout_s=120)
