"""The unpipelined expert-parallel executor against a per-token loop and Hugging Face's experts."""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.nn.functional as F
from transformers import MixtralConfig, Qwen2MoeConfig
from transformers.models.mixtral.modeling_mixtral import MixtralExperts
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeExperts

from lightning_mpipemoe import ExecutorConfig, ExpertWeights, build_process_groups, expert_parallel_forward
from lightning_mpipemoe.groups import check_parallel_sizes
from tests.dist_utils import run_distributed
from tests.moe_reference import assert_rel_close, keep_mask_reference, moe_reference, random_expert_weights

H, I = 12, 20


def make_weights(num_experts: int, gated: bool, bias: bool, seed: int = 0) -> dict:
    return random_expert_weights(num_experts, H, I, gated, bias, seed)


def make_tokens(num_tokens: int, num_experts: int, top_k: int, seed: int, route: str) -> tuple:
    """Routing modes: "random"; "skip" (experts 1 and E-1 get nothing); "first" (only experts
    0..top_k-1 are used, so every other expert and, under EP, every other rank gets no token)."""
    gen = torch.Generator().manual_seed(1000 + seed)
    hidden_TH = torch.randn(num_tokens, H, generator=gen)
    if route == "first":
        index_TK = torch.stack([torch.randperm(top_k, generator=gen) for _ in range(num_tokens)]).view(num_tokens, top_k)
    else:
        allowed = [e for e in range(num_experts) if route != "skip" or e not in (1, num_experts - 1)]
        picks = [torch.tensor(allowed)[torch.randperm(len(allowed), generator=gen)[:top_k]] for _ in range(num_tokens)]
        index_TK = torch.stack(picks).view(num_tokens, top_k) if picks else torch.zeros(0, top_k, dtype=torch.int64)
    weights_TK = torch.rand(num_tokens, top_k, generator=gen) + 0.1
    return hidden_TH, index_TK.long(), weights_TK


def upstream_grad(out_TH: torch.Tensor, first_row: int = 0) -> torch.Tensor:
    """A fixed, non-uniform output gradient that depends on the global row index."""
    start = first_row * out_TH.shape[1]
    return torch.cos(torch.arange(start, start + out_TH.numel(), dtype=out_TH.dtype)).view_as(out_TH)


def run_executor(hidden_TH, index_TK, weights_TK, full: dict, gated: bool, act, ep_rank=0, ep_size=1, group=None,
                 first_row=0, **kw):
    """Forward + backward of rank `ep_rank`'s shard; returns output and all gradients."""
    local = next(iter(full.values())).shape[0] // ep_size
    params = {k: v[ep_rank * local : (ep_rank + 1) * local].clone().requires_grad_() for k, v in full.items()}
    hidden_TH = hidden_TH.clone().requires_grad_()
    weights_TK = weights_TK.clone().requires_grad_()
    experts = ExpertWeights(**params, gated=gated, activation=act)
    out_TH = expert_parallel_forward(hidden_TH, index_TK, weights_TK, experts, ep_group=group, **kw)
    (out_TH * upstream_grad(out_TH, first_row)).sum().backward()
    return out_TH.detach(), hidden_TH.grad, weights_TK.grad, {k: p.grad for k, p in params.items()}


def run_reference(hidden_TH, index_TK, weights_TK, full: dict, gated: bool, act, keep_TK=None):
    params = {k: v.clone().requires_grad_() for k, v in full.items()}
    hidden_TH = hidden_TH.clone().requires_grad_()
    weights_TK = weights_TK.clone().requires_grad_()
    out_TH = moe_reference(hidden_TH, index_TK, weights_TK, **params, gated=gated, act=act, keep_TK=keep_TK)
    (out_TH * upstream_grad(out_TH)).sum().backward()
    grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p)) for k, p in params.items()}
    return out_TH.detach(), hidden_TH.grad, weights_TK.grad, grads


def compare(actual, expected, what: str, rel: float = 1e-5) -> None:
    out, g_hidden, g_weights, g_params = actual
    ref_out, ref_hidden, ref_weights, ref_params = expected
    assert_rel_close(out, ref_out, rel, f"{what} output")
    assert_rel_close(g_hidden, ref_hidden, rel, f"{what} grad hidden")
    assert_rel_close(g_weights, ref_weights, rel, f"{what} grad routing weights")
    for name in ref_params:
        assert_rel_close(g_params[name], ref_params[name], rel, f"{what} grad {name}")


CASES = [
    # (gated, bias, activation, top_k, route)
    (True, False, F.silu, 2, "random"),
    (True, True, F.silu, 1, "skip"),
    (False, True, F.relu, 1, "random"),
    (False, False, F.gelu, 2, "skip"),
    (True, False, F.silu, 2, "first"),
]


@pytest.mark.parametrize("gated,bias,act,top_k,route", CASES)
@pytest.mark.parametrize("num_tokens", [1, 37])
def test_local_matches_per_token_loop(gated, bias, act, top_k, route, num_tokens):
    full = make_weights(6, gated, bias)
    tokens = make_tokens(num_tokens, 6, top_k, seed=num_tokens, route=route)
    compare(run_executor(*tokens, full, gated, act), run_reference(*tokens, full, gated, act), "EP=1")


def test_zero_tokens_gives_empty_output_and_zero_expert_grads():
    full = make_weights(4, True, False)
    tokens = make_tokens(0, 4, 2, seed=0, route="random")
    out, g_hidden, g_weights, g_params = run_executor(*tokens, full, True, F.silu)
    assert out.shape == (0, H) and g_hidden.shape == (0, H) and g_weights.shape == (0, 2)
    assert all(g is None or torch.count_nonzero(g) == 0 for g in g_params.values())


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_local_matches_hugging_face_experts(family, top_k):
    torch.manual_seed(0)
    if family == "mixtral":
        cfg = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=6, num_experts_per_tok=top_k)
        module = MixtralExperts(cfg)
    else:
        cfg = Qwen2MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=6, num_experts_per_tok=top_k)
        module = Qwen2MoeExperts(cfg)
    cfg._experts_implementation = "eager"
    full = make_weights(6, True, False, seed=3)
    with torch.no_grad():
        module.gate_up_proj.copy_(full["w_in_EOH"])
        module.down_proj.copy_(full["w_out_EHI"])
    hidden_TH, index_TK, weights_TK = make_tokens(29, 6, top_k, seed=5, route="skip")
    hidden_TH.requires_grad_()
    weights_TK.requires_grad_()
    ref_TH = module(hidden_TH, index_TK, weights_TK)
    ref_TH.pow(2).sum().backward()
    ref_grads = (hidden_TH.grad, weights_TK.grad, module.gate_up_proj.grad, module.down_proj.grad)

    h2, w2 = hidden_TH.detach().clone().requires_grad_(), weights_TK.detach().clone().requires_grad_()
    experts = ExpertWeights(module.gate_up_proj, module.down_proj, activation=module.act_fn)
    module.zero_grad()
    out_TH = expert_parallel_forward(h2, index_TK, w2, experts)
    out_TH.pow(2).sum().backward()
    assert_rel_close(out_TH, ref_TH, what=f"{family} output")
    for got, want, name in zip((h2.grad, w2.grad, module.gate_up_proj.grad, module.down_proj.grad), ref_grads,
                               ("hidden", "weights", "gate_up_proj", "down_proj")):
        assert_rel_close(got, want, what=f"{family} grad {name}")


@pytest.mark.parametrize("top_k,group_size", [(1, None), (1, 8), (2, None), (2, 6)])
def test_capacity_drops_overflow_like_switch(top_k, group_size):
    full = make_weights(4, False, False)
    tokens = make_tokens(24, 4, top_k, seed=11, route="random")
    keep_TK = keep_mask_reference(tokens[1], 4, capacity=2, group_size=group_size)
    assert not keep_TK.all(), "the case must drop something to test dropping"
    actual = run_executor(*tokens, full, False, F.relu, capacity=2, capacity_group_size=group_size)
    compare(actual, run_reference(*tokens, full, False, F.relu, keep_TK=keep_TK), "capacity")


@pytest.mark.parametrize(
    "mutate,error,match",
    [
        (lambda h, i, w: (h, i + 100, w), ValueError, "expert 10[0-9]; valid experts are 0..5"),
        (lambda h, i, w: (h, i - 100, w), ValueError, "expert -[0-9]+; valid experts are 0..5"),
        (lambda h, i, w: (h, i.int(), w), TypeError, "torch.int64"),
        (lambda h, i, w: (h, i, w[:, :1]), ValueError, "top_k_weights shape"),
        (lambda h, i, w: (h[:-1], i, w), ValueError, "T=9"),
        (lambda h, i, w: (h[:, :-1], i, w), ValueError, "H=11"),
        (lambda h, i, w: (h.long(), i, w), TypeError, "floating-point"),
    ],
)
def test_bad_routing_inputs_raise_clear_errors(mutate, error, match):
    full = make_weights(6, True, False)
    tokens = mutate(*make_tokens(10, 6, 2, seed=1, route="random"))
    with pytest.raises(error, match=match):
        expert_parallel_forward(*tokens, ExpertWeights(full["w_in_EOH"], full["w_out_EHI"]))


@pytest.mark.parametrize("n,restore", [(1, "none"), (3, "s1"), (2, "s4")])
def test_mixed_dtypes_compute_in_the_hidden_states_dtype(n, restore):
    """fp16 hidden states: with fp16 experts (matching) everything is fp16 and close to the fp32
    loop; with fp32 experts (mixed) the weights are cast to fp16 once (autocast-style), so the
    output is the matching case's, bit for bit, in fp16, and the weights' gradients come back
    in fp32 (the same values up to fp16 rounding)."""
    config = ExecutorConfig(num_partitions=n, restore=restore)
    full = make_weights(4, True, True)
    hidden_TH, index_TK, weights_TK = make_tokens(23, 4, 2, seed=5, route="random")
    half = {k: v.half() for k, v in full.items()}
    matching = run_executor(hidden_TH.half(), index_TK, weights_TK, half, True, F.silu, config=config)
    assert matching[0].dtype == matching[1].dtype == torch.float16
    assert all(g.dtype == torch.float16 for g in matching[3].values())
    exact = run_reference(hidden_TH, index_TK, weights_TK, full, True, F.silu)
    upcast = (matching[0].float(), matching[1].float(), matching[2], {k: g.float() for k, g in matching[3].items()})
    compare(upcast, exact, f"fp16 n={n} {restore}", rel=2e-2)

    mixed = run_executor(hidden_TH.half(), index_TK, weights_TK, full, True, F.silu, config=config)
    assert mixed[0].dtype == torch.float16, "the output has the hidden states' dtype"
    assert torch.equal(mixed[0], matching[0]), "fp32 experts compute exactly as experts cast to fp16 once"
    assert torch.equal(mixed[1], matching[1])
    for name, grad in mixed[3].items():
        assert grad.dtype == torch.float32, f"{name}: the gradient comes back in the weight's dtype"
        assert_rel_close(grad, matching[3][name].float(), 2.0**-9, f"mixed n={n} {restore} grad {name}")


def test_non_floating_expert_weights_raise():
    full = make_weights(6, True, False)
    with pytest.raises(TypeError, match="w_in must be a floating-point tensor, got torch.int64"):
        expert_parallel_forward(*make_tokens(4, 6, 2, 0, "random"),
                                ExpertWeights(full["w_in_EOH"].long(), full["w_out_EHI"]))


def test_mismatched_expert_weights_raise():
    full = make_weights(6, True, False)
    with pytest.raises(ValueError, match="w_out"):
        expert_parallel_forward(*make_tokens(4, 6, 2, 0, "random"), ExpertWeights(full["w_in_EOH"], full["w_out_EHI"][:3]))
    with pytest.raises(ValueError, match="plain"):
        expert_parallel_forward(*make_tokens(4, 6, 2, 0, "random"), ExpertWeights(full["w_in_EOH"], full["w_out_EHI"], gated=False))


def test_parallel_size_errors_name_the_value():
    with pytest.raises(ValueError, match="expert_parallel_size=3 does not divide the world size 4"):
        check_parallel_sizes(4, 3)
    with pytest.raises(ValueError, match="does not divide the number of experts 6"):
        check_parallel_sizes(4, 4, num_experts=6)
    with pytest.raises(ValueError, match="positive int"):
        check_parallel_sizes(4, 0)


# ----------------------------------------------------------------------------- distributed

DIST_CASES = [
    # (gated, bias, act, top_k, route, tokens per rank)
    (True, False, F.silu, 2, "random", [13, 7, 0, 21]),
    (True, True, F.silu, 1, "skip", [9, 16, 5, 3]),
    (False, True, F.relu, 1, "random", [17, 0, 11, 4]),
    (False, False, F.gelu, 2, "first", [6, 11, 8, 2]),
]


def _ep_equivalence_worker(rank: int, world_size: int) -> None:
    groups = build_process_groups(world_size, timeout=datetime.timedelta(seconds=30))
    num_experts = 8
    for case, (gated, bias, act, top_k, route, counts) in enumerate(DIST_CASES):
        counts = counts[:world_size]
        full = make_weights(num_experts, gated, bias, seed=case)
        per_rank = [make_tokens(c, num_experts, top_k, seed=10 * case + r, route=route) for r, c in enumerate(counts)]
        mine = per_rank[rank]
        lo, hi = sum(counts[:rank]), sum(counts[: rank + 1])
        actual = run_executor(*mine, full, gated, act, ep_rank=rank, ep_size=world_size, group=groups.ep,
                              combine_group=groups.ep_combine, first_row=lo)
        # The reference sees every rank's tokens at once with all experts; this rank's rows
        # and this rank's expert slices of the weight gradients must match.
        every = [torch.cat([t[i] for t in per_rank]) for i in range(3)]
        out, g_hidden, g_weights, g_params = run_reference(*every, full, gated, act)
        local = num_experts // world_size
        expected = (out[lo:hi], g_hidden[lo:hi], g_weights[lo:hi],
                    {k: g[rank * local : (rank + 1) * local] for k, g in g_params.items()})
        compare(actual, expected, f"EP={world_size} case {case} rank {rank}")
        if gated and not bias and act is F.silu:
            cfg = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=num_experts,
                                num_experts_per_tok=top_k)
            cfg._experts_implementation = "eager"
            hf = MixtralExperts(cfg)
            with torch.no_grad():
                hf.gate_up_proj.copy_(full["w_in_EOH"])
                hf.down_proj.copy_(full["w_out_EHI"])
            assert_rel_close(actual[0], hf(*mine).detach(), what=f"EP={world_size} vs HF MixtralExperts")

    # An out-of-range expert on the last rank only: every rank raises, naming the index (found
    # in the exchange of counts, before any token is sent, so no rank waits in an all-to-all),
    # and the groups serve the next call as usual.
    full = make_weights(num_experts, True, False)
    local = {k: v[rank * (num_experts // world_size) : (rank + 1) * (num_experts // world_size)] for k, v in full.items()}
    hidden_TH, index_TK, weights_TK = make_tokens(5, num_experts, 2, seed=99, route="random")
    bad = index_TK.clone()
    if rank == world_size - 1:
        bad[2, 1] = num_experts + 3
    where = "" if rank == world_size - 1 else rf" \(on rank {world_size - 1} of the expert-parallel group\)"
    with pytest.raises(ValueError, match=rf"expert {num_experts + 3}; valid experts are 0..{num_experts - 1}{where}"):
        expert_parallel_forward(hidden_TH, bad, weights_TK, ExpertWeights(**local), ep_group=groups.ep)
    out_TH = expert_parallel_forward(hidden_TH, index_TK, weights_TK, ExpertWeights(**local), ep_group=groups.ep)
    assert out_TH.shape == hidden_TH.shape
    # Capacity drops with top-2 at EP > 1: each rank drops its own overflow (per group of 6 of
    # its tokens, first choices before second ones), plain and pipelined; rank 2 has no token.
    full = make_weights(num_experts, False, False, seed=9)
    counts = [12, 6, 0, 18][:world_size]  # whole groups (sequences) of 6
    per_rank = [make_tokens(c, num_experts, 2, seed=50 + r, route="random") for r, c in enumerate(counts)]
    keeps = [keep_mask_reference(t[1], num_experts, capacity=1, group_size=6) for t in per_rank]
    assert not torch.cat(keeps).all() and torch.cat(keeps).any()
    every = [torch.cat([t[i] for t in per_rank]) for i in range(3)]
    out, g_hidden, g_weights, g_params = run_reference(*every, full, False, F.relu, keep_TK=torch.cat(keeps))
    lo, hi = sum(counts[:rank]), sum(counts[: rank + 1])
    local = num_experts // world_size
    expected = (out[lo:hi], g_hidden[lo:hi], g_weights[lo:hi],
                {k: g[rank * local : (rank + 1) * local] for k, g in g_params.items()})
    for n, restore in ((1, "none"), (2, "s2")):
        actual = run_executor(*per_rank[rank], full, False, F.relu, ep_rank=rank, ep_size=world_size, group=groups.ep,
                              combine_group=groups.ep_combine, first_row=lo, capacity=1, capacity_group_size=6,
                              config=ExecutorConfig(n, restore))
        compare(actual, expected, f"EP={world_size} top-2 capacity n={n} rank {rank}")


@pytest.mark.parametrize("world_size", [2, 4])
def test_expert_parallel_matches_reference(world_size):
    run_distributed(_ep_equivalence_worker, world_size)


def _skipped_collective_worker(rank: int, world_size: int, timeout_s: float, result_queue) -> None:
    groups = build_process_groups(world_size, timeout=datetime.timedelta(seconds=timeout_s))
    if rank == 1:
        return  # this rank never joins the all-to-all
    full = make_weights(4, True, False)
    tokens = make_tokens(8, 4, 2, seed=0, route="random")
    local = {k: v[:2] for k, v in full.items()}
    try:
        expert_parallel_forward(*tokens, ExpertWeights(**local), ep_group=groups.ep)
    except RuntimeError as exc:
        result_queue.put(("error", str(exc)[:300]))
    else:
        result_queue.put(("returned", ""))


def test_skipped_collective_errors_within_timeout():
    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.SimpleQueue()
    run_distributed(_skipped_collective_worker, 2, 3.0, results)
    kind, message = results.get()
    assert kind == "error", "the all-to-all with a missing peer must fail, not return"
    # The group's own 3 s timeout ended it (no wall clock here: a loaded machine cannot fail it).
    # gloo says which limit it hit, e.g. "Timed out waiting 3000ms for send operation to complete".
    assert "timed out" in message.lower() and "3000ms" in message, message
