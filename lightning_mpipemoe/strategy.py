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
(`checkpointing.py`; the strategy's checkpoint methods are in `strategy_checkpoints.py`, its
spawn launcher in `spawn_launcher.py`). `sharding="fsdp"` shards the dense part and the expert
replicas with FSDP2 instead of replicating them (`fsdp.py`, `dcp_checkpoint.py`).

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

from collections.abc import Generator, Iterable, Mapping
from contextlib import contextmanager
from datetime import timedelta
from functools import partial
from typing import Any, Callable, Literal, Optional

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.strategies import _StrategyRegistry
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.plugins.precision import DoublePrecision, HalfPrecision, MixedPrecision, Precision
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from typing_extensions import override

from lightning_mpipemoe import collectives, fsdp
from lightning_mpipemoe.checkpointing import (
    DEFAULT_CHECKPOINT_TIMEOUT,
    build_checkpoint_group,
)
from lightning_mpipemoe.config import SimulatedLink, executor_overrides
from lightning_mpipemoe.discovery import (
    ExecutorView,
    MoEUnit,
    find_moe_units,
)
from lightning_mpipemoe.grad_sync import DEFAULT_BUCKET_BYTES, ExpertGradReducer, clip_grad_norm_
from lightning_mpipemoe.groups import (
    DEFAULT_TIMEOUT,
    MoEProcessGroups,
    build_process_groups,
    check_parallel_sizes,
    warm_up_groups,
)
from lightning_mpipemoe.moe_metrics import moe_step_metrics, trainer_logs_this_step
from lightning_mpipemoe.spawn_launcher import MPipeMoESpawnLauncher
from lightning_mpipemoe.strategy_checkpoints import ExpertCheckpointMethods

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


class MPipeMoEStrategy(ExpertCheckpointMethods, DDPStrategy):
    """Expert-parallel training with the MPipeMoE executor: experts sharded over EP groups,
    everything else data parallel (DDP).

    Args:
        expert_parallel_size: ranks that share one copy of the experts (each holds E/ep of
            them). Default: the devices of one node, so that EP groups stay within a node.
        granularity: micro-partitions `n` per MoE call (an int), or "auto" (the layer's tuner
            picks n). None keeps each layer's own setting.
        restore: memory-reuse restore strategy, one of "none", "s1".."s4", or "auto" (chosen
            by the cost model). None keeps each layer's own setting.
        memory_budget: what one MoE layer call may hold for its backward (bytes, or a
            fraction of device memory), obeyed by the "auto" choices.
        simulated_link: a `config.SimulatedLink` (or a dict of its fields) that every
            all-to-all also crosses, for schedule studies on CPU.
        timeout: timeout of the default process group and of every MoE process group
            (default 5 minutes, not torch's 30: a dead peer ends the run with an error soon).
        checkpoint_timeout: timeout of the barriers around checkpoint and export writes (a
            group of their own, `checkpoint_group`; default 60 minutes: multi-GB writes).
        log_moe_metrics: "layer" (per-layer routing and executor metrics), "expert" (also the
            tokens of every expert) or "off". Counts accumulate on the device over the steps
            between two logged ones and are reduced (one all-reduce) after the optimizer step of
            each step the trainer logs (`log_every_n_steps`), and written to the trainer's
            loggers directly (not through `LightningModule.log`: not in `callback_metrics`);
            without a logger they are not computed.
        expert_bucket_bytes: size of one expert-gradient all-reduce over the expert-dp group
            (buckets start during backward, as DDP's do; `grad_sync.ExpertGradReducer`).
        expert_grads_in_fp32: reduce low-precision expert gradients through an fp32 copy of
            one bucket at a time (default: in the gradients' own dtype, in place).
        start_method: "popen" (scripts, torchrun, SLURM; registered as "mpipemoe") or "spawn"
            (registered as "mpipemoe_spawn").
        sharding: "ddp" (replicated dense part, DDP) or "fsdp" (FSDP2: dense part sharded over
            all ranks, experts over the expert-dp ranks; `fsdp.py`; registered as
            "mpipemoe_fsdp" and "mpipemoe_fsdp_spawn"). Under "fsdp" the model may be given
            with its weights, built in `configure_model`, loaded there into shards
            (`hf_models.fsdp_load.load_fsdp`), or built there on the meta device: then its
            shards are allocated after sharding and initialised by the model's own init, each
            rank from its own random stream (`fsdp.materialize` says what that reproduces).
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
            self._launcher = MPipeMoESpawnLauncher(self, start_method=self._start_method)

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
                unit.kind.shard(unit.module, groups, self._overrides, self.root_device.type)
            except ValueError as exc:
                raise ValueError(f"MoE unit {unit.name!r} at expert_parallel_size={groups.ep_size}: {exc}") from exc
        self._units = units
        self._expert_keys = {key: count for unit in units for key, count in unit.expert_parameters().items()}
        self._packed_keys = {key: spec for unit in units for key, spec in unit.packed_expert_parameters().items()}
        ignored = set(getattr(module, "_ddp_params_and_buffers_to_ignore", ())) | set(self._expert_keys)
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, sorted(ignored))
        self._broadcast_expert_shards(module)

    def _broadcast_expert_shards(self, module: nn.Module) -> None:
        """Make the replicas of each expert shard identical (DDP does so for the rest). Not for a
        model loaded into FSDP shards (every rank read the same files) or built on the meta
        device (`fsdp.materialize` initialises it after sharding)."""
        groups = self.moe_groups
        named = dict(module.named_parameters())
        if groups.expert_dp_size == 1 or fsdp.is_sharded(module) or any(p.is_meta for p in named.values()):
            return
        src = dist.get_global_rank(groups.expert_dp, 0)
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
        return trainer_logs_this_step(self.lightning_module.trainer if self.lightning_module is not None else None)

    def _log_step(self, aux: Any) -> None:
        assert self.lightning_module is not None
        trainer = self.lightning_module.trainer
        if not trainer.loggers:  # nowhere to write them (the same on every rank: no collective skipped on one)
            return
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
        metrics["moe/expert_state_bytes"] = float(self.expert_state_bytes())
        # Straight to the trainer's loggers (at the step and epoch Lightning gives this step's own
        # logged values), not through `LightningModule.log_dict`: the values are already synced and
        # the same on every rank, and `log` costs about a millisecond per key on a CPU (dozens of
        # keys with the tuner's candidates: 20% of a small model's step). So they are not in
        # `trainer.callback_metrics`; `expert_state_bytes()` gives the last one directly.
        trainer._logger_connector.log_metrics(metrics)

    def expert_state_bytes(self) -> int:
        """Bytes this rank holds for its experts: weights, gradients and optimizer state."""
        named = dict(self.lightning_module.named_parameters())
        params = [named[k] for k in self._expert_keys]
        return fsdp.local_state_bytes(params, self.optimizers)

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


if "mpipemoe" not in StrategyRegistry:
    MPipeMoEStrategy.register_strategies(StrategyRegistry)
