"""What the fine-tuning recipe measures and prints: training throughput, the MoE executors'
choices (n and restore strategy per layer), the MoE memory they hold, and the run summary.

MoE memory in the summary is two figures per rank: the expert state the rank holds (its
experts' weights, gradients and optimizer state: what the strategy logs as
`moe/expert_state_bytes`, measured), and per MoE layer call the activations held for backward
under the chosen n and restore strategy (DESIGN.md's model, `moe.memory.analytic_memory`,
for this run's tokens per call; on device, and on the host for offloading strategies).
"""

from __future__ import annotations

import importlib.util
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_mpipemoe.config import RESTORE_STRATEGIES
from lightning_mpipemoe.moe.memory import LayerShape, analytic_memory

__all__ = ["RunMonitor", "executor_choices", "format_summary", "tensorboard_logger"]


def tensorboard_logger(save_dir: str, name: str = "tensorboard"):
    """A TensorBoardLogger when `tensorboard` (or `tensorboardX`) is installed, else None."""
    if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
        return None
    from lightning.pytorch.loggers import TensorBoardLogger

    return TensorBoardLogger(save_dir=save_dir, name=name, version="")


def executor_choices(strategy: pl.strategies.Strategy) -> dict[str, dict[str, Any]]:
    """Per MoE layer: the n and restore strategy its latest call ran with, and where each came
    from: "fixed" (the configuration), "tuned" (the layer's tuner, as its `executor_metrics()`
    reports) or "untuned" ("auto" with no tuner decision: the smallest candidate, `none`)."""
    from lightning_mpipemoe.discovery import read_executor_metrics

    choices = {}
    for name, view in getattr(strategy, "moe_executors", {}).items():
        config = view.config
        reported = read_executor_metrics(view) if config.is_auto else {}
        untuned = config.resolved()
        n, n_by = config.num_partitions, "fixed"
        if config.tunes_partitions:
            tuned = "num_partitions" in reported
            n, n_by = (int(reported["num_partitions"]), "tuned") if tuned else (untuned.num_partitions, "untuned")
        restore, restore_by = config.restore, "fixed"
        if config.tunes_restore:
            tuned = "restore" in reported
            restore = RESTORE_STRATEGIES[int(reported["restore"])] if tuned else untuned.restore
            restore_by = "tuned" if tuned else "untuned"
        chosen_by = n_by if n_by == restore_by else f"n {n_by}, restore {restore_by}"
        choices[name] = {"num_partitions": int(n), "restore": restore, "chosen_by": chosen_by}
    return choices


def _expert_shape(module: torch.nn.Module) -> tuple[int, int, bool, int] | None:
    """(hidden, intermediate, gated, element bytes) of an MoE layer's local experts."""
    from lightning_mpipemoe.hf_models.experts_interface import expert_weights_of, is_hf_experts_module

    if is_hf_experts_module(module):
        weights = expert_weights_of(module)
        return weights.hidden_size, weights.intermediate_size, weights.gated, weights.w_in_EOH.element_size()
    experts = getattr(module, "experts", None)  # Switch: stacked wi [L, I, H], wo [L, H, I]
    if experts is not None and hasattr(experts, "wi") and hasattr(experts, "wo"):
        return experts.wi.shape[2], experts.wi.shape[1], False, experts.wi.element_size()
    return None


class RunMonitor(Callback):
    """Training throughput (skipping the first `warmup_steps` steps: start-up, first profiling)
    and, at the end of training, the MoE layers' choices and memory.

    Args:
        tokens_per_row: tokens one block contributes (1 per position for causal LMs; 2 for
            seq2seq, encoder input and target).
        top_k: experts per token of the model (for the memory model).
        warmup_steps: steps left out of the throughput.
    """

    def __init__(self, tokens_per_row: int = 1, top_k: int = 1, warmup_steps: int = 2) -> None:
        self.tokens_per_row = tokens_per_row
        self.top_k = top_k
        self.warmup_steps = warmup_steps
        self.seconds = 0.0
        self.tokens = 0
        self.steps = 0
        self.train_tokens = 0
        self.tokens_per_call = 0
        self.moe: dict[str, Any] = {}
        self._start: float | None = None

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._start = time.perf_counter()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        elapsed = time.perf_counter() - self._start
        ids = batch["input_ids"]
        tokens = ids.numel() * self.tokens_per_row * trainer.world_size  # every rank trains on its own blocks
        self.tokens_per_call = ids.numel()
        self.train_tokens += tokens
        self.steps += 1
        if self.steps > self.warmup_steps:
            self.seconds += elapsed
            self.tokens += tokens

    @property
    def tokens_per_second(self) -> float | None:
        return self.tokens / self.seconds if self.seconds > 0 else None

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        strategy = trainer.strategy
        choices = executor_choices(strategy)
        layers = {}
        ep_size = getattr(getattr(strategy, "moe_groups", None), "ep_size", 1)
        for name, choice in choices.items():
            entry = dict(choice)
            shape = _expert_shape(pl_module.get_submodule(name)) if name else None
            if shape is not None and self.tokens_per_call:
                hidden, intermediate, gated, element = shape
                layer = LayerShape(self.tokens_per_call, self.top_k, hidden, intermediate, gated, ep_size, element)
                memory = analytic_memory(layer, choice["num_partitions"], choice["restore"])
                entry["held_bytes"] = memory.device_held_bytes
                entry["host_bytes"] = memory.host_held_bytes
                without_reuse = analytic_memory(layer, choice["num_partitions"], "none")
                entry["held_bytes_without_reuse"] = without_reuse.device_held_bytes
            layers[name] = entry
        measure = getattr(strategy, "expert_state_bytes", None)  # MPipeMoEStrategy; None under another strategy
        state = measure() if measure is not None else None
        self.moe = {
            "expert_state_bytes_per_rank": int(state) if state is not None else None,
            "tokens_per_call": self.tokens_per_call,
            "layers": layers,
        }


def _mib(num_bytes: float | None) -> str:
    return "n/a" if num_bytes is None else f"{num_bytes / 2**20:.2f} MiB"


def format_summary(summary: dict[str, Any]) -> str:
    """The human-readable summary printed at the end of a run."""
    model, run = summary["model"], summary["run"]
    before, after = summary["heldout"]["before"], summary["heldout"]["after"]
    moe = summary["moe"]
    tps = summary["tokens_per_second"]
    lines = [
        "",
        "== mpipemoe-finetune summary ==",
        f"model       {model['name']}: {model['class']}, {model['num_experts']} experts, top-{model['top_k']}, "
        f"{model['moe_layers']} MoE layers, {model['parameters'] / 1e6:.2f}M parameters",
        f"run         {run['processes']} processes ({run['accelerator']}), "
        f"expert_parallel_size={run['expert_parallel_size']}"
        f" x data_parallel={run['data_parallel_size']}, {run['steps']} steps, {run['train_tokens']:,} tokens, "
        f"{run['seconds']:.1f} s",
        f"held-out    loss {before['loss']:.4f} -> {after['loss']:.4f}  (perplexity {before['perplexity']:.1f} -> "
        f"{after['perplexity']:.1f}, {after['tokens']:,} tokens)",
        f"throughput  {tps:,.0f} tokens/s (training, all ranks)" if tps else "throughput  n/a (too few steps)",
        f"MoE memory  expert state {_mib(moe['expert_state_bytes_per_rank'])} per rank (weights + grads + optimizer)",
    ]
    layers = moe["layers"]
    if layers:
        width = max(len(name) for name in layers)
        lines.append(f"  {'layer'.ljust(width)}   n  restore  chosen by                    held for backward per call")
        for name, layer in layers.items():
            held = layer.get("held_bytes")
            memory = "n/a" if held is None else _mib(held)
            if held is not None and layer.get("host_bytes"):
                memory += f" (+{_mib(layer['host_bytes'])} host)"
            if held is not None and layer["held_bytes_without_reuse"] != held:
                memory += f", {_mib(layer['held_bytes_without_reuse'])} without reuse"
            lines.append(
                f"  {name.ljust(width)}  {layer['num_partitions']:>2}  {layer['restore']:<7}  "
                f"{layer['chosen_by']:<27}  {memory}"
            )
    lines += [
        f"export      {summary['export_dir']}",
        f"checkpoint  {summary['checkpoint'] or 'none'}",
        f"logs        {summary['log_dir']}",
        f"summary     {summary['summary_file']}",
    ]
    return "\n".join(lines)
