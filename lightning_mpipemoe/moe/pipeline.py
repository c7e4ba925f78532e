"""The pipelined expert-parallel executor: one autograd Function, one schedule for CPU and CUDA.

Forward of n partitions (S dispatch all-to-all, C expert FFN, R combine all-to-all):

    S0 | C0 S1 | R0 . C1 S2 | R1 . C2 ... | R(n-1)
    i.e. for partition i: wait S(i); issue S(i+1); GEMM1, activation, GEMM2 of i;
         wait R(i-1); issue R(i)

so the dispatch of i+1 and the combine of i-1 are in flight while partition i computes.
Backward runs the mirror image: the all-to-all of the output gradient of i+1 (and, under
s2 / s4, the re-communication of T_DI of i+1, or under s1 / s3 the host fetch of i+1) is in
flight while the expert backward of i runs, and the all-to-all of the input gradient of i-1
completes meanwhile. Dispatch-direction collectives (dispatch, re-communication, input
gradient) go on `dispatch_group`, combine-direction ones (combine, output gradient) on
`combine_group`; every rank issues them in the same order. The weighted unpermute stays
outside (plain autograd), so the Function returns the combined rows of all partitions.

The Function saves what backward needs through `ctx.save_for_backward` (so saved-tensor
hooks measure it) and keeps routing plans as values in `ctx`; nothing lives on a module.

Backward recomputes each partition's activation from its T_M (nothing of the activation is
kept). A `gate_fn` may draw random numbers (Switch's expert dropout): the RNG state before
each partition's activation is kept (a few KB) and replayed for the recomputation, as
`torch.utils.checkpoint` does, so backward sees the forward's dropout mask.

Shape legend: T tokens, K top-k, H model dim, I expert hidden, O = 2I (gated) or I,
S rows of one partition, L local experts, N rows of all partitions.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch.autograd.function import once_differentiable
from torch.distributed import ProcessGroup

from lightning_mpipemoe.kernels import api as kernels
from lightning_mpipemoe.config import SimulatedLink
from lightning_mpipemoe.moe.buffers import BufferPool
from lightning_mpipemoe.moe.comm import Lanes, LinkClock, start_all_to_all
from lightning_mpipemoe.moe.dispatch import DispatchPlan, group_size
from lightning_mpipemoe.moe.experts import (
    ExpertWeights,
    expert_activation,
    expert_input_projection,
    expert_output_projection,
)
from lightning_mpipemoe.moe.memory import PipelineRecord
from lightning_mpipemoe.moe.restore import RestoreStrategy, Stash, restore_strategy

__all__ = ["PipelineCall", "pipelined_experts"]


def _rng_state(device: torch.device) -> torch.Tensor:
    """The state of the generator that random ops on `device` draw from."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _replayed_activation(pre_SO: torch.Tensor, experts: ExpertWeights, state: torch.Tensor | None) -> torch.Tensor:
    """The activation as the forward drew it: its RNG state replayed (outside RNG untouched)."""
    if state is None:
        return expert_activation(pre_SO, experts)
    device = pre_SO.device
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        if device.type == "cuda":
            torch.cuda.set_rng_state(state, device)
        else:
            torch.set_rng_state(state)
        return expert_activation(pre_SO, experts)


@dataclass(frozen=True)
class PipelineCall:
    """Everything about one call that autograd does not track: plans, groups, strategy."""

    plans: list[DispatchPlan]
    experts: ExpertWeights
    dispatch_group: ProcessGroup | None
    combine_group: ProcessGroup | None
    strategy: RestoreStrategy
    link: SimulatedLink | None
    record: PipelineRecord | None

    @property
    def multi_rank(self) -> bool:
        return group_size(self.dispatch_group) > 1

    def sent_starts(self) -> list[int]:
        starts = [0]
        for plan in self.plans:
            starts.append(starts[-1] + plan.num_sent)
        return starts

    def received_starts(self) -> list[int]:
        starts = [0]
        for plan in self.plans:
            starts.append(starts[-1] + plan.num_received)
        return starts


def _trace(call: PipelineCall, what: str, partition: int) -> None:
    if call.record is not None:
        call.record.event(what, partition)


def _weight_grad(total: torch.Tensor | None, grad_SO: torch.Tensor, x_SD: torch.Tensor, offsets_L: torch.Tensor,
                 acc_dtype: torch.dtype) -> torch.Tensor:
    """`total[e] += grad[rows of e].T @ x[rows of e]` for all experts: one grouped GEMM per
    partition, summed in `acc_dtype` (fp32 for bf16 rows) without rounding in between."""
    if total is None:
        return kernels.grouped_mm_weight_grad(grad_SO, x_SD, offsets_L, out_dtype=acc_dtype)
    return kernels.grouped_mm_weight_grad(grad_SO, x_SD, offsets_L, accumulate=total)


def _bias_grad(total: torch.Tensor | None, grad_SO: torch.Tensor, offsets_L: torch.Tensor,
               acc_dtype: torch.dtype) -> torch.Tensor:
    """Per-expert row sums of `grad_SO`, `[L, O, 1]`: the same grouped GEMM against a column of
    ones (deterministic, summed in `acc_dtype`; no atomics, no loop over experts)."""
    return _weight_grad(total, grad_SO, grad_SO.new_ones(grad_SO.shape[0], 1), offsets_L, acc_dtype)


class _PipelinedExperts(torch.autograd.Function):
    """Dispatch, experts and combine of all partitions; returns the combined rows `[N, H]`."""

    @staticmethod
    def forward(ctx, call: PipelineCall, hidden_TH, w_in_EOH, w_out_EHI, b_in_EO, b_out_EH):
        device = hidden_TH.device
        lanes, pool = Lanes(device), BufferPool()
        clock = LinkClock(call.link) if call.link is not None else None
        plans, multi = call.plans, call.multi_rank
        experts = call.experts.in_dtype(hidden_TH.dtype)  # cast once per call, not per GEMM
        width = w_in_EOH.shape[1]
        sent_starts = call.sent_starts()
        stash = Stash(
            call.strategy, call.received_starts(), hidden_TH.shape[1], width, hidden_TH.dtype, device, lanes
        )
        out_NH = hidden_TH.new_empty(sent_starts[-1], hidden_TH.shape[1])

        def issue_dispatch(i: int):
            plan = plans[i]
            tokens_TH = hidden_TH[plan.token_start : plan.token_end]
            send_SH = pool.put("send", kernels.permute(tokens_TH, plan.src_token_S))
            _trace(call, "dispatch_issue", i)
            handle = start_all_to_all(
                send_SH, plan.recv_splits, plan.send_splits, call.dispatch_group,
                lanes=lanes, lane="dispatch", clock=clock,
            )
            if multi:
                pool.put("recv", handle.output)
            return handle

        dispatch = issue_dispatch(0)
        combine = None
        # RNG state before each partition's activation, when it may draw (see the module docstring).
        rng_states = [] if experts.gate_fn is not None else None
        for i, plan in enumerate(plans):
            offsets_L = plan.expert_offsets_L
            received_SH = dispatch.wait()
            _trace(call, "dispatch_done", i)
            if multi:
                pool.drop("send")
                dispatched_SH = kernels.permute(received_SH, plan.regroup_S)
            else:
                dispatched_SH = received_SH
            if call.strategy.reuses_buffers:
                pool.put("T_DI", dispatched_SH)
            pool.drop("send", "recv")
            del received_SH
            if i + 1 < len(plans):
                dispatch = issue_dispatch(i + 1)
            _trace(call, "compute_start", i)
            hidden_SO = expert_input_projection(dispatched_SH, offsets_L, experts)
            if call.strategy.reuses_buffers:
                pool.put("T_M", hidden_SO)
            stash.save(i, dispatched_SH, hidden_SO)
            pool.drop("T_DI")
            del dispatched_SH
            if rng_states is not None:
                rng_states.append(_rng_state(device))
            act_SI = pool.put("act", expert_activation(hidden_SO, experts))
            pool.drop("T_M")
            del hidden_SO
            y_SH = pool.put("T_DO", expert_output_projection(act_SI, offsets_L, experts))
            pool.drop("act")
            del act_SI
            _trace(call, "compute_end", i)
            if combine is not None:
                combine.wait()
                _trace(call, "combine_done", i - 1)
                pool.drop("T_DO_comm")
            if multi:
                y_SH = pool.put("T_DO_comm", kernels.permute(y_SH, plan.unregroup_S))
                pool.drop("T_DO")
            combine = start_all_to_all(
                y_SH, plan.send_splits, plan.recv_splits, call.combine_group,
                lanes=lanes, lane="combine", clock=clock,
                output_SH=out_NH[sent_starts[i] : sent_starts[i + 1]],
            )
            _trace(call, "combine_issue", i)
            del y_SH
            pool.drop("T_DO")
        combine.wait()
        _trace(call, "combine_done", len(plans) - 1)
        pool.clear()

        kept = stash.finish_forward()
        needs_input = call.strategy.needs_input
        ctx.call, ctx.stash, ctx.rng_states = call, stash, rng_states
        ctx.input_shape = tuple(hidden_TH.shape)
        ctx.save_for_backward(
            hidden_TH if needs_input else None,
            w_in_EOH, w_out_EHI, b_in_EO, b_out_EH,
            *[plan.src_token_S for plan in plans],
            *[plan.regroup_S for plan in plans],
            *[plan.unregroup_S for plan in plans],
            *[plan.expert_offsets_L for plan in plans],
            *kept,
        )
        if call.record is not None:
            call.record.forward_peak_temp_bytes = pool.peak_bytes
            call.record.forward_peak_slots = dict(pool.peak_slots)
            call.record.host_bytes = stash.host_bytes
            call.record.forward_wire_s = clock.busy_s if clock is not None else 0.0
        return out_NH

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out_NH):
        call, stash = ctx.call, ctx.stash
        if stash is None:
            raise RuntimeError(
                "backward ran twice through the pipelined MoE executor; its offloaded and kept buffers "
                "are released after the first (retain_graph is not supported)"
            )
        ctx.stash = None
        saved = ctx.saved_tensors
        hidden_TH, w_in_EOH, w_out_EHI, b_in_EO, b_out_EH = saved[:5]
        n = len(call.plans)
        index = saved[5 : 5 + 4 * n]
        stash.attach_saved(list(saved[5 + 4 * n :]))
        plans = [
            replace(plan, src_token_S=index[i], regroup_S=index[n + i], unregroup_S=index[2 * n + i],
                    expert_offsets_L=index[3 * n + i])
            for i, plan in enumerate(call.plans)
        ]
        grads = _backward(call, stash, plans, grad_out_NH, hidden_TH, w_in_EOH, w_out_EHI, b_in_EO, b_out_EH,
                          ctx.input_shape, ctx.needs_input_grad, ctx.rng_states)
        stash.release()
        return (None, *grads)


def _backward(call, stash, plans, grad_out_NH, hidden_TH, w_in_EOH, w_out_EHI, b_in_EO, b_out_EH, input_shape, needs,
              rng_states):
    device = grad_out_NH.device
    lanes, pool = Lanes(device), BufferPool()
    clock = LinkClock(call.link) if call.link is not None else None
    multi, strategy = call.multi_rank, call.strategy
    grad_out_NH = grad_out_NH.contiguous()
    dtype = grad_out_NH.dtype
    experts = call.experts.in_dtype(dtype)  # cast once per call (recomputation's GEMM1)
    sent_starts = call.sent_starts()
    grad_hidden_TH = grad_out_NH.new_zeros(input_shape)
    # Weight and bias gradients: one grouped GEMM per partition, summed across partitions in
    # fp32 (or wider), rounded to the parameter's dtype once at the end, so that they do not
    # depend on n beyond that rounding.
    acc_dtype = torch.promote_types(w_in_EOH.dtype, torch.float32)
    grad_w_in = grad_w_out = grad_b_in = grad_b_out = None
    # Transposed weights for the data gradients, grad_act = grad_y @ W_out[e] and
    # grad_x = grad_pre @ W_in[e], in the rows' dtype as the forward used them.
    w_out_EIH = experts.w_out_EHI.transpose(1, 2)
    w_in_EHO = experts.w_in_EOH.transpose(1, 2)
    ones_TK = None  # fp32 unit weights of the input gradient's gather-sum

    def issue(j: int) -> dict:
        """Start everything partition j's expert backward waits for."""
        plan, pending = plans[j], {}
        pending["grad_y"] = start_all_to_all(
            grad_out_NH[sent_starts[j] : sent_starts[j + 1]], plan.recv_splits, plan.send_splits,
            call.combine_group, lanes=lanes, lane="combine", clock=clock,
        )
        if multi:
            pool.put(f"dY_recv{j % 2}", pending["grad_y"].output)
        _trace(call, "grad_out_issue", j)
        if strategy.dispatched == "recommunicate":
            send_SH = kernels.permute(hidden_TH[plan.token_start : plan.token_end], plan.src_token_S)
            pool.put(f"recomm_send{j % 2}", send_SH)
            pending["T_DI"] = start_all_to_all(
                send_SH, plan.recv_splits, plan.send_splits, call.dispatch_group,
                lanes=lanes, lane="dispatch", clock=clock,
            )
            if multi:
                pool.put(f"recomm_recv{j % 2}", pending["T_DI"].output)
            _trace(call, "recomm_issue", j)
        for kind in strategy.offloads:
            pending[kind] = stash.fetch(kind, j, lanes)
            pool.put(f"{kind}_fetch{j % 2}", pending[kind].rows)
        return pending

    def regroup(rows_SH, plan):
        return kernels.permute(rows_SH, plan.regroup_S) if multi else rows_SH

    def scatter_input_grad(j: int, handle) -> None:
        """Token gradients of partition j: the sum of its top-k copies' rows, a gather-sum
        through `pos_TK` in fp32 (deterministic; no atomics, no bf16 accumulation)."""
        nonlocal ones_TK
        plan = plans[j]
        rows_SH = handle.wait()
        _trace(call, "grad_in_done", j)
        if plan.token_end > plan.token_start:
            pos_TK = plan.pos_TK
            if ones_TK is None or ones_TK.shape[1] != pos_TK.shape[1]:
                ones_TK = torch.ones(1, pos_TK.shape[1], dtype=torch.float32, device=device)
            summed_TH = kernels.unpermute(rows_SH, pos_TK, ones_TK.expand(pos_TK.shape[0], -1))
            grad_hidden_TH[plan.token_start : plan.token_end] = summed_TH
        pool.drop("dX_comm", "dX_recv")

    pending = issue(0)
    grad_in = None
    for j, plan in enumerate(plans):
        offsets_L = plan.expert_offsets_L
        grad_y_SH = regroup(pending["grad_y"].wait(), plan)
        if multi:
            pool.put("dY", grad_y_SH)
        pool.drop(f"dY_recv{j % 2}")
        _trace(call, "grad_out_done", j)
        if strategy.dispatched == "keep":
            x_SH = stash.take_kept("T_DI", j)
        elif strategy.dispatched == "offload":
            x_SH = pool.put("T_DI", pending["T_DI"].wait())
            pool.drop(f"T_DI_fetch{j % 2}")
        else:
            x_SH = pool.put("T_DI", regroup(pending["T_DI"].wait(), plan))
            pool.drop(f"recomm_send{j % 2}", f"recomm_recv{j % 2}")
        if strategy.hidden == "keep":
            pre_SO = stash.take_kept("T_M", j)
        elif strategy.hidden == "offload":
            pre_SO = pool.put("T_M", pending["T_M"].wait())
            pool.drop(f"T_M_fetch{j % 2}")
        else:
            pre_SO = pool.put("T_M", expert_input_projection(x_SH, offsets_L, experts))
        del pending
        if j + 1 < len(plans):
            pending = issue(j + 1)
        _trace(call, "compute_start", j)

        # Expert backward of partition j: activation by autograd on a local leaf (any gate_fn),
        # the grouped GEMMs by hand.
        with torch.enable_grad():
            pre_leaf = pre_SO.detach().requires_grad_()
            act_SI = _replayed_activation(pre_leaf, experts, rng_states[j] if rng_states is not None else None)
        pool.put("act", act_SI)
        grad_act_SI = pool.put("dAct", kernels.grouped_mm(grad_y_SH, w_out_EIH, offsets_L))
        if needs[3]:
            grad_w_out = _weight_grad(grad_w_out, grad_y_SH, act_SI.detach(), offsets_L, acc_dtype)
        if b_out_EH is not None and needs[5]:
            grad_b_out = _bias_grad(grad_b_out, grad_y_SH, offsets_L, acc_dtype)
        pool.drop("dY")
        del grad_y_SH
        (grad_pre_SO,) = torch.autograd.grad(act_SI, pre_leaf, grad_act_SI)
        pool.put("dPre", grad_pre_SO)
        pool.drop("act", "dAct", "T_M")
        del act_SI, grad_act_SI, pre_leaf, pre_SO
        if needs[2]:
            grad_w_in = _weight_grad(grad_w_in, grad_pre_SO, x_SH, offsets_L, acc_dtype)
        if b_in_EO is not None and needs[4]:
            grad_b_in = _bias_grad(grad_b_in, grad_pre_SO, offsets_L, acc_dtype)
        pool.drop("T_DI")
        del x_SH
        grad_x_SH = pool.put("dX", kernels.grouped_mm(grad_pre_SO, w_in_EHO, offsets_L))
        pool.drop("dPre")
        del grad_pre_SO
        _trace(call, "compute_end", j)

        if grad_in is not None:
            scatter_input_grad(j - 1, grad_in)
        if multi:
            grad_x_SH = pool.put("dX_comm", kernels.permute(grad_x_SH, plan.unregroup_S))
            pool.drop("dX")
        grad_in = start_all_to_all(
            grad_x_SH, plan.send_splits, plan.recv_splits, call.dispatch_group,
            lanes=lanes, lane="dispatch", clock=clock,
        )
        pool.put("dX_recv", grad_in.output)
        _trace(call, "grad_in_issue", j)
        del grad_x_SH
        pool.drop("dX")
    scatter_input_grad(len(plans) - 1, grad_in)
    pool.clear()
    if call.record is not None:
        call.record.backward_peak_temp_bytes = pool.peak_bytes
        call.record.backward_peak_slots = dict(pool.peak_slots)
        call.record.backward_wire_s = clock.busy_s if clock is not None else 0.0
    def final(total: torch.Tensor | None, param: torch.Tensor | None) -> torch.Tensor | None:
        return None if total is None else total.view(param.shape).to(param.dtype)

    return (
        grad_hidden_TH if needs[1] else None,
        final(grad_w_in, w_in_EOH),
        final(grad_w_out, w_out_EHI),
        final(grad_b_in, b_in_EO),
        final(grad_b_out, b_out_EH),
    )


def pipelined_experts(
    hidden_TH: torch.Tensor,
    plans: list[DispatchPlan],
    experts: ExpertWeights,
    *,
    dispatch_group: ProcessGroup | None,
    combine_group: ProcessGroup | None,
    restore: str,
    link: SimulatedLink | None = None,
    record: PipelineRecord | None = None,
) -> torch.Tensor:
    """Run the experts of all partitions through the pipeline; returns the combined rows
    `[N, H]` in send order (partition after partition), for the weighted unpermute."""
    call = PipelineCall(
        plans=plans,
        experts=experts,
        dispatch_group=dispatch_group,
        combine_group=combine_group,
        strategy=restore_strategy(restore),
        link=link,
        record=record,
    )
    return _PipelinedExperts.apply(
        call, hidden_TH, experts.w_in_EOH, experts.w_out_EHI, experts.b_in_EO, experts.b_out_EH
    )


def combined_positions(plans: list[DispatchPlan]) -> torch.Tensor:
    """`pos_TK` of every token into the pipeline's combined rows (partition offsets added)."""
    pieces, base = [], 0
    for plan in plans:
        pieces.append(torch.where(plan.pos_TK >= 0, plan.pos_TK + base, plan.pos_TK))
        base += plan.num_sent
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)
