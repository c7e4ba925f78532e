"""lightning-mpipemoe: pipelined, memory-reusing expert parallelism for Lightning and Hugging Face.

Importing the package registers two things through the libraries' own registries: the
"mpipemoe" experts implementation in transformers' `ExpertsInterface`, and the "mpipemoe" /
"mpipemoe_spawn" strategies in Lightning's `StrategyRegistry`.
"""

from lightning_mpipemoe.checkpointing import consolidate_checkpoint
from lightning_mpipemoe.config import RESTORE_STRATEGIES, ExecutorConfig, SimulatedLink
from lightning_mpipemoe.groups import MoEProcessGroups, build_process_groups, check_parallel_sizes
from lightning_mpipemoe.hf_models import experts_interface as _hf_experts  # noqa: F401  (registers "mpipemoe")
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
from lightning_mpipemoe.strategy import MPipeMoEStrategy  # registers "mpipemoe" and "mpipemoe_spawn"

__version__ = "0.1.0"

__all__ = [
    "RESTORE_STRATEGIES",
    "ExecutorConfig",
    "ExpertWeights",
    "MPipeMoEStrategy",
    "MoELayer",
    "MoEProcessGroups",
    "RoutingStats",
    "SimulatedLink",
    "SwitchRouter",
    "TopKRouter",
    "build_process_groups",
    "check_parallel_sizes",
    "consolidate_checkpoint",
    "expert_parallel_forward",
    "load_balancing_loss",
    "router_z_loss",
]
