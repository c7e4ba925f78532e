"""Per-rank memory plan of a fine-tuning run, from the model's config alone (meta device).

Why: whether Mixtral-8x7B fits on 8 or 16 GPUs, with replicated (`ddp`) or sharded (`fsdp`)
dense and expert state, is a question of arithmetic that should be answered before a
cluster allocation is spent on an out-of-memory error. The model is built on the meta
device (no weights, no host memory), its parameters split into dense (replicated) and
expert-sharded ones by the same adapter that shards them at run time, and each term below
is computed per rank.

Terms (bytes per rank; P_d dense and P_e expert parameters, W world, ep expert-parallel
size, T tokens per rank, a activation bytes):

- parameters, gradients, optimizer state. `bf16-mixed`: fp32 master weights, fp32
  gradients, AdamW's two fp32 moments (4 + 4 + 8 = 16 B per parameter); `bf16-true` /
  `16-true`: 2 + 2 + 4; `32-true`: 16. With LoRA (`lora=True`) the base is frozen in bf16
  (2 B, no gradient, no state) and the adapters are small enough to leave out.
  `ddp`: P_d whole on every rank, P_e / ep; DDP also keeps a bucket copy of the dense
  gradients. `fsdp`: P_d / W and P_e / W (experts over ep, then over expert-dp).
- activations held for backward: with gradient checkpointing each block keeps its input
  (T·H·a) and one block at a time is recomputed; without, every block keeps its attention
  activations (T·(4H + 3q + 2kv)·a, q/kv the projection widths, SDPA without a T² term)
  plus its MoE layer's (the executor's analytic model, `moe.memory.analytic_memory`, per
  restore strategy: held on device and offloaded to host).
- the largest transient: the logits and their fp32 loss (T·V·(a + 8)), the MoE call's
  peak temporary buffers, FSDP's unsharded block (current + prefetched, compute dtype, plus
  its fp32 gradient before reduce-scatter), DDP's gradient bucket.
- a fixed overhead (CUDA context, NCCL buffers; `overhead_bytes`) and an allocator margin
  (`fragmentation` of the sum).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_mpipemoe.moe.memory import LayerShape, analytic_memory

__all__ = ["ModelCounts", "RankPlan", "count_model", "meta_model", "parse_bytes", "plan_rank", "smallest_world_that_fits"]

GiB = 1 << 30
#: (weights, gradients, optimizer state) bytes per trained parameter, AdamW.
STATE_BYTES = {"bf16-mixed": (4, 4, 8), "bf16-true": (2, 2, 4), "16-true": (2, 2, 4), "32-true": (4, 4, 8),
               "32": (4, 4, 8), "16-mixed": (4, 4, 8)}
RESTORES = ("none", "s1", "s2", "s3", "s4")
DDP_BUCKET_BYTES = 25 * (1 << 20)


@dataclass(frozen=True)
class ModelCounts:
    """What the plan needs to know of a model: parameter counts and shapes."""

    dense_params: int
    expert_params: int
    largest_block_dense_params: int
    largest_layer_expert_params: int
    num_layers: int
    moe_layers: int
    num_experts: int
    top_k: int
    hidden: int
    expert_intermediate: int
    gated: bool
    vocab: int
    q_width: int
    kv_width: int

    @property
    def total_params(self) -> int:
        return self.dense_params + self.expert_params


def meta_model(config) -> nn.Module:
    """A transformers causal LM of `config` on the meta device (nothing allocated)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _blocks(model: nn.Module, num_layers: int) -> nn.ModuleList:
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    raise ValueError(f"found no list of {num_layers} transformer blocks in {type(model).__name__}")


def count_model(model: nn.Module) -> ModelCounts:
    """Split a (meta) model's parameters into dense and expert-sharded ones, by its adapter."""
    from lightning_mpipemoe.hf_models.api import sharded_expert_keys

    cfg = model.config
    experts = sharded_expert_keys(model)  # name -> global expert count
    params = dict(model.named_parameters())
    expert_params = sum(params[name].numel() for name in experts if name in params)
    dense_params = sum(p.numel() for name, p in params.items() if name not in experts)
    num_layers = int(cfg.num_hidden_layers)
    blocks = _blocks(model, num_layers)
    largest_block_dense, largest_layer_experts, moe_layers = 0, 0, 0
    names = {id(p): n for n, p in params.items()}
    for block in blocks:
        block_expert = sum(p.numel() for p in block.parameters() if names[id(p)] in experts)
        largest_block_dense = max(largest_block_dense, sum(p.numel() for p in block.parameters()) - block_expert)
        largest_layer_experts = max(largest_layer_experts, block_expert)
        moe_layers += block_expert > 0
    num_experts = max(experts.values()) if experts else 0
    shapes = [params[name].shape for name in experts if name in params and params[name].dim() == 3]
    hidden = int(cfg.hidden_size)
    intermediate = int(getattr(cfg, "moe_intermediate_size", None) or getattr(cfg, "intermediate_size", None)
                       or getattr(cfg, "d_ff"))
    heads = int(getattr(cfg, "num_attention_heads"))
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    # A gated expert holds 3·H·I weights, a plain one 2·H·I.
    per_expert = largest_layer_experts / max(num_experts, 1)
    gated = bool(shapes) and round(per_expert / (hidden * intermediate)) >= 3
    return ModelCounts(
        dense_params=dense_params,
        expert_params=expert_params,
        largest_block_dense_params=largest_block_dense,
        largest_layer_expert_params=largest_layer_experts,
        num_layers=num_layers,
        moe_layers=moe_layers,
        num_experts=num_experts,
        top_k=int(getattr(cfg, "num_experts_per_tok", 1)),
        hidden=hidden,
        expert_intermediate=intermediate,
        gated=gated,
        vocab=int(cfg.vocab_size),
        q_width=heads * head_dim,
        kv_width=kv_heads * head_dim,
    )


@dataclass
class RankPlan:
    """One rank's bytes under one setting; `rows` in print order."""

    sharding: str
    world_size: int
    ep_size: int
    restore: str
    rows: dict[str, int] = field(default_factory=dict)
    moe_by_restore: dict[str, tuple[int, int]] = field(default_factory=dict)  # restore -> (device, host)
    device_memory: int | None = None

    @property
    def total(self) -> int:
        return sum(self.rows.values())

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.total <= self.device_memory


def plan_rank(
    counts: ModelCounts,
    *,
    sharding: str,
    world_size: int,
    ep_size: int,
    tokens_per_rank: int,
    precision: str = "bf16-mixed",
    gradient_checkpointing: bool = True,
    restore: str = "s4",
    num_partitions: int = 4,
    lora: bool = False,
    device_memory: int | None = None,
    overhead_bytes: int = int(1.5 * GiB),
    fragmentation: float = 0.05,
) -> RankPlan:
    """The per-rank bytes of one setting (see the module docstring for each term)."""
    if sharding not in ("ddp", "fsdp"):
        raise ValueError(f"sharding must be 'ddp' or 'fsdp', got {sharding!r}")
    if precision not in STATE_BYTES:
        raise ValueError(f"precision {precision!r} is not one of {sorted(STATE_BYTES)}")
    if world_size < 1 or ep_size < 1 or world_size % ep_size:
        raise ValueError(f"ep_size={ep_size} must divide world_size={world_size}")
    if counts.num_experts and counts.num_experts % ep_size:
        raise ValueError(f"ep_size={ep_size} must divide the {counts.num_experts} experts")
    if restore not in RESTORES:
        raise ValueError(f"restore must be one of {RESTORES}, got {restore!r}")
    w_b, g_b, o_b = STATE_BYTES[precision]
    a_b = 2 if precision.startswith(("bf16", "16")) else 4
    if lora:
        w_b, g_b, o_b = 2, 0, 0
    if sharding == "ddp":
        dense_share, expert_share = counts.dense_params, counts.expert_params / ep_size
    else:
        dense_share, expert_share = counts.dense_params / world_size, counts.expert_params / world_size
    trained = dense_share + expert_share
    rows = {
        "parameters": int(trained * w_b),
        "gradients": int(trained * g_b),
        "optimizer state": int(trained * o_b),
    }
    if sharding == "ddp" and g_b and world_size > 1:
        rows["DDP gradient buckets"] = int(counts.dense_params * g_b)
    T, H = tokens_per_rank, counts.hidden
    attention = T * (4 * H + 3 * counts.q_width + 2 * counts.kv_width) * a_b
    shape = LayerShape(tokens=T, top_k=counts.top_k, hidden=H, intermediate=counts.expert_intermediate,
                       gated=counts.gated, ep_size=ep_size, dtype_bytes=a_b)
    moe_by_restore = {}
    for name in RESTORES:
        memory = analytic_memory(shape, num_partitions if name != "none" else 1, name)
        moe_by_restore[name] = (memory.device_held_bytes * counts.moe_layers, memory.host_held_bytes * counts.moe_layers)
    chosen = analytic_memory(shape, num_partitions, restore)
    router = T * counts.num_experts * 4
    per_block = attention + (chosen.device_held_bytes + router if counts.moe_layers else 0)
    if gradient_checkpointing:
        rows["activations"] = counts.num_layers * T * H * a_b + per_block
    else:
        rows["activations"] = counts.num_layers * attention + counts.moe_layers * (chosen.device_held_bytes + router)
    transients = {
        "logits + loss": T * counts.vocab * (a_b + 8),
        "MoE call buffers": max(chosen.forward_peak_temp_bytes or 0, chosen.backward_peak_temp_bytes or 0),
    }
    if sharding == "fsdp" and world_size > 1:
        block = counts.largest_block_dense_params + counts.largest_layer_expert_params / ep_size
        compute_b = 2 if precision.startswith(("bf16", "16")) else 4
        transients["FSDP unsharded block"] = int(block * (2 * compute_b + (g_b or 0)))
    elif world_size > 1:
        transients["DDP bucket"] = DDP_BUCKET_BYTES
    largest = max(transients, key=transients.get)
    rows[f"largest transient ({largest})"] = int(transients[largest])
    rows["overhead (context, NCCL)"] = overhead_bytes
    rows["allocator margin"] = int(fragmentation * sum(rows.values()))
    return RankPlan(sharding, world_size, ep_size, restore, rows, moe_by_restore, device_memory)


def smallest_world_that_fits(counts: ModelCounts, *, ep_size: int, max_world: int = 1024, **kwargs) -> int | None:
    """The smallest multiple of `ep_size` (up to `max_world`) at which `fsdp` fits `device_memory`."""
    world = ep_size
    while world <= max_world:
        if plan_rank(counts, sharding="fsdp", world_size=world, ep_size=ep_size, **kwargs).fits:
            return world
        world += ep_size
    return None


def parse_bytes(text: str | int | float) -> int:
    """'80GB' (10^9), '80GiB' (2^30), '8e10' or a number of bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    units = {"tib": 1 << 40, "gib": 1 << 30, "mib": 1 << 20, "kib": 1 << 10,
             "tb": 10**12, "gb": 10**9, "mb": 10**6, "kb": 10**3, "b": 1}
    lowered = str(text).strip().lower().replace(" ", "")
    for unit, scale in units.items():
        if lowered.endswith(unit):
            number = lowered[: -len(unit)]
            break
    else:
        number, scale = lowered, 1
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"device memory {text!r} is not a size such as '80GB', '80GiB' or 8e10") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"device memory must be positive, got {text!r}")
    return int(value * scale)
