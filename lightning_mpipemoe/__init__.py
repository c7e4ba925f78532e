"""lightning-mpipemoe: pipelined, memory-reusing expert parallelism for Lightning and Hugging Face."""

from lightning_mpipemoe.config import RESTORE_STRATEGIES, ExecutorConfig
from lightning_mpipemoe.groups import MoEProcessGroups, build_process_groups, check_parallel_sizes
from lightning_mpipemoe.moe import (
    ExpertWeights,
    MoELayer,
    RoutingStats,
    SwitchRouter,
    TopKRouter,
    expert_parallel_forward,
    load_balancing_loss,
    router_z_loss,
)
from lightning_mpipemoe.hf_models import experts_interface as _hf_experts  # noqa: F401  registers "mpipemoe" with transformers' ExpertsInterface

__version__ = "0.1.0"

__all__ = [
    "RESTORE_STRATEGIES",
    "ExecutorConfig",
    "ExpertWeights",
    "MoELayer",
    "MoEProcessGroups",
    "RoutingStats",
    "SwitchRouter",
    "TopKRouter",
    "build_process_groups",
    "check_parallel_sizes",
    "expert_parallel_forward",
    "load_balancing_loss",
    "router_z_loss",
]
