"""How close a bf16 computation must be to an fp32 run of the same weights and inputs.

The error model. bf16 keeps 8 significand bits: rounding to bf16 multiplies a value by
(1 + d) with |d| <= u = 2^-8 (the unit roundoff). Treat each rounding's d as independent
and mean zero, uniform on [-u, u], so of standard deviation u / sqrt(3). A result that goes
through `stages` roundings one after another (e.g. GEMM output, activation, gate product,
GEMM output, routing weight product, top-k sum: 6 for a gated expert layer's output) then
carries a relative error of standard deviation about u * sqrt(stages / 3) per element.
Reductions: the GEMMs here accumulate in fp32 (CPU and cuBLAS bf16 GEMMs do), so a sum of
`reduction` terms adds at most `reduction` * 2^-24 relative (the worst-case bound gamma_n of
fp32 recursive summation, negligible at these sizes but kept so that the bound stays valid for
long reductions); a reduction accumulated in bf16 would add up to sqrt(reduction) * u and
must be counted as stages. We compare norm-wise, ||bf16 - fp32|| / ||fp32||: the norm
averages hundreds of independent element errors, so it sits close to that standard deviation;
the bound is `LAMBDA` = 2.5 of them (measured: 1.0-2.2 u for one expert layer, n = 1 and
pipelined, H in 16..64, 30..200 tokens).

What it catches. One expert layer is checked with LAYER_STAGES = 8 (the longest chain among
its output and gradients, counted with margin): 2.5 * u * sqrt(8 / 3) = 4.1 u = 1.6 %. A 2 %
error in the output (5.1 u) or a doubled gradient (256 u) fails it. A whole model's logits
cannot be held to one layer's bound: errors compound through its layers, and in top-k
routing a rounding can flip a near tie, moving one token's output by O(1) (measured 53 u on
tiny Mixtral). So the per-layer check compares each MoE layer's output on the inputs it
actually received; whole-model checks use a model where every expert is chosen (no flips) and
the stages of all layers in sequence.

fp16 (`precision="16-true"`): the same model with fp16's unit roundoff, u = 2^-11 (11
significand bits); `unit_roundoff=FP16_U` below.
"""

from __future__ import annotations

import math

import torch

U = 2.0**-8
FP16_U = 2.0**-11
FP32_U = 2.0**-24
LAMBDA = 2.5
#: An expert layer's forward (6 roundings) and backward chains, with margin.
LAYER_STAGES = 8


def bf16_tolerance(stages: int, reduction: int = 1, unit_roundoff: float = U) -> float:
    """Norm-wise relative tolerance of a bf16 result after `stages` roundings in sequence and
    fp32-accumulated reductions of length `reduction` (see the module docstring)."""
    return LAMBDA * unit_roundoff * math.sqrt(stages / 3) + reduction * FP32_U


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.detach().double()
    return float((actual.detach().double() - expected).norm() / expected.norm().clamp_min(1e-30))


def assert_bf16_close(actual: torch.Tensor, expected: torch.Tensor, what: str, *, stages: int = LAYER_STAGES,
                      reduction: int = 1, unit_roundoff: float = U) -> None:
    """`actual` (bf16 run, or fp16 with `unit_roundoff=FP16_U`) within
    `bf16_tolerance(stages, reduction, unit_roundoff)` of `expected` (fp32 run)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    u = unit_roundoff
    error, tol = relative_error(actual, expected), bf16_tolerance(stages, reduction, u)
    assert error <= tol, (
        f"{what}: norm-wise relative error {error:.3e} = {error / u:.2f} u > {tol / u:.2f} u "
        f"(u = 2^{math.log2(u):.0f}, {stages} roundings, reductions of {reduction})"
    )
