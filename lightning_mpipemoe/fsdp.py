"""`MPipeMoEStrategy(sharding="fsdp")`: FSDP2 over expert parallelism.

Meshes. One set of process groups (`groups.build_process_groups`, each with its timeout)
viewed as two device meshes (`DeviceMesh.from_group`, which torch 2.7 has):

    expert mesh (ep, expert_dp)   rank = d * ep + e   (groups.py's layout, EP innermost)
    dense mesh  (fsdp,)           every rank

The expert mesh's `ep` dimension IS the executor's EP group and its `expert_dp` dimension
the expert-data-parallel group (the same `ProcessGroup` objects, not copies), so the
all-to-alls of the executor and FSDP's collectives for the experts run on one set of groups.
FSDP shards the experts over its `expert_dp` slice; checkpoints (`dcp_checkpoint.py`) describe
them over the whole mesh as global `[E, ...]` DTensors, placements (Shard(0), Shard(0)): EP
rank e holds experts [e*E/ep, (e+1)*E/ep), which FSDP cuts again over expert_dp.

Order of sharding (torchtitan's `apply_fsdp` composition): experts are already sharded over
`ep` (E/ep per rank, by the strategy's `_prepare_moe`); inside every module that owns expert
parameters, each child holding dense parameters (a router) is `fully_shard`ed over the dense
mesh first, then the owner over `expert_dp` (so it manages only its expert parameters); then
every transformer block (the children of a `ModuleList` that holds an MoE layer) over the
dense mesh; then each child of the LightningModule that still has unmanaged parameters (the
root). Activation checkpointing applied to the blocks beforehand (HF's
`gradient_checkpointing_enable`) stays inside them.

Gradient divide factor. With W = ep x expert_dp ranks, rank r computing its mean loss L_r,
the loss optimised is L = (1/W) sum_r L_r (what DDP's averaging gives). A dense parameter's
local gradient is dL_r/dw; FSDP's reduce-scatter over the dense mesh (W ranks) sums and
divides by W (its default): the mean over all data-parallel ranks. An expert w lives on one
rank of each EP group, and its local gradient is already a sum over that EP group (the
combine all-to-all's backward brings back the gradient of every rank whose tokens it served):

    g_local(w) = sum_{r in my EP group} dL_r/dw

The reduce-scatter over `expert_dp` sums one such term per EP group, i.e. sum_r dL_r/dw over
the whole world, so dL/dw needs a division by W, not by expert_dp (FSDP's default for that
mesh, which would give ep times the true gradient). Hence a divide factor W on every experts
FSDP module (`_set_divide_factor`: the torch 2.7 and >= 2.8 APIs differ).

Clipping. After the reductions every gradient element lives on exactly one rank: dense
gradients are sharded over all W ranks, expert gradients over `expert_dp` within disjoint EP
shards. So ||g||_p^p is the sum over the world of the local shards' p-th powers (one
all-reduce over the dense group; max for p = inf), and every rank scales its shards alike.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from lightning_mpipemoe import collectives
from lightning_mpipemoe.groups import MoEProcessGroups

__all__ = [
    "SHARDINGS",
    "FSDPLayout",
    "build_meshes",
    "check_shardable",
    "clip_grad_norm_",
    "full_state_dict",
    "is_sharded",
    "layout_of",
    "local_tensor",
    "materialize",
    "mixed_precision_policy",
    "shard_model",
    "warn_bf16_true",
]

SHARDINGS = ("ddp", "fsdp")

#: Half an ulp of bfloat16 relative to the value (8 significant bits): an update smaller than
#: this fraction of the weight rounds away.
BF16_HALF_ULP = 2.0**-9


def _fsdp():
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    return FSDPModule, MixedPrecisionPolicy, fully_shard


def local_tensor(t: Tensor) -> Tensor:
    """This rank's part of `t` (a DTensor's local shard; a plain tensor itself)."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def build_meshes(groups: MoEProcessGroups, device_type: str) -> tuple[DeviceMesh, DeviceMesh]:
    """The dense `(fsdp,)` mesh and the expert `(ep, expert_dp)` mesh, over `groups`' own groups."""
    world = groups.world_size
    dense = DeviceMesh.from_group(groups.dp, device_type, mesh_dim_names=("fsdp",))
    layout = torch.arange(world).view(groups.expert_dp_size, groups.ep_size).t().contiguous()
    expert = DeviceMesh.from_group(
        [groups.ep, groups.expert_dp], device_type, mesh=layout, mesh_dim_names=("ep", "expert_dp")
    )
    return dense, expert


def mixed_precision_policy(plugin: Precision):
    """bf16-mixed: bf16 compute over fp32 master weights, fp32 gradient reduction; None otherwise
    (32-true; bf16-true keeps the module in bf16, converted by the precision plugin)."""
    _, MixedPrecisionPolicy, _ = _fsdp()
    if isinstance(plugin, MixedPrecision) and plugin.precision == "bf16-mixed":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return None


def warn_bf16_true(plugin: Precision, optimizers: Iterable[torch.optim.Optimizer]) -> None:
    """bf16-true keeps bf16 weights and a bf16 optimizer: an update lr * u (Adam: |u| ~ 1) below
    half a bf16 ulp of the weight rounds to zero. Warn when lr is below that for this rank's
    typical weight (the RMS of its parameter shards)."""
    if getattr(plugin, "precision", None) != "bf16-true":
        return
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            shards = [local_tensor(p.detach()).float() for p in group["params"] if p.numel()]
            if not shards:
                continue
            rms = math.sqrt(sum(float(s.pow(2).sum()) for s in shards) / max(sum(s.numel() for s in shards), 1))
            lr = float(group.get("lr", 0.0))
            if 0 < lr < BF16_HALF_ULP * rms:
                rank_zero_warn(
                    f"precision='bf16-true' with lr={lr:g}: an update of lr on a weight of RMS {rms:.3g} is below half "
                    f"a bf16 ulp ({BF16_HALF_ULP * rms:.2g}), so most updates round to zero and training stalls; use "
                    "precision='bf16-mixed' (fp32 master weights and optimizer state, bf16 compute)"
                )
                return


class FSDPLayout:
    """The FSDP modules of one sharded model (for gradient-sync switches and clipping)."""

    def __init__(self, dense: DeviceMesh, expert: DeviceMesh, groups: MoEProcessGroups) -> None:
        self.dense_mesh = dense
        self.expert_mesh = expert
        self.groups = groups
        self.modules: list[nn.Module] = []
        self.expert_modules: list[nn.Module] = []

    def set_requires_gradient_sync(self, sync: bool) -> None:
        """Off: backward accumulates the unsharded gradients locally (no communication), as
        DDP's `no_sync`; the next synced backward reduces the sum."""
        for module in self.modules:
            module.set_requires_gradient_sync(sync, recurse=False)


def _owners(module: nn.Module, expert_keys: Iterable[str]) -> dict[str, nn.Module]:
    """Qualified name -> module, for each module that directly holds expert parameters."""
    modules = dict(module.named_modules())
    owners: dict[str, nn.Module] = {}
    for key in expert_keys:
        owner_name = key.rpartition(".")[0]
        owners[owner_name] = modules[owner_name]
    for name, owner in owners.items():
        prefix = f"{name}." if name else ""
        dense = [n for n, _ in owner.named_parameters(recurse=False) if prefix + n not in expert_keys]
        if dense:
            raise ValueError(
                f"sharding='fsdp': module {name!r} holds expert parameters and the dense parameters {dense} directly; "
                "the experts are sharded over the expert-data-parallel ranks and the dense ones over all ranks, so "
                "they must live in different modules (move the dense ones into a submodule)"
            )
    return owners


def check_shardable(module: nn.Module, expert_keys: Iterable[str]) -> dict[str, nn.Module]:
    """Raise a ValueError for what `shard_model` cannot shard (call before any collective);
    returns the modules that own expert parameters. Meta-device parameters are fine: the
    caller materialises the shards after sharding (`materialize`, `hf_models.fsdp_load`)."""
    if any(True for _ in module.parameters(recurse=False)):
        raise ValueError(
            f"sharding='fsdp': {type(module).__name__} holds parameters directly "
            f"({[n for n, _ in module.named_parameters(recurse=False)][:5]}); keep them in a submodule (e.g. self.model)"
        )
    lora = [n for n, m in module.named_modules() if type(m).__name__ == "ParamWrapper" and "peft" in type(m).__module__]
    if lora:
        raise ValueError(
            f"sharding='fsdp' does not shard LoRA on routed experts (peft's target_parameters, e.g. {lora[:2]}): peft's "
            "ParamWrapper reads the expert weights outside FSDP's unshard; use LoRA on attention (recipe: "
            "peft.targets=attention) or sharding='ddp'"
        )
    meta = [n for n, p in module.named_parameters() if p.is_meta]
    if meta and len(meta) < sum(1 for _ in module.parameters()):
        raise ValueError(
            f"sharding='fsdp': the model is partly on the meta device ({meta[:3]}, ...) and partly not; build it "
            "all on the meta device (materialised and initialised after sharding) or all on a real device"
        )
    placed = [n for n, p in module.named_parameters() if isinstance(p, _dtensor())]
    if placed:
        raise ValueError(
            f"sharding='fsdp': the model is partly sharded already ({placed[:3]} are DTensors, other parameters are "
            "not); shard it whole (`hf_models.fsdp_load.load_fsdp`) or not at all"
        )
    return _owners(module, set(expert_keys))


def is_sharded(module: nn.Module) -> bool:
    """Whether `module`'s parameters are FSDP's DTensors already (e.g. loaded by `load_fsdp`)."""
    return any(isinstance(p, _dtensor()) for p in module.parameters())


def layout_of(
    module: nn.Module, expert_keys: Iterable[str], groups: MoEProcessGroups, device_type: str
) -> FSDPLayout:
    """The `FSDPLayout` of a module `shard_model` sharded before (`hf_models.fsdp_load.load_fsdp`
    in `configure_model`): its FSDP modules, over meshes on the same groups."""
    FSDPModule, _, _ = _fsdp()
    plain = [n for n, p in module.named_parameters() if not isinstance(p, _dtensor())]
    if plain:
        raise ValueError(
            f"sharding='fsdp': the model is partly sharded already (e.g. {plain[:3]} are not DTensors); shard it "
            "whole (`hf_models.fsdp_load.load_fsdp`) or not at all"
        )
    layout = FSDPLayout(*build_meshes(groups, device_type), groups)
    layout.modules = [m for m in module.modules() if isinstance(m, FSDPModule)]
    layout.expert_modules = list(_owners(module, set(expert_keys)).values())
    return layout


def materialize(module: nn.Module, device: torch.device, seed: int | None = None) -> list[str]:
    """Allocate the local shards of a module built on the meta device (after `shard_model`) and
    initialise them with the model's own initialisation; returns the initialised names.

    Initialisation: a Hugging Face model (each outermost `PreTrainedModel`) runs `init_weights()`
    (`_init_weights` on every module, RoPE tables, tied weights, as `from_config` does); any
    other module with `reset_parameters()` (torch's layers) runs it. Every floating-point tensor
    is set to NaN first and checked afterwards: one that no initialisation wrote is an error
    naming it, not garbage memory trained on.

    Random numbers: each rank draws its own shards from its own stream, `seed` (default:
    torch's current initial seed) + 1_000_003 x global rank, in `torch.random.fork_rng` (the
    global stream is left as it was). So no two ranks draw the same values (the shards of one
    weight, and the experts of different EP ranks, are independent draws), and a run is
    reproducible for one seed and one layout; but the values are not those of the same model
    initialised in one process with the same seed, nor of another layout. A checkpoint loaded
    afterwards (`ckpt_path=`, `load_fsdp`) replaces them all.

    That is what holds on CPU meshes (tested). On CUDA, DTensor's offset-based RNG tracker
    (state synchronised from rank 0, an offset per shard of the parameter's own mesh) draws the
    random ops on DTensors instead: dense shards then follow one stream, but an expert
    parameter is a DTensor over expert_dp only, so the expert shards of different EP ranks may
    start equal. Not verified on a GPU yet: until it is, start expert-parallel GPU runs from a
    checkpoint rather than from a meta-device init."""
    from torch.distributed.tensor import DTensor

    module.to_empty(device=device)
    tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    with torch.no_grad():
        for value in tensors.values():
            local = value.to_local() if isinstance(value, DTensor) else value
            if local.is_floating_point():
                local.fill_(float("nan"))
    rank = dist.get_rank() if dist.is_initialized() else 0
    seed = torch.initial_seed() if seed is None else seed
    devices = [device] if device.type not in ("cpu", "meta") else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        torch.manual_seed((seed + 1_000_003 * rank) % 2**63)
        _initialize(module)
    missed = []
    for name, value in tensors.items():
        local = value.to_local() if isinstance(value, DTensor) else value
        if local.is_floating_point() and local.numel() and bool(torch.isnan(local).any()):
            missed.append(name)
    if missed:
        raise ValueError(
            f"sharding='fsdp': the meta-device model's own initialisation left {len(missed)} tensors unset "
            f"(e.g. {missed[:5]}); give their modules a reset_parameters() (or _init_weights for a Hugging Face model)"
            ", or load the weights (hf_models.fsdp_load.load_fsdp, ckpt_path=)"
        )
    return sorted(tensors)


def _initialize(module: nn.Module) -> None:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        PreTrainedModel = ()

    def visit(sub: nn.Module) -> None:
        if isinstance(sub, PreTrainedModel):
            for inner in sub.modules():
                inner._is_hf_initialized = False  # a meta build flags them as done
            sub.init_weights()
            return
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()
        for child in sub.children():
            visit(child)

    with torch.no_grad():
        visit(module)


def shard_model(
    module: nn.Module,
    expert_keys: Mapping[str, int],
    groups: MoEProcessGroups,
    device_type: str,
    mp_policy: Any = None,
) -> FSDPLayout:
    """`fully_shard` the (EP-sharded) `module` in place: experts over `expert_dp`, the rest over
    the world (see the module docstring for the order and the divide factor). Meta-device
    parameters stay on the meta device (`materialize` allocates and initialises the shards)."""
    _, _, fully_shard = _fsdp()
    owners = check_shardable(module, expert_keys)
    dense_mesh, expert_mesh = build_meshes(groups, device_type)
    layout = FSDPLayout(dense_mesh, expert_mesh, groups)
    kwargs = {} if mp_policy is None else {"mp_policy": mp_policy}

    def shard(sub: nn.Module, mesh: DeviceMesh) -> None:
        fully_shard(sub, mesh=mesh, **kwargs)
        layout.modules.append(sub)

    def has_unmanaged_params(sub: nn.Module) -> bool:
        return any(not isinstance(p, _dtensor()) for p in sub.parameters())

    for owner in owners.values():
        for child in owner.children():
            if has_unmanaged_params(child):
                shard(child, dense_mesh)  # e.g. MoELayer's router: dense, over the world
        shard(owner, expert_mesh["expert_dp"])
        _set_divide_factor(owner, groups.world_size, device_type, groups.expert_dp_size)
        layout.expert_modules.append(owner)
    owner_ids = {id(m) for m in owners.values()}
    for sub in list(module.modules()):
        if isinstance(sub, nn.ModuleList) and any(id(m) in owner_ids for m in sub.modules()):
            for block in sub:
                if has_unmanaged_params(block):
                    shard(block, dense_mesh)
    for child in module.children():
        if has_unmanaged_params(child):
            shard(child, dense_mesh)  # the root(s): embeddings, final norm, head
    return layout


def _dtensor():
    from torch.distributed.tensor import DTensor

    return DTensor


def _set_divide_factor(module: nn.Module, factor: float, device_type: str, group_size: int) -> None:
    """Divide the experts' reduced gradients by `factor` (the world size, not the group's).

    torch >= 2.8: `set_gradient_divide_factor`; a custom factor becomes NCCL's PreMulSum, which
    other backends (gloo) lack, so off CUDA the reduction is forced to a plain sum followed by
    the division (`set_force_sum_reduction_for_comms`); not for a one-rank group, which
    communicates nothing: torch 2.13 would then divide twice (its one-rank copy divides by the
    factor, and the forced-sum path divides again after it). torch 2.7 only has
    `set_reduce_scatter_divide_factor`, which always builds NCCL's PreMulSum: CUDA only there
    (gloo rejects it on a group of several ranks, and ignores it on a one-rank group: the
    experts' gradients came out ep times too large, measured under torch 2.7)."""
    setter = getattr(module, "set_gradient_divide_factor", None)
    if setter is not None:
        setter(float(factor))
        if device_type != "cuda" and group_size > 1:
            module.set_force_sum_reduction_for_comms(True)
        return
    if device_type != "cuda":
        raise RuntimeError(
            f"sharding='fsdp' on {device_type!r} devices needs torch >= 2.8 (FSDPModule.set_gradient_divide_factor): "
            f"torch {torch.__version__}'s FSDP2 divides the expert gradients by a custom factor with NCCL's PreMulSum "
            "only; use CUDA devices, sharding='ddp', or a newer torch"
        )
    module.set_reduce_scatter_divide_factor(float(factor))


@torch.no_grad()
def clip_grad_norm_(
    parameters: Iterable[nn.Parameter], max_norm: float, groups: MoEProcessGroups, norm_type: float = 2.0
) -> Tensor:
    """Clip by the global norm of the sharded gradients (each element counted once, see the
    module docstring); collective over the world. Returns the norm."""
    grads = [local_tensor(p.grad) for p in parameters if p.grad is not None]
    norm_type = float(norm_type)
    device = grads[0].device if grads else torch.device("cpu")
    if norm_type == math.inf:
        local = max(
            (g.detach().abs().max().float() for g in grads if g.numel()), default=torch.zeros((), device=device)
        )
        total = local.reshape(1).clone()
        op = dist.ReduceOp.MAX
    else:
        total = torch.zeros(1, device=device, dtype=torch.float32)
        for g in grads:
            total += g.detach().float().abs().pow(norm_type).sum()
        op = dist.ReduceOp.SUM
    if groups.dp is not None and dist.get_world_size(groups.dp) > 1:
        collectives.all_reduce(total, op=op, group=groups.dp, site="fsdp.clip_grad_norm")
    norm = total[0] if norm_type == math.inf else total[0].pow(1.0 / norm_type)
    coef = (float(max_norm) / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return norm


def full_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """`module`'s state dict with every DTensor gathered over its mesh (collective over the world:
    dense tensors whole, expert tensors this EP rank's E/ep experts whole). For tests and the
    spawn launcher's hand-over; checkpoints never gather."""
    DTensor = _dtensor()
    out = {}
    for key, value in module.state_dict().items():
        value = value.detach()
        out[key] = value.full_tensor() if isinstance(value, DTensor) else value
    return out


@torch.no_grad()
def sync_dense_state(module: nn.Module, expert_keys: Iterable[str], groups: MoEProcessGroups) -> None:
    """Broadcast every non-expert parameter and buffer from rank 0 (as DDP does at wrap time),
    so that the shards cut from each rank's copy belong to one model."""
    if groups.dp is None or dist.get_world_size(groups.dp) == 1:
        return
    src = dist.get_global_rank(groups.dp, 0)
    skip = set(expert_keys)
    for key, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if key not in skip and not tensor.is_meta:
            collectives.broadcast(tensor.data, src, group=groups.dp, site="fsdp.sync_dense_state")


def setup_strategy(strategy: Any, trainer: Any) -> FSDPLayout:
    """`MPipeMoEStrategy.setup` for sharding='fsdp' (after the experts are EP-sharded): what
    `DDPStrategy.setup` does, with `fully_shard` in place of the DDP wrapper."""
    from lightning.fabric.utilities.optimizer import _optimizers_to_device
    from lightning.pytorch.trainer.states import TrainerFn

    strategy.accelerator.setup(trainer)
    module = strategy.model
    strategy.precision_plugin.convert_module(module)
    meta = any(p.is_meta for p in module.parameters())
    if not meta:  # a meta-device model gets its shards on the device in `materialize`
        strategy.model_to_device()
    groups = strategy.moe_groups
    layout = getattr(strategy, "_fsdp", None)
    if is_sharded(module):
        # Sharded already: a second setup (fit after validate) keeps its shards; a model loaded
        # into shards in configure_model (`load_fsdp`, every rank reading the same files) too.
        if layout is None:
            layout = layout_of(module, strategy._expert_keys, groups, strategy.root_device.type)
    else:
        check_shardable(module, strategy._expert_keys)  # before the broadcasts
        sync_dense_state(module, strategy._expert_keys, groups)  # meta tensors: nothing to send
        layout = shard_model(
            module,
            strategy._expert_keys,
            groups,
            strategy.root_device.type,
            mixed_precision_policy(strategy.precision_plugin),
        )
        if meta:  # built on the meta device: allocate the shards, then the model's own init
            materialize(module, strategy.root_device)
    fitting = trainer.state.fn == TrainerFn.FITTING
    if fitting:
        strategy.setup_optimizers(trainer)
    strategy.setup_precision_plugin()
    if fitting:
        _optimizers_to_device(strategy.optimizers, strategy.root_device)
        warn_bf16_true(strategy.precision_plugin, strategy.optimizers)
    return layout


def local_state_bytes(params: Iterable[Tensor], optimizers: Iterable[torch.optim.Optimizer]) -> int:
    """Bytes this rank holds for `params`: its shards of the weights, gradients and optimizer state."""
    params = list(params)
    total = 0
    for p in params:
        total += _nbytes(p)
        if p.grad is not None:
            total += _nbytes(p.grad)
    for optimizer in optimizers:
        for p in params:
            total += sum(_nbytes(v) for v in optimizer.state.get(p, {}).values() if isinstance(v, Tensor))
    return total


def _nbytes(t: Tensor) -> int:
    local = local_tensor(t)
    return local.numel() * local.element_size()
