"""Per-step MoE metrics for Lightning's logger, synced with one all-reduce.

Routing counts differ per rank (each rank counts the tokens it sent), so they are summed over
the world, packed into one float64 tensor on the device the group serves (the counts are
already there): a logged step costs one small all-reduce and one copy to the host, whatever
the number of layers. The strategy calls this after the optimizer step of the steps the
trainer logs (`log_every_n_steps`), never between a forward and its backward. The executor's choices (n, restore strategy) are the same on every rank
and are logged as they are.

Logged keys, per MoE layer `L` (its qualified name in the LightningModule):

    moe/L/num_partitions      n of the layer's executor
    moe/L/restore             index into `RESTORE_STRATEGIES` ("none", "s1".."s4" -> 0..4)
    moe/L/tokens_max          tokens (top-k slots) routed to the busiest expert, whole world
    moe/L/tokens_min          ... to the least busy expert
    moe/L/load_imbalance      tokens_max / mean tokens per expert (1 = balanced)
    moe/L/dropped_tokens      slots dropped by expert capacity, whole world
    moe/L/tokens_e{i}         tokens of expert i (only with `per_expert=True`)
    moe/L/{key}               numeric entries of `RoutingStats.extra` and of the executor's
                              `executor_metrics()` (e.g. the tuner's choices, which it agrees
                              over the EP group), as this rank sees them: not synced, so that
                              a key one rank lacks cannot derail the collective
    moe/aux_loss              mean over ranks of the "aux_loss" the training step returned
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.distributed import ProcessGroup

from lightning_mpipemoe import collectives
from lightning_mpipemoe.config import RESTORE_STRATEGIES
from lightning_mpipemoe.discovery import ExecutorView, read_executor_metrics

__all__ = ["moe_step_metrics", "trainer_logs_this_step"]


def trainer_logs_this_step(trainer) -> bool:
    """Whether the trainer writes the current step's logged values (its `log_every_n_steps`
    rule; True outside a trainer). Values logged on other steps are accumulated, then dropped,
    at about a millisecond per key in `LightningModule.log`: per-step diagnostics are only
    worth computing on the steps that keep them."""
    if trainer is None:
        return True
    connector = getattr(trainer, "_logger_connector", None)  # private in Lightning 2.x: its own rule
    return True if connector is None else bool(connector.should_update_logs)


def _numeric_extras(view: ExecutorView) -> dict[str, float]:
    extra = view.stats.extra if view.stats is not None else {}
    numbers = {k: float(v) for k, v in extra.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    numbers.update(read_executor_metrics(view))
    return dict(sorted(numbers.items()))


def moe_step_metrics(
    executors: Mapping[str, ExecutorView],
    *,
    aux_loss: torch.Tensor | None,
    group: ProcessGroup | None,
    world_size: int,
    per_expert: bool = False,
    device: torch.device | None = None,
) -> dict[str, float]:
    """The MoE metrics since the last reset of the layers' stats, identical on every rank.
    Collective over `group` (every rank of the world, all with the same layers) when
    `world_size > 1`, on `device` (default: the CPU; the strategy passes its root device)."""
    device = torch.device("cpu") if device is None else device
    layout: list[tuple[str, str, int]] = []  # (layer, what, length)
    local: list[torch.Tensor] = []
    for name, view in executors.items():
        if view.stats is not None:
            tokens_E = view.stats.tokens_per_expert_E
            tokens_E = torch.zeros(view.num_experts) if tokens_E is None else tokens_E.detach()
            layout.append((name, "tokens", view.num_experts))
            local.append(tokens_E.to(device, torch.float64))
            layout.append((name, "dropped", 1))
            local.append(torch.tensor([float(view.stats.dropped)], dtype=torch.float64, device=device))
    if aux_loss is not None:
        layout.append(("", "aux_loss", 1))
        local.append(aux_loss.detach().reshape(1).to(device, torch.float64))
    packed = torch.cat(local) if local else torch.zeros(0, dtype=torch.float64, device=device)
    if world_size > 1 and packed.numel():
        collectives.all_reduce(packed, group=group, site="metrics.reduce")
    packed = packed.to("cpu")

    metrics: dict[str, float] = {}
    for name, view in executors.items():
        if isinstance(view.config.num_partitions, int):
            metrics[f"moe/{name}/num_partitions"] = float(view.config.num_partitions)
        if view.config.restore in RESTORE_STRATEGIES:
            metrics[f"moe/{name}/restore"] = float(RESTORE_STRATEGIES.index(view.config.restore))
        for key, value in _numeric_extras(view).items():
            metrics[f"moe/{name}/{key}"] = value
    offset = 0
    for name, what, length in layout:
        values = packed[offset : offset + length]
        offset += length
        if what == "tokens":
            metrics[f"moe/{name}/tokens_max"] = float(values.max())
            metrics[f"moe/{name}/tokens_min"] = float(values.min())
            mean = float(values.mean())
            metrics[f"moe/{name}/load_imbalance"] = float(values.max()) / mean if mean > 0 else 0.0
            if per_expert:
                for e, count in enumerate(values.tolist()):
                    metrics[f"moe/{name}/tokens_e{e}"] = count
        elif what == "dropped":
            metrics[f"moe/{name}/dropped_tokens"] = float(values[0])
        else:
            metrics["moe/aux_loss"] = float(values[0]) / world_size
    return metrics
