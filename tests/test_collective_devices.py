"""Every collective of the executor, the tuner, the metrics, the gradient sync, the
checkpointing and the strategy's set-up runs on a tensor of the device its group serves.

With NCCL a CPU tensor on a CUDA-only group raises at the first call of a real run, a bug
class a gloo run cannot show. `collectives.py` checks each call against the device types its
group serves; here, on 2 gloo processes, the groups are declared to serve CUDA
(`declare_group_device`) while every tensor is on the CPU, and `record_collectives(
raise_on_mismatch=False)` lists every call: each expected call site shows up, through the
check, flagged as mismatched (the check fires). Under the default (raising) recorder the
first collective raises on every rank before anything is issued, and with the groups'
real declaration (gloo: CPU) nothing mismatches.
"""

from __future__ import annotations

import torch

from lightning_mpipemoe import ExecutorConfig, ExpertWeights, build_process_groups, collectives
from lightning_mpipemoe.checkpointing import checkpoint_barrier, gather_full_state_dict
from lightning_mpipemoe.discovery import ExecutorView
from lightning_mpipemoe.grad_sync import ExpertGradReducer, global_grad_norm
from lightning_mpipemoe.moe.executor import RoutingStats, expert_parallel_forward
from lightning_mpipemoe.moe.tuner import LayerTuner
from lightning_mpipemoe.moe_metrics import moe_step_metrics
from lightning_mpipemoe.groups import warm_up_groups
from lightning_mpipemoe.strategy import MPipeMoEStrategy
from tests.dist_utils import run_distributed

E, K, H, I = 8, 2, 8, 6

#: Call sites one training step of a layer reaches on 2 ranks (executor n = 1 and n = 2 with
#: re-communication, a tuned call, the metrics, the strategy's set-up).
EXPECTED_SITES = {
    "dispatch.count_exchange",  # the per-expert counts, on the tokens' device
    "executor.reference", "executor.reference_backward",  # the plain path's all-to-alls
    "executor.dispatch", "executor.combine",  # the pipeline's
    "tuner.setup", "tuner.load_exchange",
    "metrics.reduce",
    "grad_sync.expert_bucket", "grad_sync.norm",  # bucketed expert-gradient reduction, global norm
    "checkpointing.gather_full_state_dict", "checkpoint.test_barrier",
    "strategy.expert_shards", "strategy.warm_up.ep", "strategy.warm_up.ep_combine", "strategy.warm_up.dp",
}


def _layer(rank: int, world: int, seed: int):
    gen = torch.Generator().manual_seed(seed + rank)
    tokens = 11 + 4 * rank
    hidden_TH = torch.randn(tokens, H, generator=gen).requires_grad_()
    index_TK = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(tokens)])
    weights_TK = torch.rand(tokens, K, generator=gen)
    local = E // world
    experts = ExpertWeights(
        (torch.randn(local, 2 * I, H, generator=gen) * 0.2).requires_grad_(),
        (torch.randn(local, H, I, generator=gen) * 0.2).requires_grad_(),
    )
    return hidden_TH, index_TK, weights_TK, experts


class _StrategyStub:
    """What `MPipeMoEStrategy._broadcast_expert_shards` reads of the strategy."""

    def __init__(self, groups, keys) -> None:
        self.moe_groups, self._expert_keys = groups, keys


class _Experts(torch.nn.Module):
    def __init__(self, experts: ExpertWeights) -> None:
        super().__init__()
        self.w_in = torch.nn.Parameter(experts.w_in_EOH.detach().clone())
        self.w_out = torch.nn.Parameter(experts.w_out_EHI.detach().clone())


def _one_step(rank: int, world: int, groups) -> None:
    """Executor (n = 1 and n = 2, s2), a tuned call, metrics, gradient sync (bucketed
    reduction during backward, global norm), checkpointing (live gather, barrier), strategy
    set-up."""
    kw = dict(ep_group=groups.ep, combine_group=groups.ep_combine)
    stats = RoutingStats()
    for config in (ExecutorConfig(num_partitions=1, restore="none"), ExecutorConfig(num_partitions=2, restore="s2")):
        hidden_TH, index_TK, weights_TK, experts = _layer(rank, world, seed=1)
        out_TH = expert_parallel_forward(hidden_TH, index_TK, weights_TK, experts, config=config, stats=stats, **kw)
        out_TH.square().sum().backward()
    tuner = LayerTuner()
    tuner.EXCHANGE_EVERY = 1
    auto = ExecutorConfig(num_partitions="auto", restore="none", candidates=(1, 2))
    for seed in (2, 3):
        hidden_TH, index_TK, weights_TK, experts = _layer(rank, world, seed)
        expert_parallel_forward(hidden_TH, index_TK, weights_TK, experts, config=auto, tuner=tuner, **kw).sum().backward()
    view = ExecutorView(ExecutorConfig(1, "none"), stats, None, E)
    metrics = moe_step_metrics({"layer": view}, aux_loss=torch.tensor(0.5), group=groups.dp, world_size=world)
    assert metrics["moe/layer/tokens_max"] > 0
    # Gradient sync as the strategy runs it: hooks reduce buckets over expert_dp during backward.
    hidden_TH, index_TK, weights_TK, experts = _layer(rank, world, seed=5)
    shards = _Experts(experts)
    reducer = ExpertGradReducer(list(shards.parameters()), groups, bucket_bytes=1)
    reducer.attach()
    reducer.start(sync=True)
    out_TH = expert_parallel_forward(hidden_TH, index_TK, weights_TK, ExpertWeights(shards.w_in, shards.w_out),
                                     config=ExecutorConfig(1, "none"), **kw)  # fmt: skip
    out_TH.square().sum().backward()
    reducer.finish()
    reducer.detach()
    assert global_grad_norm(list(shards.parameters()), list(shards.parameters()), groups) > 0
    # Checkpointing: the live gather of every expert over EP, the checkpoint barrier.
    full = gather_full_state_dict(shards, {"w_in": 0, "w_out": 0}, groups)
    assert (full is not None) == (groups.ep_rank == 0)
    checkpoint_barrier(groups.dp, "checkpoint.test_barrier")
    warm_up_groups(groups, torch.device("cpu"))
    module = torch.nn.Linear(2, 2)
    MPipeMoEStrategy._broadcast_expert_shards(_StrategyStub(groups, {"weight": 1}), module)


def _worker(rank: int, world: int) -> None:
    # EP 1 x DP 2 would not communicate experts; EP 2 and, for the expert-shard broadcast, a
    # second set of groups with EP 1 (expert-data-parallel size 2).
    groups = build_process_groups(world)
    dp_groups = build_process_groups(1)
    groups = type(groups)(groups.ep, groups.ep_combine, dp_groups.expert_dp, groups.dp, ep_size=groups.ep_size,
                          ep_rank=groups.ep_rank, expert_dp_size=dp_groups.expert_dp_size, expert_dp_rank=rank)
    all_groups = {groups.ep, groups.ep_combine, groups.expert_dp, groups.dp}

    # Declared CUDA, tensors on the CPU: every call recorded, every call flagged.
    for group in all_groups:
        collectives.declare_group_device(group, "cuda")
    with collectives.record_collectives(raise_on_mismatch=False) as calls:
        _one_step(rank, world, groups)
    sites = {call.site for call in calls}
    assert EXPECTED_SITES <= sites, f"rank {rank}: sites never checked: {sorted(EXPECTED_SITES - sites)}"
    assert all(call.mismatched and call.tensor_device == "cpu" and call.group_devices == ("cuda",)
               for call in calls if call.op != "barrier"), [c for c in calls if not c.mismatched]

    # Raising (the default): the first collective of a layer call raises on every rank, before
    # anything is issued (so no rank waits for another).
    hidden_TH, index_TK, weights_TK, experts = _layer(rank, world, seed=4)
    try:
        with collectives.record_collectives():
            expert_parallel_forward(hidden_TH, index_TK, weights_TK, experts, ep_group=groups.ep,
                                    config=ExecutorConfig(2, "s4"))
    except collectives.CollectiveDeviceError as exc:
        assert "dispatch.count_exchange" in str(exc) and "cuda" in str(exc), exc
    else:
        raise AssertionError("a CPU tensor on a group declared CUDA-only did not raise")

    # The groups' real device (gloo serves the CPU): nothing mismatches, and it raises nowhere.
    for group in all_groups:
        collectives.declare_group_device(group, "cpu")
    with collectives.record_collectives() as calls:
        _one_step(rank, world, groups)
    assert EXPECTED_SITES <= {call.site for call in calls}
    assert not [call for call in calls if call.mismatched]


def test_every_collective_is_checked_against_its_groups_device():
    run_distributed(_worker, 2, timeout_s=120)
