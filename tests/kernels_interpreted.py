"""Triton kernels on CPU under TRITON_INTERPRET=1, through the custom ops, against the reference.

Not collected by a plain `pytest` run (the name has no `test_` prefix): Triton must see
TRITON_INTERPRET before it is first imported, so tests/test_kernels.py runs this file in a
subprocess that starts with the variable set. To run it by hand:

    TRITON_INTERPRET=1 python -m pytest tests/kernels_interpreted.py -q

Every case routes CPU tensors to `TritonBackend` with `use_backend`, so the custom ops, their
autograd formulas and the kernels run exactly as on CUDA, and compares outputs and every
gradient with the pure-PyTorch reference in fp32. fp32 and fp16 only: the interpreter's bf16
`tl.dot` is wrong.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 from process start (run via tests/test_kernels.py)", allow_module_level=True)

from kernels_helpers import assert_close, make_routing, poisoned_empty  # noqa: E402

from lightning_mpipemoe.kernels import api as kernels  # noqa: E402
from lightning_mpipemoe.kernels import triton_permute  # noqa: E402
from lightning_mpipemoe.kernels.triton_backend import TritonBackend  # noqa: E402

DTYPES = [torch.float32, torch.float16]


@pytest.fixture(autouse=True)
def poison_uninitialised_memory():
    with poisoned_empty():
        yield


@pytest.fixture(scope="module")
def triton_on_cpu():
    with kernels.use_backend("cpu", TritonBackend(grouped_mm_impl="triton")) as backend:
        yield backend


def _leaf(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return t.detach().to(dtype or t.dtype).clone().requires_grad_(True)


# --- permute / unpermute ------------------------------------------------------------------

# (tokens, top_k, experts, experts with no tokens, hidden); 40 is not a power of two.
ROUTINGS = [
    (100, 1, 4, (2,), 40),
    (100, 2, 6, (0, 5), 40),
    (100, 8, 10, (3, 7), 40),
    (600, 2, 8, (1,), 40),
    (600, 8, 9, (4,), 24),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("routing_case", ROUTINGS, ids=lambda c: f"T{c[0]}-K{c[1]}-E{c[2]}")
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_permute_unpermute_match_reference(triton_on_cpu, dtype, routing_case, padded):
    num_tokens, top_k, num_experts, empty, hidden = routing_case
    routing = make_routing(num_tokens, top_k, num_experts, empty_experts=empty, drop_every=7 if top_k > 1 else 0)
    src_row, pos = routing.src_row_S, routing.pos_TK
    if padded:
        layout = kernels.pad_segments(src_row, routing.counts_E, block=8)
        src_row, pos = layout.src_row_P, layout.pad_pos(pos)
    assert (src_row < 0).any() == padded or not padded
    gen = torch.Generator().manual_seed(1)
    hidden_TH = torch.randn(num_tokens, hidden, generator=gen)
    weights_TK = torch.rand(num_tokens, top_k, generator=gen)  # fp32, as routers give them
    scale_S1 = torch.randn(src_row.shape[0], 1, generator=gen)
    grad_TH = torch.randn(num_tokens, hidden, generator=gen)

    def run(permute, unpermute, x, w, work_dtype):
        rows = permute(x, src_row)
        rows.retain_grad()
        out = unpermute(rows * scale_S1.to(work_dtype), pos, w)
        (out.float() * grad_TH).sum().backward()
        return rows, out

    x, w = _leaf(hidden_TH, dtype), _leaf(weights_TK)
    rows, out = run(lambda h, s: kernels.permute(h, s, pos), kernels.unpermute, x, w, dtype)
    x_ref, w_ref = _leaf(x.detach().float()), _leaf(weights_TK)
    rows_ref, out_ref = run(kernels.permute_reference, kernels.unpermute_reference, x_ref, w_ref, torch.float32)

    assert rows.dtype == dtype and out.dtype == dtype
    assert_close(rows, rows_ref, dtype, "permute output")
    assert_close(out, out_ref, dtype, "unpermute output")
    assert_close(rows.grad, rows_ref.grad, dtype, "unpermute grad rows")
    assert_close(w.grad, w_ref.grad, dtype, "unpermute grad weights")
    assert_close(x.grad, x_ref.grad, dtype, "permute grad hidden")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_tokens, top_k", [(100, 2), (600, 1)])
def test_permute_without_inverse_map(triton_on_cpu, dtype, num_tokens, top_k):
    """The row-major gather forward, and a backward that derives the inverse map itself."""
    routing = make_routing(num_tokens, top_k, 5, empty_experts=(2,), drop_every=5)
    layout = kernels.pad_segments(routing.src_row_S, routing.counts_E, block=4)
    hidden_TH = torch.randn(num_tokens, 40)
    grad_SH = torch.randn(layout.src_row_P.shape[0], 40)
    x = _leaf(hidden_TH, dtype)
    rows = kernels.permute(x, layout.src_row_P)
    (rows.float() * grad_SH).sum().backward()
    x_ref = _leaf(x.detach().float())
    rows_ref = kernels.permute_reference(x_ref, layout.src_row_P)
    (rows_ref * grad_SH).sum().backward()
    assert_close(rows, rows_ref, dtype, "permute output")
    assert_close(x.grad, x_ref.grad, dtype, "permute grad hidden")


@pytest.mark.parametrize("top_k", [1, 8])
def test_permute_kernels_loop_over_hidden_chunks(triton_on_cpu, monkeypatch, top_k):
    """A small register tile makes every kernel walk H in several chunks, the GPU-sized case."""
    monkeypatch.setattr(triton_permute, "_TILE", 64)
    routing = make_routing(40, top_k, 9, empty_experts=(0,), drop_every=3)
    layout = kernels.pad_segments(routing.src_row_S, routing.counts_E, block=4)
    src_row, pos = layout.src_row_P, layout.pad_pos(routing.pos_TK)
    x, w = _leaf(torch.randn(40, 72)), _leaf(torch.rand(40, top_k))
    x_ref, w_ref = _leaf(x.detach()), _leaf(w.detach())
    grad_TH = torch.randn(40, 72)
    for permute_pos in (pos, None):
        x.grad = w.grad = x_ref.grad = w_ref.grad = None
        out = kernels.unpermute(kernels.permute(x, src_row, permute_pos), pos, w)
        (out * grad_TH).sum().backward()
        out_ref = kernels.unpermute_reference(kernels.permute_reference(x_ref, src_row), pos, w_ref)
        (out_ref * grad_TH).sum().backward()
        assert_close(out, out_ref, torch.float32, "round trip output")
        assert_close(x.grad, x_ref.grad, torch.float32, "grad hidden")
        assert_close(w.grad, w_ref.grad, torch.float32, "grad weights")


def test_round_trip_returns_input_and_gradient(triton_on_cpu):
    """Unit weights: unpermute(permute(x)) == K * x, and the gradient is K * incoming grad."""
    routing = make_routing(100, 2, 4)
    x = _leaf(torch.randn(100, 40))
    out = kernels.unpermute(kernels.permute(x, routing.src_row_S, routing.pos_TK), routing.pos_TK, torch.ones(100, 2))
    grad = torch.randn(100, 40)
    out.backward(grad)
    torch.testing.assert_close(out, 2 * x.detach())
    torch.testing.assert_close(x.grad, 2 * grad)


# --- grouped GEMM --------------------------------------------------------------------------

# Rows per expert; "tail" rows past the last offset must come out (and get gradients) zero.
SEGMENTS = {
    "S100-empty-tail": ([30, 0, 45, 0, 15], 10),
    "S600-empty": ([0, 200, 150, 0, 250], 0),
    "S600-one-expert-tail": ([580], 20),
    "S100-all-empty": ([0, 0, 0], 100),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("segments", list(SEGMENTS), ids=str)
@pytest.mark.parametrize("in_out", [(40, 24), (64, 96)], ids=lambda d: f"D{d[0]}-O{d[1]}")
def test_grouped_mm_matches_reference(triton_on_cpu, dtype, segments, in_out):
    counts, tail = SEGMENTS[segments]
    in_features, out_features = in_out
    offsets_E = torch.cumsum(torch.tensor(counts), 0)
    num_rows = sum(counts) + tail
    gen = torch.Generator().manual_seed(2)
    x_SD = torch.randn(num_rows, in_features, generator=gen)
    w_EOD = torch.randn(len(counts), out_features, in_features, generator=gen) / in_features**0.5
    grad_SO = torch.randn(num_rows, out_features, generator=gen)

    x, w = _leaf(x_SD, dtype), _leaf(w_EOD, dtype)
    y = kernels.grouped_mm(x, w, offsets_E)
    (y.float() * grad_SO).sum().backward()
    x_ref, w_ref = _leaf(x.detach().float()), _leaf(w.detach().float())
    y_ref = kernels.grouped_mm_reference(x_ref, w_ref, offsets_E)
    (y_ref * grad_SO).sum().backward()

    assert y.dtype == dtype
    assert_close(y, y_ref, dtype, "grouped_mm output")
    assert_close(x.grad, x_ref.grad, dtype, "grouped_mm grad x")
    assert_close(w.grad, w_ref.grad, dtype, "grouped_mm grad w")
    tail_start = sum(counts)
    assert torch.all(y[tail_start:] == 0) and torch.all(x.grad[tail_start:] == 0)


def test_grouped_mm_int32_offsets(triton_on_cpu):
    x, w = torch.randn(100, 40), torch.randn(3, 24, 40)
    offsets = torch.tensor([20, 20, 90], dtype=torch.int32)
    assert_close(kernels.grouped_mm(x, w, offsets), kernels.grouped_mm_reference(x, w, offsets), torch.float32, "int32")


def test_grouped_mm_torch_impl_zeroes_tail_rows():
    """The torch.grouped_mm path (CPU fallback, fp32) plus the tail-zeroing kernel."""
    if not hasattr(F, "grouped_mm"):
        pytest.skip("this torch has no torch.nn.functional.grouped_mm")
    counts, tail = [30, 0, 45, 0, 15], 10
    offsets_E = torch.cumsum(torch.tensor(counts), 0)
    x = _leaf(torch.randn(sum(counts) + tail, 40))
    w = _leaf(torch.randn(5, 24, 40))
    with kernels.use_backend("cpu", TritonBackend(grouped_mm_impl="torch")):
        y = kernels.grouped_mm(x, w, offsets_E)
        grad = torch.randn_like(y)
        y.backward(grad)
    x_ref, w_ref = _leaf(x.detach()), _leaf(w.detach())
    y_ref = kernels.grouped_mm_reference(x_ref, w_ref, offsets_E)
    y_ref.backward(grad)
    assert_close(y, y_ref, torch.float32, "torch grouped_mm output")
    assert_close(x.grad, x_ref.grad, torch.float32, "torch grouped_mm grad x")
    assert_close(w.grad, w_ref.grad, torch.float32, "torch grouped_mm grad w")


def test_zero_tail_rows_touches_only_the_tail():
    from lightning_mpipemoe.kernels import triton_grouped_gemm

    y = torch.randn(100, 1500)  # wider than one column block
    before = y.clone()
    triton_grouped_gemm.zero_tail_rows(y, torch.tensor([10, 60, 73]))
    torch.testing.assert_close(y[:73], before[:73], rtol=0, atol=0)
    assert torch.all(y[73:] == 0)


# --- the expert pipeline, padded to blocks ----------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("top_k, block", [(1, 1), (2, 16), (8, 8)])
def test_pipeline_padded_expert_ffn(triton_on_cpu, dtype, top_k, block):
    """permute -> grouped GEMM -> SwiGLU -> grouped GEMM -> unpermute, on block-padded segments,
    against the unpadded reference pipeline: the output and the gradients of every input."""
    num_tokens, num_experts, hidden, inter = 100, 10, 32, 24
    routing = make_routing(num_tokens, top_k, num_experts, empty_experts=(2, 6), drop_every=9 if top_k > 1 else 0)
    layout = kernels.pad_segments(routing.src_row_S, routing.counts_E, block=block)
    gen = torch.Generator().manual_seed(3)
    hidden_TH = torch.randn(num_tokens, hidden, generator=gen)
    weights_TK = torch.rand(num_tokens, top_k, generator=gen)
    w_in = torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    w_out = torch.randn(num_experts, hidden, inter, generator=gen) / inter**0.5
    grad_TH = torch.randn(num_tokens, hidden, generator=gen)

    def ffn(x_SH, offsets, w1, w2, grouped_mm):
        gate, up = grouped_mm(x_SH, w1, offsets).chunk(2, dim=-1)
        return grouped_mm(F.silu(gate) * up, w2, offsets)

    leaves = [_leaf(hidden_TH, dtype), _leaf(weights_TK), _leaf(w_in, dtype), _leaf(w_out, dtype)]
    x, w, w1, w2 = leaves
    pos = layout.pad_pos(routing.pos_TK)
    rows = kernels.permute(x, layout.src_row_P, pos)
    out = kernels.unpermute(ffn(rows, layout.offsets_E, w1, w2, kernels.grouped_mm), pos, w)
    (out.float() * grad_TH).sum().backward()

    refs = [_leaf(t.detach().float()) for t in leaves]
    x_r, w_r, w1_r, w2_r = refs
    rows_r = kernels.permute_reference(x_r, routing.src_row_S)
    y_r = ffn(rows_r, routing.offsets_E, w1_r, w2_r, kernels.grouped_mm_reference)
    out_r = kernels.unpermute_reference(y_r, routing.pos_TK, w_r)
    (out_r * grad_TH).sum().backward()

    assert_close(out, out_r, dtype, "pipeline output")
    for name, got, ref in zip(["hidden", "weights", "w_in", "w_out"], leaves, refs):
        assert_close(got.grad, ref.grad, dtype, f"pipeline grad {name}")


def test_ops_reach_the_triton_kernels(triton_on_cpu, monkeypatch):
    """Guards the harness: every op and backward really launches a Triton kernel here."""
    from lightning_mpipemoe.kernels import triton_grouped_gemm

    launched = []

    def spy(module, name):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, **k: launched.append(name) or real(*a, **k))

    for name in ("scatter_rows", "gather_rows", "gather_slots"):
        spy(triton_permute, name)
    for name in ("grouped_mm", "grouped_mm_weight_grad"):
        spy(triton_grouped_gemm, name)
    routing = make_routing(20, 2, 4)
    x, w = _leaf(torch.randn(20, 16)), _leaf(torch.rand(20, 2))
    w_EOD = _leaf(torch.randn(4, 16, 16))
    rows = kernels.permute(x, routing.src_row_S, routing.pos_TK)
    y = kernels.grouped_mm(rows, w_EOD, routing.offsets_E)
    kernels.unpermute(y, routing.pos_TK, w).sum().backward()
    kernels.permute(x, routing.src_row_S).sum().backward()
    assert sorted(set(launched)) == ["gather_rows", "gather_slots", "grouped_mm", "grouped_mm_weight_grad", "scatter_rows"]
    assert launched.count("scatter_rows") == 2 and launched.count("grouped_mm") == 2


def test_benchmark_script_runs(tmp_path):
    """benchmarks/bench_kernels.py end to end on tiny sizes (CPU, interpreted): every row is
    produced, timed and checked against the reference, and the JSON report is written."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "kernels.json"
    argv = ["--device", "cpu", "--tokens", "32", "--hidden", "32", "--inter", "48", "--experts", "4"]
    assert bench.main([*argv, "--dtype", "float32", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    kernels_timed = {row["kernel"] for row in report["rows"]}
    assert len(kernels_timed) == 12 and {"permute fwd", "unpermute bwd", "grouped_mm w_out (down) grad w"} <= kernels_timed
    for row in report["rows"]:
        assert row["ms"] > 0 and row["bound_ms"] > 0 and row["rel_err"] < 1e-4, row
    assert report["copy_bytes_per_s"] > 0 and report["matmul_flops_per_s"] > 0
