"""Step time (forward + backward) of one MoE layer per partition count n, over a simulated link.

    OMP_NUM_THREADS=1 python benchmarks/bench_pipeline_speed.py [--tokens 4096] [--repeats 5]

EP = 2 on gloo, the layer of bench_pipeline_memory.py. A 2-core machine cannot show
overlap of gloo's own transfers with compute (gloo spends the cores), so the all-to-alls
also cross a simulated link (`SimulatedLink`: a wait that holds no core). The link is
calibrated so that communication ~ compute: its bandwidth makes the wire time of one step
(four all-to-alls) equal to the measured step time of the executor at n = 1 without a
link. Then, with the link:

    reference n=1   the plain autograd path (what the default config runs)
    n = 1, 2, 4, 8  the pipelined executor, restore "none" (and n=4 with s1..s4)

beside the ideal bound of perfect overlap, `max(A, C) + min(A, C) / n`, where A is the
step's wire time (from the executor's own record) and C its step time without the link
(one partition's worth of the smaller side is exposed filling and draining the pipe).
Times are the median of `--repeats` steps (slowest rank of each), with min and max; the
configurations are interleaved round by round, so that a shared machine's drifting load
falls on all of them alike.
Writes benchmarks/results/pipeline_speed.json.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from pipeline_common import (
    LayerSpec,
    build_layer,
    experts_of,
    launch,
    machine_note,
    route,
    summarize,
    timed_round_robin,
    write_json,
)

from lightning_mpipemoe import ExecutorConfig, build_process_groups
from lightning_mpipemoe.config import SimulatedLink
from lightning_mpipemoe.moe.executor import pipelined_expert_parallel_forward, reference_expert_parallel_forward
from lightning_mpipemoe.moe.memory import PipelineRecord

LATENCY_S = 1e-4


def _bench(rank: int, world: int, spec: LayerSpec, repeats: int, partitions: list[int]) -> dict:
    groups = build_process_groups(world)
    kw = dict(ep_group=groups.ep, combine_group=groups.ep_combine)
    params, hidden_TH = build_layer(spec, rank, world)
    hidden_TH.requires_grad_()
    experts = experts_of(params, spec)
    grad_scale = torch.cos(torch.arange(spec.hidden, dtype=torch.float32))

    def step_fn(path: str, n: int, restore: str, link: SimulatedLink | None, record: PipelineRecord | None = None):
        def step():
            for p in (*params.values(), hidden_TH):
                p.grad = None
            index_TK, weights_TK = route(hidden_TH, params["gate_HE"], spec.top_k)
            config = ExecutorConfig(num_partitions=n, restore=restore, link=link)
            if path == "reference":
                out_TH = reference_expert_parallel_forward(
                    hidden_TH, index_TK, weights_TK, experts, config=config, **kw
                )
            else:
                out_TH = pipelined_expert_parallel_forward(
                    hidden_TH, index_TK, weights_TK, experts, config=config, record=record, **kw
                )
            (out_TH * grad_scale).sum().backward()

        return step

    configs = [("reference", 1, "none")] + [("pipelined", n, "none") for n in partitions]
    configs += [("pipelined", 4, restore) for restore in ("s1", "s2", "s3", "s4")]

    # 1. Without a link: compute (and gloo's own transfers) only.
    no_link = timed_round_robin({cfg: step_fn(*cfg, None) for cfg in configs}, repeats)
    no_link = {cfg: summarize(times) for cfg, times in no_link.items()}

    # 2. Calibrate: bytes on the wire per step, then the bandwidth that makes the wire time
    #    A equal the compute C of the executor at n = 1 (the step that n > 1 pipelines).
    probe = PipelineRecord()
    step_fn("pipelined", 1, "none", SimulatedLink(0.0, 1e12), probe)()
    wire_bytes = torch.tensor([(probe.forward_wire_s + probe.backward_wire_s) * 1e12], dtype=torch.float64)
    dist.all_reduce(wire_bytes, op=dist.ReduceOp.MAX)
    compute_s = no_link[("pipelined", 1, "none")]["median_s"]
    wire_s_target = compute_s - 4 * LATENCY_S
    link = SimulatedLink(LATENCY_S, float(wire_bytes) / wire_s_target)

    # 3. With the link.
    records = {cfg: PipelineRecord() for cfg in configs}
    with_link = timed_round_robin({cfg: step_fn(*cfg, link, records[cfg]) for cfg in configs}, repeats)
    rows = []
    for cfg in configs:
        path, n, restore = cfg
        record = records[cfg]
        times = summarize(with_link[cfg])
        wire = torch.tensor([record.forward_wire_s + record.backward_wire_s], dtype=torch.float64)
        dist.all_reduce(wire, op=dist.ReduceOp.MAX)
        if path == "reference":
            wire = torch.tensor([float(wire_bytes) / link.bandwidth_bytes_per_s + 4 * LATENCY_S])
        A, C = float(wire), no_link[cfg]["median_s"]
        rows.append({
            "path": path, "n": n, "restore": restore, "with_link": times, "without_link": no_link[cfg],
            "wire_s": A, "ideal_s": max(A, C) + min(A, C) / n, "serial_s": A + C,
        })
    return {"rows": rows, "link": {"latency_s": link.latency_s, "bandwidth_bytes_per_s": link.bandwidth_bytes_per_s},
            "wire_bytes_per_step": float(wire_bytes), "calibration_compute_s": compute_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--partitions", type=int, nargs="+", default=[1, 2, 4, 8])
    args = parser.parse_args()
    spec = LayerSpec(tokens=args.tokens)
    result = launch(_bench, 2, spec, args.repeats, args.partitions)
    link = result["link"]
    print(f"MoE layer fwd+bwd step, EP=2 gloo, top-{spec.top_k}, gated, M={spec.hidden}, I={spec.intermediate}, "
          f"{spec.experts} experts, T={spec.tokens} tokens/rank")
    print(f"simulated link: latency {link['latency_s'] * 1e3:.2f} ms, "
          f"bandwidth {link['bandwidth_bytes_per_s'] / 1e6:.1f} MB/s "
          f"({result['wire_bytes_per_step'] / 2**20:.1f} MiB on the wire per step, calibrated to the executor's "
          f"{result['calibration_compute_s'] * 1e3:.0f} ms of compute at n=1)")
    header = (f"{'config':>16} | {'no link (med)':>13} | {'with link: median [min, max]':>30} | {'wire A':>7} | "
              f"{'ideal':>7} | {'serial':>7} | {'vs ref n=1':>10}")
    print(header)
    print("-" * len(header))
    reference = result["rows"][0]["with_link"]["median_s"]
    for row in result["rows"]:
        t = row["with_link"]
        name = "reference n=1" if row["path"] == "reference" else f"n={row['n']} {row['restore']}"
        row["ratio_vs_reference_n1"] = t["median_s"] / reference
        print(f"{name:>16} | {row['without_link']['median_s'] * 1e3:10.0f} ms | "
              f"{t['median_s'] * 1e3:8.0f} ms [{t['min_s'] * 1e3:6.0f}, {t['max_s'] * 1e3:6.0f}] | "
              f"{row['wire_s'] * 1e3:4.0f} ms | {row['ideal_s'] * 1e3:4.0f} ms | {row['serial_s'] * 1e3:4.0f} ms | "
              f"{row['ratio_vs_reference_n1']:9.2f}x")
    pipelined_n1 = next(r for r in result["rows"] if r["path"] == "pipelined" and r["n"] == 1)
    n4 = next((r for r in result["rows"] if r["path"] == "pipelined" and r["n"] == 4 and r["restore"] == "none"), None)
    summary = {}
    if n4 is not None:
        summary = {
            "n4_over_reference_n1": n4["with_link"]["median_s"] / reference,
            "n4_over_pipelined_n1": n4["with_link"]["median_s"] / pipelined_n1["with_link"]["median_s"],
        }
        print(f"\nn=4 / n=1: {summary['n4_over_reference_n1']:.2f}x of the reference path, "
              f"{summary['n4_over_pipelined_n1']:.2f}x of the pipelined executor at n=1")
    path = write_json("pipeline_speed.json", {"spec": spec.__dict__, **result, "summary": summary,
                                              "machine": machine_note()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
