"""Expert-gradient reduction and gradient clipping by the true global norm.

Why the expert gradients are summed over the expert-data-parallel group and divided by the
whole world size. With W = ep_size x dp_size ranks, rank r computing its mean loss L_r,
the global loss is L = (1/W) sum_r L_r (what DDP's averaging of the replicated parameters
optimises). An expert w lives on one rank of each EP group. Its local gradient after
backward is already a sum over the EP group, because the combine all-to-all's backward
brings back the gradient of every rank whose tokens it served:

    g_local(w) = sum_{r in my EP group} dL_r/dw

Summing over the expert-dp group (one rank per EP group, all holding w) gives
sum_r dL_r/dw over the whole world, so dL/dw = (1/W) * sum_{expert-dp} g_local.
Averaging over the expert-dp group instead (dividing by dp_size) gives ep_size times the
true gradient: the EP-size scaling bug of several peer systems. Adam hides most of it
(it is scale invariant up to eps); SGD, weight decay and clipping do not.

Gradient norm. Replicated gradients are identical on every rank after DDP; expert
gradients are identical within an expert-dp group and disjoint across an EP group. The
global norm therefore adds the replicated part once and the expert part summed over the EP
group: ||g||^p = ||g_rep||^p + sum_{EP group} ||g_exp,local||^p.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from lightning_mpipemoe.groups import MoEProcessGroups

__all__ = ["clip_grad_norm_", "global_grad_norm", "reduce_dtype", "reduce_expert_gradients"]


def reduce_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype expert gradients are reduced in: at least fp32 (bf16 sums of many ranks lose
    bits; where the optimizer keeps fp32 parameters the gradients are fp32 already)."""
    return torch.promote_types(dtype, torch.float32)


def reduce_expert_gradients(params: Sequence[nn.Parameter], groups: MoEProcessGroups) -> None:
    """Turn each expert parameter's local gradient into the gradient of the global mean loss
    (sum over `groups.expert_dp`, divide by the world size), in place.

    One all-reduce per reduction dtype (gradients flattened into one buffer). A parameter
    without a gradient on some ranks takes part with zeros; it gets a gradient afterwards
    iff any rank had one, so every replica steps the same parameters.
    """
    world_size = groups.world_size
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault(reduce_dtype(p.dtype), []).append(p)
    for dtype, members in by_dtype.items():
        device = members[0].device
        pieces = [
            (p.grad.detach() if p.grad is not None else torch.zeros((), device=device, dtype=dtype).expand(p.shape))
            .reshape(-1)
            .to(dtype)
            for p in members
        ]
        has_grad = torch.tensor([p.grad is not None for p in members], device=device, dtype=dtype)
        flat = torch.cat(pieces + [has_grad])
        if groups.expert_dp_size > 1:
            dist.all_reduce(flat, group=groups.expert_dp)
        any_grad = (flat[-len(members) :] > 0).tolist()
        flat = flat[: -len(members)].div_(world_size)
        offset = 0
        for p, keep in zip(members, any_grad):
            chunk = flat[offset : offset + p.numel()].view(p.shape)
            offset += p.numel()
            if not keep:
                p.grad = None
            elif p.grad is None:
                p.grad = chunk.to(p.dtype)
            else:
                p.grad.copy_(chunk)


def _local_norm(grads: list[torch.Tensor], norm_type: float, device: torch.device) -> torch.Tensor:
    if not grads:
        return torch.zeros((), device=device, dtype=torch.float32)
    norms = torch.stack([torch.linalg.vector_norm(g.detach(), norm_type, dtype=torch.float32) for g in grads])
    return torch.linalg.vector_norm(norms, norm_type)


def global_grad_norm(
    params: Iterable[nn.Parameter],
    expert_params: Iterable[nn.Parameter],
    groups: MoEProcessGroups,
    norm_type: float = 2.0,
    device: torch.device | None = None,
) -> torch.Tensor:
    """The norm of the full gradient (every expert of every EP rank plus the replicated part),
    the same on every rank. Collective over `groups.ep`: every rank must call it.

    `params`: the parameters to measure (e.g. an optimizer's); those in `expert_params` are
    counted as expert shards. Call after DDP's and `reduce_expert_gradients`' reductions.
    """
    params = list(params)
    norm_type = float(norm_type)
    expert_ids = {id(p) for p in expert_params}
    device = device or (params[0].device if params else torch.device("cpu"))
    replicated = [p.grad for p in params if p.grad is not None and id(p) not in expert_ids]
    experts = [p.grad for p in params if p.grad is not None and id(p) in expert_ids]
    rep_norm = _local_norm(replicated, norm_type, device)
    exp_norm = _local_norm(experts, norm_type, device)
    if math.isinf(norm_type):
        if groups.ep_size > 1:
            dist.all_reduce(exp_norm, op=dist.ReduceOp.MAX, group=groups.ep)
        return torch.maximum(rep_norm, exp_norm)
    exp_pow = exp_norm.pow(norm_type)
    if groups.ep_size > 1:
        dist.all_reduce(exp_pow, group=groups.ep)
    return (rep_norm.pow(norm_type) + exp_pow).pow(1.0 / norm_type)


def clip_grad_norm_(
    params: Iterable[nn.Parameter],
    max_norm: float,
    expert_params: Iterable[nn.Parameter],
    groups: MoEProcessGroups,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` with the global norm of `global_grad_norm`; returns it."""
    params = [p for p in params if p is not None]
    total = global_grad_norm(params, expert_params, groups, norm_type)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"the total norm of order {norm_type} of the gradients is non-finite ({total.item()})")
    grads = [p for p in params if p.grad is not None]
    if grads:
        torch.nn.utils.clip_grads_with_norm_(grads, max_norm, total)
    return total
