"""The spawn launcher of `MPipeMoEStrategy` (`mpipemoe_spawn`, `mpipemoe_fsdp_spawn`).

Lightning's `_MultiProcessingLauncher`, plus what expert parallelism needs: the main process
gets consolidated weights (its module was never sharded), the workers rendezvous through a
store this process holds (no port picked, closed and bound again), and they tear their groups
down together before they exit.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Callable, Optional

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher, _WorkerOutput
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

if TYPE_CHECKING:
    from lightning_mpipemoe.strategy import MPipeMoEStrategy

__all__ = ["MPipeMoESpawnLauncher", "hosted_rendezvous", "load_trained_weights"]


class MPipeMoESpawnLauncher(_MultiProcessingLauncher):
    """The spawn launcher, handing the main process consolidated weights: its module was never
    sharded, so rank 0's shards would not load into it. A module that builds its model in
    `configure_model` (which only the workers ran) gets it built in the main process too, so
    that the trained weights have somewhere to go.

    The workers rendezvous through a store this process hosts (`hosted_rendezvous`), and tear
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
        with hosted_rendezvous(self._strategy):
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
            load_trained_weights(trainer.lightning_module, state_dict)
            worker_output = worker_output._replace(weights_path=None)
        super()._recover_results_in_main_process(worker_output, trainer)

    @override
    def _collect_rank_zero_results(self, trainer: "pl.Trainer", results: Any) -> Optional[_WorkerOutput]:
        strategy = self._strategy  # an MPipeMoEStrategy
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
def hosted_rendezvous(strategy: "MPipeMoEStrategy") -> Iterator[None]:
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


def load_trained_weights(module: pl.LightningModule, state_dict: dict[str, Tensor]) -> None:
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
    # A model built on the meta device (sharding="fsdp" materialises it in the workers only) takes
    # the consolidated tensors themselves: a copy into a meta tensor would drop them silently.
    meta = any(t.is_meta for t in (*module.parameters(), *module.buffers()))
    unexpected = module.load_state_dict(state_dict, strict=False, assign=meta).unexpected_keys
    if unexpected:
        rank_zero_warn(
            f"the main process's {type(module).__name__} has no place for {len(unexpected)} trained weights of the "
            f"workers (e.g. {unexpected[:3]}); they are not loaded"
        )
    if meta:
        _rebuild_meta_buffers(module)
    still_meta = [k for k, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
    if still_meta:
        rank_zero_warn(
            f"the main process's {type(module).__name__} keeps {len(still_meta)} meta-device tensors the workers do not "
            f"hand back (e.g. {still_meta[:3]}); rebuild them before using the module here"
        )


@torch.no_grad()
def _rebuild_meta_buffers(module: nn.Module) -> None:
    """Non-persistent buffers (not in a state dict, e.g. RoPE tables) of a meta-built model: each
    module that holds only such buffers (no parameters of its own) is allocated on the CPU and
    initialised by its Hugging Face model's `_init_weights`, or its own `reset_parameters`."""
    from transformers import PreTrainedModel

    def visit(sub: nn.Module, owner: PreTrainedModel | None) -> None:
        owner = sub if isinstance(sub, PreTrainedModel) else owner  # the innermost, as HF's init dispatches
        own = list(sub.parameters(recurse=False))
        if not own and any(b.is_meta for b in sub.buffers(recurse=False)):
            sub.to_empty(device="cpu", recurse=False)
            if owner is not None:
                owner._init_weights(sub)
            elif callable(getattr(sub, "reset_parameters", None)):
                sub.reset_parameters()
        for child in sub.children():
            visit(child, owner)

    visit(module, None)
