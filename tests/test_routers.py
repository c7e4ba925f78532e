"""Routers and auxiliary losses against references that share none of their code.

The routers are checked against routing written out in plain Python (sorting each token's
scores; softmax by hand) and against Hugging Face's own router modules (Mixtral renormalises
the top-k weights, Qwen2-MoE may not); the losses against hand computation and Hugging
Face's functions; `MoELayer` (router + executor) against the per-token loop of
`tests.moe_reference`, including Switch's capacity (tokens past it contribute zero) and its
multiplicative jitter (the same random draw, replayed from the seed).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import MixtralConfig, Qwen2MoeConfig
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func as hf_load_balancing_loss
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter
from transformers.models.switch_transformers.modeling_switch_transformers import router_z_loss_func as hf_z_loss

from lightning_mpipemoe import ExecutorConfig, MoELayer, SwitchRouter, TopKRouter, load_balancing_loss, router_z_loss
from tests.moe_reference import assert_rel_close, moe_reference

H, I, E = 10, 7, 6


def _hidden(tokens: int, seed: int, hidden: int = H) -> torch.Tensor:
    return torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed))


def hand_routing(logits_TE: torch.Tensor, top_k: int, scoring: str, normalize: bool):
    """Per token, in Python floats: the k largest logits (descending), and their weights."""
    index, weights = [], []
    for row in logits_TE.double().tolist():
        order = sorted(range(len(row)), key=lambda e: -row[e])[:top_k]
        if scoring == "softmax_topk":
            peak = max(row)
            total = sum(math.exp(v - peak) for v in row)
            w = [math.exp(row[e] - peak) / total for e in order]
            if normalize:
                w = [x / sum(w) for x in w]
        else:  # topk_softmax: softmax over the k chosen logits only
            peak = row[order[0]]
            total = sum(math.exp(row[e] - peak) for e in order)
            w = [math.exp(row[e] - peak) / total for e in order]
        index.append(order)
        weights.append(w)
    return torch.tensor(index), torch.tensor(weights, dtype=torch.float64)


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("scoring, normalize", [("softmax_topk", True), ("softmax_topk", False), ("topk_softmax", True)])
def test_topk_router_matches_hand_routing(top_k, scoring, normalize):
    torch.manual_seed(0)
    router = TopKRouter(H, E, top_k, scoring=scoring, normalize=normalize)
    hidden_TH = _hidden(23, seed=top_k)
    out = router(hidden_TH)
    torch.testing.assert_close(out.logits_TE, hidden_TH @ router.gate.weight.T, atol=1e-6, rtol=0)
    index_TK, weights_TK = hand_routing(out.logits_TE.detach(), top_k, scoring, normalize)
    assert torch.equal(out.top_k_index_TK, index_TK)
    torch.testing.assert_close(out.top_k_weights_TK.double(), weights_TK, atol=1e-6, rtol=0)
    sums = out.top_k_weights_TK.sum(-1)
    if scoring == "topk_softmax" or normalize:
        torch.testing.assert_close(sums, torch.ones_like(sums))
    elif top_k < E:
        assert (sums < 1 - 1e-3).all()  # unnormalised: the mass of the experts left out is missing


@pytest.mark.parametrize("family, normalize", [("mixtral", True), ("qwen2_moe", False), ("qwen2_moe", True)])
def test_topk_router_matches_hugging_face_routers(family, normalize):
    """Values and the gradient of the gate weight equal Hugging Face's router modules."""
    if family == "mixtral":
        hf = MixtralTopKRouter(MixtralConfig(hidden_size=H, num_local_experts=E, num_experts_per_tok=2))
    else:
        config = Qwen2MoeConfig(hidden_size=H, num_experts=E, num_experts_per_tok=2, norm_topk_prob=normalize)
        hf = Qwen2MoeTopKRouter(config)
    ours = TopKRouter(H, E, 2, normalize=normalize)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(E, H, generator=torch.Generator().manual_seed(3)))
        ours.gate.weight.copy_(hf.weight)
    hidden_TH = _hidden(31, seed=4)
    hf_logits, hf_weights, hf_index = hf(hidden_TH)
    out = ours(hidden_TH)
    assert torch.equal(out.top_k_index_TK, hf_index)
    torch.testing.assert_close(out.top_k_weights_TK, hf_weights.float(), atol=1e-6, rtol=0)
    probe_TK = torch.randn(31, 2, generator=torch.Generator().manual_seed(5))
    (out.top_k_weights_TK * probe_TK).sum().backward()
    (hf_weights * probe_TK).sum().backward()
    torch.testing.assert_close(ours.gate.weight.grad, hf.weight.grad, atol=1e-6, rtol=0)


def test_router_z_loss_by_hand_and_as_hugging_face():
    logits_TE = torch.randn(17, E, generator=torch.Generator().manual_seed(6)) * 3
    by_hand = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits_TE.double().tolist()) / 17
    assert router_z_loss(logits_TE).item() == pytest.approx(by_hand, rel=1e-6)
    assert router_z_loss(logits_TE).item() == pytest.approx(hf_z_loss(logits_TE.unsqueeze(0)).item(), rel=1e-6)
    grouped = logits_TE[:16].view(2, 8, E)  # [groups, tokens, E] is taken as is
    assert router_z_loss(grouped).item() == pytest.approx(hf_z_loss(grouped).item(), rel=1e-6)


@pytest.mark.parametrize("top_k", [1, 2])
def test_load_balancing_loss_by_hand_and_as_hugging_face(top_k):
    """E * sum_e f_e * P_e, f_e the share of rows (token x choice) sent to expert e among all
    tokens (summed over the k choices), P_e the mean router probability; layers concatenated."""
    layers = tuple(torch.randn(13, E, generator=torch.Generator().manual_seed(s)) for s in (7, 8))
    counts, probs, tokens = [0.0] * E, [0.0] * E, 0
    for logits_TE in layers:
        for row in logits_TE.double().tolist():
            total = sum(math.exp(v) for v in row)
            for e in sorted(range(E), key=lambda e: -row[e])[:top_k]:
                counts[e] += 1
            for e in range(E):
                probs[e] += math.exp(row[e]) / total
            tokens += 1
    by_hand = E * sum((counts[e] / tokens) * (probs[e] / tokens) for e in range(E))
    assert load_balancing_loss(layers, E, top_k).item() == pytest.approx(by_hand, rel=1e-6)
    assert load_balancing_loss(layers, E, top_k).item() == pytest.approx(
        hf_load_balancing_loss(layers, num_experts=E, top_k=top_k).item(), rel=1e-6
    )
    single = load_balancing_loss(layers[0], E, top_k)  # one tensor is one layer
    assert single.item() == pytest.approx(hf_load_balancing_loss(layers[:1], E, top_k).item(), rel=1e-6)
    uniform = torch.zeros(8, E)  # equal probabilities, top_k copies each: the minimum E * k/E * 1/E * E
    assert load_balancing_loss(uniform, E, top_k).item() == pytest.approx(top_k, rel=1e-6)


def _experts_of(layer: MoELayer) -> dict:
    return {"w_in_EOH": layer.gate_up_proj, "w_out_EHI": layer.down_proj}


@pytest.mark.parametrize("num_partitions, restore", [(1, "none"), (3, "s2")])
@pytest.mark.parametrize("scoring, normalize", [("softmax_topk", True), ("softmax_topk", False), ("topk_softmax", True)])
def test_moe_layer_with_topk_router_matches_per_token_loop(scoring, normalize, num_partitions, restore):
    torch.manual_seed(1)
    layer = MoELayer(H, I, E, 2, router_kwargs={"scoring": scoring, "normalize": normalize}, init_std=0.3,
                     config=ExecutorConfig(num_partitions, restore))
    hidden_BSH = _hidden(2 * 11, seed=2).view(2, 11, H).requires_grad_()
    out_BSH, logits_TE = layer(hidden_BSH)
    probe = torch.randn(out_BSH.shape, generator=torch.Generator().manual_seed(9))
    (out_BSH * probe).sum().backward()
    got = [out_BSH.detach(), hidden_BSH.grad, layer.router.gate.weight.grad, layer.gate_up_proj.grad,
           layer.down_proj.grad]

    # The reference: hand routing (sorting floats) and the per-token loop, autograd through
    # the router weights only for the gradients.
    gate = layer.router.gate.weight.detach().clone().requires_grad_()
    w_in, w_out = (p.detach().clone().requires_grad_() for p in (layer.gate_up_proj, layer.down_proj))
    hidden_TH = hidden_BSH.detach().reshape(-1, H).clone().requires_grad_()
    logits = hidden_TH @ gate.T
    index_TK, _ = hand_routing(logits.detach(), 2, scoring, normalize)
    chosen_TK = logits.gather(1, index_TK)
    if scoring == "softmax_topk":
        weights_TK = F.softmax(logits, -1).gather(1, index_TK)
        if normalize:
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
    else:
        weights_TK = F.softmax(chosen_TK, -1)
    expected_out = moe_reference(hidden_TH, index_TK, weights_TK, w_in, w_out)
    (expected_out.view_as(probe) * probe).sum().backward()
    expected = [expected_out.view_as(out_BSH).detach(), hidden_TH.grad.view_as(hidden_BSH), gate.grad, w_in.grad,
                w_out.grad]
    torch.testing.assert_close(logits_TE, logits, atol=1e-6, rtol=0)
    for what, a, e in zip(("out", "d hidden", "d gate", "d gate_up_proj", "d down_proj"), got, expected):
        assert_rel_close(a, e, 1e-5, f"{scoring}/{normalize} n={num_partitions} {what}")


@pytest.mark.parametrize("num_partitions, restore", [(1, "none"), (2, "s4")])
def test_switch_capacity_and_jitter_inside_moe_layer(num_partitions, restore):
    """Top-1 with capacity ceil(1.0 * 12 / 4) = 3 per expert and sequence: tokens past it (in
    sequence order) contribute zero; the jitter multiplies the router's input only, by
    U(1 - j, 1 + j) drawn first from the global generator (replayed here from the seed)."""
    num_experts, seq, jitter = 4, 12, 0.3
    torch.manual_seed(2)
    layer = MoELayer(H, I, num_experts, 1, router="switch", gated=False, activation="relu", init_std=0.3,
                     router_kwargs={"capacity_factor": 1.0, "jitter": jitter},
                     config=ExecutorConfig(num_partitions, restore))
    with torch.no_grad():  # a skewed router: most tokens want expert 0, so capacity must drop some
        layer.router.classifier.weight[0] += 0.8
    hidden_BSH = _hidden(3 * seq, seed=3).view(3, seq, H).requires_grad_()
    torch.manual_seed(123)
    out_BSH, logits_TE = layer(hidden_BSH)
    probe = torch.randn(out_BSH.shape, generator=torch.Generator().manual_seed(9))
    (out_BSH * probe).sum().backward()

    torch.manual_seed(123)
    hidden_TH = hidden_BSH.detach().reshape(-1, H)
    noise_TH = torch.empty_like(hidden_TH).uniform_(1.0 - jitter, 1.0 + jitter)
    gate = layer.router.classifier.weight.detach().clone().requires_grad_()
    w_in, w_out = (p.detach().clone().requires_grad_() for p in (layer.gate_up_proj, layer.down_proj))
    hidden_ref = hidden_TH.clone().requires_grad_()
    logits = (hidden_ref * noise_TH) @ gate.T
    torch.testing.assert_close(logits_TE, logits, atol=1e-6, rtol=0)
    probs = F.softmax(logits, -1)
    index_T1 = probs.detach().argmax(-1, keepdim=True)
    capacity = math.ceil(1.0 * seq / num_experts)
    keep_T1 = torch.zeros_like(index_T1, dtype=torch.bool)
    for b in range(3):  # first `capacity` tokens of each expert in each sequence
        taken = [0] * num_experts
        for t in range(b * seq, (b + 1) * seq):
            e = int(index_T1[t])
            keep_T1[t] = taken[e] < capacity
            taken[e] += 1
    assert not keep_T1.all() and keep_T1.any(), "the case must drop some tokens and keep others"
    expected = moe_reference(hidden_ref, index_T1, probs.gather(1, index_T1), w_in, w_out, gated=False,
                             act=F.relu, keep_TK=keep_T1)
    dropped = ~keep_T1[:, 0]
    assert (out_BSH.detach().reshape(-1, H)[dropped] == 0).all()
    assert_rel_close(out_BSH.detach().reshape(-1, H), expected.detach(), 1e-5, "switch out")
    (expected.view_as(probe) * probe).sum().backward()
    assert_rel_close(hidden_BSH.grad.reshape(-1, H), hidden_ref.grad, 1e-5, "switch d hidden")
    assert_rel_close(layer.router.classifier.weight.grad, gate.grad, 1e-5, "switch d classifier")
    assert_rel_close(layer.gate_up_proj.grad, w_in.grad, 1e-5, "switch d w_in")
    assert_rel_close(layer.down_proj.grad, w_out.grad, 1e-5, "switch d w_out")

    layer.eval()  # no jitter in eval: the router sees the input itself
    with torch.no_grad():
        _, eval_logits = layer(hidden_BSH)
    torch.testing.assert_close(eval_logits, hidden_TH @ gate.detach().T, atol=1e-6, rtol=0)


def test_switch_router_explicit_capacity_and_errors():
    router = SwitchRouter(H, 4, expert_capacity=2)
    out = router(_hidden(9, seed=1), sequence_length=9)
    assert out.capacity == 2 and out.capacity_group_size == 9 and out.top_k_index_TK.shape == (9, 1)
    assert SwitchRouter(H, 4, capacity_factor=1.5)(_hidden(10, seed=1)).capacity == math.ceil(1.5 * 10 / 4)
    with pytest.raises(ValueError, match="expert_capacity"):
        SwitchRouter(H, 4, capacity_factor=None)
    with pytest.raises(ValueError, match="top_k=5 must be in 1..num_experts=4"):
        TopKRouter(H, 4, 5)
    with pytest.raises(ValueError, match="scoring="):
        TopKRouter(H, 4, 2, scoring="sigmoid")
