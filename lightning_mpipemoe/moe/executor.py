"""The expert-parallel MoE executor: permute, dispatch, expert FFN, combine, unpermute.

Its inputs are exactly Hugging Face's experts signature (`hidden [T, H]`,
`top_k_index [T, K]`, `top_k_weights [T, K]`) plus the local expert weights and an explicit
expert-parallel group. This module holds the plain (unpipelined) path, which every fast
path is checked against (outputs and every gradient), and routes pipelined configurations
(`num_partitions > 1` or a restore strategy) to `pipeline.pipelined_experts`. A config with
"auto" fields asks the layer's `LayerTuner` (`tuner.py`) for this call's n and strategy.

Shape legend: T tokens, K top-k, H model dim, S dispatched rows, L local experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.distributed import ProcessGroup

from lightning_mpipemoe.kernels import api as kernels
from lightning_mpipemoe.config import ExecutorConfig, SimulatedLink
from lightning_mpipemoe.moe.comm import linked_all_to_all
from lightning_mpipemoe.moe.dispatch import DispatchPlan, HostRider, check_routing, group_size, plan_dispatch
from lightning_mpipemoe.moe.experts import ExpertWeights, expert_ffn
from lightning_mpipemoe.moe.memory import PipelineRecord
from lightning_mpipemoe.moe.pipeline import combined_positions, pipelined_experts
from lightning_mpipemoe.moe.tuner import LayerTuner

__all__ = [
    "RoutingStats",
    "compute_dtype",
    "expert_parallel_forward",
    "pipelined_expert_parallel_forward",
    "reference_expert_parallel_forward",
]


@dataclass
class RoutingStats:
    """Running routing metrics of one layer (what was sent, what was dropped), for logging."""

    tokens_per_expert_E: torch.Tensor | None = None
    dropped: int = 0
    calls: int = 0
    extra: dict = field(default_factory=dict)

    def record(self, plans: list[DispatchPlan]) -> None:
        sent_E = sum(plan.sent_per_expert_E for plan in plans)
        self.tokens_per_expert_E = sent_E if self.tokens_per_expert_E is None else self.tokens_per_expert_E + sent_E
        self.dropped += sum(plan.num_dropped for plan in plans)
        self.calls += 1

    def reset(self) -> None:
        self.tokens_per_expert_E, self.dropped, self.calls = None, 0, 0


def compute_dtype(hidden_TH: torch.Tensor) -> torch.dtype:
    """The dtype rows travel and compute in: autocast's when it is on, else the input's."""
    device_type = hidden_TH.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden_TH.dtype


def all_to_all(
    rows_SH: torch.Tensor,
    out_splits: list[int],
    in_splits: list[int],
    group: ProcessGroup | None,
    link: SimulatedLink | None = None,
) -> torch.Tensor:
    """Differentiable all-to-all with uneven splits (identity on a group of one), over the
    simulated link when one is configured (so that the reference pays the same wire)."""
    if group_size(group) == 1:
        return rows_SH
    return linked_all_to_all(rows_SH.contiguous(), out_splits, in_splits, group, link)


def _run_partition(
    hidden_TH: torch.Tensor,
    weights_TK: torch.Tensor,
    plan: DispatchPlan,
    experts: ExpertWeights,
    ep_group: ProcessGroup | None,
    combine_group: ProcessGroup | None,
    link: SimulatedLink | None = None,
) -> torch.Tensor:
    # Each permute gets its inverse map (pos), so its backward is a gather-sum: no sort, no sync.
    rows_SH = kernels.permute(hidden_TH, plan.src_token_S, plan.pos_TK)
    received_SH = all_to_all(rows_SH, plan.recv_splits, plan.send_splits, ep_group, link)
    if group_size(ep_group) > 1:
        received_SH = kernels.permute(received_SH, plan.regroup_S, plan.unregroup_S.view(-1, 1))
    out_SH = expert_ffn(received_SH, plan.expert_offsets_L, experts, plan.expert_ends)
    if group_size(ep_group) > 1:
        out_SH = kernels.permute(out_SH, plan.unregroup_S, plan.regroup_S.view(-1, 1))
    returned_SH = all_to_all(out_SH, plan.send_splits, plan.recv_splits, combine_group, link)
    return kernels.unpermute(returned_SH, plan.pos_TK, weights_TK)


def expert_parallel_forward(
    hidden_TH: torch.Tensor,
    top_k_index_TK: torch.Tensor,
    top_k_weights_TK: torch.Tensor,
    experts: ExpertWeights,
    *,
    ep_group: ProcessGroup | None = None,
    combine_group: ProcessGroup | None = None,
    config: ExecutorConfig | None = None,
    capacity: int | None = None,
    capacity_group_size: int | None = None,
    stats: RoutingStats | None = None,
    tuner: LayerTuner | None = None,
) -> torch.Tensor:
    """Run the experts of one MoE layer over the expert-parallel group; returns `[T, H]`.

    `experts` holds this rank's `E / ep_size` experts (rank r owns experts
    `r*L .. r*L + L-1`). `capacity` (with `capacity_group_size`) drops overflow slots, which
    then contribute zero. `combine_group` may be a second communicator over the same ranks.
    `config.num_partitions > 1` or `config.restore != "none"` takes the pipelined executor
    (`pipeline.py`); n = 1 without reuse takes the plain reference path. "auto" fields are
    decided per call by `tuner` (the layer's own `LayerTuner`; without one, "auto" is the
    untuned default, `config.resolved()`); a profiled call returns the real result.
    """
    config = config or ExecutorConfig()
    sample, riders = None, ()
    if config.is_auto:
        if tuner is None:
            config = config.resolved()
        else:
            # Checked before the tuner's collectives: a malformed call must fail on its own
            # rank, not leave the others waiting in an all-reduce.
            experts.check()
            check_routing(hidden_TH, top_k_index_TK, top_k_weights_TK,
                          experts.num_local_experts * group_size(ep_group), experts.hidden_size)
            call = tuner.begin(
                config, top_k_index_TK=top_k_index_TK, experts=experts, dtype=compute_dtype(hidden_TH),
                device=hidden_TH.device, ep_group=ep_group, capacity=capacity, capacity_group_size=capacity_group_size,
            )
            config, sample, riders = call.config, call.sample, call.riders
    engine = "pipelined" if config.pipelined else "reference"
    if sample is not None:
        hidden_TH, experts = sample.wrap_inputs(hidden_TH, experts)
        sample.start()
    out_TH = _execute(
        hidden_TH, top_k_index_TK, top_k_weights_TK, experts, ep_group=ep_group, combine_group=combine_group,
        config=config, capacity=capacity, capacity_group_size=capacity_group_size, stats=stats, engine=engine,
        riders=riders,
    )
    if sample is not None:
        sample.forward_done(out_TH)
    return out_TH


def reference_expert_parallel_forward(
    hidden_TH: torch.Tensor,
    top_k_index_TK: torch.Tensor,
    top_k_weights_TK: torch.Tensor,
    experts: ExpertWeights,
    *,
    ep_group: ProcessGroup | None = None,
    combine_group: ProcessGroup | None = None,
    config: ExecutorConfig | None = None,
    capacity: int | None = None,
    capacity_group_size: int | None = None,
    stats: RoutingStats | None = None,
) -> torch.Tensor:
    """The plain path for any config: partitions one after another under autograd, no reuse
    (`config.restore` is ignored; `config.link` applies; "auto" is the untuned default). The
    oracle of the pipeline's tests."""
    return _execute(
        hidden_TH, top_k_index_TK, top_k_weights_TK, experts, ep_group=ep_group, combine_group=combine_group,
        config=(config or ExecutorConfig()).resolved(), capacity=capacity, capacity_group_size=capacity_group_size,
        stats=stats, engine="reference",
    )


def pipelined_expert_parallel_forward(
    hidden_TH: torch.Tensor,
    top_k_index_TK: torch.Tensor,
    top_k_weights_TK: torch.Tensor,
    experts: ExpertWeights,
    *,
    ep_group: ProcessGroup | None = None,
    combine_group: ProcessGroup | None = None,
    config: ExecutorConfig | None = None,
    capacity: int | None = None,
    capacity_group_size: int | None = None,
    stats: RoutingStats | None = None,
    record: PipelineRecord | None = None,
) -> torch.Tensor:
    """The pipelined executor for any config, n = 1 without reuse included; `record` (a
    `PipelineRecord`) receives its buffer peaks, host bytes, wire time and schedule trace
    ("auto" fields take the untuned default)."""
    return _execute(
        hidden_TH, top_k_index_TK, top_k_weights_TK, experts, ep_group=ep_group, combine_group=combine_group,
        config=(config or ExecutorConfig()).resolved(), capacity=capacity, capacity_group_size=capacity_group_size,
        stats=stats, engine="pipelined", record=record,
    )


def _execute(
    hidden_TH: torch.Tensor,
    top_k_index_TK: torch.Tensor,
    top_k_weights_TK: torch.Tensor,
    experts: ExpertWeights,
    *,
    ep_group: ProcessGroup | None,
    combine_group: ProcessGroup | None,
    config: ExecutorConfig,
    capacity: int | None,
    capacity_group_size: int | None,
    stats: RoutingStats | None,
    engine: str,
    record: PipelineRecord | None = None,
    riders: tuple[HostRider, ...] = (),
) -> torch.Tensor:
    experts.check()
    ep_size = group_size(ep_group)
    num_experts = experts.num_local_experts * ep_size
    check_routing(hidden_TH, top_k_index_TK, top_k_weights_TK, num_experts, experts.hidden_size)
    if combine_group is not None and group_size(combine_group) != ep_size:
        raise ValueError(
            f"combine_group has {group_size(combine_group)} ranks but ep_group has {ep_size}; "
            "they must span the same ranks"
        )
    combine_group = combine_group if combine_group is not None else ep_group
    plans = plan_dispatch(
        top_k_index_TK,
        num_experts,
        ep_group,
        num_partitions=config.num_partitions,
        capacity=capacity,
        capacity_group_size=capacity_group_size,
        riders=riders,
    )
    if stats is not None:
        stats.record(plans)
    rows_TH = hidden_TH.to(compute_dtype(hidden_TH))
    if engine == "pipelined":
        combined_NH = pipelined_experts(
            rows_TH, plans, experts, dispatch_group=ep_group, combine_group=combine_group,
            restore=config.restore, link=config.link, record=record,
        )
        out_TH = kernels.unpermute(combined_NH, combined_positions(plans), top_k_weights_TK)
        return out_TH.to(hidden_TH.dtype)
    compute_experts = experts.in_dtype(rows_TH.dtype)  # cast once per call (autograd carries it back)
    outputs = [
        _run_partition(
            rows_TH[plan.token_start : plan.token_end],
            top_k_weights_TK[plan.token_start : plan.token_end],
            plan,
            compute_experts,
            ep_group,
            combine_group,
            config.link,
        )
        for plan in plans
    ]
    out_TH = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)
    return out_TH.to(hidden_TH.dtype)
