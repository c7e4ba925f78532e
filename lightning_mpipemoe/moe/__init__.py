"""MoE building blocks: routing plan, experts, executor, routers and the standalone layer."""

from lightning_mpipemoe.moe.dispatch import DispatchPlan, check_routing, plan_dispatch
from lightning_mpipemoe.moe.executor import RoutingStats, expert_parallel_forward
from lightning_mpipemoe.moe.experts import ExpertWeights, expert_ffn

__all__ = ["DispatchPlan", "ExpertWeights", "RoutingStats", "check_routing", "expert_ffn", "expert_parallel_forward", "plan_dispatch"]
