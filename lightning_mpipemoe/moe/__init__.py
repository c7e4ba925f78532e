"""MoE building blocks: routing plan, experts, executor, routers and the standalone layer."""

from lightning_mpipemoe.moe.dispatch import DispatchPlan, check_routing, plan_dispatch
from lightning_mpipemoe.moe.executor import RoutingStats, expert_parallel_forward
from lightning_mpipemoe.moe.experts import ExpertWeights, expert_ffn
from lightning_mpipemoe.moe.layer import MoELayer
from lightning_mpipemoe.moe.router import RouterOutput, SwitchRouter, TopKRouter, load_balancing_loss, router_z_loss

__all__ = [
    "DispatchPlan",
    "ExpertWeights",
    "MoELayer",
    "RouterOutput",
    "RoutingStats",
    "SwitchRouter",
    "TopKRouter",
    "check_routing",
    "expert_ffn",
    "expert_parallel_forward",
    "load_balancing_loss",
    "plan_dispatch",
    "router_z_loss",
]
