"""The granularity tuner, the strategy selector and tuning persistence.

Ranges (insert, merge, monotonicity, cache), the cost model on a synthetic calibration
(deterministic), decisions under no_grad and checkpoint recomputation, outputs while tuning
against the reference path, JSON round trips and re-tuning, and one EP = 2 gloo spawn for
agreement across ranks (also when the ranks measure different timings).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from lightning_mpipemoe import ExecutorConfig, ExpertWeights, build_process_groups
from lightning_mpipemoe.config import RESTORE_STRATEGIES, budget_bytes
from lightning_mpipemoe.moe import tuner as tuner_module
from lightning_mpipemoe.moe.cost_model import (
    Calibration,
    StrategyChoice,
    choose_strategy,
    footprint_bytes,
    needs_calibration,
    predict_seconds,
    strategy_work,
)
from lightning_mpipemoe.moe.executor import expert_parallel_forward, reference_expert_parallel_forward
from lightning_mpipemoe.moe.memory import LayerShape
from lightning_mpipemoe.moe.restore import RESTORE
from lightning_mpipemoe.moe.tuner import LayerTuner, RangeTable, agree_load, kept_counts
from lightning_mpipemoe.moe.tuning_store import load_tuning, save_tuning, tuning_path
from tests.dist_utils import run_distributed
from tests.moe_reference import assert_rel_close

H, I, E, K = 12, 10, 4, 2
CALIBRATION = Calibration(flops_per_s=1e10, comm_bytes_per_s=1e8, comm_latency_s=1e-4, copy_bytes_per_s=2e9,
                          comm_overlap=1.0, copy_overlap=0.0)


def assert_close(actual, expected, what, rel=1e-6):
    assert_rel_close(actual, expected, rel, what, floor=1e-6)


def make_experts(num_local: int, rank: int = 0, seed: int = 7, hidden: int = H) -> ExpertWeights:
    gen = torch.Generator().manual_seed(seed)
    w_in = torch.randn(num_local * 8, 2 * I, hidden, generator=gen) / hidden**0.5
    w_out = torch.randn(num_local * 8, hidden, I, generator=gen) / I**0.5
    sl = slice(rank * num_local, (rank + 1) * num_local)
    return ExpertWeights(w_in[sl].clone().requires_grad_(), w_out[sl].clone().requires_grad_())


def make_batch(tokens: int, num_experts: int, seed: int, hidden: int = H):
    gen = torch.Generator().manual_seed(seed)
    hidden_TH = torch.randn(tokens, hidden, generator=gen).requires_grad_()
    index_TK = torch.stack([torch.randperm(num_experts, generator=gen)[:K] for _ in range(tokens)])
    weights_TK = torch.rand(tokens, K, generator=gen).requires_grad_()
    return hidden_TH, index_TK, weights_TK


def fwd_bwd(forward, batch, experts, **kw):
    hidden_TH, index_TK, weights_TK = (t.detach().clone().requires_grad_(t.requires_grad) for t in batch)
    for p in (experts.w_in_EOH, experts.w_out_EHI):
        p.grad = None
    out_TH = forward(hidden_TH, index_TK, weights_TK, experts, **kw)
    (out_TH * torch.cos(torch.arange(out_TH.numel()).view_as(out_TH) * 0.3)).sum().backward()
    return [out_TH.detach(), hidden_TH.grad, weights_TK.grad, experts.w_in_EOH.grad.clone(),
            experts.w_out_EHI.grad.clone()]


class RecordingTuner(LayerTuner):
    """Records (n, restore, profiled, inside backward) of every call."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls = []

    def begin(self, config, **kw):
        call = super().begin(config, **kw)
        self.calls.append((call.config.num_partitions, call.config.restore, call.sample is not None,
                           tuner_module._in_backward()))
        return call


def fake_times(table: dict, alternate: dict | None = None):
    """A `ProfileSample.per_row` replacement: seconds per row by the candidate's n (n in
    `alternate` takes its two values in turn, second first)."""
    calls: dict[int, int] = {}

    def per_row(self):
        n = (1, 2, 4, 8)[self.candidate]
        calls[n] = calls.get(n, 0) + 1
        t = alternate[n][calls[n] % 2] if alternate and n in alternate else table[n]
        return t, t / 2

    return per_row


# -- config ------------------------------------------------------------------------------------


def test_config_auto_defaults_and_validation():
    config = ExecutorConfig()
    assert config.num_partitions == "auto" and config.restore == "auto" and config.is_auto and config.pipelined
    assert config.candidates is None and config.candidate_set == (1, 2, 4, 8) and config.memory_budget is None
    explicit = ExecutorConfig(num_partitions=1, restore="none")
    assert not explicit.pipelined and not explicit.is_auto
    assert ExecutorConfig(2, "s1").resolved() == ExecutorConfig(2, "s1")
    assert config.resolved() == ExecutorConfig(1, "none")
    assert ExecutorConfig(candidates=[8, 2]).candidates == (2, 8)
    assert ExecutorConfig(candidates=(2, 4)).resolved().num_partitions == 2
    for bad in (dict(num_partitions="Auto"), dict(num_partitions=0), dict(restore="s5"),
                dict(candidates=()), dict(candidates=(1, 1)), dict(candidates=(0, 2)), dict(candidates=(True,)),
                dict(memory_budget=0), dict(memory_budget=-3), dict(memory_budget=1.5),
                dict(memory_budget=math.nan), dict(memory_budget=math.inf)):
        with pytest.raises(ValueError):
            ExecutorConfig(**bad)
    for bad in (dict(memory_budget="1GB"), dict(memory_budget=True)):
        with pytest.raises(TypeError):
            ExecutorConfig(**bad)
    assert budget_bytes(0.25, 1000) == 250 and budget_bytes(1.0, 1000) == 1000
    assert budget_bytes(4096, 10) == 4096 and budget_bytes(8e9, 10) == 8_000_000_000 and budget_bytes(None, 1) is None


def test_placement_narrows_the_default_candidates_where_partitions_cannot_overlap():
    from lightning_mpipemoe.config import SimulatedLink, for_placement

    auto, link = ExecutorConfig(), SimulatedLink(latency_s=1e-4, bandwidth_bytes_per_s=1e9)
    assert for_placement(auto, 1, "cuda").candidates == (1,)  # one rank: no all-to-all at all
    assert for_placement(auto, 2, "cpu").candidates == (1,)  # gloo's bytes move on the computing cores
    assert for_placement(auto, 2, None).candidates is None  # device unknown: left to the tuner
    assert for_placement(auto, 2, "cuda").candidates is None
    assert for_placement(replace(auto, link=link), 2, "cpu").candidates is None  # a wire to overlap
    named = ExecutorConfig(candidates=(1, 4))
    assert for_placement(named, 2, "cpu") == named and for_placement(named, 1, "cpu") == named
    fixed = ExecutorConfig(num_partitions=4)
    assert for_placement(fixed, 2, "cpu") == fixed
    budgeted = for_placement(ExecutorConfig(memory_budget=0.1), 2, "cpu")
    assert budgeted.candidates == (1,) and budgeted.tunes_restore and budgeted.memory_budget == 0.1


# -- ranges ------------------------------------------------------------------------------------


def test_ranges_insert_merge_and_monotone_bounds():
    table = RangeTable((1, 2, 4, 8), tolerance=0.1)
    assert table.lookup(1000) is None and table.bounds(1000) == (1, 8)
    table.insert(1000, 2)
    assert table.lookup(1000) == 2 and table.lookup(1090) == 2 and table.lookup(1150) is None
    assert table.lookup(500) is None  # below a point whose n is not the smallest candidate: unknown
    table.insert(4000, 2)  # same n: merged, everything between is n = 2
    assert table.ranges() == [(1000 / 1.1, 4000 * 1.1, 2)]
    assert table.lookup(2500) == 2
    table.insert(16000, 8)  # largest candidate: its range extends to infinity
    assert table.lookup(10**9) == 8 and table.lookup(8000) is None
    assert table.bounds(8000) == (2, 8)
    table.insert(8000, 2)  # agrees with its neighbours: nothing to repair
    assert table.points == [(1000, 2), (4000, 2), (8000, 2), (16000, 8)]
    table.insert(6000, 1)  # newer, and the best n never grows as the load shrinks: left points repaired
    assert table.points == [(1000, 1), (4000, 1), (6000, 1), (8000, 2), (16000, 8)]
    table.insert(12000, 4)
    table.insert(200, 1)  # smallest candidate: extends to zero
    assert table.lookup(3) == 1 and table.lookup(900) == 1 and table.lookup(7000) is None
    ranges = table.ranges()
    assert ranges[0][0] == 0.0 and ranges[-1][1] == math.inf
    assert [r[2] for r in ranges] == sorted(r[2] for r in ranges)
    assert all(low < high for low, high, _ in ranges)
    assert all(ranges[j][1] <= ranges[j + 1][0] for j in range(len(ranges) - 1))
    for low, high, n in ranges:  # lookups agree with the ranges inside them
        probe = int(max(low, 1) * 1.01) if math.isinf(high) else int((max(low, 1) * high) ** 0.5)
        assert table.lookup(probe) == n
    before = table.hits
    table.lookup(12345)
    table.lookup(12345)
    assert table.hits == before + 1  # exact-count cache
    copy = RangeTable((1, 2, 4, 8), 0.1)
    copy.load(table.state())
    assert copy.points == table.points


def test_tolerance_zones_of_different_n_meet_halfway():
    table = RangeTable((1, 2, 4), tolerance=0.5)
    table.insert(100, 1)
    table.insert(160, 2)
    (_, high1, _), (low2, _, _) = table.ranges()
    assert high1 == low2 == pytest.approx((100 * 160) ** 0.5)
    assert table.lookup(120) == 1 and table.lookup(135) == 2


# -- cost model --------------------------------------------------------------------------------


def test_work_reduces_to_design_table():
    """Top-1, plain experts, I = 4M: GEMM units of b*M*H, copies of b*M elements (DESIGN §1.4)."""
    shape = LayerShape(tokens=64, top_k=1, hidden=8, intermediate=32, gated=False, ep_size=2, dtype_bytes=2)
    for name, strategy in RESTORE.items():
        forward, backward = strategy_work(shape, name, num_partitions=4)
        r = 16
        units = lambda w: (w.flops / (2 * r * 8 * 32), w.a2a_count, w.copy_bytes / (r * 8 * 2))  # noqa: E731
        assert units(forward) == pytest.approx(strategy.work_forward), name
        assert units(backward) == pytest.approx(strategy.work_backward), name


def test_strategy_choice_on_a_synthetic_calibration():
    shape = LayerShape(tokens=4096, top_k=2, hidden=128, intermediate=256, gated=True, ep_size=2, dtype_bytes=4)
    n = 4
    sizes = {s: footprint_bytes(shape, n, s) for s in RESTORE_STRATEGIES}
    assert sizes["none"] > max(sizes[s] for s in ("s1", "s2", "s3", "s4"))
    # No budget, or a budget that fits `none`: `none`, no calibration needed.
    assert choose_strategy(shape, n, None, None).restore == "none"
    assert not needs_calibration(shape, n, sizes["none"])
    assert choose_strategy(shape, n, sizes["none"], None).restore == "none"
    # A budget that excludes `none` only: the cheapest predicted of s1..s4.
    budget = sizes["none"] - 1
    assert needs_calibration(shape, n, budget)
    choice = choose_strategy(shape, n, budget, CALIBRATION)
    predicted = {s: predict_seconds(CALIBRATION, shape, n, s) for s in ("s1", "s2", "s3", "s4")}
    assert choice.restore == min(predicted, key=predicted.get) and choice.predicted_s == pytest.approx(predicted)
    assert not choice.over_budget and "none" not in choice.feasible and "excludes none" in choice.explain(CALIBRATION)
    # Copies cheap and comm slow: offloading beats re-communication; copies dear: recompute wins.
    assert choice.restore == "s1"
    dear_copies = Calibration(1e10, 1e8, 1e-4, 1e7, 1.0, 0.0)
    assert choose_strategy(shape, n, budget, dear_copies).restore == "s4"
    # A budget nothing fits: the smallest footprint, flagged.
    tiny = choose_strategy(shape, n, 1, CALIBRATION)
    assert tiny.over_budget and tiny.footprints[tiny.restore] == min(sizes.values())
    # n = 1 without reuse is the plain path: priced with autograd's extra activation outputs.
    assert footprint_bytes(shape, 1, "none") > footprint_bytes(shape, 2, "none")


def test_cpu_budget_counts_what_offload_moves_to_the_host():
    """On a CPU device the host is the budgeted memory: s1-s3's host bytes count as held, so a
    budget at s4's footprint is met by recomputation + re-communication, not by offload."""
    gpu = LayerShape(tokens=4096, top_k=2, hidden=128, intermediate=256, gated=True, ep_size=2, dtype_bytes=4)
    cpu = replace(gpu, host_is_device=True)
    n = 4
    on_gpu = {s: footprint_bytes(gpu, n, s) for s in RESTORE_STRATEGIES}
    on_cpu = {s: footprint_bytes(cpu, n, s) for s in RESTORE_STRATEGIES}
    rows_bytes = gpu.rows * 4
    host = {"none": 0, "s1": rows_bytes * (gpu.hidden + gpu.width), "s2": rows_bytes * gpu.width,
            "s3": rows_bytes * gpu.hidden, "s4": 0}
    assert {s: on_cpu[s] - on_gpu[s] for s in RESTORE_STRATEGIES} == host
    # Offload beats recomputation with this calibration where the host is free memory ...
    budget = on_gpu["none"] - 1
    assert choose_strategy(gpu, n, budget, CALIBRATION).restore == "s1"
    # ... but on CPU it only fits if what it holds on the host fits too.
    assert choose_strategy(cpu, n, on_cpu["s4"], CALIBRATION).restore == "s4"
    choice = choose_strategy(cpu, n, budget, CALIBRATION)
    assert not choice.over_budget and on_cpu[choice.restore] <= budget


def test_prediction_formula_by_hand():
    shape = LayerShape(tokens=100, top_k=1, hidden=10, intermediate=20, gated=False, ep_size=2, dtype_bytes=4)
    cal = Calibration(1e6, 1e5, 0.01, 1e6, 0.5, 0.0)
    r = 50  # n = 2
    t1, t2 = 2 * r * 10 * 20 * 2 / 1e6, 2 * 0.01 + 2 * r * 10 * 4 * 0.5 / 1e5
    tau = max(t1, t2) + 0.5 * min(t1, t2)
    forward = t1 + t2 + tau
    t1b = 2 * t1
    backward = t1b + t2 + max(t1b, t2) + 0.5 * min(t1b, t2)
    assert predict_seconds(cal, shape, 2, "none") == pytest.approx(forward + backward)


# -- the tuner in one process ----------------------------------------------------------------------


def test_tuning_calls_return_the_reference_result_and_decide():
    experts = make_experts(E)
    tuner = LayerTuner(max_rounds=4)  # real timings: a bounded session (the rules have fake-time tests)
    for step in range(40):
        batch = make_batch(37, E, seed=step)
        actual = fwd_bwd(expert_parallel_forward, batch, experts, config=ExecutorConfig(), tuner=tuner)
        expected = fwd_bwd(reference_expert_parallel_forward, batch, experts)
        for a, e, what in zip(actual, expected, ("out", "d hidden", "d weights", "d w_in", "d w_out")):
            assert_close(a, e, f"step {step} {what}")
    assert not tuner.tuning and len(tuner.table) == 1 and tuner.profile_calls >= 4 + 4  # two full rounds at least
    metrics = tuner.metrics()
    assert {"num_partitions", "restore", "tuning", "candidate_ms/n1", "candidate_ms/n8"} <= set(metrics)
    assert metrics["num_partitions"] == tuner.table.points[0][1]


def test_ties_go_to_the_smaller_n(monkeypatch):
    monkeypatch.setattr(tuner_module.ProfileSample, "per_row", fake_times({1: 2.0, 2: 1.0, 4: 1.0, 8: 9.0}))
    experts, tuner = make_experts(E), RecordingTuner()
    for step in range(30):
        fwd_bwd(expert_parallel_forward, make_batch(40, E, seed=step), experts, tuner=tuner)
    profiled = [n for n, _, profiled, _ in tuner.calls if profiled]
    # 1 and 8 go after two rounds (slower by more than GROSS_MARGIN); 4 is equivalent to 2
    # after min_rounds, and the tie goes to the smaller n.
    assert profiled == [1, 2, 4, 8] * 2 + [2, 4] * (tuner.min_rounds - 2)
    assert tuner.table.points == [(80, 2)]


def test_losers_are_pruned_and_near_equals_measured_on(monkeypatch):
    # n=4 against n=2: 1.1, 0.99, 1.1, 0.99: after min_rounds 4% apart by the median, but not
    # significantly (the spread is as large): measured on until it is.
    times = fake_times({1: 2.0, 2: 1.0, 8: 9.0}, alternate={4: (0.99, 1.1)})
    monkeypatch.setattr(tuner_module.ProfileSample, "per_row", times)
    experts, tuner = make_experts(E), RecordingTuner()
    for step in range(40):
        fwd_bwd(expert_parallel_forward, make_batch(40, E, seed=step), experts, tuner=tuner)
    profiled = [n for n, _, profiled, _ in tuner.calls if profiled]
    assert profiled[:8] == [1, 2, 4, 8] * 2 and set(profiled[8:]) == {2, 4}
    assert len(profiled) > 8 + 2 * (tuner.min_rounds - 2)
    assert tuner.table.points == [(80, 2)] and tuner.calls[-1][0] == 2
    metrics = tuner.metrics()
    assert metrics["candidate_ms/n8"] == pytest.approx(9.0 * 80 * 1e3) and metrics["num_partitions"] == 2


def test_ranges_bound_the_candidates_past_the_outermost_point():
    table = RangeTable((1, 2, 4, 8), tolerance=0.1)
    table.insert(1000, 1)
    table.insert(4000, 2)
    # Within REACH of the outermost points the bound is their own n (a drifting load profiles
    # its neighbours); farther out, monotonicity alone bounds it.
    assert table.bounds(1500) == (1, 2)  # interior: unchanged
    assert table.bounds(int(4000 * RangeTable.REACH)) == (2, 2)
    assert table.bounds(int(4000 * RangeTable.REACH) + 1) == (2, 8)
    assert table.bounds(600) == (1, 1)
    table.insert(400, 2)  # the newest point: n >= 2 above it, so (1000, 1) is repaired to 2
    assert table.points == [(400, 2), (1000, 2), (4000, 2)]
    assert table.bounds(int(400 / RangeTable.REACH)) == (2, 2)
    assert table.bounds(int(400 / RangeTable.REACH) - 1) == (1, 2)


def test_a_drifting_load_profiles_only_the_neighbours_of_the_last_range():
    experts, tuner = make_experts(E), RecordingTuner(min_rounds=2, max_rounds=2)
    for step in range(10):  # 2 rounds of 4 candidates; the 9th call agrees on the last round
        fwd_bwd(expert_parallel_forward, make_batch(40, E, seed=step), experts, tuner=tuner)
    assert not tuner.tuning and [k for k, _ in tuner.table.points] == [80]
    n_first = tuner.table.points[0][1]
    first = len(tuner.calls)
    for step in range(8):  # 60 tokens: 1.5x the profiled key, past the last point but within REACH
        fwd_bwd(expert_parallel_forward, make_batch(60, E, seed=step), experts, tuner=tuner)
    profiled = {n for n, _, sampled, *_ in tuner.calls[first:] if sampled}
    candidates = (1, 2, 4, 8)
    i = candidates.index(n_first)
    assert profiled and profiled <= set(candidates[max(0, i - 1) : i + 2]), (n_first, profiled)


def test_a_session_whose_key_stops_coming_is_closed():
    experts, tuner = make_experts(E), LayerTuner()
    for step in range(6):  # a round and a half at 40 tokens ...
        fwd_bwd(expert_parallel_forward, make_batch(40, E, seed=step), experts, tuner=tuner)
    assert tuner.tuning
    for step in range(LayerTuner.STALL_CALLS + 2):  # ... then only 400 tokens, far outside its bucket
        fwd_bwd(expert_parallel_forward, make_batch(400, E, seed=step), experts, tuner=tuner)
        if not tuner.tuning:
            break
    assert [k for k, _ in tuner.table.points] == [80]  # decided on the agreed round; 800 rows profile next
    fwd_bwd(expert_parallel_forward, make_batch(400, E, seed=0), experts, tuner=tuner)
    assert tuner.tuning


def test_no_profiling_without_grad_or_while_recomputing():
    experts = make_experts(E)
    tuner = RecordingTuner()
    batch = make_batch(30, E, seed=1)
    with torch.no_grad():
        for _ in range(3):
            expert_parallel_forward(*batch, experts, tuner=tuner)
    assert tuner.profile_calls == 0 and not tuner.tuning and len(tuner.table) == 0
    assert {c[:3] for c in tuner.calls} == {(1, "none", False)}  # nearest known, else the smallest candidate

    for reentrant in (False, True):
        tuner = RecordingTuner(max_rounds=4)
        for step in range(40):
            hidden_TH, index_TK, weights_TK = make_batch(30, E, seed=step)

            def block(h, w, index_TK=index_TK):
                return expert_parallel_forward(h, index_TK, w, experts, tuner=tuner)

            out = checkpoint(block, hidden_TH, weights_TK, use_reentrant=reentrant)
            out.sum().backward()
        inside = [c for c in tuner.calls if c[3]]
        outside = [c for c in tuner.calls if not c[3]]
        assert len(inside) == 40 and not any(c[2] for c in inside)  # recomputations never profile
        assert [c[:2] for c in inside] == [c[:2] for c in outside]  # ... and repeat the forward's decision
        if not reentrant:  # the reentrant first forward runs under no_grad: lookups only
            assert tuner.profile_calls > 0 and len(tuner.table) == 1


def test_budget_constrains_the_joint_choice():
    """A budget below every `none` footprint: no call runs `none`; the strategies chosen fit."""
    experts = make_experts(E)
    key = 2 * 64
    shape = LayerShape(tokens=64, top_k=K, hidden=H, intermediate=I, gated=True, ep_size=1, dtype_bytes=4,
                       host_is_device=True)  # a CPU layer: its host bytes are in the budget
    sizes = {(n, s): footprint_bytes(shape, n, s) for n in (1, 2, 4, 8) for s in RESTORE_STRATEGIES}
    budget = min(sizes[(n, "none")] for n in (1, 2, 4, 8)) - 1
    tuner = RecordingTuner(max_rounds=4)
    config = ExecutorConfig(memory_budget=budget)
    for step in range(40):
        batch = make_batch(64, E, seed=step)
        actual = fwd_bwd(expert_parallel_forward, batch, experts, config=config, tuner=tuner)
        expected = fwd_bwd(reference_expert_parallel_forward, batch, experts)
        for a, e in zip(actual, expected):
            assert_close(a, e, f"step {step}")
    assert tuner.calibration is not None and tuner.budget_bytes == budget
    assert all(restore != "none" and sizes[(n, restore)] <= budget for n, restore, _, _ in tuner.calls)
    assert tuner.table.points[0][0] == key


def test_a_budget_nothing_fits_warns_once_per_fallback_not_per_key(caplog):
    """Keys that drift call after call take the same smallest-footprint fallback: one warning."""
    experts, tuner = make_experts(E), LayerTuner()
    config = ExecutorConfig(memory_budget=1)
    with caplog.at_level(logging.WARNING, logger="lightning_mpipemoe.tuner"):
        for step, tokens in enumerate((40, 64, 100, 160)):  # keys more than the tolerance apart
            fwd_bwd(expert_parallel_forward, make_batch(tokens, E, seed=step), experts, config=config, tuner=tuner)
    warnings = [r for r in caplog.records if "fits no strategy" in r.getMessage()]
    assert len(tuner.table) == 4 and len(warnings) == 1, [r.getMessage() for r in warnings]


class NearTieTuner(RecordingTuner):
    """A cost model that cannot separate s3 (its pick) from s1 (1% apart) but clearly ranks s2,
    s4 behind (30%); `none` is over the budget."""

    def _modelled(self, n, key):
        predicted = {"s1": 1.01 / n, "s2": 1.3 / n, "s3": 1.0 / n, "s4": 1.3 / n}
        footprints = {"none": 100, "s1": 10, "s2": 10, "s3": 10, "s4": 10}
        return StrategyChoice("s3", n, key, 50, footprints, predicted, over_budget=False)


def test_strategies_the_model_cannot_separate_are_measured(monkeypatch):
    measured_ms = {(2, "s1"): 3.0, (2, "s3"): 3.3, (4, "s1"): 1.0, (4, "s3"): 1.2}  # s1 really is faster

    def per_row(self):
        candidate = tuner._session.candidates[self.candidate]
        return measured_ms[(candidate.n, candidate.restore)], 0.0

    monkeypatch.setattr(tuner_module.ProfileSample, "per_row", per_row)
    experts, tuner = make_experts(E), NearTieTuner()
    config = ExecutorConfig(candidates=(2, 4), memory_budget=50)
    for step in range(16):
        batch = make_batch(40, E, seed=step)
        actual = fwd_bwd(expert_parallel_forward, batch, experts, config=config, tuner=tuner)
        for a, e in zip(actual, fwd_bwd(reference_expert_parallel_forward, batch, experts)):
            assert_close(a, e, f"step {step}")
    profiled = {(n, restore) for n, restore, profiled, _ in tuner.calls if profiled}
    assert profiled == set(measured_ms)  # s2 and s4 are never run: the model rules them out
    assert not tuner.tuning and tuner.table.points == [(80, 4)]
    assert tuner.calls[-1][:3] == (4, "s1", False)  # the measured winner, not the model's pick
    choice = tuner._strategy(4, 80)
    assert choice.restore == "s1" and choice.measured and "measured s1 faster" in choice.explain()
    assert tuner._strategy(2, 80).restore == "s3"  # only measured at n=4's winning point
    metrics = tuner.metrics()
    assert metrics["candidate_ms/n4"] == pytest.approx(1.2 * 80 * 1e3)
    assert metrics["candidate_ms/n4_s1"] == pytest.approx(1.0 * 80 * 1e3)
    assert metrics["restore"] == RESTORE_STRATEGIES.index("s1")

    resumed = NearTieTuner()  # the measured strategy is part of the saved decisions
    resumed.load_state_dict(json.loads(json.dumps(tuner.state_dict())))
    fwd_bwd(expert_parallel_forward, make_batch(40, E, seed=0), experts, config=config, tuner=resumed)
    assert resumed.profile_calls == 0 and resumed.calls[-1][:2] == (4, "s1")


# -- persistence ---------------------------------------------------------------------------------


def _train(tuner, experts, steps, tokens=50, hidden=H):
    for step in range(steps):
        fwd_bwd(expert_parallel_forward, make_batch(tokens, E, seed=step, hidden=hidden), experts, tuner=tuner)


def test_json_round_trip_skips_retuning_and_changes_retune(tmp_path):
    experts = make_experts(E)
    tuned = LayerTuner(max_rounds=4)
    _train(tuned, experts, 40)
    assert len(tuned.table) == 1
    path = save_tuning(tuning_path(tmp_path), {"layer0": tuned})
    assert path == tmp_path / "mpipemoe_tuning.json"
    state = json.loads(path.read_text())["layers"]["layer0"]
    assert state["points"] == tuned.table.state() and state["fingerprint"]["ep_size"] == 1

    resumed = LayerTuner()
    assert load_tuning(path, {"layer0": resumed, "other": LayerTuner()}) == ["layer0"]
    assert resumed.state_dict() == tuned.state_dict()  # pending state passes through unchanged
    _train(resumed, experts, 3)
    assert resumed.profile_calls == 0 and resumed.table.points == tuned.table.points

    wider = LayerTuner()  # a layer of another shape re-tunes
    wider.load_state_dict(tuned.state_dict())
    _train(wider, make_experts(E, hidden=H + 4), 1, hidden=H + 4)
    assert wider.tuning and wider.profile_calls == 1  # a session started with its first call

    other_world = dict(tuned.state_dict())  # saved by a run of another world size
    other_world["fingerprint"] = {**other_world["fingerprint"], "world_size": 4, "ep_size": 2}
    moved = LayerTuner()
    moved.load_state_dict(other_world)
    _train(moved, experts, 1)
    assert moved.tuning and len(moved.table) == 0

    other_budget = LayerTuner()  # another budget is another decision problem
    other_budget.load_state_dict(tuned.state_dict())
    fwd_bwd(expert_parallel_forward, make_batch(50, E, seed=0), experts, tuner=other_budget,
            config=ExecutorConfig(memory_budget=10**12))
    assert other_budget.tuning
    with pytest.raises(ValueError, match="LayerTuner state"):
        LayerTuner().load_state_dict({"points": "nope"})
    assert tuning_path(tmp_path / "last.ckpt").name == "last.ckpt.mpipemoe_tuning.json"


# -- EP = 2 ------------------------------------------------------------------------------------------


def _gather(value):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _ep2_worker(rank: int, world: int, tmp: str) -> None:
    groups = build_process_groups(world)
    kw = dict(ep_group=groups.ep, combine_group=groups.ep_combine)
    experts = make_experts(E, rank)  # 4 local experts each, 8 in all
    tokens = (61, 23)[rank]  # different token counts per rank: the key must still agree

    # The key: the busiest rank's rows, identical on both ranks; capacity drops counted.
    # Hand-built uneven routing: rank 0's 61 tokens all go to experts 4 and 5 (rank 1's), rank
    # 1's 23 tokens to experts 0 and 6. Sent: 122, 46; received: rank 0 23, rank 1 122 + 23.
    index_TK = torch.tensor([[4, 5], [0, 6]][rank]).expand(tokens, K)
    assert agree_load(index_TK, 2 * E, groups.ep) == (145, 61)  # max over ranks, not a sum (168)
    # Capacity 3 per expert: rank 0 keeps 3 + 3 (to rank 1), rank 1 keeps 3 (to rank 0) + 3.
    assert agree_load(index_TK, 2 * E, groups.ep, capacity=3) == (9, 61)
    batch = make_batch(tokens, 2 * E, seed=rank)
    key, most_tokens = agree_load(batch[1], 2 * E, groups.ep)
    counts_E = torch.bincount(torch.cat(_gather(batch[1])).reshape(-1), minlength=2 * E)
    received, sent = counts_E.view(2, E).sum(1), torch.tensor([61 * K, 23 * K])
    assert (key, most_tokens) == (int(torch.maximum(received, sent).max()), 61)
    assert int(kept_counts(batch[1], 2 * E, capacity=1, capacity_group_size=None).max()) <= 1

    # 1. Real timings: every call agrees, outputs match the reference while tuning.
    tuner = RecordingTuner(max_rounds=4)
    for step in range(40):
        batch = make_batch(tokens, 2 * E, seed=10 * step + rank)
        actual = fwd_bwd(expert_parallel_forward, batch, experts, tuner=tuner, **kw)
        expected = fwd_bwd(reference_expert_parallel_forward, batch, experts, **kw)
        for a, e in zip(actual, expected):
            assert_close(a, e, f"rank {rank} step {step}")
    calls = _gather(tuner.calls)
    assert calls[0] == calls[1] and len(tuner.table) == 1
    # Evaluation calls (no grad) of another size decide by the training key and never replace it.
    trained_key = tuner._lag_key
    with torch.no_grad():
        for step in range(2 * LayerTuner.EXCHANGE_EVERY):
            expert_parallel_forward(*make_batch(3 * tokens, 2 * E, seed=step), experts, tuner=tuner, **kw)
    assert tuner._lag_key == trained_key and not tuner.tuning
    assert _gather(tuner.table.points) == [tuner.table.points] * 2
    assert _gather(tuner.metrics()["num_partitions"])[0] == tuner.metrics()["num_partitions"]
    # Outside sessions the load is agreed every EXCHANGE_EVERY calls: a new token count is seen
    # (and profiled) within that many calls, on both ranks at the same call.
    for step in range(LayerTuner.EXCHANGE_EVERY + 2):
        fwd_bwd(expert_parallel_forward, make_batch(4 * tokens, 2 * E, seed=step), experts, tuner=tuner, **kw)
        if tuner.tuning:
            break
    assert tuner.tuning and _gather(step) == [step, step]

    # 2. The ranks measure different timings (rank 0 favours n=2, rank 1 n=4): both take the
    #    n whose slowest rank is fastest (max: 1 -> 5, 2 -> 3.5, 4 -> 3, 8 -> 6).
    times = [{1: 5.0, 2: 1.0, 4: 3.0, 8: 6.0}, {1: 5.0, 2: 3.5, 4: 1.0, 8: 6.0}][rank]
    original = tuner_module.ProfileSample.per_row
    tuner_module.ProfileSample.per_row = fake_times(times)
    try:
        tuner = RecordingTuner()
        for step in range(24):
            fwd_bwd(expert_parallel_forward, make_batch(tokens, 2 * E, seed=step + rank), experts, tuner=tuner, **kw)
    finally:
        tuner_module.ProfileSample.per_row = original
    assert _gather(tuner.calls)[0] == tuner.calls and tuner.table.points[0][1] == 4 and tuner.calls[-1][0] == 4

    # 3. No grad: lookups only, still agreed.
    fresh = RecordingTuner()
    with torch.no_grad():
        for step in range(3):
            expert_parallel_forward(*make_batch(tokens, 2 * E, seed=step), experts, tuner=fresh, **kw)
    assert fresh.profile_calls == 0 and _gather(fresh.calls)[0] == fresh.calls

    # 4. A budget that excludes `none`: one agreed calibration, the same strategy everywhere.
    shape = LayerShape(tokens=61, top_k=K, hidden=H, intermediate=I, gated=True, ep_size=2, dtype_bytes=4)
    budget = min(footprint_bytes(shape, n, "none") for n in (1, 2, 4, 8)) - 1
    budgeted = RecordingTuner()
    config = ExecutorConfig(memory_budget=budget)
    for step in range(10):
        batch = make_batch(tokens, 2 * E, seed=step + 5 * rank)
        actual = fwd_bwd(expert_parallel_forward, batch, experts, config=config, tuner=budgeted, **kw)
        expected = fwd_bwd(reference_expert_parallel_forward, batch, experts, **kw)
        for a, e in zip(actual, expected):
            assert_close(a, e, f"rank {rank} budget step {step}")
    assert budgeted.calibration is not None
    assert _gather(budgeted.calibration.to_dict())[0] == budgeted.calibration.to_dict()
    assert _gather(budgeted.calls)[0] == budgeted.calls and all(c[1] != "none" for c in budgeted.calls)

    # 5. Token counts that change every step (each call decides by the previous call's agreed
    #    load while its own travels), under checkpointing: recomputations repeat their forward's
    #    decision, and every rank takes the same ones.
    ck = RecordingTuner()
    for step in range(16):
        hidden_TH, index_TK, weights_TK = make_batch(tokens + 3 * (step % 3), 2 * E, seed=step + 7 * rank)

        def block(h, w, index_TK=index_TK):
            return expert_parallel_forward(h, index_TK, w, experts, tuner=ck, **kw)

        checkpoint(block, hidden_TH, weights_TK, use_reentrant=False).sum().backward()
    inside, outside = [c for c in ck.calls if c[3]], [c for c in ck.calls if not c[3]]
    assert [c[:2] for c in inside] == [c[:2] for c in outside] and not any(c[2] for c in inside)
    assert _gather(ck.calls)[0] == ck.calls and ck.profile_calls > 0

    # 6. Persistence: saved by rank 0, loaded by both; no re-tuning.
    if rank == 0:
        save_tuning(f"{tmp}/tuning.json", {"moe": tuner})
    dist.barrier()
    resumed = RecordingTuner()
    load_tuning(f"{tmp}/tuning.json", {"moe": resumed})
    for step in range(3):
        fwd_bwd(expert_parallel_forward, make_batch(tokens, 2 * E, seed=step), experts, tuner=resumed, **kw)
    assert resumed.profile_calls == 0 and {c[0] for c in resumed.calls} == {4}


def test_ep2_agreement_correctness_and_persistence(tmp_path):
    run_distributed(_ep2_worker, 2, str(tmp_path), timeout_s=120)
    # A state tuned at EP = 2 does not apply to one process: it re-tunes.
    single = LayerTuner()
    load_tuning(tmp_path / "tuning.json", {"moe": single})
    _train(single, make_experts(E), 1, tokens=61)
    assert single.tuning and len(single.table) == 0
