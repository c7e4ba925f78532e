"""Expert weights in Hugging Face's fused layout, and the expert FFN over per-expert segments.

Shape legend: S rows (tokens already grouped by expert), H model dim, I expert hidden dim,
O = 2I for gated experts (gate and up concatenated) or I for plain ones, E local experts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from lightning_mpipemoe.kernels import api as kernels

__all__ = ["ExpertWeights", "expert_ffn", "expert_input_projection", "expert_activation", "expert_output_projection"]


@dataclass(frozen=True)
class ExpertWeights:
    """The experts one rank holds, as views of its parameters (no copies).

    `w_in_EOH` is Hugging Face's `gate_up_proj [E, 2I, H]` (gate rows first) for gated experts
    or the stacked Switch `wi [E, I, H]` for plain ones; `w_out_EHI` is `down_proj [E, H, I]`
    (stacked `wo`). `gate_fn` overrides the default `activation(gate) * up`, for families
    whose experts module defines its own `_apply_gate`, and for Switch's dropout after the
    activation (a `gate_fn` may draw random numbers: the pipelined executor replays them when
    it recomputes the activation in backward).
    """

    w_in_EOH: torch.Tensor
    w_out_EHI: torch.Tensor
    b_in_EO: torch.Tensor | None = None
    b_out_EH: torch.Tensor | None = None
    gated: bool = True
    activation: Callable[[torch.Tensor], torch.Tensor] = F.silu
    gate_fn: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def num_local_experts(self) -> int:
        return self.w_in_EOH.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.w_in_EOH.shape[2]

    @property
    def intermediate_size(self) -> int:
        return self.w_out_EHI.shape[2]

    def in_dtype(self, dtype: torch.dtype) -> "ExpertWeights":
        """The weights in the rows' compute dtype, cast once (autocast-style: fp32 master weights,
        bf16 rows); the casts stay in the autograd graph, so gradients reach the parameters in
        their own dtype. No copy when the dtypes already match."""
        def cast(t: torch.Tensor | None) -> torch.Tensor | None:
            return t if t is None or t.dtype == dtype else t.to(dtype)

        return replace(self, w_in_EOH=cast(self.w_in_EOH), w_out_EHI=cast(self.w_out_EHI),
                       b_in_EO=cast(self.b_in_EO), b_out_EH=cast(self.b_out_EH))

    def check(self) -> None:
        """Raise a ValueError naming the inconsistent shape."""
        if self.w_in_EOH.dim() != 3 or self.w_out_EHI.dim() != 3:
            raise ValueError(
                f"expert weights must be 3-D [E, out, in]; got w_in {tuple(self.w_in_EOH.shape)}, "
                f"w_out {tuple(self.w_out_EHI.shape)}"
            )
        e, o, h = self.w_in_EOH.shape
        width = 2 * self.intermediate_size if self.gated else self.intermediate_size
        if self.w_out_EHI.shape != (e, h, self.intermediate_size) or o != width:
            kind = "gated (w_in [E, 2I, H])" if self.gated else "plain (w_in [E, I, H])"
            raise ValueError(
                f"{kind} experts need w_out [E, H, I] matching w_in; got w_in {tuple(self.w_in_EOH.shape)}, "
                f"w_out {tuple(self.w_out_EHI.shape)}"
            )
        if self.b_in_EO is not None and self.b_in_EO.shape != (e, o):
            raise ValueError(f"b_in must be [E, {o}] = [{e}, {o}], got {tuple(self.b_in_EO.shape)}")
        if self.b_out_EH is not None and self.b_out_EH.shape != (e, h):
            raise ValueError(f"b_out must be [E, H] = [{e}, {h}], got {tuple(self.b_out_EH.shape)}")
        for name, t in (("w_in", self.w_in_EOH), ("w_out", self.w_out_EHI), ("b_in", self.b_in_EO),
                        ("b_out", self.b_out_EH)):
            if t is not None and not t.is_floating_point():
                raise TypeError(f"expert weight {name} must be a floating-point tensor, got {t.dtype}")


def _rows_expert_bias(bias_EX: torch.Tensor, offsets_E: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Each row's expert bias; rows past the last offset (padding) get zeros."""
    row_S = torch.arange(num_rows, device=offsets_E.device)
    expert_of_row_S = torch.bucketize(row_S, offsets_E, right=True)  # no host sync, unlike repeat_interleave
    padded_EX = torch.cat([bias_EX, bias_EX.new_zeros(1, bias_EX.shape[1])])
    return padded_EX[expert_of_row_S.to(bias_EX.device)]


def _in_dtype(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight in the rows' compute dtype (autocast: fp32 master weights, bf16 rows);
    autograd carries the gradient back through the cast in the parameter's dtype."""
    return weight if weight.dtype == dtype else weight.to(dtype)


def expert_input_projection(x_SH: torch.Tensor, offsets_E: torch.Tensor, experts: ExpertWeights) -> torch.Tensor:
    """GEMM1: the pre-activation expert hidden T_M `[S, O]` (what recomputation rebuilds)."""
    pre_SO = kernels.grouped_mm(x_SH, _in_dtype(experts.w_in_EOH, x_SH.dtype), offsets_E)
    if experts.b_in_EO is not None:
        pre_SO = pre_SO + _in_dtype(_rows_expert_bias(experts.b_in_EO, offsets_E, x_SH.shape[0]), x_SH.dtype)
    return pre_SO


def expert_activation(pre_SO: torch.Tensor, experts: ExpertWeights) -> torch.Tensor:
    if experts.gate_fn is not None:
        return experts.gate_fn(pre_SO)
    if experts.gated:
        gate_SI, up_SI = pre_SO.chunk(2, dim=-1)
        return experts.activation(gate_SI) * up_SI
    return experts.activation(pre_SO)


def expert_output_projection(act_SI: torch.Tensor, offsets_E: torch.Tensor, experts: ExpertWeights) -> torch.Tensor:
    """GEMM2: the expert output T_DO `[S, H]`."""
    y_SH = kernels.grouped_mm(act_SI, _in_dtype(experts.w_out_EHI, act_SI.dtype), offsets_E)
    if experts.b_out_EH is not None:
        y_SH = y_SH + _in_dtype(_rows_expert_bias(experts.b_out_EH, offsets_E, act_SI.shape[0]), act_SI.dtype)
    return y_SH


def _each_expert(experts: ExpertWeights) -> list[ExpertWeights]:
    """One `ExpertWeights` per local expert (views `[1, ...]` of the stacked tensors).

    Split with one `unbind` per tensor: its backward stacks the experts' gradients into one
    `[L, ...]` tensor. Indexing `t[e : e + 1]` per expert instead costs, in backward, a zero
    `[L, ...]` tensor and a full-size add per expert (L^2 work: at 32 local experts it was
    most of a fine-grained model's step on CPU)."""

    def split(t: torch.Tensor | None) -> list:
        return [None] * experts.num_local_experts if t is None else [w.unsqueeze(0) for w in t.unbind(0)]

    fields = ("w_in_EOH", "w_out_EHI", "b_in_EO", "b_out_EH")
    per_field = [split(getattr(experts, name)) for name in fields]
    return [replace(experts, **dict(zip(fields, parts))) for parts in zip(*per_field)]


def _expert_ffn_by_segment(x_SH: torch.Tensor, offsets_E: torch.Tensor, experts: ExpertWeights,
                           ends: Sequence[int] | None) -> torch.Tensor:
    """One expert at a time, for CPU: the per-expert intermediates stay in cache, and the
    allocator reuses them instead of mapping fresh pages for one `[S, 2I]` tensor per call
    (tens of thousands of page faults a step). Bit-identical to the grouped form. `ends` is
    the host copy of `offsets_E` when the caller has one (the dispatch plan does).

    Rows and weights are cut with one `split` / `unbind` each (not a slice per expert), so
    that backward assembles each full gradient once (see `_each_expert`)."""
    ends = list(ends if ends is not None else offsets_E.tolist())
    sizes = [end - start for start, end in zip([0, *ends[:-1]], ends)]
    rows_by_expert = x_SH.split([*sizes, x_SH.shape[0] - (ends[-1] if ends else 0)])
    pieces, start = [], 0
    each = _each_expert(experts)
    for e, end in enumerate(ends):
        if end > start:
            one = each[e]
            pre_SO = expert_input_projection(rows_by_expert[e], offsets_E.new_tensor([end - start]), one)
            pieces.append(expert_output_projection(expert_activation(pre_SO, one), offsets_E.new_tensor([end - start]), one))
        start = end
    if not pieces:  # no rows: the grouped form keeps the (empty) output in the autograd graph
        return _expert_ffn_grouped(x_SH, offsets_E, experts)
    if start < x_SH.shape[0]:  # rows past the last offset (padding) are zero
        pieces.append(x_SH.new_zeros(x_SH.shape[0] - start, experts.hidden_size))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)


def _expert_ffn_grouped(x_SH: torch.Tensor, offsets_E: torch.Tensor, experts: ExpertWeights) -> torch.Tensor:
    pre_SO = expert_input_projection(x_SH, offsets_E, experts)
    return expert_output_projection(expert_activation(pre_SO, experts), offsets_E, experts)


def expert_ffn(x_SH: torch.Tensor, offsets_E: torch.Tensor, experts: ExpertWeights,
               ends: Sequence[int] | None = None) -> torch.Tensor:
    """The expert FFN over contiguous per-expert row segments (`offsets_E`: cumulative ends;
    `ends`: their host copy, if the caller has one).

    The output always stays in the autograd graph, even with no rows: under expert
    parallelism a rank that received nothing must still join the backward all-to-alls.
    """
    if x_SH.device.type == "cpu":
        return _expert_ffn_by_segment(x_SH, offsets_E, experts, ends)
    return _expert_ffn_grouped(x_SH, offsets_E, experts)
