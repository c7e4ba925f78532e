"""Triton grouped GEMM over per-expert row segments: forward, input gradient, weight gradient.

The segments come as cumulative end rows (`offsets_E`, torch `grouped_mm`'s `offs`), on the
device, and are never read on the host: each M-tile program finds its expert from the
offsets itself, so a step needs no synchronisation and no padding. The launch grid is the
worst-case tile count (`cdiv(S, BLOCK_M) + E + 1`); programs past the real tiles exit at once.
Rows past the last offset form one extra segment whose output is written as zeros.

`grouped_mm` takes `w` through its strides, so the input gradient `grad_y @ w[e]` is the same
kernel called with `w.transpose(1, 2)`, with no copy.

To run them on CPU tensors, TRITON_INTERPRET=1 must be set before Triton is first imported
(Triton's own language helpers are defined then, compiled or interpreted), so in practice
when the process starts (the autotuner then has a single small config).

Shape legend: S rows, D input features, O output features, E experts; inside the kernels
M/N/K are the usual GEMM dims (rows, output columns, contraction).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["grouped_mm", "grouped_mm_weight_grad", "zero_tail_rows"]


def _interpreting() -> bool:
    knobs = getattr(triton, "knobs", None)  # Triton >= 3.4; older ones read the variable directly
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _gemm_configs() -> list[triton.Config]:
    if _interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    shapes = [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (64, 256, 64, 4, 4), (128, 64, 64, 4, 4)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for m, n, k, w, s in shapes
    ]


def _wgrad_configs() -> list[triton.Config]:
    if _interpreting():
        return [triton.Config({"BLOCK_O": 32, "BLOCK_D": 32, "BLOCK_R": 32, "GROUP_O": 4}, num_warps=4, num_stages=1)]
    shapes = [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 32, 4, 4), (64, 128, 64, 4, 4)]
    return [
        triton.Config({"BLOCK_O": o, "BLOCK_D": d, "BLOCK_R": r, "GROUP_O": 8}, num_warps=w, num_stages=s)
        for o, d, r, w, s in shapes
    ]


class _OneConfig:
    """A kernel launched with one fixed config: what `triton.autotune` is given under the
    interpreter (one config there). Triton < 3.4's autotuner asks for a GPU driver when it is
    created, which a CPU-only interpreter run does not have."""

    def __init__(self, kernel, config: triton.Config) -> None:
        self.kernel, self.config = kernel, config

    def __getitem__(self, grid):
        launch = self.kernel[grid]
        return lambda *args, **kwargs: launch(*args, **kwargs, **self.config.kwargs)


def _autotune(configs: list[triton.Config], **kwargs):
    """`triton.autotune(configs=configs, **kwargs)`; under the interpreter, its one config."""
    if not _interpreting():
        return triton.autotune(configs=configs, **kwargs)
    (config,) = configs
    return lambda kernel: _OneConfig(kernel, config)


# Below this many multiply-adds a GEMM is not worth tuning: one modest config, one compile. The
# size class is part of the autotune key, so a small first call never fixes the config that
# the large calls of the same shape then use.
_TUNE_MIN_WORK = 1 << 30


def _size_class(*dims: int) -> int:
    work = 1
    for dim in dims:
        work *= dim
    return int(work >= _TUNE_MIN_WORK)


def _prune_small(configs, named_args, **kwargs):
    """Large problems try every config; small ones take the one with the smallest output tile."""
    if named_args["size_class"]:
        return configs

    def tile_area(config):
        rows, cols = [v for k, v in config.kwargs.items() if k.startswith("BLOCK_")][:2]  # output tile dims
        return rows * cols, config.num_warps

    return [min(configs, key=tile_area)]


def _input_precision(dtype: torch.dtype) -> str:
    """fp32 operands: exact products unless torch itself allows TF32 for matmuls."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _num_m_tiles(num_rows: int, num_experts: int, block_m: int) -> int:
    """Upper bound on M-tiles: every segment (E experts + the tail) may add one partial tile."""
    return triton.cdiv(num_rows, block_m) + num_experts + 1


@triton.jit
def _tile_segment(offsets_ptr, num_experts, num_rows, tile, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """(segment, first row, end row) of M-tile `tile`; segment E is the tail past the last offset.

    A tile past all segments gets a segment > E.
    """
    e_E = tl.arange(0, BLOCK_E)
    ends_E = tl.load(offsets_ptr + e_E, mask=e_E < num_experts, other=num_rows).to(tl.int64)
    ends_E = tl.minimum(ends_E, num_rows)
    starts_E = tl.load(offsets_ptr + e_E - 1, mask=(e_E >= 1) & (e_E <= num_experts), other=0).to(tl.int64)
    starts_E = tl.where(e_E > num_experts, num_rows, tl.minimum(starts_E, ends_E))
    tiles_E = ((ends_E - starts_E + BLOCK_M - 1) // BLOCK_M).to(tl.int32)
    tile_ends_E = tl.cumsum(tiles_E, axis=0)
    segment = tl.sum((tile_ends_E <= tile).to(tl.int32), axis=0)
    hit_E = e_E == segment
    seg_start = tl.sum(tl.where(hit_E, starts_E, 0), axis=0)
    seg_end = tl.sum(tl.where(hit_E, ends_E, 0), axis=0)
    first_tile = tl.sum(tl.where(hit_E, tile_ends_E - tiles_E, 0), axis=0)
    return segment, seg_start + (tile - first_tile).to(tl.int64) * BLOCK_M, seg_end


@_autotune(
    configs=_gemm_configs(),
    key=["N", "K", "stride_wk", "size_class"],
    prune_configs_by={"early_config_prune": _prune_small},
)
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit(do_not_specialize=["num_rows", "num_experts", "size_class"])
def _grouped_gemm_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    offsets_ptr,
    num_rows,
    N,
    K,
    num_experts,
    stride_xm,
    stride_xk,
    stride_we,
    stride_wn,
    stride_wk,
    stride_ym,
    stride_yn,
    size_class,
    BLOCK_E: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(num_rows, BLOCK_M) + num_experts + 1
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped ordering: GROUP_M M-tiles sweep the N-tiles together, so w panels stay in L2.
    pids_in_group = GROUP_M * num_pid_n
    first_m = (pid // pids_in_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % pids_in_group) % group_rows
    pid_n = (pid % pids_in_group) // group_rows

    segment, row0, seg_end = _tile_segment(offsets_ptr, num_experts, num_rows, pid_m, BLOCK_M, BLOCK_E)
    if segment <= num_experts:
        rm_M = row0 + tl.arange(0, BLOCK_M)
        rn_N = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc_MN = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if segment < num_experts:
            # Rows past the segment (but inside x) load harmlessly: their outputs are not stored.
            rm_load_M = tl.minimum(rm_M, num_rows - 1)
            rn_load_N = tl.max_contiguous(tl.multiple_of(rn_N % N, BLOCK_N), BLOCK_N)
            rk_K = tl.arange(0, BLOCK_K)
            x_ptrs = x_ptr + rm_load_M[:, None] * stride_xm + rk_K[None, :] * stride_xk
            w_ptrs = w_ptr + segment.to(tl.int64) * stride_we + rn_load_N[None, :] * stride_wn + rk_K[:, None] * stride_wk
            for k0 in range(0, K, BLOCK_K):
                if EVEN_K:
                    a_MK = tl.load(x_ptrs)
                    b_KN = tl.load(w_ptrs)
                else:
                    k_mask_K = rk_K < K - k0
                    a_MK = tl.load(x_ptrs, mask=k_mask_K[None, :], other=0.0)
                    b_KN = tl.load(w_ptrs, mask=k_mask_K[:, None], other=0.0)
                acc_MN = tl.dot(a_MK, b_KN, acc_MN, input_precision=INPUT_PRECISION)
                x_ptrs += BLOCK_K * stride_xk
                w_ptrs += BLOCK_K * stride_wk
        # The tail segment (rows past the last offset) stores the zero accumulator.
        mask_MN = (rm_M < seg_end)[:, None] & (rn_N < N)[None, :]
        y_ptrs = y_ptr + rm_M[:, None] * stride_ym + rn_N[None, :] * stride_yn
        tl.store(y_ptrs, acc_MN.to(y_ptr.dtype.element_ty), mask=mask_MN)


@_autotune(
    configs=_wgrad_configs(),
    key=["O", "D", "size_class"],
    prune_configs_by={"early_config_prune": _prune_small},
)
@triton.jit(do_not_specialize=["num_rows", "size_class"])
def _grouped_wgrad_kernel(
    gy_ptr,
    x_ptr,
    dw_ptr,
    offsets_ptr,
    num_rows,
    O,
    D,
    stride_gm,
    stride_go,
    stride_xm,
    stride_xd,
    stride_we,
    stride_wo,
    stride_wd,
    size_class,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_O: tl.constexpr,
):
    pid = tl.program_id(0)
    expert = tl.program_id(1)
    num_pid_o = tl.cdiv(O, BLOCK_O)
    num_pid_d = tl.cdiv(D, BLOCK_D)
    pids_in_group = GROUP_O * num_pid_d
    first_o = (pid // pids_in_group) * GROUP_O
    group_rows = tl.minimum(num_pid_o - first_o, GROUP_O)
    pid_o = first_o + (pid % pids_in_group) % group_rows
    pid_d = (pid % pids_in_group) // group_rows

    end = tl.minimum(tl.load(offsets_ptr + expert).to(tl.int64), num_rows)
    start = tl.load(offsets_ptr + expert - 1, mask=expert > 0, other=0).to(tl.int64)
    start = tl.minimum(start, end)
    ro_O = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    rd_D = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    ro_load_O = tl.max_contiguous(tl.multiple_of(ro_O % O, BLOCK_O), BLOCK_O)
    rd_load_D = tl.max_contiguous(tl.multiple_of(rd_D % D, BLOCK_D), BLOCK_D)
    acc_OD = tl.zeros((BLOCK_O, BLOCK_D), dtype=tl.float32)
    for i in range(0, tl.cdiv(end - start, BLOCK_R)):
        rr_R = start + i * BLOCK_R + tl.arange(0, BLOCK_R)
        r_mask_R = rr_R < end
        gy_ptrs = gy_ptr + rr_R[None, :] * stride_gm + ro_load_O[:, None] * stride_go
        gy_OR = tl.load(gy_ptrs, mask=r_mask_R[None, :], other=0.0)
        x_RD = tl.load(x_ptr + rr_R[:, None] * stride_xm + rd_load_D[None, :] * stride_xd, mask=r_mask_R[:, None], other=0.0)
        acc_OD = tl.dot(gy_OR, x_RD, acc_OD, input_precision=INPUT_PRECISION)
    mask_OD = (ro_O < O)[:, None] & (rd_D < D)[None, :]
    dw_ptrs = dw_ptr + expert.to(tl.int64) * stride_we + ro_O[:, None] * stride_wo + rd_D[None, :] * stride_wd
    tl.store(dw_ptrs, acc_OD.to(dw_ptr.dtype.element_ty), mask=mask_OD)


@triton.jit(do_not_specialize=["num_experts", "num_rows"])
def _zero_tail_rows_kernel(
    y_ptr, offsets_ptr, num_experts, num_rows, N, stride_ym, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    last = tl.load(offsets_ptr + num_experts - 1).to(tl.int64)
    rm_M = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    tail_M = (rm_M >= last) & (rm_M < num_rows)
    if tl.max(tail_M.to(tl.int32), axis=0) > 0:
        for n0 in range(0, N, BLOCK_N):
            rn_N = n0 + tl.arange(0, BLOCK_N)
            tl.store(
                y_ptr + rm_M[:, None] * stride_ym + rn_N[None, :],
                tl.zeros((BLOCK_M, BLOCK_N), dtype=y_ptr.dtype.element_ty),
                mask=tail_M[:, None] & (rn_N < N)[None, :],
            )


def grouped_mm(x_SD: torch.Tensor, w_EOD: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """`y[rows of e] = x[rows of e] @ w[e].T` per segment, zeros past the last offset.

    `w_EOD` may be any strided view (the input gradient passes `w.transpose(1, 2)`).
    """
    num_rows, in_features = x_SD.shape
    num_experts, out_features = w_EOD.shape[0], w_EOD.shape[1]
    y_SO = torch.empty(num_rows, out_features, dtype=x_SD.dtype, device=x_SD.device)
    if num_rows == 0 or out_features == 0:
        return y_SO
    if in_features == 0 or num_experts == 0:
        return y_SO.zero_()
    offsets_E = offsets_E.contiguous()

    def grid(meta):
        return (_num_m_tiles(num_rows, num_experts, meta["BLOCK_M"]) * triton.cdiv(out_features, meta["BLOCK_N"]),)

    _grouped_gemm_kernel[grid](
        x_SD,
        w_EOD,
        y_SO,
        offsets_E,
        num_rows,
        out_features,
        in_features,
        num_experts,
        x_SD.stride(0),
        x_SD.stride(1),
        w_EOD.stride(0),
        w_EOD.stride(1),
        w_EOD.stride(2),
        y_SO.stride(0),
        y_SO.stride(1),
        _size_class(num_rows, out_features, in_features),
        BLOCK_E=triton.next_power_of_2(num_experts + 1),
        INPUT_PRECISION=_input_precision(x_SD.dtype),
    )
    return y_SO


def grouped_mm_weight_grad(
    grad_y_SO: torch.Tensor, x_SD: torch.Tensor, offsets_E: torch.Tensor, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """`grad_w[e] = grad_y[rows of e].T @ x[rows of e]`; an expert with no rows gets zeros.
    The fp32 accumulator is stored in `out_dtype` (default: the operands' dtype)."""
    num_rows, in_features = x_SD.shape
    out_features, num_experts = grad_y_SO.shape[1], offsets_E.shape[0]
    grad_w_EOD = torch.empty(
        num_experts, out_features, in_features, dtype=out_dtype or x_SD.dtype, device=x_SD.device
    )
    if grad_w_EOD.numel() == 0:
        return grad_w_EOD
    if num_rows == 0:
        return grad_w_EOD.zero_()
    offsets_E = offsets_E.contiguous()

    def grid(meta):
        return (triton.cdiv(out_features, meta["BLOCK_O"]) * triton.cdiv(in_features, meta["BLOCK_D"]), num_experts)

    _grouped_wgrad_kernel[grid](
        grad_y_SO,
        x_SD,
        grad_w_EOD,
        offsets_E,
        num_rows,
        out_features,
        in_features,
        grad_y_SO.stride(0),
        grad_y_SO.stride(1),
        x_SD.stride(0),
        x_SD.stride(1),
        grad_w_EOD.stride(0),
        grad_w_EOD.stride(1),
        grad_w_EOD.stride(2),
        _size_class(num_rows, out_features, in_features),
        INPUT_PRECISION=_input_precision(x_SD.dtype),
    )
    return grad_w_EOD


def zero_tail_rows(y_SO: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """Zero the rows of `y_SO` past `offsets_E[-1]` in place, without reading it on the host.

    torch's `grouped_mm` leaves those rows uninitialised; the op contract says zeros.
    """
    num_rows, width = y_SO.shape
    if num_rows == 0 or width == 0:
        return y_SO
    if offsets_E.shape[0] == 0:
        return y_SO.zero_()
    if y_SO.stride(1) != 1:
        raise ValueError("zero_tail_rows needs rows with unit column stride")
    block_n = min(triton.next_power_of_2(width), 1024)
    block_m = max(min(4096 // block_n, 64), 1)
    _zero_tail_rows_kernel[(triton.cdiv(num_rows, block_m),)](
        y_SO, offsets_E.contiguous(), offsets_E.shape[0], num_rows, width, y_SO.stride(0), BLOCK_M=block_m, BLOCK_N=block_n
    )
    return y_SO
