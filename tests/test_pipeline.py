"""The pipelined executor (n partitions x restore strategies) against the plain reference path.

Every configuration is compared with the n = 1 reference (outputs and every gradient,
within 1e-6 of the largest reference value, fp32), on one rank and on gloo groups of 2 and
4 ranks, with awkward token counts, n larger than a rank's tokens, a rank without tokens,
empty experts and ranks that receive nothing. One spawn per world size.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F

from lightning_mpipemoe import ExecutorConfig, ExpertWeights, build_process_groups
from lightning_mpipemoe.config import RESTORE_STRATEGIES, SimulatedLink
from lightning_mpipemoe.moe.buffers import BufferPool
from lightning_mpipemoe.moe.comm import LinkClock
from lightning_mpipemoe.moe.executor import (
    expert_parallel_forward,
    pipelined_expert_parallel_forward,
    reference_expert_parallel_forward,
)
from lightning_mpipemoe.moe.memory import LayerShape, PipelineRecord, analytic_memory, measure_call
from tests.dist_utils import run_distributed
from tests.moe_reference import assert_rel_close, random_expert_weights

PARTITIONS = (1, 2, 3, 4, 8)
H, I = 12, 10

# (gated, bias, activation, top_k, route, capacity)
SCENARIOS = [
    (True, True, F.silu, 2, "random", None),
    (False, False, F.relu, 1, "skip", None),
    (True, False, F.gelu, 1, "random", None),
    (False, True, F.silu, 2, "first", None),
    (True, False, F.silu, 2, "random", 3),
]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, rel: float = 1e-6) -> None:
    """Within `rel` of max|expected| (fp32: rounding of reordered sums only)."""
    assert_rel_close(actual, expected, rel, what, floor=1e-6)


def make_weights(num_experts: int, gated: bool, bias: bool) -> dict:
    return random_expert_weights(num_experts, H, I, gated, bias, seed=7)


def make_tokens(num_tokens: int, num_experts: int, top_k: int, route: str, seed: int) -> tuple:
    """"random"; "skip": experts 1 and E-1 get nothing; "first": only experts 0..k-1 (all on
    rank 0, so every other rank receives no token)."""
    gen = torch.Generator().manual_seed(100 + seed)
    hidden_TH = torch.randn(num_tokens, H, generator=gen)
    if route == "first":
        allowed = list(range(top_k))
    elif route == "skip":
        allowed = [e for e in range(num_experts) if e not in (1, num_experts - 1)]
    else:
        allowed = list(range(num_experts))
    picks = [torch.tensor(allowed)[torch.randperm(len(allowed), generator=gen)[:top_k]] for _ in range(num_tokens)]
    index_TK = torch.stack(picks) if picks else torch.zeros(0, top_k, dtype=torch.int64)
    weights_TK = torch.rand(num_tokens, top_k, generator=gen) + 0.1
    return hidden_TH, index_TK.long(), weights_TK


def run_once(forward, tokens, full: dict, gated: bool, act, ep_rank: int, ep_size: int, gate_fn=None,
             **kw) -> list[torch.Tensor]:
    """Forward + backward of this rank's shard: output, then gradients of hidden, routing
    weights and every expert parameter (zeros where autograd left None)."""
    local = next(iter(full.values())).shape[0] // ep_size
    params = {k: v[ep_rank * local : (ep_rank + 1) * local].clone().requires_grad_() for k, v in full.items()}
    hidden_TH, index_TK, weights_TK = (t.clone() for t in tokens)
    hidden_TH.requires_grad_()
    weights_TK.requires_grad_()
    experts = ExpertWeights(**params, gated=gated, activation=act, gate_fn=gate_fn)
    out_TH = forward(hidden_TH, index_TK, weights_TK, experts, **kw)
    grad_TH = torch.cos(torch.arange(out_TH.numel(), dtype=out_TH.dtype, device=out_TH.device) * 0.37).view_as(out_TH)
    (out_TH * grad_TH).sum().backward()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params.values()]
    return [out_TH.detach(), hidden_TH.grad, weights_TK.grad, *grads]


def check_matrix(rank: int, world: int, groups, tokens_per_rank: list[int]) -> int:
    """Every scenario x n x restore against the n = 1 reference; returns configurations run."""
    ep, combine = groups.ep, groups.ep_combine
    names = ["output", "grad hidden", "grad routing weights", "grad w_in", "grad w_out", "grad b_in", "grad b_out"]
    runs = 0
    for s, (gated, bias, act, top_k, route, capacity) in enumerate(SCENARIOS):
        num_experts = 4 * world
        full = make_weights(num_experts, gated, bias)
        tokens = make_tokens(tokens_per_rank[rank], num_experts, top_k, route, seed=10 * s + rank)
        kw = dict(ep_group=ep, combine_group=combine, capacity=capacity)
        expected = run_once(reference_expert_parallel_forward, tokens, full, gated, act, rank, world, **kw)
        for n in PARTITIONS:
            for restore in RESTORE_STRATEGIES:
                config = ExecutorConfig(num_partitions=n, restore=restore)
                actual = run_once(pipelined_expert_parallel_forward, tokens, full, gated, act, rank, world,
                                  config=config, **kw)
                for name, a, e in zip(names, actual, expected):
                    assert_close(a, e, f"rank {rank} scenario {s} n={n} restore={restore} {name}")
                runs += 1
    return runs


# --- one process ------------------------------------------------------------------------


class _Local:
    ep = ep_combine = None


@pytest.mark.parametrize("num_tokens", [0, 5, 37])
def test_matrix_one_rank(num_tokens):
    assert check_matrix(0, 1, _Local(), [num_tokens]) == len(SCENARIOS) * len(PARTITIONS) * len(RESTORE_STRATEGIES)


def test_explicit_plain_config_takes_reference_and_others_the_pipeline():
    assert not ExecutorConfig(num_partitions=1, restore="none").pipelined
    assert ExecutorConfig().is_auto and not ExecutorConfig().resolved().pipelined  # untuned "auto" is the plain path
    assert ExecutorConfig(num_partitions=2).pipelined and ExecutorConfig(restore="s4").pipelined
    full = make_weights(4, True, True)
    tokens = make_tokens(9, 4, 2, "random", seed=1)
    via_router = run_once(expert_parallel_forward, tokens, full, True, F.silu, 0, 1,
                          config=ExecutorConfig(num_partitions=3, restore="s2"))
    reference = run_once(reference_expert_parallel_forward, tokens, full, True, F.silu, 0, 1)
    for a, e in zip(via_router, reference):
        assert_close(a, e, "expert_parallel_forward(n=3, s2)")


def test_bf16_rows_with_fp32_weights_match_the_reference():
    """Compute in bf16 (the rows' dtype) with fp32 master weights: gradients in each one's dtype."""
    full = make_weights(4, True, True)
    hidden_TH, index_TK, weights_TK = make_tokens(29, 4, 2, "random", seed=3)
    tokens = (hidden_TH.bfloat16(), index_TK, weights_TK)
    expected = run_once(reference_expert_parallel_forward, tokens, full, True, F.silu, 0, 1)
    for n, restore in ((1, "none"), (3, "s1"), (4, "s4")):
        actual = run_once(pipelined_expert_parallel_forward, tokens, full, True, F.silu, 0, 1,
                          config=ExecutorConfig(n, restore))
        for a, e in zip(actual, expected):
            assert a.dtype == e.dtype
            assert_close(a.float(), e.float(), f"bf16 n={n} {restore}", rel=2e-2)


def _within_bf16_rounding(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Elementwise within one bf16 rounding step (2^-7 relative, the spacing of bf16) of `expected`."""
    a, e = actual.float(), expected.float()
    tolerance = e.abs() * 2.0**-7 + 1e-30
    worst = ((a - e).abs() / tolerance).max()
    assert worst <= 1.0, f"{what}: {float(worst):.2f} bf16 rounding steps apart"


def test_bf16_gradients_do_not_depend_on_n():
    """bf16 rows and bf16 parameters: the weight and bias gradients are summed over partitions
    in fp32 and rounded once, so any n gives the n = 1 result up to that one rounding."""
    full = {k: v.bfloat16() for k, v in make_weights(4, True, True).items()}
    hidden_TH, index_TK, weights_TK = make_tokens(203, 4, 2, "random", seed=6)
    tokens = (hidden_TH.bfloat16(), index_TK, weights_TK)
    names = ["output", "grad hidden", "grad routing weights", "grad w_in", "grad w_out", "grad b_in", "grad b_out"]
    for restore in ("none", "s4"):
        one = run_once(pipelined_expert_parallel_forward, tokens, full, True, F.silu, 0, 1, config=ExecutorConfig(1, restore))
        for n in (2, 4, 8):
            actual = run_once(pipelined_expert_parallel_forward, tokens, full, True, F.silu, 0, 1,
                              config=ExecutorConfig(n, restore))
            for name, a, e in zip(names[3:], actual[3:], one[3:]):
                assert a.dtype == torch.bfloat16
                _within_bf16_rounding(a, e, f"n={n} {restore} {name}")


def test_random_activation_is_replayed_in_backward():
    """A `gate_fn` that draws random numbers (Switch's expert dropout): backward recomputes the
    activation with the forward's mask, so output and every gradient equal the same partitions
    run one after another under autograd from the same seed, and the RNG ends where it did."""
    dropout = torch.nn.Dropout(0.3)

    def relu_dropout(pre_SO):
        return dropout(F.relu(pre_SO))

    full = make_weights(4, False, True)
    tokens = make_tokens(37, 4, 2, "skip", seed=4)
    names = ["output", "grad hidden", "grad routing weights", "grad w_in", "grad w_out", "grad b_in", "grad b_out"]
    for n, restore in ((2, "none"), (3, "s1"), (4, "s3"), (4, "s4")):
        config = ExecutorConfig(n, restore)
        torch.manual_seed(5)
        expected = run_once(reference_expert_parallel_forward, tokens, full, False, F.relu, 0, 1,
                            gate_fn=relu_dropout, config=config)
        after_reference = torch.get_rng_state()
        torch.manual_seed(5)
        actual = run_once(pipelined_expert_parallel_forward, tokens, full, False, F.relu, 0, 1,
                          gate_fn=relu_dropout, config=config)
        assert torch.equal(torch.get_rng_state(), after_reference), f"n={n} {restore}: backward moved the RNG"
        for name, a, e in zip(names, actual, expected):
            assert_close(a, e, f"dropout n={n} {restore} {name}")
    no_dropout = run_once(reference_expert_parallel_forward, tokens, full, False, F.relu, 0, 1, config=config)
    assert not torch.allclose(no_dropout[3], expected[3])  # the masks did drop something


def test_second_backward_is_a_clear_error():
    full = make_weights(4, True, False)
    hidden_TH, index_TK, weights_TK = make_tokens(6, 4, 2, "random", seed=2)
    hidden_TH.requires_grad_()
    experts = ExpertWeights(**{k: v.requires_grad_() for k, v in full.items()})
    out_TH = pipelined_expert_parallel_forward(hidden_TH, index_TK, weights_TK, experts, config=ExecutorConfig(2, "s1"))
    out_TH.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        out_TH.sum().backward()


def test_simulated_link_validation():
    assert SimulatedLink(0.001, 1e9).transfer_seconds(10**9) == pytest.approx(1.0)
    assert SimulatedLink(latency_s=0.0).transfer_seconds(10**12) == 0.0
    for bad in (dict(latency_s=-1.0), dict(latency_s=math.inf), dict(bandwidth_bytes_per_s=0.0),
                dict(bandwidth_bytes_per_s=-5.0), dict(latency_s=math.nan), dict(latency_s="1ms"),
                dict(bandwidth_bytes_per_s=True)):
        with pytest.raises(ValueError, match="SimulatedLink"):
            SimulatedLink(**bad)
    with pytest.raises(TypeError, match="SimulatedLink"):
        ExecutorConfig(link=0.5)


def test_link_clock_serialises_transfers_on_one_wire():
    clock = LinkClock(SimulatedLink(latency_s=0.5, bandwidth_bytes_per_s=1000.0))
    first = clock.reserve(1000)  # wire busy 1 s, done 0.5 s later
    second = clock.reserve(1000)  # waits for the wire, not for the first one's latency
    assert second - first == pytest.approx(1.0, abs=0.05)
    assert clock.busy_s == pytest.approx(3.0)


def test_buffer_pool_refuses_a_live_slot_and_counts_storages_once():
    pool = BufferPool()
    a = pool.put("a", torch.zeros(10, 4))
    pool.put("alias", a[2:5])
    assert pool.live_bytes() == 160
    with pytest.raises(RuntimeError, match="drop it"):
        pool.put("a", torch.zeros(1))
    pool.drop("a", "alias")
    pool.put("a", torch.zeros(2, 4))
    assert pool.live_bytes() == 32 and pool.peak_bytes == 160


def test_analytic_saving_is_designs_delta():
    """s4 - none = R*(M + O): DESIGN's ΔM_act with the shared buffers counted as temporaries."""
    for top_k, gated in ((1, False), (2, True)):
        shape = LayerShape(tokens=4096, top_k=top_k, hidden=256, intermediate=512, gated=gated)
        none = analytic_memory(shape, 4, "none")
        s4 = analytic_memory(shape, 4, "s4")
        assert none.device_held_bytes - s4.device_held_bytes == shape.rows * (shape.hidden + shape.width) * 4
        s1 = analytic_memory(shape, 4, "s1")
        assert s1.device_held_bytes == s4.device_held_bytes
        assert s1.host_held_bytes == none.device_held_bytes - s4.device_held_bytes
        # Temporaries shrink with n (buffers of R/n rows), held bytes do not depend on n.
        assert analytic_memory(shape, 8, "s4").forward_peak_temp_bytes < s4.forward_peak_temp_bytes
        assert analytic_memory(shape, 8, "s4").device_held_bytes == s4.device_held_bytes


# --- gloo groups ------------------------------------------------------------------------


def _matrix_worker(rank: int, world: int, tokens_per_rank: list[int]) -> None:
    torch.manual_seed(0)
    groups = build_process_groups(world)
    check_matrix(rank, world, groups, tokens_per_rank)


def test_matrix_two_ranks():
    # 37 / 5 tokens: uneven, not divisible by n, and n = 8 > 5 leaves empty partitions.
    run_distributed(_matrix_worker, 2, [37, 5], timeout_s=240)


def test_matrix_four_ranks():
    # Rank 2 holds no token at all; rank 3 fewer tokens than partitions.
    run_distributed(_matrix_worker, 4, [23, 9, 0, 3], timeout_s=240)


class _SleepyGate:
    """A gated activation that also sleeps: compute that holds no core, so timing on a
    loaded 2-core machine still measures the schedule, not the machine."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, pre_SO: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        gate_SI, up_SI = pre_SO.chunk(2, dim=-1)
        return F.silu(gate_SI) * up_SI


def _balanced_layer(num_tokens: int, num_experts: int, top_k: int, hidden: int, inter: int, rank: int, world: int):
    """A router (linear gate, so the layer input is held as in a real layer) with routing that
    spreads every partition evenly over experts and ranks."""
    gen = torch.Generator().manual_seed(3 + rank)
    hidden_TH = torch.randn(num_tokens, hidden, generator=gen).requires_grad_()
    gate_HE = (torch.randn(hidden, num_experts, generator=gen) * 0.1).requires_grad_()
    token_T = torch.arange(num_tokens)
    index_TK = torch.stack([(token_T * top_k + k + rank) % num_experts for k in range(top_k)], dim=1)
    local = num_experts // world
    g2 = torch.Generator().manual_seed(11)
    mine = slice(rank * local, (rank + 1) * local)
    params = {
        "w_in_EOH": (torch.randn(num_experts, 2 * inter, hidden, generator=g2) * 0.05)[mine],
        "w_out_EHI": (torch.randn(num_experts, hidden, inter, generator=g2) * 0.05)[mine],
    }
    params = {k: v.clone().requires_grad_() for k, v in params.items()}
    return hidden_TH, gate_HE, index_TK, params


def _memory_and_overlap_worker(rank: int, world: int) -> None:
    groups = build_process_groups(world)
    kw = dict(ep_group=groups.ep, combine_group=groups.ep_combine)

    # Memory: measured (saved-tensor hooks + buffer pool) within 10% of the analytic model.
    tokens, experts_total, top_k, hidden, inter, n = 64, 8, 2, 256, 128, 4
    shape = LayerShape(tokens=tokens, top_k=top_k, hidden=hidden, intermediate=inter, gated=True, ep_size=world)
    held = {}
    for restore in RESTORE_STRATEGIES:
        hidden_TH, gate_HE, index_TK, params = _balanced_layer(tokens, experts_total, top_k, hidden, inter, rank, world)
        experts = ExpertWeights(**params)
        record = PipelineRecord()

        def forward():
            probs_TE = (hidden_TH @ gate_HE).softmax(dim=-1)
            weights_TK = probs_TE.gather(1, index_TK)
            return pipelined_expert_parallel_forward(
                hidden_TH, index_TK, weights_TK, experts, config=ExecutorConfig(n, restore), record=record, **kw
            )

        measured = measure_call(forward, lambda out: out.sum().backward(), parameters=[gate_HE, *params.values()],
                                record=record)
        analytic = analytic_memory(shape, n, restore)
        for field in ("device_held_bytes", "host_held_bytes", "forward_peak_temp_bytes", "backward_peak_temp_bytes"):
            m, a = getattr(measured, field), getattr(analytic, field)
            assert abs(m - a) <= 0.1 * max(a, 1), f"rank {rank} {restore} {field}: measured {m} vs analytic {a}"
        held[restore] = measured.device_held_bytes
    assert held["s4"] <= 0.5 * held["none"], held

    # Overlap, by the schedule's events (no wall clock: a loaded machine cannot fail it): with
    # a 50 ms link and 50 ms of (sleeping) compute per partition, partition i + 1's dispatch is
    # issued before partition i computes, and partition i's combine is issued before partition
    # i + 1 computes and completes after it: communication runs under computation.
    step = 0.05
    link = SimulatedLink(latency_s=step, bandwidth_bytes_per_s=math.inf)
    hidden_TH, gate_HE, index_TK, params = _balanced_layer(16, 4, 1, 8, 4, rank, world)
    experts = ExpertWeights(**params, gate_fn=_SleepyGate(step))
    weights_TK = torch.ones(16, 1)
    record = PipelineRecord.tracing()
    for _ in range(2):  # the second call's events are checked (the first one warms gloo up)
        with torch.no_grad():
            pipelined_expert_parallel_forward(
                hidden_TH, index_TK, weights_TK, experts, config=ExecutorConfig(4, "s4", link=link), record=record, **kw
            )
    order = [(what, i) for what, i, _ in record.trace[len(record.trace) // 2 :]]
    for i in range(3):
        assert order.index(("dispatch_issue", i + 1)) < order.index(("compute_start", i))
        assert order.index(("combine_issue", i)) < order.index(("compute_start", i + 1))
        assert order.index(("combine_done", i)) > order.index(("compute_end", i + 1))


def test_memory_accounting_and_overlap_two_ranks():
    run_distributed(_memory_and_overlap_worker, 2, timeout_s=240)


# --- CUDA (off by default: pytest --gpu) -------------------------------------------------


@pytest.mark.gpu
def test_matrix_cuda_one_rank():
    """The CUDA path (lanes, events, pinned host store) against the reference, on one GPU."""
    device = torch.device("cuda")
    for s, (gated, bias, act, top_k, route, capacity) in enumerate(SCENARIOS):
        full = {k: v.to(device) for k, v in make_weights(8, gated, bias).items()}
        tokens = tuple(t.to(device) for t in make_tokens(301, 8, top_k, route, seed=s))
        expected = run_once(reference_expert_parallel_forward, tokens, full, gated, act, 0, 1, capacity=capacity)
        for n in PARTITIONS:
            for restore in RESTORE_STRATEGIES:
                actual = run_once(pipelined_expert_parallel_forward, tokens, full, gated, act, 0, 1,
                                  capacity=capacity, config=ExecutorConfig(n, restore))
                for a, e in zip(actual, expected):
                    assert_close(a, e, f"cuda scenario {s} n={n} {restore}", rel=1e-5)


def _cuda_worker(rank: int, world: int) -> None:
    # One GPU: both ranks share it over gloo (NCCL refuses two ranks on one device).
    torch.cuda.set_device(0)
    groups = build_process_groups(world)
    device = torch.device("cuda", 0)
    full = {k: v.to(device) for k, v in make_weights(8, True, True).items()}
    tokens = tuple(t.to(device) for t in make_tokens([77, 31][rank], 8, 2, "random", seed=rank))
    kw = dict(ep_group=groups.ep, combine_group=groups.ep_combine)
    expected = run_once(reference_expert_parallel_forward, tokens, full, True, F.silu, rank, world, **kw)
    for n in (1, 3, 4):
        for restore in RESTORE_STRATEGIES:
            actual = run_once(pipelined_expert_parallel_forward, tokens, full, True, F.silu, rank, world,
                              config=ExecutorConfig(n, restore), **kw)
            for a, e in zip(actual, expected):
                assert_close(a, e, f"cuda rank {rank} n={n} {restore}", rel=1e-5)


@pytest.mark.gpu
def test_matrix_cuda_two_ranks():
    run_distributed(_cuda_worker, 2, timeout_s=300)
