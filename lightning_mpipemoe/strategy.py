"""`Trainer(strategy="mpipemoe")`: expert parallelism on the MPipeMoE executor, inside DDP.

Why a `DDPStrategy` subclass and not `ModelParallelStrategy`: everything but the experts is
replicated, and DDP's bucketed all-reduce that overlaps backward is exactly what those
parameters need; DDP also brings the launchers (script, torchrun, SLURM, spawn), samplers and
`no_sync` for gradient accumulation. `ModelParallelStrategy` is built around a DeviceMesh,
FSDP2/DTensor parameters and torch.distributed.checkpoint, requires `configure_model` to
parallelise by hand, and its checkpoints assume DTensor sharding: the experts here are plain
tensors sharded along dim 0 by the executor's own process groups. What DDP lacks is added:
expert parameters are excluded from DDP and reduced over the expert-data-parallel group
(`grad_sync.py`), clipping uses the global norm, and checkpoints hold one shard per EP rank
(`checkpointing.py`).

Order of events in a run (Lightning's `Trainer._run`):

1. `Trainer(...)`: `_configure_launcher` checks the EP size against devices x nodes and the
   precision, before any process is launched.
2. `setup_environment`: the default process group, then the ep / ep-combine / expert-dp / dp
   groups (`groups.build_process_groups`, each with `timeout`), each warmed by one tiny
   all-reduce on the root device (NCCL creates communicators lazily).
3. `configure_model` (the user's), then `setup`: MoE layers are found (`discovery.py`),
   checked against the EP size, sharded (each rank keeps E/ep experts) and bound to the
   executor with the strategy's config; expert shards are made identical across expert-dp
   replicas; then DDP wraps the model with the experts ignored.
4. Checkpoints are restored after setup (the model is sharded by then).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Generator, Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.fabric.strategies import _StrategyRegistry
from lightning.fabric.utilities.optimizer import _optimizer_to_device
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.plugins.precision import DoublePrecision, HalfPrecision, MixedPrecision, Precision
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher, _WorkerOutput
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from typing_extensions import override

from lightning_mpipemoe import collectives, dcp_checkpoint, fsdp
from lightning_mpipemoe.atomic_dir import commit_directory, new_token, remove_stale, temporary_directory
from lightning_mpipemoe.checkpointing import (
    DEFAULT_CHECKPOINT_TIMEOUT,
    META_FILE,
    SECTION,
    build_checkpoint_group,
    checkpoint_barrier,
    gather_full_state_dict,
    optimizer_state_by_index,
    optimizer_state_by_name,
    read_checkpoint,
    record_files,
    shard_file,
    split_checkpoint,
)
from lightning_mpipemoe.config import SimulatedLink, executor_overrides
from lightning_mpipemoe.discovery import (
    ExecutorView,
    MoEUnit,
    find_moe_units,
    load_executor_state,
    pack_experts,
    read_executor_state,
    unpack_experts,
)
from lightning_mpipemoe.grad_sync import DEFAULT_BUCKET_BYTES, ExpertGradReducer, clip_grad_norm_
from lightning_mpipemoe.groups import DEFAULT_TIMEOUT, MoEProcessGroups, build_process_groups, check_parallel_sizes
from lightning_mpipemoe.moe_metrics import moe_step_metrics

__all__ = ["MPipeMoEStrategy"]

_LOG_LEVELS = ("layer", "expert", "off")


def _check_precision(plugin: Precision) -> None:
    if isinstance(plugin, MixedPrecision):
        if plugin.scaler is not None:
            raise ValueError(
                "MPipeMoEStrategy does not support precision='16-mixed': the gradient scaler's inf/nan check is per "
                "rank and expert gradients differ across EP ranks, so ranks could disagree on skipping a step. "
                "Use precision='bf16-mixed' (no scaler)."
            )
        return
    if isinstance(plugin, (HalfPrecision, DoublePrecision)) or type(plugin) is Precision:
        return
    raise ValueError(
        f"MPipeMoEStrategy does not support the {type(plugin).__name__} precision plugin; use precision="
        "'32-true', 'bf16-mixed' or 'bf16-true' ('16-true' and '64-true' work too)"
    )


class MPipeMoEStrategy(DDPStrategy):
    """Expert-parallel training with the MPipeMoE executor: experts sharded over EP groups,
    everything else data parallel (DDP).

    Args:
        expert_parallel_size: ranks that share one copy of the experts (each holds E/ep of
            them). Default: the devices of one node, so that EP groups stay within a node.
        granularity: micro-partitions `n` per MoE call (an int), or "auto" (the layer's tuner
            picks n). None keeps each layer's own setting.
        restore: memory-reuse restore strategy, one of "none", "s1".."s4", or "auto" (chosen
            by the cost model). None keeps each layer's own setting.
        memory_budget: what one MoE layer call may hold (bytes, or a fraction of device
            memory), obeyed by the "auto" choices.
        simulated_link: a `config.SimulatedLink` (or a dict of its fields) that every
            all-to-all also crosses, for schedule studies on CPU.
        timeout: timeout of the default process group and of every MoE process group
            (default 5 minutes, not torch's 30: a dead peer ends the run with an error soon).
        checkpoint_timeout: timeout of the barriers around checkpoint and export writes (a
            group of their own, `checkpoint_group`; default 60 minutes: multi-GB writes).
        log_moe_metrics: "layer" (per-layer routing and executor metrics), "expert" (also the
            tokens of every expert) or "off". Counts accumulate on the device over the steps
            between two logged ones and are reduced (one all-reduce) after the optimizer step of
            each step the trainer logs (`log_every_n_steps`).
        expert_bucket_bytes: size of one expert-gradient all-reduce over the expert-dp group
            (buckets start during backward, as DDP's do; `grad_sync.ExpertGradReducer`).
        expert_grads_in_fp32: reduce low-precision expert gradients through an fp32 copy of
            one bucket at a time (default: in the gradients' own dtype, in place).
        start_method: "popen" (scripts, torchrun, SLURM; registered as "mpipemoe") or "spawn"
            (registered as "mpipemoe_spawn").
        sharding: "ddp" (replicated dense part, DDP) or "fsdp" (FSDP2: dense part sharded over
            all ranks, experts over the expert-dp ranks; `fsdp.py`; registered as
            "mpipemoe_fsdp" and "mpipemoe_fsdp_spawn").
        **kwargs: DDPStrategy's arguments (`find_unused_parameters`, `static_graph`, comm
            hooks, ...), passed on to `DistributedDataParallel`.
    """

    def __init__(
        self,
        expert_parallel_size: Optional[int] = None,
        granularity: int | str | None = None,
        restore: Optional[str] = None,
        memory_budget: int | float | None = None,
        simulated_link: SimulatedLink | Mapping[str, float] | None = None,
        timeout: timedelta = DEFAULT_TIMEOUT,
        checkpoint_timeout: timedelta = DEFAULT_CHECKPOINT_TIMEOUT,
        log_moe_metrics: Literal["layer", "expert", "off"] = "layer",
        expert_bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        expert_grads_in_fp32: bool = False,
        accelerator: Optional["pl.accelerators.Accelerator"] = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        checkpoint_io: Optional[CheckpointIO] = None,
        precision_plugin: Optional[Precision] = None,
        ddp_comm_state: Optional[object] = None,
        ddp_comm_hook: Optional[Callable] = None,
        ddp_comm_wrapper: Optional[Callable] = None,
        model_averaging_period: Optional[int] = None,
        process_group_backend: Optional[str] = None,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        sharding: Literal["ddp", "fsdp"] = "ddp",
        **kwargs: Any,
    ) -> None:
        if sharding not in fsdp.SHARDINGS:
            raise ValueError(f"sharding must be one of {fsdp.SHARDINGS}, got {sharding!r}")
        if sharding == "fsdp" and (ddp_comm_state, ddp_comm_hook, ddp_comm_wrapper, kwargs) != (None, None, None, {}):
            raise ValueError(
                "sharding='fsdp' does not take DDP's arguments (ddp_comm_state / ddp_comm_hook / ddp_comm_wrapper / "
                f"DistributedDataParallel kwargs {sorted(kwargs)}): FSDP2 does the gradient reduction"
            )
        ep = expert_parallel_size
        if ep is not None and (isinstance(ep, bool) or not isinstance(ep, int) or ep < 1):
            raise ValueError(f"expert_parallel_size must be a positive int (or None), got {expert_parallel_size!r}")
        from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import PostLocalSGDState

        if model_averaging_period is not None or isinstance(ddp_comm_state, PostLocalSGDState):
            raise ValueError(
                "MPipeMoEStrategy does not support post-local-SGD model averaging: it averages every parameter over "
                "the world, which would mix the different experts of different EP ranks"
            )
        if log_moe_metrics not in _LOG_LEVELS:
            raise ValueError(f"log_moe_metrics must be one of {_LOG_LEVELS}, got {log_moe_metrics!r}")
        if isinstance(expert_bucket_bytes, bool) or not isinstance(expert_bucket_bytes, int) or expert_bucket_bytes < 1:
            raise ValueError(f"expert_bucket_bytes must be a positive int, got {expert_bucket_bytes!r}")
        if not isinstance(timeout, timedelta) or timeout.total_seconds() <= 0:
            raise TypeError(f"timeout must be a positive datetime.timedelta, got {timeout!r}")
        if not isinstance(checkpoint_timeout, timedelta) or checkpoint_timeout.total_seconds() <= 0:
            raise TypeError(f"checkpoint_timeout must be a positive datetime.timedelta, got {checkpoint_timeout!r}")
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            ddp_comm_state=ddp_comm_state,
            ddp_comm_hook=ddp_comm_hook,
            ddp_comm_wrapper=ddp_comm_wrapper,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
            **kwargs,
        )
        self._expert_parallel_size = expert_parallel_size
        self._overrides = executor_overrides(granularity, restore, simulated_link, memory_budget)
        self._log_moe_metrics = log_moe_metrics
        self._groups: MoEProcessGroups | None = None
        self._reported_layout: str | None = None
        self._units: list[MoEUnit] = []
        self._expert_keys: dict[str, int] = {}
        self._packed_keys: dict[str, tuple[int, str]] = {}  # peft's LoRA on fused experts
        self._expert_params: list[nn.Parameter] = []
        self._bucket_bytes = expert_bucket_bytes
        self._grads_in_fp32 = bool(expert_grads_in_fp32)
        self._grad_reducer: ExpertGradReducer | None = None
        self._checkpoint_timeout = checkpoint_timeout
        self._checkpoint_group = None
        self._last_aux_loss: Any = None
        self._sharding = sharding
        self._fsdp: fsdp.FSDPLayout | None = None

    # ------------------------------------------------------------------------------ properties

    @property
    def expert_parallel_size(self) -> int:
        """The EP size (resolved to the devices of one node when not given)."""
        return self._expert_parallel_size or self.num_processes

    @property
    def moe_groups(self) -> MoEProcessGroups:
        """The ep / expert-dp / dp groups of this rank (available from `configure_model` on)."""
        if self._groups is None:
            raise RuntimeError("the MoE process groups exist once the strategy's environment is set up")
        return self._groups

    @property
    def checkpoint_group(self):
        """The group of the barriers around checkpoint and export writes (gloo, with
        `checkpoint_timeout`), e.g. for `hf_models.export_pretrained(barrier_group=...)`."""
        if self._groups is None:
            raise RuntimeError("the checkpoint group exists once the strategy's environment is set up")
        return self._checkpoint_group

    @property
    def expert_parameter_names(self) -> dict[str, int]:
        """Expert-sharded parameter name (in the LightningModule) -> global expert count."""
        return dict(self._expert_keys)

    @property
    def moe_executors(self) -> dict[str, ExecutorView]:
        """Every MoE layer's executor (config, routing stats), by qualified name."""
        return {name: view for unit in self._units for name, view in unit.executors().items()}

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        # The experts are sharded in `setup`; a checkpoint holds shards, so it loads after.
        return True

    # ----------------------------------------------------------------------- launch and groups

    def _check_layout(self) -> None:
        """Everything that can be checked before any process or collective exists."""
        devices, nodes = self.num_processes, self.num_nodes
        ep = self.expert_parallel_size
        try:
            check_parallel_sizes(devices * nodes, ep)
        except ValueError as exc:
            raise ValueError(f"MPipeMoEStrategy with {devices} devices x {nodes} nodes: {exc}") from exc
        if nodes > 1 and (ep > devices or devices % ep):
            rank_zero_warn(
                f"expert_parallel_size={ep} with {devices} devices per node puts EP groups across nodes: every MoE "
                "all-to-all then crosses the inter-node link. An EP size that divides the devices per node keeps "
                "them within a node."
            )
        _check_precision(self.precision_plugin)

    @override
    def _configure_launcher(self) -> None:
        self._check_layout()
        assert self.cluster_environment is not None
        if self._start_method == "popen":
            self._launcher = _SubprocessScriptLauncher(self.cluster_environment, self.num_processes, self.num_nodes)
        else:
            self._launcher = _MPipeMoESpawnLauncher(self, start_method=self._start_method)

    @override
    def setup_environment(self) -> None:
        self._check_layout()  # before the rendezvous
        super().setup_environment()
        self._groups = build_process_groups(self.expert_parallel_size, timeout=self._timeout)
        self._checkpoint_group = build_checkpoint_group(self._checkpoint_timeout)
        groups = self._groups
        warm_up_groups(groups, self.root_device)
        layout = (
            f"MPipeMoEStrategy: {groups.world_size} ranks = expert_parallel_size {groups.ep_size} x "
            f"data_parallel {groups.expert_dp_size}"
        )
        if layout != self._reported_layout:  # once per run, not once per validate / fit / test
            rank_zero_info(layout)
            self._reported_layout = layout

    # ------------------------------------------------------------------------------- the model

    @override
    def setup(self, trainer: "pl.Trainer") -> None:
        assert self.lightning_module is not None
        self._prepare_moe(self.lightning_module)
        if self._sharding == "fsdp":
            self._fsdp = fsdp.setup_strategy(self, trainer)
            if self._expert_keys:
                self.precision_plugin.clip_grad_by_norm = partial(self._clip_grad_by_norm, self.precision_plugin)
            return
        super().setup(trainer)
        named = dict(self.lightning_module.named_parameters())
        self._expert_params = [named[k] for k in sorted(self._expert_keys) if named[k].requires_grad]
        if self._grad_reducer is not None:
            self._grad_reducer.detach()
        self._grad_reducer = None
        if self._expert_params:
            # Registration order (the same on every rank): backward produces the gradients roughly
            # in its reverse, which is the order the buckets are filled and started in.
            self._grad_reducer = ExpertGradReducer(
                [p for k, p in named.items() if k in self._expert_keys and p.requires_grad],
                self.moe_groups,
                bucket_bytes=self._bucket_bytes,
                reduce_in_fp32=self._grads_in_fp32,
            ).attach()
        if any(hasattr(opt, "consolidate_state_dict") for opt in self.optimizers):
            raise ValueError(
                "MPipeMoEStrategy does not support optimizers that shard their state (ZeroRedundancyOptimizer)"
            )
        if self._expert_params:
            # Lightning routes `gradient_clip_val` through the precision plugin the Trainer chose;
            # this strategy's own plugin instance gets a global-norm `clip_grad_by_norm`.
            self.precision_plugin.clip_grad_by_norm = partial(self._clip_grad_by_norm, self.precision_plugin)

    def _prepare_moe(self, module: pl.LightningModule) -> None:
        groups = self.moe_groups
        units = find_moe_units(module)
        if not units:
            rank_zero_warn(
                f"MPipeMoEStrategy found no MoE layer in {type(module).__name__} (neither a lightning_mpipemoe "
                "MoELayer nor a Hugging Face MoE model that lightning_mpipemoe.hf_models covers); it trains as "
                "plain DDP"
            )
            self._units, self._expert_keys, self._packed_keys = [], {}, {}
            return
        for unit in units:  # before anything collective or any sharding
            for num_experts in unit.kind.num_experts(unit.module):
                try:
                    check_parallel_sizes(groups.world_size, groups.ep_size, num_experts)
                except ValueError as exc:
                    raise ValueError(f"MoE layer {unit.name!r}: {exc}") from exc
        for unit in units:
            try:
                unit.kind.shard(unit.module, groups, self._overrides)
            except ValueError as exc:
                raise ValueError(f"MoE unit {unit.name!r} at expert_parallel_size={groups.ep_size}: {exc}") from exc
        self._units = units
        self._expert_keys = {key: count for unit in units for key, count in unit.expert_parameters().items()}
        self._packed_keys = {key: spec for unit in units for key, spec in unit.packed_expert_parameters().items()}
        ignored = set(getattr(module, "_ddp_params_and_buffers_to_ignore", ())) | set(self._expert_keys)
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, sorted(ignored))
        self._broadcast_expert_shards(module)

    def _broadcast_expert_shards(self, module: nn.Module) -> None:
        """Make the replicas of each expert shard identical (DDP does so for the rest)."""
        groups = self.moe_groups
        if groups.expert_dp_size == 1:
            return
        src = dist.get_global_rank(groups.expert_dp, 0)
        named = dict(module.named_parameters())
        with torch.no_grad():
            for key in sorted(self._expert_keys):
                collectives.broadcast(named[key].data, src, group=groups.expert_dp, site="strategy.expert_shards")

    @override
    def process_dataloader(self, dataloader: object) -> object:
        dataloader = super().process_dataloader(dataloader)
        self._check_even_batches(dataloader)
        return dataloader

    def _check_even_batches(self, dataloader: object) -> None:
        """Every MoE forward is collective over the EP group, so every rank must run as many
        batches. Lightning's predict sampler does not pad the data to equal shares."""
        batch_sampler = getattr(dataloader, "batch_sampler", None)  # Lightning's predict wrapper copies its fields
        sampler = getattr(batch_sampler, "sampler", None) or getattr(dataloader, "sampler", None)
        if not isinstance(sampler, UnrepeatedDistributedSampler) or not self._units or self.moe_groups.ep_size == 1:
            return
        batch_size = getattr(batch_sampler, "batch_size", None) or getattr(dataloader, "batch_size", None) or 1
        drop_last = getattr(batch_sampler, "drop_last", getattr(dataloader, "drop_last", False))
        shares = [len(range(r, sampler.total_size, sampler.num_replicas)) for r in range(sampler.num_replicas)]
        batches = sorted({n // batch_size if drop_last else -(-n // batch_size) for n in shares})
        if len(batches) > 1:
            raise ValueError(
                f"the predict data ({sampler.total_size} samples over {sampler.num_replicas} ranks, batch size "
                f"{batch_size}) gives the ranks {batches[0]} to {batches[-1]} batches; with expert parallelism every "
                "MoE forward is collective, so every rank must run the same number: pad the dataset to a multiple "
                "of the world size (x batch size)"
            )

    # --------------------------------------------------------------------------- gradients

    def _syncing_gradients(self) -> bool:
        """False inside `no_sync` (gradient accumulation), as for DDP's own reduction."""
        return not isinstance(self.model, DistributedDataParallel) or self.model.require_backward_grad_sync

    @override
    def pre_backward(self, closure_loss: Tensor) -> None:
        super().pre_backward(closure_loss)
        if self._grad_reducer is not None:
            # Inside Lightning's `block_backward_sync` (accumulate_grad_batches: every micro-batch
            # but the last) DDP's `no_sync` is on: the expert buckets then do not communicate either.
            self._grad_reducer.start(sync=self._syncing_gradients())

    @override
    def post_backward(self, closure_loss: Tensor) -> None:
        super().post_backward(closure_loss)
        if self._grad_reducer is not None:
            self._grad_reducer.finish()  # waits for the buckets started during backward

    @override
    @contextmanager
    def block_backward_sync(self) -> Generator:
        """Gradient accumulation without communication: DDP's `no_sync`, or FSDP2's switch."""
        if self._fsdp is None:
            with super().block_backward_sync():
                yield
            return
        self._fsdp.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self._fsdp.set_requires_gradient_sync(True)

    def clip_grad_norm_(self, parameters: Iterable[nn.Parameter], max_norm: float, norm_type: float = 2.0) -> Tensor:
        """Clip by the global gradient norm (all experts of all EP ranks and the replicated part);
        returns the norm. Collective: call on every rank (manual optimization)."""
        if self._fsdp is not None:
            return fsdp.clip_grad_norm_(parameters, max_norm, self.moe_groups, norm_type)
        return clip_grad_norm_(parameters, max_norm, self._expert_params, self.moe_groups, norm_type)

    def _clip_grad_by_norm(self, plugin: Precision, optimizer: Optimizer, clip_val: float) -> None:
        self.clip_grad_norm_(plugin.main_params(optimizer), clip_val)

    # ------------------------------------------------------------------------------- logging

    # The routing counts of the steps between two logged ones accumulate on the device (the
    # executor adds each call's counts there); they are reduced over the world in one all-reduce
    # after the optimizer step of a step the trainer logs (`log_every_n_steps`), then reset:
    # nothing runs between a step's forward and its backward, and nothing on the other steps.

    def _logs_moe_metrics(self) -> bool:
        return self._log_moe_metrics != "off" and bool(self._units)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        output = super().training_step(*args, **kwargs)
        if self._logs_moe_metrics():
            aux = output.get("aux_loss") if isinstance(output, Mapping) else None
            self._last_aux_loss = aux.detach() if isinstance(aux, Tensor) else aux
        return output

    @override
    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        if self._logs_moe_metrics() and self._logs_this_step():
            self._log_step(self._last_aux_loss)
            for view in self.moe_executors.values():
                if view.stats is not None:
                    view.stats.reset()
        return output

    def _logs_this_step(self) -> bool:
        """Whether the trainer logs the metrics of the step that just stepped (its own rule)."""
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is None:
            return True
        return trainer._logger_connector.should_update_logs

    def _log_step(self, aux: Any) -> None:
        if aux is not None and not isinstance(aux, Tensor):
            aux = torch.tensor(float(aux))
        metrics = moe_step_metrics(
            self.moe_executors,
            aux_loss=aux,
            group=self.moe_groups.dp,
            world_size=self.world_size,
            per_expert=self._log_moe_metrics == "expert",
            device=self.root_device,
        )
        metrics["moe/expert_state_bytes"] = float(self._expert_state_bytes())
        assert self.lightning_module is not None
        self.lightning_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    def _expert_state_bytes(self) -> int:
        """Bytes this rank holds for its experts: weights, gradients and optimizer state."""
        named = dict(self.lightning_module.named_parameters())
        params = [named[k] for k in self._expert_keys]
        return fsdp.local_state_bytes(params, self.optimizers)

    # --------------------------------------------------------------------------- checkpoints

    def _param_names(self) -> dict[int, str]:
        assert self.lightning_module is not None
        return {id(p): name for name, p in self.lightning_module.named_parameters()}

    def _relayout(self, state: dict[str, Any], to_checkpoint: bool) -> dict[str, Any]:
        """Packed expert tensors (peft's LoRA A `[r*L, in]`, B `[out, r*L]` on fused experts) to
        the unpacked form checkpoints hold (`[L, r, in]`, `[L, out, r]`: dim 0 the expert, so
        that the checkpoint code cuts and joins them like any expert shard), or back."""
        if not self._packed_keys:
            return state
        ep = self.moe_groups.ep_size
        out = dict(state)
        for key, (num_experts, layout) in self._packed_keys.items():
            if key in out:
                value = out[key]
                out[key] = (
                    unpack_experts(value, num_experts // ep, layout) if to_checkpoint else pack_experts(value, layout)
                )
        return out

    @property
    @override
    def lightning_restore_optimizer(self) -> bool:
        return self._fsdp is None  # FSDP: restored with the model in `load_checkpoint` (DCP)

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        if self._fsdp is not None:
            return {}  # saved by DCP from the sharded module (`dcp_checkpoint.save`)
        return self._relayout(super().lightning_module_state_dict(), to_checkpoint=True)

    def _relayout_optimizer(self, named: dict[str, Any], to_checkpoint: bool) -> dict[str, Any]:
        if not self._packed_keys:
            return named
        shapes = {name: tuple(p.shape) for name, p in self.lightning_module.named_parameters()}
        state = dict(named["state"])
        for key in self._packed_keys.keys() & state.keys():
            param_state = dict(state[key])
            for name, value in param_state.items():
                # Tensors shaped like the parameter (Adam's moments) move with it; scalars stay.
                if not isinstance(value, Tensor):
                    continue
                if (tuple(value.shape) == shapes[key]) if to_checkpoint else value.dim() == 3:
                    param_state[name] = self._relayout({key: value}, to_checkpoint)[key]
            state[key] = param_state
        return {**named, "state": state}

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """Name-keyed optimizer state (`checkpointing.optimizer_state_by_name`)."""
        if self._fsdp is not None:
            return {}  # saved by DCP (`dcp_checkpoint.save`)
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        return self._relayout_optimizer(optimizer_state_by_name(optimizer, self._param_names()), to_checkpoint=True)

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        names = self._param_names()
        for optimizer, named in zip(self.optimizers, checkpoint["optimizer_states"]):
            named = self._relayout_optimizer(named, to_checkpoint=False)
            optimizer.load_state_dict(optimizer_state_by_index(named, optimizer, names))
            _optimizer_to_device(optimizer, self.root_device)

    def _executor_state(self) -> dict[str, dict]:
        return {name: read_executor_state(view) for name, view in self.moe_executors.items()}

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Optional[Any] = None
    ) -> None:
        """Collective: the checkpoint directory (`checkpointing.py`), written atomically."""
        if storage_options is not None:
            raise TypeError("MPipeMoEStrategy.save_checkpoint does not take storage_options")
        if self._fsdp is not None:
            return dcp_checkpoint.save(self, checkpoint, Path(filepath))
        if self._groups is None:
            raise RuntimeError(
                "MPipeMoEStrategy saves checkpoints from the training processes (e.g. ModelCheckpoint or a callback); "
                "this process never set the strategy up (the main process of a spawn run holds the consolidated "
                "weights only: trainer.lightning_module.state_dict())"
            )
        groups = self.moe_groups
        path_str, token = self.broadcast((str(filepath), new_token()))
        path = Path(path_str)
        tmp = temporary_directory(path, token)
        if self.is_global_zero:
            remove_stale(path)
            tmp.mkdir(parents=True)
        checkpoint_barrier(self._checkpoint_group, "strategy.save_checkpoint.mkdir")
        meta, shard = split_checkpoint(
            checkpoint, self._expert_keys, groups.ep_size, self.world_size, self._executor_state()
        )
        written = []
        if self.is_global_zero:
            self.checkpoint_io.save_checkpoint(meta, tmp / META_FILE)
            written.append(META_FILE)
        if groups.expert_dp_rank == 0:
            name = shard_file(groups.ep_rank, groups.ep_size)
            self.checkpoint_io.save_checkpoint(shard, tmp / name)
            written.append(name)
        record_files(tmp, written)  # size + SHA-256 beside each file, then fsync
        checkpoint_barrier(self._checkpoint_group, "strategy.save_checkpoint.written")
        if self.is_global_zero:
            commit_directory(tmp, path, token)
        checkpoint_barrier(self._checkpoint_group, "strategy.save_checkpoint.committed")

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: Optional[bool] = None) -> dict[str, Any]:
        if self._fsdp is not None:  # loads model and optimizer state here (DCP), returns the rest
            return dcp_checkpoint.load(self, Path(checkpoint_path))
        path = Path(self.broadcast(str(checkpoint_path)))
        groups = self.moe_groups
        checkpoint = read_checkpoint(path, groups.ep_size, groups.ep_rank, self.checkpoint_io, weights_only)
        saved = checkpoint[SECTION]["expert_keys"]
        if saved != self._expert_keys:
            differ = sorted(k for k in set(saved) | set(self._expert_keys) if saved.get(k) != self._expert_keys.get(k))
            raise ValueError(
                f"{path}: the checkpoint's expert parameters do not match the model's (key: checkpoint experts vs "
                f"model experts): {[(k, saved.get(k), self._expert_keys.get(k)) for k in differ[:5]]}"
            )
        return checkpoint

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        if self._packed_keys and self._fsdp is None:
            checkpoint = {**checkpoint, "state_dict": self._relayout(checkpoint["state_dict"], to_checkpoint=False)}
        if self._fsdp is None:  # FSDP: loaded in `load_checkpoint` (DCP)
            super().load_model_state_dict(checkpoint, strict=strict)
        saved = dict(checkpoint.get(SECTION, {}).get("executor_state", {}))
        for name, view in self.moe_executors.items():
            load_executor_state(view, saved.pop(name, {}), name)
        leftover = sorted(name for name, state in saved.items() if state)
        if leftover:
            rank_zero_warn(f"the checkpoint holds executor state for MoE layers the model does not have: {leftover}")

    def consolidated_state_dict(self, unconverted: bool = False) -> dict[str, Tensor] | None:
        """Collective over the EP group: the LightningModule's state dict with every expert, on
        EP rank 0 of each EP group (None elsewhere). `unconverted=True` maps Hugging Face units
        back to their original keys (what an unsharded copy of the module loads)."""
        groups = self.moe_groups
        # FSDP: every DTensor gathered over its mesh first (collective over the world).
        local = fsdp.full_state_dict(self.lightning_module) if self._sharding == "fsdp" else None
        full = gather_full_state_dict(
            self.lightning_module, self._expert_keys, groups, device=self.root_device, local=local
        )
        if full is None:
            return full
        for key, (num_experts, layout) in self._packed_keys.items():  # shards were joined along dim 0: redo
            pieces = [unpack_experts(p, num_experts // groups.ep_size, layout) for p in full[key].chunk(groups.ep_size)]
            full[key] = pack_experts(torch.cat(pieces), layout)
        if not unconverted:
            return full
        for unit in self._units:
            prefix = f"{unit.name}." if unit.name else ""
            inner = {k[len(prefix) :]: full.pop(k) for k in [k for k in full if k.startswith(prefix)]}
            full.update({prefix + k: v for k, v in unit.kind.to_unconverted(unit.module, inner).items()})
        return full

    @override
    def teardown(self) -> None:
        vars(self.precision_plugin).pop("clip_grad_by_norm", None)
        if self._grad_reducer is not None:
            self._grad_reducer.detach()
            self._grad_reducer = None
        super().teardown()  # the MoE groups stay: the spawn launcher gathers the experts after teardown

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        strategy_registry.register(
            "mpipemoe",
            cls,
            description="MPipeMoE expert parallelism (DDP for the rest), subprocess launcher: scripts, torchrun, SLURM",
            start_method="popen",
        )
        strategy_registry.register(
            "mpipemoe_spawn",
            cls,
            description="MPipeMoE expert parallelism (DDP for the rest), spawn launcher",
            start_method="spawn",
        )
        strategy_registry.register(
            "mpipemoe_fsdp",
            cls,
            description="MPipeMoE expert parallelism with FSDP2 (dense part and expert replicas sharded), subprocess "
            "launcher",
            start_method="popen",
            sharding="fsdp",
        )
        strategy_registry.register(
            "mpipemoe_fsdp_spawn",
            cls,
            description="MPipeMoE expert parallelism with FSDP2 (dense part and expert replicas sharded), spawn launcher",
            start_method="spawn",
            sharding="fsdp",
        )


class _MPipeMoESpawnLauncher(_MultiProcessingLauncher):
    """The spawn launcher, handing the main process consolidated weights: its module was never
    sharded, so rank 0's shards would not load into it. A module that builds its model in
    `configure_model` (which only the workers ran) gets it built in the main process too, so
    that the trained weights have somewhere to go.

    The workers rendezvous through a store this process hosts (`_hosted_rendezvous`), and tear
    their process groups down together before they exit."""

    @override
    def launch(self, function: Callable, *args: Any, trainer: Optional["pl.Trainer"] = None, **kwargs: Any) -> Any:
        # A transformers model that ran a forward here carries output-capturing hooks, which
        # cannot be pickled; transformers installs them again at the next forward.
        modules = [a for a in (*args, *kwargs.values()) if isinstance(a, nn.Module)]
        if modules:
            from lightning_mpipemoe.hf_models.output_capturing import drop_output_capturing_hooks

            for module in modules:
                drop_output_capturing_hooks(module)
        with _hosted_rendezvous(self._strategy):
            return super().launch(function, *args, trainer=trainer, **kwargs)

    @override
    def _wrapping_function(self, *args: Any, **kwargs: Any) -> None:
        super()._wrapping_function(*args, **kwargs)
        # The worker is done and rank 0's results are on the queue. Every rank finishes its
        # collectives (a barrier, bounded by the group's timeout), then destroys the process
        # groups before the interpreter exits: a gloo context left to the interpreter's
        # shutdown while a peer is already gone can abort the process ("terminate called
        # without an active exception"). Not after a failure (the exception propagates past
        # this): the peers may be blocked in a collective this rank never joins.
        if dist.is_initialized():
            self._strategy.barrier("mpipemoe_spawn_exit")
            dist.destroy_process_group()

    @override
    def _recover_results_in_main_process(self, worker_output: _WorkerOutput, trainer: "pl.Trainer") -> None:
        if worker_output.weights_path is not None:
            io = self._strategy.checkpoint_io
            state_dict = io.load_checkpoint(worker_output.weights_path)
            io.remove_checkpoint(worker_output.weights_path)
            _load_trained_weights(trainer.lightning_module, state_dict)
            worker_output = worker_output._replace(weights_path=None)
        super()._recover_results_in_main_process(worker_output, trainer)

    @override
    def _collect_rank_zero_results(self, trainer: "pl.Trainer", results: Any) -> Optional[_WorkerOutput]:
        strategy = self._strategy
        assert isinstance(strategy, MPipeMoEStrategy)
        callback = trainer.checkpoint_callback
        best_model_path = callback.best_model_path if callback and hasattr(callback, "best_model_path") else None
        if strategy._groups is not None:
            state_dict = strategy.consolidated_state_dict(unconverted=True)  # collective over EP
        else:
            state_dict = trainer.lightning_module.state_dict()
        if strategy.local_rank != 0:
            return None
        weights_path = None
        if trainer.state.fn == TrainerFn.FITTING and state_dict is not None:
            weights_path = os.path.join(tempfile.mkdtemp(), ".temp.ckpt")
            strategy.checkpoint_io.save_checkpoint(state_dict, weights_path)
        extra = self.get_extra_results(trainer)
        return _WorkerOutput(best_model_path, weights_path, trainer.state, results, extra)


@contextlib.contextmanager
def _hosted_rendezvous(strategy: MPipeMoEStrategy) -> Iterator[None]:
    """Host the workers' rendezvous store in this (the launching) process for one launch.

    Lightning's default (`LightningEnvironment` without `MASTER_PORT`) picks a free port, closes
    it, and has rank 0 bind it again: anything on the machine may take the port in between
    (EADDRINUSE). Here a `TCPStore` is bound to a port the OS assigns, and stays bound while the
    workers run; every worker connects to it as a client (`TORCHELASTIC_USE_AGENT_STORE`,
    torch's switch for "the launcher hosts the store", as torchrun's agent does). One store per
    launch (a finished group's keys stay in its store); `MASTER_PORT` and the switch are
    restored afterwards, so that no later launch reuses the closed port. Only for one node and
    Lightning's own environment with no `MASTER_PORT` given; otherwise Lightning's rendezvous.
    """
    env = strategy.cluster_environment
    if type(env) is not LightningEnvironment or strategy.num_nodes != 1 or "MASTER_PORT" in os.environ:
        yield
        return
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=strategy._timeout)
    names = ("MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE")
    saved = {name: os.environ.get(name) for name in names}
    env._main_port = store.port  # the port Lightning's launcher hands the workers (it caches the first one)
    os.environ.update(MASTER_PORT=str(store.port), TORCHELASTIC_USE_AGENT_STORE="True")
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        env._main_port = -1
        del store


def _load_trained_weights(module: pl.LightningModule, state_dict: dict[str, Tensor]) -> None:
    """Load the workers' consolidated weights into the main process's module, building what
    its `configure_model` builds first when the module lacks those weights."""
    if set(state_dict) - set(module.state_dict()) and is_overridden("configure_model", module, pl.LightningModule):
        try:
            module.configure_model()  # on the CPU, unsharded: the weights arrive consolidated
        except Exception as exc:  # the run itself succeeded: say what is missing, do not lose the result
            rank_zero_warn(
                f"{type(module).__name__}.configure_model() failed in the main process ({type(exc).__name__}: {exc}); "
                "the trained weights stay in the workers' checkpoints only"
            )
    unexpected = module.load_state_dict(state_dict, strict=False).unexpected_keys
    if unexpected:
        rank_zero_warn(
            f"the main process's {type(module).__name__} has no place for {len(unexpected)} trained weights of the "
            f"workers (e.g. {unexpected[:3]}); they are not loaded"
        )


if "mpipemoe" not in StrategyRegistry:
    MPipeMoEStrategy.register_strategies(StrategyRegistry)


def warm_up_groups(groups: MoEProcessGroups, device: torch.device) -> None:
    """One tiny all-reduce on each MoE group at set-up, on `device` (the device the groups
    serve): NCCL creates a communicator lazily at a group's first collective, which would
    otherwise land inside the first pipelined forward (seconds, and a skew between ranks)."""
    for name in ("ep", "ep_combine", "expert_dp", "dp"):
        group = getattr(groups, name)
        if group is not None and dist.get_world_size(group) > 1:
            collectives.all_reduce(torch.zeros(1, device=device), group=group, site=f"strategy.warm_up.{name}")
