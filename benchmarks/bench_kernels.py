"""Time the kernels at Mixtral-like sizes against the PyTorch reference and against their bounds.

Bounds, from ceilings measured on the same device at start-up:
- permute / unpermute: the fewest bytes the op must move (each input read once, each output
  written once) over the copy bandwidth of a large device-to-device copy (read + write bytes);
- grouped GEMM: 2 * rows * in * out FLOPs over the rate of a large torch.matmul in the same dtype.
Targets: at least 70% of the bound. For each grouped GEMM (forward, input grad, weight grad of
both expert projections) the faster of Triton and torch's `grouped_mm` is reported as the
choice; the backend's own "auto" choice is recorded beside it. Every fast output is checked
against the reference at full size (`rel_err`: max |fast - ref| / max |ref|).

    python benchmarks/bench_kernels.py                       # T=16384 H=4096 I=14336 E=8 K=2 bf16
    TRITON_INTERPRET=1 python benchmarks/bench_kernels.py --device cpu --tokens 64 --hidden 64 \
        --inter 96 --dtype float32 --out /tmp/kernels.json   # smoke run of this script, no GPU

Shape legend: T tokens, K top-k, S = T*K permuted rows, H model dim, I expert hidden dim,
E experts.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lightning_mpipemoe.kernels import api as kernels
from lightning_mpipemoe.kernels.triton_backend import TritonBackend, torch_grouped_mm_applies

TARGET = 0.70
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Median milliseconds of a call: CUDA events (Triton's do_bench) on GPU, a wall clock on CPU."""
    if device.type == "cuda":
        import triton.testing

        return lambda fn: float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))

    def wall(fn):
        fn()
        samples = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return statistics.median(samples)

    return wall


def measure_ceilings(device: torch.device, dtype: torch.dtype, time_ms) -> tuple[float, float]:
    """(copy bytes/s counting read + write, matmul FLOP/s in `dtype`), on random data."""
    numel = (1 << 30) if device.type == "cuda" else (1 << 22)  # 2 GiB of bf16 on GPU
    src = torch.randn(numel, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * src.element_size() / (time_ms(lambda: dst.copy_(src)) * 1e-3)
    del src, dst
    n = 8192 if device.type == "cuda" else 256
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    rate = 2 * n**3 / (time_ms(lambda: a @ b) * 1e-3)
    return bandwidth, rate


def make_routing(num_tokens: int, top_k: int, num_experts: int, device: torch.device):
    """Uniform random top-k routing, expert-sorted: (src_row_S, pos_TK, offsets_E)."""
    scores = torch.rand(num_tokens, num_experts, device=device)
    expert_X = torch.topk(scores, top_k, dim=1).indices.reshape(-1)
    slot_S = torch.argsort(expert_X, stable=True)
    pos_X = torch.empty_like(slot_S)
    pos_X[slot_S] = torch.arange(slot_S.numel(), device=device)
    offsets_E = torch.cumsum(torch.bincount(expert_X, minlength=num_experts), 0)
    return slot_S // top_k, pos_X.view(num_tokens, top_k), offsets_E


def rel_err(fast, ref) -> float:
    fast, ref = (fast if isinstance(fast, tuple) else (fast,)), (ref if isinstance(ref, tuple) else (ref,))
    worst = 0.0
    for a, b in zip(fast, ref):
        scale = float(b.float().abs().max()) or 1.0
        worst = max(worst, float((a.float() - b.float()).abs().max()) / scale)
    return worst


def permutation_rows(args, device, dtype, bandwidth, time_ms, backend) -> list[dict]:
    T, K, H = args.tokens, args.top_k, args.hidden
    S = T * K
    src_S, pos_TK, _ = make_routing(T, K, args.experts, device)
    hidden_TH = torch.randn(T, H, device=device, dtype=dtype)
    rows_SH = torch.randn(S, H, device=device, dtype=dtype)
    grad_TH = torch.randn(T, H, device=device, dtype=dtype)
    weights_TK = torch.rand(T, K, device=device)  # fp32, as routers give them
    size = torch.tensor([], dtype=dtype).element_size()
    ref = kernels.ReferenceBackend()
    cases = [
        # name, bytes, fast, reference
        ("permute fwd", (T + S) * H * size,
         lambda: backend.permute(hidden_TH, src_S, pos_TK), lambda: ref.permute(hidden_TH, src_S, None)),
        ("permute fwd, no inverse map", (T + S) * H * size,
         lambda: backend.permute(hidden_TH, src_S, None), lambda: ref.permute(hidden_TH, src_S, None)),
        ("permute fwd, custom op", (T + S) * H * size,
         lambda: kernels.permute(hidden_TH, src_S, pos_TK), lambda: ref.permute(hidden_TH, src_S, None)),
        ("permute bwd", (S + T) * H * size,
         lambda: backend.permute_backward(rows_SH, src_S, pos_TK, T),
         lambda: ref.permute_backward(rows_SH, src_S, None, T)),
        ("unpermute fwd", (S + T) * H * size,
         lambda: backend.unpermute(rows_SH, pos_TK, weights_TK), lambda: ref.unpermute(rows_SH, pos_TK, weights_TK)),
        ("unpermute bwd", (T + 2 * S) * H * size,
         lambda: backend.unpermute_backward(grad_TH, pos_TK, weights_TK, rows_SH, S),
         lambda: ref.unpermute_backward(grad_TH, pos_TK, weights_TK, rows_SH, S)),
    ]
    out = []
    for name, nbytes, fast, reference in cases:
        err = rel_err(fast(), reference())
        ms, ref_ms = time_ms(fast), time_ms(reference)
        bound_ms = nbytes / bandwidth * 1e3
        out.append(dict(kernel=name, impl="triton", ms=ms, bound_ms=bound_ms, ref_ms=ref_ms, rel_err=err,
                        bound="HBM", gbytes=nbytes / 1e9))
    return out


def gemm_rows(args, device, dtype, rate, time_ms, backend) -> tuple[list[dict], dict]:
    T, K, H, I, E = args.tokens, args.top_k, args.hidden, args.inter, args.experts
    S = T * K
    _, _, offsets_E = make_routing(T, K, E, device)
    gemm = backend.gemm_kernels
    rows, choice = [], {}
    for proj, (d_in, d_out) in {"w_in (gate_up)": (H, 2 * I), "w_out (down)": (I, H)}.items():
        x_SD = torch.randn(S, d_in, device=device, dtype=dtype)
        w_EOD = torch.randn(E, d_out, d_in, device=device, dtype=dtype) / d_in**0.5
        grad_SO = torch.randn(S, d_out, device=device, dtype=dtype)
        w_t = w_EOD.transpose(1, 2)
        cases = {  # (triton, torch grouped_mm, reference, whether torch's applies)
            "fwd": (lambda: gemm.grouped_mm(x_SD, w_EOD, offsets_E),
                    lambda: backend._torch_grouped_mm(x_SD, w_EOD, offsets_E),
                    lambda: kernels.grouped_mm_reference(x_SD, w_EOD, offsets_E),
                    torch_grouped_mm_applies(x_SD, w_EOD)),
            "grad x": (lambda: gemm.grouped_mm(grad_SO, w_t, offsets_E),
                       lambda: backend._torch_grouped_mm(grad_SO, w_t, offsets_E),
                       lambda: kernels.grouped_mm_reference(grad_SO, w_t, offsets_E),
                       torch_grouped_mm_applies(grad_SO, w_t)),
            "grad w": (lambda: gemm.grouped_mm_weight_grad(grad_SO, x_SD, offsets_E),
                       lambda: backend._torch_weight_grad(grad_SO, x_SD, offsets_E),
                       lambda: kernels.grouped_mm_weight_grad_reference(grad_SO, x_SD, offsets_E),
                       torch_grouped_mm_applies(grad_SO.transpose(0, 1), x_SD)),
        }
        bound_ms = 2 * S * d_in * d_out / rate * 1e3
        for which, (triton_fn, torch_fn, ref_fn, torch_ok) in cases.items():
            name = f"grouped_mm {proj} {which}"
            expected = ref_fn()
            ref_ms = time_ms(ref_fn)
            timed = {"triton": (time_ms(triton_fn), rel_err(triton_fn(), expected))}
            if torch_ok:
                timed["torch"] = (time_ms(torch_fn), rel_err(torch_fn(), expected))
            del expected
            choice[name] = min(timed, key=lambda impl: timed[impl][0])
            for impl, (ms, err) in timed.items():
                rows.append(dict(kernel=name, impl=impl + (" *" if impl == choice[name] else ""), ms=ms,
                                 bound_ms=bound_ms, ref_ms=ref_ms, rel_err=err, bound="matmul",
                                 tflops=2 * S * d_in * d_out / (ms * 1e-3) / 1e12))
        # What the backend's own measured choice ("auto") picks for these shapes.
        auto = TritonBackend(grouped_mm_impl="auto")
        auto.grouped_mm(x_SD, w_EOD, offsets_E)
        auto.grouped_mm(grad_SO, w_t, offsets_E)
        auto.grouped_mm_weight_grad(grad_SO, x_SD, offsets_E)
        choice[f"auto {proj}"] = sorted(set(auto.choices.values())) or ["triton (torch not applicable)"]
        del x_SD, w_EOD, grad_SO, w_t
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, choice


def table(rows: list[dict]) -> str:
    lines = [
        "| kernel | impl | ms | bound ms | % of bound | reference ms | speed-up vs ref | rel err | target met |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        frac = r["bound_ms"] / r["ms"]
        lines.append(
            f"| {r['kernel']} | {r['impl']} | {r['ms']:.3f} | {r['bound_ms']:.3f} | {100 * frac:.0f}% "
            f"({r['bound']}) | {r['ref_ms']:.3f} | {r['ref_ms'] / r['ms']:.2f}x | {r['rel_err']:.1e} | "
            f"{'yes' if frac >= TARGET else 'NO'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--inter", type=int, default=14336)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "kernels_gpu.json")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    time_ms = timer(device)
    backend = TritonBackend(grouped_mm_impl="triton")
    bandwidth, rate = measure_ceilings(device, dtype, time_ms)
    print(f"ceilings: copy {bandwidth / 1e12:.2f} TB/s (read + write), {args.dtype} matmul {rate / 1e12:.0f} TFLOP/s")
    with kernels.use_backend(device.type, backend):
        rows = permutation_rows(args, device, dtype, bandwidth, time_ms, backend)
        more, choice = gemm_rows(args, device, dtype, rate, time_ms, backend)
    rows += more
    print(f"\nT={args.tokens} H={args.hidden} I={args.inter} E={args.experts} K={args.top_k} {args.dtype}; "
          f"target {TARGET:.0%} of bound; * = faster grouped GEMM impl\n")
    print(table(rows))
    print("\ngrouped GEMM choice:", json.dumps(choice, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    import triton

    report = dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__,
        triton=triton.__version__,
        sizes=dict(tokens=args.tokens, hidden=args.hidden, inter=args.inter, experts=args.experts, top_k=args.top_k,
                   dtype=args.dtype),
        copy_bytes_per_s=bandwidth,
        matmul_flops_per_s=rate,
        target_fraction_of_bound=TARGET,
        rows=rows,
        grouped_mm_choice=choice,
    )
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    worst = max(r["rel_err"] for r in rows)
    return 0 if worst < 5e-2 else 1


if __name__ == "__main__":
    raise SystemExit(main())
