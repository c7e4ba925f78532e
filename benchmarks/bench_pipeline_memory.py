"""Memory of one MoE layer call per partition count n and restore strategy, measured and analytic.

    OMP_NUM_THREADS=1 python benchmarks/bench_pipeline_memory.py [--tokens 4096] [--device cpu|cuda]

EP = 2 (two gloo processes; on a one-GPU machine both share the GPU), top-2, gated experts,
M = 256, I = 512, 8 experts, T tokens per rank. For each configuration: device bytes held
for backward (saved-tensor hooks), host bytes held (offload store), peak temporary bytes of
forward and backward (the buffer pool's records; on CUDA also max_memory_allocated), each
beside the analytic value of `lightning_mpipemoe.moe.memory.analytic_memory`. Prints the
table and writes it to benchmarks/results/pipeline_memory.json.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from pipeline_common import LayerSpec, build_layer, experts_of, launch, machine_note, route, write_json

from lightning_mpipemoe import ExecutorConfig, build_process_groups
from lightning_mpipemoe.config import RESTORE_STRATEGIES
from lightning_mpipemoe.moe.executor import pipelined_expert_parallel_forward, reference_expert_parallel_forward
from lightning_mpipemoe.moe.memory import LayerShape, PipelineRecord, analytic_memory, measure_call

FIELDS = ("device_held_bytes", "host_held_bytes", "forward_peak_temp_bytes", "backward_peak_temp_bytes")


def _measure(rank: int, world: int, spec: LayerSpec, device_name: str, partitions: list[int]) -> dict:
    device = torch.device(device_name, 0) if device_name == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(0)
    groups = build_process_groups(world)
    kw = dict(ep_group=groups.ep, combine_group=groups.ep_combine)
    shape = LayerShape(spec.tokens, spec.top_k, spec.hidden, spec.intermediate, spec.gated, ep_size=world)
    configs = [("reference", 1)] + [(restore, n) for n in partitions for restore in RESTORE_STRATEGIES]
    rows = []
    for restore, n in configs:
        params, hidden_TH = build_layer(spec, rank, world)
        params = {k: v.detach().to(device).requires_grad_() for k, v in params.items()}
        hidden_TH = hidden_TH.to(device).requires_grad_()
        experts = experts_of(params, spec)
        record = None if restore == "reference" else PipelineRecord()

        def forward():
            index_TK, weights_TK = route(hidden_TH, params["gate_HE"], spec.top_k)
            if restore == "reference":
                return reference_expert_parallel_forward(hidden_TH, index_TK, weights_TK, experts, **kw)
            config = ExecutorConfig(num_partitions=n, restore=restore)
            return pipelined_expert_parallel_forward(
                hidden_TH, index_TK, weights_TK, experts, config=config, record=record, **kw
            )

        def backward(out_TH):
            (out_TH * torch.cos(torch.arange(out_TH.shape[1], device=device, dtype=out_TH.dtype))).sum().backward()

        measured = measure_call(forward, backward, parameters=list(params.values()), record=record, device=device)
        analytic = analytic_memory(shape, n, restore)
        row = {"restore": restore, "n": n}
        for field in FIELDS:
            row[f"measured_{field}"] = getattr(measured, field)
            row[f"analytic_{field}"] = getattr(analytic, field)
        row["cuda_forward_peak_bytes"] = measured.cuda_forward_peak_bytes
        row["cuda_backward_peak_bytes"] = measured.cuda_backward_peak_bytes
        if record is not None:
            row["forward_peak_slots"] = record.forward_peak_slots
            row["backward_peak_slots"] = record.backward_peak_slots
        rows.append(row)
    gathered = [None] * world
    dist.all_gather_object(gathered, rows)
    return {"ranks": gathered, "analytic_terms": analytic_memory(shape, 1, "reference").terms}


def _mb(value) -> str:
    return f"{'-':>8}" if value is None else f"{value / 2**20:8.2f}"


def _dev(measured, analytic) -> float | None:
    if measured is None or analytic is None or analytic == 0:
        return None if measured != analytic else 0.0
    return (measured - analytic) / analytic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--partitions", type=int, nargs="+", default=[1, 2, 4, 8])
    args = parser.parse_args()
    spec = LayerSpec(tokens=args.tokens)
    result = launch(_measure, 2, spec, args.device, args.partitions)
    rank0 = result["ranks"][0]

    print(f"MoE layer memory, EP=2, top-{spec.top_k}, gated, M={spec.hidden}, I={spec.intermediate}, "
          f"{spec.experts} experts, T={spec.tokens} tokens/rank ({args.device}); MiB, rank 0; "
          "measured / analytic; worst deviation over both ranks")
    header = (f"{'config':>12} | {'held dev':>17} | {'held host':>17} | {'fwd peak temp':>17} | "
              f"{'bwd peak temp':>17} | {'worst dev':>9}")
    print(header)
    print("-" * len(header))
    worst_overall = 0.0
    for i, row in enumerate(rank0):
        cells, worst = [], 0.0
        for field in FIELDS:
            m, a = row[f"measured_{field}"], row[f"analytic_{field}"]
            cells.append(f"{_mb(m)} /{_mb(a)}")
            for rank_rows in result["ranks"]:
                dev = _dev(rank_rows[i][f"measured_{field}"], rank_rows[i][f"analytic_{field}"])
                if dev is not None:
                    worst = max(worst, abs(dev))
        worst_overall = max(worst_overall, worst)
        name = "reference" if row["restore"] == "reference" else f"n={row['n']} {row['restore']}"
        print(f"{name:>12} | " + " | ".join(cells) + f" | {worst:8.1%}")
        row["worst_relative_deviation"] = worst
    if args.device == "cuda":
        print("\nCUDA allocator peaks above the bytes allocated before each pass (MiB, rank 0):")
        for row in rank0:
            name = "reference" if row["restore"] == "reference" else f"n={row['n']} {row['restore']}"
            fwd, bwd = _mb(row["cuda_forward_peak_bytes"]), _mb(row["cuda_backward_peak_bytes"])
            print(f"{name:>12} | fwd {fwd} | bwd {bwd}")

    by_key = {(row["restore"], row["n"]): row for row in rank0}
    held = lambda key: by_key[key]["measured_device_held_bytes"]  # noqa: E731
    summary = {}
    if ("s4", 4) in by_key and ("none", 1) in by_key:
        summary = {
            "n4_s4_over_n1_none_held": held(("s4", 4)) / held(("none", 1)),
            "n4_s4_over_reference_held": held(("s4", 4)) / held(("reference", 1)),
            "worst_relative_deviation_measured_vs_analytic": worst_overall,
        }
        print(f"\nheld for backward, n=4 s4 / n=1 none (pipelined): {summary['n4_s4_over_n1_none_held']:.1%}; "
              f"n=4 s4 / reference n=1: {summary['n4_s4_over_reference_held']:.1%}; "
              f"worst measured-vs-analytic deviation: {worst_overall:.1%}")
    path = write_json("pipeline_memory.json", {
        "spec": spec.__dict__, "device": args.device, "rows_rank0": rank0, "ranks": result["ranks"],
        "analytic_terms_reference": result["analytic_terms"], "summary": summary, "machine": machine_note(),
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
