"""Tests of `lightning_mpipemoe.kernels`: the custom ops, their CPU dispatch, the index helpers,
the Triton kernels under the interpreter (in a subprocess), and GPU checks (`--gpu`).

Every comparison is against the pure-PyTorch reference, outputs and every gradient, at awkward
sizes (100 and 600 rows, experts with no tokens, K = 1, 2, 8, padding on and off). The CPU
backend (`CpuBackend`, what the ops run on CPU) must match the reference bit for bit (`torch.equal`,
which takes -0.0 == 0.0), primitive by primitive and through the ops' autograd.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from kernels_helpers import assert_close, make_routing, poisoned_empty

from lightning_mpipemoe.kernels import api as kernels
from lightning_mpipemoe.kernels import ops, reference

REPO = Path(__file__).resolve().parents[1]


def _leaf(t: torch.Tensor, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
    return t.detach().to(dtype=dtype or t.dtype, device=device).clone().requires_grad_(True)


# --- Triton kernels under the interpreter (CPU) ------------------------------------------------


def test_triton_kernels_under_interpreter(tmp_path):
    """Runs tests/kernels_interpreted.py in a process started with TRITON_INTERPRET=1.

    Triton fixes compiled-or-interpreted for its own language helpers when it is first imported,
    and this process imported it long ago (torch does), hence the subprocess. The JUnit report
    is read back so that a skipped or missing case fails here too.
    """
    report = tmp_path / "interpreted.xml"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "tests/kernels_interpreted.py", "-q", "-p", "no:cacheprovider"]
    proc = subprocess.run(
        # A guard against a hang, not a speed check: the 54 cases take 130-190 s on a loaded 2-core machine.
        [*cmd, f"--junitxml={report}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"interpreted kernel tests failed:\n{tail}"
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key)) for key in ("tests", "failures", "errors", "skipped")}
    # One case compares against torch's own grouped_mm, which torch < 2.8 does not have.
    allowed_skips = 0 if hasattr(torch.nn.functional, "grouped_mm") else 1
    assert counts["failures"] == counts["errors"] == 0 and counts["skipped"] == allowed_skips, f"{counts}\n{tail}"
    assert counts["tests"] >= 50, f"only {counts['tests']} interpreted cases ran:\n{tail}"


# --- the custom ops on CPU (CpuBackend, checked against the reference) -------------------------

ROUTINGS = [
    (100, 1, 4, (2,)),
    (100, 2, 6, (0, 5)),
    (100, 8, 10, (3, 7)),
    (600, 2, 8, (1,)),
    (600, 8, 9, (4,)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("routing_case", ROUTINGS, ids=lambda c: f"T{c[0]}-K{c[1]}-E{c[2]}")
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_cpu_ops_match_reference_autograd(dtype, routing_case, padded):
    """The ops' registered backward formulas against autograd through the reference functions."""
    num_tokens, top_k, num_experts, empty = routing_case
    routing = make_routing(num_tokens, top_k, num_experts, empty_experts=empty, drop_every=7 if top_k > 1 else 0)
    src_row, pos, offsets = routing.src_row_S, routing.pos_TK, routing.offsets_E
    if padded:
        layout = kernels.pad_segments(src_row, routing.counts_E, block=8)
        src_row, pos, offsets = layout.src_row_P, layout.pad_pos(pos), layout.offsets_E
    gen = torch.Generator().manual_seed(5)
    hidden_TH = torch.randn(num_tokens, 24, generator=gen)
    weights_TK = torch.rand(num_tokens, top_k, generator=gen)
    w_EOD = torch.randn(num_experts, 16, 24, generator=gen) / 5
    grad_TH = torch.randn(num_tokens, 16, generator=gen)

    def run(permute, grouped_mm, unpermute, leaves):
        x, w, w_e = leaves
        rows = permute(x, src_row)
        out = unpermute(grouped_mm(rows, w_e, offsets), pos, w)
        (out.float() * grad_TH).sum().backward()
        return out

    got = [_leaf(hidden_TH, dtype), _leaf(weights_TK), _leaf(w_EOD, dtype)]
    out = run(lambda x, s: kernels.permute(x, s, pos), kernels.grouped_mm, kernels.unpermute, got)
    ref = [_leaf(t.detach()) for t in got]
    out_ref = run(kernels.permute_reference, kernels.grouped_mm_reference, kernels.unpermute_reference, ref)
    assert out.dtype == dtype
    assert_close(out, out_ref, dtype, "output")
    for name, a, b in zip(["hidden", "weights", "w"], got, ref):
        assert a.grad.dtype == a.dtype
        assert_close(a.grad, b.grad, dtype, f"grad {name}")


@pytest.mark.parametrize("counts, tail", [([30, 0, 45, 0, 15], 10), ([0, 0, 0], 7), ([600], 0)])
def test_cpu_grouped_mm_zero_tail_and_empty_experts(counts, tail):
    offsets = torch.cumsum(torch.tensor(counts), 0)
    x = _leaf(torch.randn(sum(counts) + tail, 12))
    w = _leaf(torch.randn(len(counts), 20, 12))
    y = kernels.grouped_mm(x, w, offsets)
    y.backward(torch.randn_like(y))
    end = sum(counts)
    assert torch.all(y[end:] == 0) and torch.all(x.grad[end:] == 0)
    for e, count in enumerate(counts):
        if count == 0:
            assert torch.all(w.grad[e] == 0)
    start = 0
    for e, count in enumerate(counts):
        torch.testing.assert_close(y[start : start + count], x[start : start + count] @ w[e].T)
        start += count


def _routing_layout(routing_case, padded: bool):
    """(src_row, pos, offsets) of a ROUTINGS case: some slots dropped (-1 in pos) for K > 1; when
    padded, padding rows (-1 in src_row, read by no token) and spare rows past the last offset."""
    num_tokens, top_k, num_experts, empty = routing_case
    routing = make_routing(num_tokens, top_k, num_experts, empty_experts=empty, drop_every=7 if top_k > 1 else 0)
    if not padded:
        return routing.src_row_S, routing.pos_TK, routing.offsets_E
    layout = kernels.pad_segments(routing.src_row_S, routing.counts_E, block=8)
    return layout.src_row_P, layout.pad_pos(routing.pos_TK), layout.offsets_E


def _assert_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (
        f"{what}: {actual.dtype} {tuple(actual.shape)} vs {expected.dtype} {tuple(expected.shape)}"
    )
    if not torch.equal(actual, expected):
        diff = (actual.double() - expected.double()).abs()
        raise AssertionError(f"{what}: not bit-identical, max |diff| {float(diff.nan_to_num(float('inf')).max()):.3g}")


@pytest.mark.parametrize("weights_dtype", ["same", "fp32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("routing_case", ROUTINGS, ids=lambda c: f"T{c[0]}-K{c[1]}-E{c[2]}")
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_cpu_backend_primitives_equal_reference(dtype, weights_dtype, routing_case, padded):
    """Each of the six primitives of CpuBackend against its reference function, bit for bit.

    Under `poisoned_empty` an output row the lean code leaves unwritten is NaN, never a zero.
    """
    src_row, pos, offsets = _routing_layout(routing_case, padded)
    num_tokens, top_k = pos.shape
    num_rows, num_experts = src_row.shape[0], offsets.shape[0]
    gen = torch.Generator().manual_seed(11)
    w_dtype = dtype if weights_dtype == "same" else torch.float32
    hidden_TH = torch.randn(num_tokens, 24, generator=gen).to(dtype)
    rows_SH = torch.randn(num_rows, 24, generator=gen).to(dtype)
    weights_TK = torch.rand(num_tokens, top_k, generator=gen).to(w_dtype)
    grad_out_TH = torch.randn(num_tokens, 24, generator=gen).to(dtype)
    w_EOD = (torch.randn(num_experts, 16, 24, generator=gen) / 5).to(dtype)
    grad_y_SO = torch.randn(num_rows, 16, generator=gen).to(dtype)
    cpu = kernels.CpuBackend()
    with poisoned_empty():
        _assert_equal(cpu.permute(hidden_TH, src_row, pos), reference.permute_reference(hidden_TH, src_row), "permute")
        _assert_equal(
            cpu.permute_backward(rows_SH, src_row, pos, num_tokens),
            reference.permute_backward_reference(rows_SH, src_row, num_tokens),
            "permute backward",
        )
        _assert_equal(cpu.unpermute(rows_SH, pos, weights_TK), reference.unpermute_reference(rows_SH, pos, weights_TK), "unpermute")
        for rows in (rows_SH, None):
            got = cpu.unpermute_backward(grad_out_TH, pos, weights_TK, rows, num_rows)
            expected = reference.unpermute_backward_reference(grad_out_TH, pos, weights_TK, rows, num_rows)
            _assert_equal(got[0], expected[0], f"unpermute backward rows (rows kept: {rows is not None})")
            _assert_equal(got[1], expected[1], f"unpermute backward weights (rows kept: {rows is not None})")
        _assert_equal(cpu.grouped_mm(rows_SH, w_EOD, offsets), reference.grouped_mm_reference(rows_SH, w_EOD, offsets), "grouped mm")
        w_EDO = w_EOD.transpose(1, 2)  # the input-gradient form the autograd formula calls
        _assert_equal(
            cpu.grouped_mm(grad_y_SO, w_EDO, offsets), reference.grouped_mm_reference(grad_y_SO, w_EDO, offsets), "grouped mm (w^T)"
        )
        _assert_equal(
            cpu.grouped_mm_weight_grad(grad_y_SO, rows_SH, offsets),
            reference.grouped_mm_weight_grad_reference(grad_y_SO, rows_SH, offsets),
            "grouped mm weight grad",
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("routing_case", ROUTINGS, ids=lambda c: f"T{c[0]}-K{c[1]}-E{c[2]}")
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_cpu_backend_ops_equal_reference_backend(dtype, routing_case, padded):
    """The ops' forward and every gradient on CpuBackend (the CPU default) against the same ops on
    ReferenceBackend, bit for bit: an expert FFN (regroup permutations, gated grouped GEMMs)
    between a permute and a weighted unpermute."""
    src_row, pos, offsets = _routing_layout(routing_case, padded)
    num_tokens, top_k = pos.shape
    num_rows, num_experts = src_row.shape[0], offsets.shape[0]
    gen = torch.Generator().manual_seed(7)
    regroup_S = torch.randperm(num_rows, generator=gen)  # a permutation: the gather backward
    tensors = [
        torch.randn(num_tokens, 24, generator=gen).to(dtype),
        torch.rand(num_tokens, top_k, generator=gen),
        (torch.randn(num_experts, 32, 24, generator=gen) / 5).to(dtype),
        (torch.randn(num_experts, 24, 16, generator=gen) / 4).to(dtype),
    ]
    grad_TH = torch.randn(num_tokens, 24, generator=gen)

    def run():
        x, w, w_in, w_out = leaves = [_leaf(t) for t in tensors]
        rows = kernels.permute(kernels.permute(x, src_row, pos), regroup_S)
        gate, up = kernels.grouped_mm(rows, w_in, offsets).chunk(2, dim=-1)
        y = kernels.permute(kernels.grouped_mm(F.silu(gate) * up, w_out, offsets), torch.argsort(regroup_S))
        out = kernels.unpermute(y, pos, w)
        (out.float() * grad_TH).sum().backward()
        return [out, *(leaf.grad for leaf in leaves)]

    assert isinstance(kernels.backend_for(torch.device("cpu")), kernels.CpuBackend)
    with poisoned_empty():
        got = run()
        with kernels.use_backend("cpu", kernels.ReferenceBackend()):
            expected = run()
    for name, a, b in zip(["output", "grad hidden", "grad weights", "grad w_in", "grad w_out"], got, expected):
        _assert_equal(a, b, name)


def test_cpu_backend_edge_cases():
    """Empty inputs, all-padding indices, a gather-path permute backward (at most one row per
    token, some tokens without one), a row read twice in unpermute (falls back to the reference's
    sum) and non-finite values in rows that padding never reads."""
    cpu = kernels.CpuBackend()
    gen = torch.Generator().manual_seed(3)
    with poisoned_empty():
        # empty tokens / rows / experts
        empty_H = torch.randn(0, 5)
        _assert_equal(cpu.permute(empty_H, torch.tensor([-1, -1]), None), torch.zeros(2, 5), "permute of nothing")
        _assert_equal(cpu.permute(empty_H, torch.zeros(0, dtype=torch.int64), None), torch.zeros(0, 5), "empty permute")
        x, w = torch.randn(6, 4, generator=gen), torch.randn(0, 3, 4)
        _assert_equal(cpu.grouped_mm(x, w, torch.zeros(0, dtype=torch.int64)), torch.zeros(6, 3), "no experts")
        _assert_equal(
            cpu.grouped_mm_weight_grad(torch.randn(6, 3), x, torch.tensor([0, 0])), torch.zeros(2, 3, 4), "no rows"
        )
        pos = torch.full((3, 2), -1)
        weights = torch.rand(3, 2, generator=gen)
        for got, expected in zip(
            cpu.unpermute_backward(torch.randn(3, 4), pos, weights, torch.randn(5, 4), 5),
            reference.unpermute_backward_reference(torch.randn(3, 4), pos, weights, torch.randn(5, 4), 5),
        ):
            _assert_equal(got, expected, "all slots dropped")
        # the gather path of permute backward: injective with and without misses, int32 index
        grad_rows = torch.randn(7, 4, generator=gen)
        for src in ([3, 0, 6, 5, 1, 2, 4], [3, -1, 6, 5, 1, -1, 0], [9, 1, 8, 4, -1, 2, 0]):
            for dtype in (torch.int64, torch.int32):
                index = torch.tensor(src, dtype=dtype)
                tokens = max(src) + 1
                _assert_equal(
                    cpu.permute_backward(grad_rows, index, None, tokens),
                    reference.permute_backward_reference(grad_rows, index, tokens),
                    f"permute backward {src} {dtype}",
                )
        # a row read twice breaks unpermute's contract; the backward still sums like the reference
        pos_twice = torch.tensor([[0, 2], [2, 1]])
        grad_out, rows = torch.randn(2, 4, generator=gen), torch.randn(3, 4, generator=gen)
        for got, expected in zip(
            cpu.unpermute_backward(grad_out, pos_twice, weights[:2], rows, 3),
            reference.unpermute_backward_reference(grad_out, pos_twice, weights[:2], rows, 3),
        ):
            _assert_equal(got, expected, "row read twice")
    # padding reads zeros even where row 0 (what a clamped index reads) is not finite
    hidden = torch.randn(4, 3, generator=gen)
    hidden[0] = float("nan")
    src = torch.tensor([1, -1, 0, -1])
    got, expected = cpu.permute(hidden, src, None), reference.permute_reference(hidden, src)
    assert torch.all(got[[1, 3]] == 0) and torch.equal(got[[0, 1, 3]], expected[[0, 1, 3]]) and got[2].isnan().all()
    rows = torch.randn(3, 3, generator=gen)
    rows[0] = float("inf")
    pos = torch.tensor([[1, -1], [2, -1]])
    weights = torch.rand(2, 2, generator=gen)
    _assert_equal(cpu.unpermute(rows, pos, weights), reference.unpermute_reference(rows, pos, weights), "non-finite unread row")


@pytest.mark.parametrize("backend", [kernels.CpuBackend(), kernels.ReferenceBackend()], ids=["cpu", "reference"])
def test_weight_grad_out_dtype_and_accumulate(backend):
    """The weight gradient in a wider dtype (bf16 operands, fp32 result: the products of the
    upcast operands, unrounded) and accumulated in place, an expert without rows included."""
    gen = torch.Generator().manual_seed(3)
    grad_y_SO = torch.randn(13, 5, generator=gen).bfloat16()
    x_SD = torch.randn(13, 4, generator=gen).bfloat16()
    offsets = torch.tensor([3, 3, 9, 13])  # expert 1 has no rows
    exact = reference.grouped_mm_weight_grad_reference(grad_y_SO.float(), x_SD.float(), offsets)
    with kernels.use_backend("cpu", backend):
        wide = kernels.grouped_mm_weight_grad(grad_y_SO, x_SD, offsets, out_dtype=torch.float32)
        assert wide.dtype == torch.float32
        torch.testing.assert_close(wide, exact, atol=1e-6, rtol=1e-6)
        assert kernels.grouped_mm_weight_grad(grad_y_SO, x_SD, offsets).dtype == torch.bfloat16
        total = torch.ones(4, 5, 4)
        returned = kernels.grouped_mm_weight_grad(grad_y_SO, x_SD, offsets, accumulate=total)
        assert returned is total
        torch.testing.assert_close(total, exact + 1, atol=1e-6, rtol=1e-6)
        assert torch.equal(total[1], torch.ones(5, 4)), "an expert without rows adds nothing"
        with pytest.raises(ValueError, match="accumulate must be a floating tensor of shape"):
            kernels.grouped_mm_weight_grad(grad_y_SO, x_SD, offsets, accumulate=torch.zeros(4, 5, 3))


def test_unpermute_mixed_dtypes_promote_then_cast():
    """bf16 rows with fp32 weights: fp32 products and sum, bf16 result, fp32 weight gradient."""
    rows = _leaf(torch.randn(6, 8, dtype=torch.bfloat16))
    pos = torch.tensor([[0, 3], [5, -1], [1, 2]])
    weights = _leaf(torch.rand(3, 2))
    out = kernels.unpermute(rows, pos, weights)
    assert out.dtype == torch.bfloat16
    expected = (rows.float()[0] * weights[0, 0] + rows.float()[3] * weights[0, 1]).to(torch.bfloat16)
    torch.testing.assert_close(out[0], expected)
    out.float().sum().backward()
    assert weights.grad.dtype == torch.float32
    torch.testing.assert_close(weights.grad[1, 1], torch.tensor(0.0))
    assert torch.all(rows.grad[4] == 0)  # row 4 is read by no token


def test_grouped_mm_follows_autocast_like_matmul():
    x, w = _leaf(torch.randn(10, 8)), _leaf(torch.randn(2, 6, 8))
    offsets = torch.tensor([4, 10])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = kernels.grouped_mm(x, w, offsets)
        expected = torch.cat([x[:4] @ w[0].T, x[4:] @ w[1].T])
    assert y.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected)
    y.float().sum().backward()
    assert x.grad.dtype == w.grad.dtype == torch.float32


def test_round_trip_is_identity_with_unit_weights():
    routing = make_routing(100, 2, 4)
    x = _leaf(torch.randn(100, 8))
    rows = kernels.permute(x, routing.src_row_S, routing.pos_TK)
    out = kernels.unpermute(rows, routing.pos_TK, torch.full((100, 2), 0.5))
    grad = torch.randn(100, 8)
    out.backward(grad)
    torch.testing.assert_close(out, x.detach())
    torch.testing.assert_close(x.grad, grad)


def _saved_tensor_ids(fn):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


def test_backward_keeps_only_what_it_needs():
    """unpermute keeps the rows only for a weight gradient; grouped_mm keeps x only for a w gradient."""
    rows = torch.randn(6, 8, requires_grad=True)
    pos = torch.tensor([[0, 3], [5, -1], [1, 2]])
    fixed_w, free_w = torch.rand(3, 2), torch.rand(3, 2, requires_grad=True)

    def holds(saved, t):
        return any(s is t for s in saved)

    assert not holds(_saved_tensor_ids(lambda: kernels.unpermute(rows, pos, fixed_w)), rows)
    assert holds(_saved_tensor_ids(lambda: kernels.unpermute(rows, pos, free_w)), rows)
    x = torch.randn(10, 8, requires_grad=True)
    offsets = torch.tensor([4, 10])
    frozen, trained = torch.randn(2, 5, 8), torch.randn(2, 5, 8, requires_grad=True)
    assert not holds(_saved_tensor_ids(lambda: kernels.grouped_mm(x, frozen, offsets)), x)
    assert holds(_saved_tensor_ids(lambda: kernels.grouped_mm(x, trained, offsets)), x)


def _opcheck_cases():
    routing = make_routing(20, 2, 4, empty_experts=(1,), drop_every=5)
    layout = kernels.pad_segments(routing.src_row_S, routing.counts_E, block=4)
    hidden = torch.randn(20, 8, requires_grad=True)
    weights = torch.rand(20, 2, requires_grad=True)
    rows = torch.randn(len(routing.src_row_S), 8, requires_grad=True)
    x = torch.randn(len(routing.src_row_S) + 3, 8, requires_grad=True)
    w = torch.randn(4, 6, 8, requires_grad=True)
    return [
        (ops.permute_op, (hidden, routing.src_row_S, routing.pos_TK)),
        (ops.permute_op, (hidden, layout.src_row_P)),
        (ops.unpermute_op, (rows, routing.pos_TK, weights)),
        (ops.grouped_mm_op, (x, w, routing.offsets_E)),
        (ops.permute_backward_op, (rows.detach(), routing.src_row_S, None, 20)),
        (ops.unpermute_backward_op, (hidden.detach(), routing.pos_TK, weights.detach(), rows.detach(), rows.shape[0])),
        (ops.unpermute_backward_op, (hidden.detach(), routing.pos_TK, weights.detach(), None, rows.shape[0])),
        (ops.grouped_mm_weight_grad_op, (torch.randn(x.shape[0], 6), x.detach(), routing.offsets_E)),
    ]


@pytest.mark.parametrize("case", range(8))
def test_opcheck(case):
    """Schema, fake kernel, autograd registration and AOT dispatch of every op (CPU)."""
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_ops_check_their_arguments():
    x, src = torch.randn(4, 3), torch.tensor([0, 1])
    with pytest.raises(TypeError, match="src_row"):
        kernels.permute(x, src.float())
    with pytest.raises(ValueError, match="hidden"):
        kernels.permute(x[0], src)
    with pytest.raises(ValueError, match="weights"):
        kernels.unpermute(x, torch.tensor([[0, 1]]), torch.rand(1, 3))
    w = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="need x"):
        kernels.grouped_mm(x, w.transpose(1, 2), torch.tensor([1, 4]))
    with pytest.raises(TypeError, match="float64"):
        kernels.grouped_mm(x.double(), w, torch.tensor([1, 4]))
    with pytest.raises(ValueError, match="offsets has 3"):
        kernels.grouped_mm(x, w, torch.tensor([1, 2, 4]))


# --- backend selection --------------------------------------------------------------------------


class _NegatingBackend(kernels.ReferenceBackend):
    def permute(self, hidden_TH, src_row_S, pos_TK):
        return -super().permute(hidden_TH, src_row_S, pos_TK)


def test_backend_follows_device_and_use_backend_restores():
    cpu = torch.device("cpu")
    default = kernels.backend_for(cpu)
    assert isinstance(default, kernels.CpuBackend)
    x, src = torch.randn(3, 2), torch.tensor([2, 0])
    with kernels.use_backend("cpu", _NegatingBackend()):
        torch.testing.assert_close(kernels.permute(x, src), -x[src])
    assert kernels.backend_for(cpu) is default
    kernels.set_backend("cpu", kernels.ReferenceBackend())
    try:
        assert isinstance(kernels.backend_for(cpu), kernels.ReferenceBackend)
    finally:
        kernels.set_backend("cpu", None)
    assert isinstance(kernels.backend_for(cpu), kernels.CpuBackend)
    torch.testing.assert_close(kernels.permute(x, src), x[src])
    assert isinstance(kernels.backend_for(torch.device("meta")), kernels.ReferenceBackend)


def test_import_needs_no_triton():
    """Without Triton the package imports and runs on CPU, and use_backend reaches the ops.
    (That the repository's `kernels/` never shadows Hugging Face's is tests/test_packaging.py's.)"""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import transformers.activations\n"
        "import torch, lightning_mpipemoe\n"
        "from lightning_mpipemoe.kernels import api as kernels\n"
        "x = torch.randn(3, 2); out = kernels.permute(x, torch.tensor([2, -1]))\n"
        "assert torch.equal(out, torch.stack([x[2], torch.zeros(2)]))\n"
        "assert not any(m.startswith('lightning_mpipemoe.kernels.triton') for m in sys.modules)\n"
        "class Neg(kernels.ReferenceBackend):\n"
        "    def permute(self, h, s, p): return -super().permute(h, s, p)\n"
        "with kernels.use_backend('cpu', Neg()): assert torch.equal(kernels.permute(x, torch.tensor([2])), -x[[2]])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


# --- index helpers ------------------------------------------------------------------------------


def test_pad_segments_hand_worked():
    src = torch.tensor([5, 1, 7, 2, 0])  # experts: [5, 1, 7] -> 0, [] -> 1, [2, 0] -> 2
    layout = kernels.pad_segments(src, torch.tensor([3, 0, 2]), block=4)
    assert layout.offsets_E.tolist() == [4, 4, 8]
    assert layout.row_map_S.tolist() == [0, 1, 2, 4, 5]
    assert layout.src_row_P.tolist() == [5, 1, 7, -1, 2, 0, -1, -1] + [-1] * 6  # room for 5 + 3 * 3 rows
    assert layout.pad_pos(torch.tensor([[0, 3], [4, -1]])).tolist() == [[0, 4], [5, -1]]
    exact = kernels.pad_segments(src, torch.tensor([3, 0, 2]), block=4, num_rows=8)
    assert exact.src_row_P.tolist() == [5, 1, 7, -1, 2, 0, -1, -1]
    same = kernels.pad_segments(src, torch.tensor([3, 0, 2]), block=1)
    assert same.src_row_P.tolist() == src.tolist() and same.offsets_E.tolist() == [3, 3, 5]


@pytest.mark.parametrize("block", [1, 8, 16])
def test_pad_segments_keeps_each_segment_in_order(block):
    routing = make_routing(600, 2, 8, empty_experts=(3,), drop_every=11)
    layout = kernels.pad_segments(routing.src_row_S, routing.counts_E, block=block)
    padded_counts = kernels.segment_counts(layout.offsets_E)
    assert torch.all(padded_counts % block == 0) and torch.all(padded_counts >= routing.counts_E)
    start = padded_start = 0
    for count, padded in zip(routing.counts_E.tolist(), padded_counts.tolist()):
        segment = layout.src_row_P[padded_start : padded_start + padded]
        assert segment[:count].tolist() == routing.src_row_S[start : start + count].tolist()
        assert torch.all(segment[count:] == -1)
        start, padded_start = start + count, padded_start + padded
    assert torch.all(layout.src_row_P[padded_start:] == -1)
    pos = layout.pad_pos(routing.pos_TK)
    live = pos >= 0
    tokens = torch.arange(600).unsqueeze(1).expand_as(pos)
    assert torch.equal(layout.src_row_P[pos[live]], tokens[live])
    assert torch.equal(live, routing.pos_TK >= 0)


def test_invert_src_rows():
    pos = kernels.invert_src_rows(torch.tensor([2, 0, 2, -1, 1, -1]), num_tokens=4, max_copies=2)
    assert pos.tolist() == [[1, -1], [4, -1], [0, 2], [-1, -1]]
    routing = make_routing(100, 8, 10, drop_every=3)
    pos = kernels.invert_src_rows(routing.src_row_S, 100, 8)
    assert torch.equal(pos.sort(dim=1).values, routing.pos_TK.sort(dim=1).values)


def test_segment_counts():
    assert kernels.segment_counts(torch.tensor([3, 3, 7], dtype=torch.int32)).tolist() == [3, 0, 4]


# --- GPU ----------------------------------------------------------------------------------------

# bf16 is what runs; fp32 checks exactness (fp16 is covered by the interpreter tests).
GPU_DTYPES = [torch.bfloat16, torch.float32]


@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.fail("--gpu given but CUDA is not available")
    with poisoned_empty():
        yield torch.device("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("routing_case", [*ROUTINGS, (4096, 2, 8, ())], ids=lambda c: f"T{c[0]}-K{c[1]}-E{c[2]}")
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("with_pos", [True, False], ids=["pos", "nopos"])
def test_gpu_permute_unpermute(cuda, dtype, routing_case, padded, with_pos):
    num_tokens, top_k, num_experts, empty = routing_case
    routing = make_routing(num_tokens, top_k, num_experts, empty_experts=empty, drop_every=7 if top_k > 1 else 0)
    src_row, pos = routing.src_row_S, routing.pos_TK
    if padded:
        layout = kernels.pad_segments(src_row, routing.counts_E, block=16)
        src_row, pos = layout.src_row_P, layout.pad_pos(pos)
    hidden = 520  # not a power of two
    x_TH, w_TK, grad_TH = torch.randn(num_tokens, hidden), torch.rand(num_tokens, top_k), torch.randn(num_tokens, hidden)
    scale_S1 = torch.randn(src_row.shape[0], 1)

    def run(device, work_dtype):
        x, w = _leaf(x_TH, work_dtype, device), _leaf(w_TK, None, device)
        s, p = src_row.to(device), pos.to(device)
        rows = kernels.permute(x, s, p if with_pos else None)
        rows.retain_grad()
        out = kernels.unpermute(rows * scale_S1.to(device, work_dtype), p, w)
        (out.float() * grad_TH.to(device)).sum().backward()
        return rows, out, x, w

    got = run(cuda, dtype)
    ref = run(torch.device("cpu"), torch.float32)  # CPU: CpuBackend, bit-identical to the reference

    def results(rows, out, x, w):
        return {"rows": rows, "out": out, "grad hidden": x.grad, "grad weights": w.grad, "grad rows": rows.grad}

    expected = results(*ref)
    for name, value in results(*got).items():
        assert_close(value, expected[name], dtype, name)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "torch", "auto"])
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize(
    "segments", [([300, 0, 1200, 0, 500, 37, 0, 963], 100), ([0, 0, 0, 0], 64), ([600], 0)], ids=["mixed", "empty", "one"]
)
@pytest.mark.parametrize("in_out", [(256, 384), (200, 136)], ids=["aligned", "unaligned"])
def test_gpu_grouped_mm(cuda, impl, dtype, segments, in_out):
    from lightning_mpipemoe.kernels.triton_backend import TritonBackend

    if impl == "torch" and (dtype != torch.bfloat16 or not hasattr(F, "grouped_mm")):
        pytest.skip("torch.grouped_mm takes bf16 only")
    counts, tail = segments
    in_features, out_features = in_out
    offsets = torch.cumsum(torch.tensor(counts), 0)
    x_SD = torch.randn(sum(counts) + tail, in_features)
    w_EOD = torch.randn(len(counts), out_features, in_features) / in_features**0.5
    grad_SO = torch.randn(x_SD.shape[0], out_features)
    with kernels.use_backend("cuda", TritonBackend(grouped_mm_impl=impl)) as backend:
        x, w = _leaf(x_SD, dtype, cuda), _leaf(w_EOD, dtype, cuda)
        y = kernels.grouped_mm(x, w, offsets.to(cuda))
        (y.float() * grad_SO.to(cuda)).sum().backward()
    x_ref, w_ref = _leaf(x.detach().float().cpu()), _leaf(w.detach().float().cpu())
    y_ref = kernels.grouped_mm_reference(x_ref, w_ref, offsets)
    (y_ref * grad_SO).sum().backward()
    assert_close(y, y_ref, dtype, "output")
    assert_close(x.grad, x_ref.grad, dtype, "grad x")
    assert_close(w.grad, w_ref.grad, dtype, "grad w")
    if impl == "auto" and dtype == torch.bfloat16 and in_out == (256, 384) and sum(counts):
        assert set(backend.choices.values()) <= {"torch", "triton"} and backend.choices


@pytest.mark.gpu
def test_gpu_grouped_mm_tuned_configs(cuda):
    """Large enough to autotune over every config (forward, input grad, weight grad), bf16."""
    from lightning_mpipemoe.kernels.triton_backend import TritonBackend

    counts = [1500, 0, 2600, 1100, 900, 1300, 0, 800]
    offsets = torch.cumsum(torch.tensor(counts), 0).to(cuda)
    x = _leaf(torch.randn(sum(counts) + 96, 1024), torch.bfloat16, cuda)
    w = _leaf(torch.randn(8, 2048, 1024) / 32, torch.bfloat16, cuda)
    grad = torch.randn(x.shape[0], 2048, device=cuda)
    with kernels.use_backend("cuda", TritonBackend(grouped_mm_impl="triton")):
        y = kernels.grouped_mm(x, w, offsets)
        (y.float() * grad).sum().backward()
    x_ref, w_ref = _leaf(x.detach().float()), _leaf(w.detach().float())
    y_ref = kernels.grouped_mm_reference(x_ref, w_ref, offsets)
    (y_ref * grad).sum().backward()
    assert_close(y, y_ref, torch.bfloat16, "output")
    assert_close(x.grad, x_ref.grad, torch.bfloat16, "grad x")
    assert_close(w.grad, w_ref.grad, torch.bfloat16, "grad w")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_gpu_expert_pipeline_matches_cpu_reference(cuda, dtype):
    """A Mixtral-shaped layer in small: permute, gated grouped GEMMs, unpermute, padded to 128."""
    num_tokens, top_k, num_experts, hidden, inter = 1000, 2, 8, 256, 512
    routing = make_routing(num_tokens, top_k, num_experts, empty_experts=(5,))
    layout = kernels.pad_segments(routing.src_row_S, routing.counts_E, block=128)
    tensors = [
        torch.randn(num_tokens, hidden),
        torch.rand(num_tokens, top_k),
        torch.randn(num_experts, 2 * inter, hidden) / hidden**0.5,
        torch.randn(num_experts, hidden, inter) / inter**0.5,
    ]
    grad_TH = torch.randn(num_tokens, hidden)

    def run(device, work_dtype, src, pos, offsets):
        x, w, w1, w2 = (_leaf(t, work_dtype if i != 1 else None, device) for i, t in enumerate(tensors))
        rows = kernels.permute(x, src.to(device), pos.to(device))
        gate, up = kernels.grouped_mm(rows, w1, offsets.to(device)).chunk(2, dim=-1)
        y = kernels.grouped_mm(F.silu(gate) * up, w2, offsets.to(device))
        out = kernels.unpermute(y, pos.to(device), w)
        (out.float() * grad_TH.to(device)).sum().backward()
        return out, x.grad, w.grad, w1.grad, w2.grad

    got = run(cuda, dtype, layout.src_row_P, layout.pad_pos(routing.pos_TK), layout.offsets_E)
    ref = run(torch.device("cpu"), torch.float32, routing.src_row_S, routing.pos_TK, routing.offsets_E)
    for name, a, b in zip(["out", "grad hidden", "grad weights", "grad w_in", "grad w_out"], got, ref):
        assert_close(a, b, dtype, name)


def _chain(hidden, weights, w, routing):
    """permute -> grouped_mm -> unpermute through the public functions (the executor's chain)."""
    rows = kernels.permute(hidden, routing.src_row_S, routing.pos_TK)
    out = kernels.grouped_mm(rows, w, routing.offsets_E)
    return kernels.unpermute(out, routing.pos_TK, weights)


def test_eager_path_equals_the_custom_ops_and_compiles():
    """Outside torch.compile the public functions skip the custom-op dispatch; under it they
    call the ops. Both give the same bits, outputs and every gradient, and the chain compiles
    (aot_eager: tracing through the ops' fake kernels and autograd, no C++ toolchain)."""
    routing = make_routing(37, 2, 4, empty_experts=(2,), drop_every=5)
    hidden, weights = torch.randn(37, 8), torch.rand(37, 2)
    w = torch.randn(4, 6, 8)
    cot = torch.randn(37, 6)

    def run(forward):
        leaves = [_leaf(hidden), _leaf(weights), _leaf(w)]
        out = forward(*leaves, routing)
        out.backward(cot)
        return [out.detach(), *(leaf.grad for leaf in leaves)]

    def through_ops(hidden, weights, w, routing):
        rows = ops.permute_op(hidden, routing.src_row_S, routing.pos_TK)
        out = ops.grouped_mm_op(rows, w, routing.offsets_E)
        return ops.unpermute_op(out, routing.pos_TK, weights)

    eager, custom = run(_chain), run(through_ops)
    assert all(torch.equal(a, b) for a, b in zip(eager, custom))
    assert all(g is not None and g.abs().sum() > 0 for g in eager[1:])
    torch._dynamo.reset()
    compiled = run(torch.compile(_chain, backend="aot_eager", fullgraph=True))
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))
    # Weight gradients outside autograd: plain, into fp32, and accumulated in place.
    grad_y, x = torch.randn(40, 6), torch.randn(40, 8)
    offsets = torch.tensor([10, 10, 25, 33])
    plain = kernels.grouped_mm_weight_grad(grad_y, x, offsets)
    assert torch.equal(plain, ops.grouped_mm_weight_grad_op(grad_y, x, offsets))
    acc = torch.ones(4, 6, 8)
    kernels.grouped_mm_weight_grad(grad_y, x, offsets, accumulate=acc)
    torch.testing.assert_close(acc, plain + 1)
    assert torch.equal(plain[1], torch.zeros(6, 8))
