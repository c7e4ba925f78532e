"""Expert-gradient reduction and gradient clipping by the true global norm.

Why the expert gradients are summed over the expert-data-parallel group and divided by the
whole world size. With W = ep_size x dp_size ranks, rank r computing its mean loss L_r,
the global loss is L = (1/W) sum_r L_r (what DDP's averaging of the replicated parameters
optimises). An expert w lives on one rank of each EP group. Its local gradient after
backward is already a sum over the EP group, because the combine all-to-all's backward
brings back the gradient of every rank whose tokens it served:

    g_local(w) = sum_{r in my EP group} dL_r/dw

Summing over the expert-dp group (one rank per EP group, all holding w) gives
sum_r dL_r/dw over the whole world, so dL/dw = (1/W) * sum_{expert-dp} g_local
= sum_{expert-dp} (g_local / W): each rank divides its own gradient by W before the sum (as
DDP divides before its all-reduce, which keeps low-precision sums in range). With one
expert-dp replica (W = ep_size) the sum is the gradient itself: only the division is left.
Averaging over the expert-dp group instead (dividing by dp_size) gives ep_size times the
true gradient: the EP-size scaling bug of several peer systems. Adam hides most of it
(it is scale invariant up to eps); SGD, weight decay and clipping do not.

How (`ExpertGradReducer`), as DDP does for the replicated parameters: the expert gradients
live in a few flat buckets (each gradient is a view into its bucket, so the reduction is in
place and nothing is upcast or concatenated), and a bucket's all-reduce starts, async, as
soon as the last of its gradients is accumulated during backward (a post-accumulate-grad
hook), so communication overlaps the rest of backward. `finish()` waits for them before the
optimizer step and clipping. Buckets start in a fixed order on every rank (bucket b only
after buckets < b), so the ranks of an expert-dp group issue the same collectives in the
same order. Inside gradient accumulation (`sync=False`) nothing is communicated.

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

from lightning_mpipemoe import collectives
from lightning_mpipemoe.groups import MoEProcessGroups

__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "ExpertGradReducer",
    "clip_grad_norm_",
    "global_grad_norm",
    "reduce_dtype",
    "reduce_expert_gradients",
]

#: DDP's default bucket size (25 MiB).
DEFAULT_BUCKET_BYTES = 25 * 2**20


def reduce_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of an fp32 reduction (`reduce_in_fp32=True`): at least fp32 (bf16 sums of many
    ranks lose bits; where the optimizer keeps fp32 parameters the gradients are fp32 already)."""
    return torch.promote_types(dtype, torch.float32)


class _Bucket:
    """Gradients of a few parameters of one dtype in one flat buffer, plus one presence flag
    per parameter (so that a parameter gets a gradient iff any replica had one)."""

    def __init__(self, params: list[nn.Parameter], dtype: torch.dtype, device: torch.device) -> None:
        self.params = params
        self.numel = sum(p.numel() for p in params)
        self.flat = torch.zeros(self.numel + len(params), dtype=dtype, device=device)
        self.views: list[torch.Tensor] = []
        offset = 0
        for p in params:
            self.views.append(self.flat[offset : offset + p.numel()].view(p.shape))
            offset += p.numel()
        self.flags = self.flat[self.numel :]
        self.ready = 0
        self.work = None
        self.wire: torch.Tensor | None = None  # the fp32 copy that travels, with reduce_in_fp32


class ExpertGradReducer:
    """Reduces the expert gradients over `groups.expert_dp` in place, in buckets, during backward.

    `params`: the expert parameters (same list, same order on every rank). `bucket_bytes`: the
    size of one all-reduce. `reduce_in_fp32`: reduce low-precision gradients through an fp32
    copy of one bucket at a time (default: in the gradient's dtype, no copy). Call `attach()`
    once (hooks), `start(sync)` before each backward (`sync=False` inside gradient
    accumulation: no communication), `finish()` after it (it waits and scales; nothing
    without sync); `detach()` removes the hooks. With one expert-dp replica there are no buckets
    and no hooks: `finish()` only divides by the world size.
    """

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        groups: MoEProcessGroups,
        *,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        reduce_in_fp32: bool = False,
    ) -> None:
        if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be a positive int, got {bucket_bytes!r}")
        self.params = [p for p in params if p.requires_grad]
        self.groups = groups
        self.reduce_in_fp32 = reduce_in_fp32
        self.communicates = groups.expert_dp_size > 1
        self.buckets: list[_Bucket] = self._make_buckets(bucket_bytes) if self.communicates else []
        self._where = {id(p): (b, i) for b, bucket in enumerate(self.buckets) for i, p in enumerate(bucket.params)}
        self._handles: list = []
        self._sync = True
        self._next = 0  # the next bucket to start

    def _make_buckets(self, bucket_bytes: int) -> list[_Bucket]:
        """Parameters in reverse order (backward produces the last layers' gradients first),
        split by dtype and device, cut at `bucket_bytes`."""
        buckets: list[_Bucket] = []
        open_: dict = {}
        for p in reversed(self.params):
            key = (p.dtype, p.device)
            members, size = open_.get(key, ([], 0))
            if members and size + p.numel() * p.element_size() > bucket_bytes:
                buckets.append(_Bucket(members, p.dtype, p.device))
                members, size = [], 0
            open_[key] = (members + [p], size + p.numel() * p.element_size())
        buckets += [_Bucket(members, key[0], key[1]) for key, (members, _) in open_.items() if members]
        return buckets

    # -- lifecycle --------------------------------------------------------------------------
    def attach(self) -> "ExpertGradReducer":
        for p in self.params if self.communicates else ():
            self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad_ready))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def start(self, sync: bool = True) -> None:
        """Before a backward: `sync=False` inside gradient accumulation (no communication)."""
        if self._next or any(bucket.work is not None for bucket in self.buckets):
            raise RuntimeError("ExpertGradReducer.start: the previous synchronising backward was never finish()ed")
        self._sync = sync
        for bucket in self.buckets:
            bucket.ready = 0

    # -- during backward ----------------------------------------------------------------------
    def _adopt(self, p: nn.Parameter, view: torch.Tensor) -> None:
        """Make `p.grad` the bucket's view (copy once after the optimizer set it to None)."""
        grad = p.grad
        if grad is None or (grad.data_ptr() == view.data_ptr() and grad.shape == view.shape):
            return
        view.copy_(grad)
        p.grad = view

    def _on_grad_ready(self, p: nn.Parameter) -> None:
        b, i = self._where[id(p)]
        bucket = self.buckets[b]
        self._adopt(p, bucket.views[i])
        if not self._sync:
            return
        bucket.ready += 1
        if bucket.ready == len(bucket.params):
            self._launch_ready()

    def _launch_ready(self, force: bool = False) -> None:
        while self._next < len(self.buckets):
            bucket = self.buckets[self._next]
            if not force and bucket.ready < len(bucket.params):
                return
            self._launch(bucket)
            self._next += 1

    def _launch(self, bucket: _Bucket) -> None:
        with torch.no_grad():
            for p, view, flag in zip(bucket.params, bucket.views, bucket.flags.unbind(0)):
                if p.grad is None:
                    view.zero_()
                    flag.fill_(0)
                else:
                    self._adopt(p, view)
                    flag.fill_(1)
            bucket.flat[: bucket.numel].div_(self.groups.world_size)
            wire = bucket.flat
            if self.reduce_in_fp32 and reduce_dtype(wire.dtype) != wire.dtype:
                wire = bucket.wire = wire.to(reduce_dtype(wire.dtype))
            bucket.work = collectives.all_reduce(
                wire, group=self.groups.expert_dp, async_op=True, site="grad_sync.expert_bucket"
            )

    # -- after backward -----------------------------------------------------------------------
    def finish(self) -> None:
        """Wait for every bucket (starting those whose parameters got no gradient) and scale.
        Call on every rank after the synchronising backward, before clipping and the step."""
        if not self._sync:
            return
        if not self.communicates:
            grads = [p.grad for p in self.params if p.grad is not None]
            if grads and self.groups.world_size > 1:
                torch._foreach_div_(grads, self.groups.world_size)
            return
        self._launch_ready(force=True)
        with torch.no_grad():
            for bucket in self.buckets:
                bucket.work.wait()
                if bucket.wire is not None:
                    bucket.flat.copy_(bucket.wire)
                    bucket.wire = None
                bucket.work = None
                missing = [i for i, p in enumerate(bucket.params) if p.grad is None]
                if missing:  # rare (a layer unused on this rank): one host read of the flags
                    any_grad = (bucket.flags > 0).tolist()
                    for i in missing:
                        if any_grad[i]:
                            bucket.params[i].grad = bucket.views[i]
                bucket.ready = 0
        self._next = 0


def reduce_expert_gradients(
    params: Sequence[nn.Parameter], groups: MoEProcessGroups, *, reduce_in_fp32: bool = False
) -> None:
    """Turn each expert parameter's local gradient into the gradient of the global mean loss
    (sum over `groups.expert_dp`, divide by the world size), after backward, in one call (no
    overlap; `ExpertGradReducer` overlaps it with backward). A parameter without a gradient
    on some ranks takes part with zeros; it gets a gradient afterwards iff any rank had one.
    Collective over `groups.expert_dp` when it has more than one rank.
    """
    reducer = ExpertGradReducer(params, groups, reduce_in_fp32=reduce_in_fp32)
    reducer.start(sync=True)
    reducer.finish()


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
            collectives.all_reduce(
                exp_norm, op=dist.ReduceOp.MAX, group=groups.ep, site="grad_sync.norm_max"
            )
        return torch.maximum(rep_norm, exp_norm)
    exp_pow = exp_norm.pow(norm_type)
    if groups.ep_size > 1:
        collectives.all_reduce(exp_pow, group=groups.ep, site="grad_sync.norm")
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
