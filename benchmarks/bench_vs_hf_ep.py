"""Our n = 1 path against Hugging Face's built-in expert parallelism, real gloo, no simulated link.

    OMP_NUM_THREADS=1 python benchmarks/bench_vs_hf_ep.py [--tokens 4096] [--repeats 11]

EP = 2. The same experts layer on both sides: Mixtral's `MixtralExperts` (gated SiLU,
`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`), M = 256, I = 512, 8 experts, top-2, T
tokens per rank, the same weights and the same routing. Hugging Face's side is its own plan
application (`apply_expert_parallelism` with `grouped_gemm` parameter sharding and
`ep_dispatch_experts` + `ep_implementation="all_to_all"`, i.e. `AllToAllEP`, what
`DistributedConfig(ep_size=2)` installs in training), under each of its CPU-capable experts
implementations ("eager" loop, "grouped_mm"); its fastest is the baseline. Ours:
`expert_parallel_forward` on the n = 1 plain path (`ExecutorConfig(num_partitions=1,
restore="none")`, spelled out so that the measured path does not move with the config's
default) and the pipelined executor at n = 1. One step is forward + backward of the experts
call (hidden states and routing weights need gradients).

Timing on a shared machine: every round runs each path once, in an order rotated from round to
round (no path always runs first, right after the barrier, or last); each time is the slowest
rank's wall time. Reported: median, min, max per path, the ratio of medians, and the median of
the per-round ratios (ours / HF best in the same round), which cancels load that drifts between
rounds; beside them the CPU time (summed over both ranks) and the minor page faults of a step,
which other processes disturb far less than wall time. Load averages before and after go into
benchmarks/results/vs_hf_ep.json.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import torch
import torch.distributed as dist
from pipeline_common import (
    LayerSpec,
    hf_mixtral_experts,
    launch,
    machine_note,
    mixtral_weights,
    routed_batch,
    summarize,
    write_json,
)

from lightning_mpipemoe import ExecutorConfig, ExpertWeights, build_process_groups, expert_parallel_forward, kernels
from lightning_mpipemoe.moe.executor import pipelined_expert_parallel_forward

HF_IMPLEMENTATIONS = ("eager", "grouped_mm")
OURS_N1 = "ours: expert_parallel_forward, n=1 plain path"


def _timed_once(step) -> tuple[float, float, float]:
    """One run of `step` on every rank after a barrier: (wall seconds of the slowest rank, CPU
    seconds summed over the ranks, minor page faults summed over the ranks). Wall time is the
    measure; CPU time and page faults say how much of it is work, and are far less disturbed by
    other processes on a shared machine."""
    dist.barrier()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    cpu = time.process_time() - cpu
    wall = time.perf_counter() - wall
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    slowest = torch.tensor([wall], dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    total = torch.tensor([cpu, faults], dtype=torch.float64)
    dist.all_reduce(total)
    return float(slowest), float(total[0]), float(total[1])


def _rotated_rounds(steps: dict, repeats: int, warmup: int = 2) -> dict:
    """`repeats` rounds of one run of every step; round r starts at step r (mod the count).
    Returns {"wall" | "cpu" | "faults": {step: [one value per round]}}."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    measures = {key: {name: [] for name in names} for key in ("wall", "cpu", "faults")}
    for r in range(repeats):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            for key, value in zip(("wall", "cpu", "faults"), _timed_once(steps[name])):
                measures[key][name].append(value)
    return measures


def _bench(rank: int, world: int, spec: LayerSpec, repeats: int, with_reference_kernels: bool = False) -> dict:
    groups = build_process_groups(world)
    full = mixtral_weights(spec)
    local = spec.experts // world
    ours = {k: v[rank * local : (rank + 1) * local].clone().requires_grad_() for k, v in full.items()}
    experts = ExpertWeights(ours["w_in_EOH"], ours["w_out_EHI"])
    hidden_TH, index_TK, weights_TK, grad_TH = routed_batch(spec, rank)
    hf = {name: hf_mixtral_experts(spec, name, full, world) for name in HF_IMPLEMENTATIONS}
    kw = dict(ep_group=groups.ep, combine_group=groups.ep_combine)

    def clear():
        for t in (hidden_TH, weights_TK, *ours.values(), *(p for m in hf.values() for p in m.parameters())):
            t.grad = None

    def step(run):
        def go():
            clear()
            out_TH = run()
            (out_TH * grad_TH).sum().backward()
            return out_TH

        return go

    n1 = ExecutorConfig(num_partitions=1, restore="none")
    runs = {
        OURS_N1: lambda: expert_parallel_forward(hidden_TH, index_TK, weights_TK, experts, config=n1, **kw),
        "ours: pipelined executor, n=1": lambda: pipelined_expert_parallel_forward(
            hidden_TH, index_TK, weights_TK, experts, config=ExecutorConfig(1, "none"), **kw),
        **{f"HF AllToAllEP, experts={name}": (lambda module=module: module(hidden_TH, index_TK, weights_TK))
           for name, module in hf.items()},
    }
    # Same layer, same answer: compare outputs once.
    outputs = {name: step(run)().detach() for name, run in runs.items()}
    first = next(iter(outputs.values()))
    max_diff = max(float((out - first).abs().max()) for out in outputs.values())
    diff = torch.tensor([max_diff], dtype=torch.float64)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    steps = {name: step(run) for name, run in runs.items()}
    if with_reference_kernels:  # the same n = 1 path on the readable reference kernels (A/B of the CPU backend)
        def on_reference_kernels():
            with kernels.use_backend("cpu", kernels.ReferenceBackend()):
                return steps[OURS_N1]()

        steps[OURS_N1 + " (reference kernels)"] = on_reference_kernels
    measures = _rotated_rounds(steps, repeats)
    times, cpu = measures["wall"], measures["cpu"]
    hf_names = [name for name in times if name.startswith("HF")]
    hf_best_per_round = [min(times[name][r] for name in hf_names) for r in range(repeats)]
    round_ratios = [ours / hf for ours, hf in zip(times[OURS_N1], hf_best_per_round)]
    cpu_hf_best_per_round = [min(cpu[name][r] for name in hf_names) for r in range(repeats)]
    cpu_round_ratios = [ours / hf for ours, hf in zip(cpu[OURS_N1], cpu_hf_best_per_round)]
    return {
        "times": {name: summarize(t) for name, t in times.items()},
        "cpu_time_sum_of_ranks": {name: summarize(t) for name, t in cpu.items()},
        "minor_page_faults_per_step_sum_of_ranks": {name: statistics.median(f) for name, f in measures["faults"].items()},
        "raw_times_s": times,
        "raw_cpu_s": cpu,
        "per_round_ratio_n1_vs_hf_best": round_ratios,
        "per_round_cpu_ratio_n1_vs_hf_best": cpu_round_ratios,
        "max_output_difference": float(diff),
    }


def _fmt_load(load) -> str:
    return "(" + ", ".join(f"{x:.2f}" for x in load) + ")"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--with-reference-kernels", action="store_true",
                        help="also time the n = 1 path on the CPU reference kernels (kernels.ReferenceBackend)")
    args = parser.parse_args()
    spec = LayerSpec(tokens=args.tokens)
    load_before = os.getloadavg()
    result = launch(_bench, 2, spec, args.repeats, args.with_reference_kernels)
    load_after = os.getloadavg()
    times = result["times"]
    hf_best_name = min((n for n in times if n.startswith("HF")), key=lambda n: times[n]["median_s"])
    hf_best = times[hf_best_name]["median_s"]
    print(f"experts fwd+bwd, EP=2 real gloo (no simulated link), Mixtral experts M={spec.hidden}, "
          f"I={spec.intermediate}, {spec.experts} experts, top-{spec.top_k}, T={spec.tokens} tokens/rank; "
          f"outputs agree to {result['max_output_difference']:.1e}")
    cpu, faults = result["cpu_time_sum_of_ranks"], result["minor_page_faults_per_step_sum_of_ranks"]
    cpu_hf_best = cpu[hf_best_name]["median_s"]
    width = max(len(name) for name in times)
    header = (f"{'path':>{width}} | {'wall: median [min, max] ms':>26} | {'/ HF best':>9} | "
              f"{'CPU ms (both ranks)':>19} | {'/ HF best':>9} | {'page faults':>11}")
    print(header)
    print("-" * len(header))
    for name, t in times.items():
        t["ratio_vs_hf_best"] = t["median_s"] / hf_best
        cpu[name]["ratio_vs_hf_best"] = cpu[name]["median_s"] / cpu_hf_best
        print(f"{name:>{width}} | {t['median_s'] * 1e3:9.0f} [{t['min_s'] * 1e3:6.0f}, {t['max_s'] * 1e3:6.0f}] | "
              f"{t['ratio_vs_hf_best']:8.2f}x | {cpu[name]['median_s'] * 1e3:19.0f} | {cpu[name]['ratio_vs_hf_best']:8.2f}x | "
              f"{faults[name]:11.0f}")
    ratio = times[OURS_N1]["median_s"] / hf_best
    round_ratios = result["per_round_ratio_n1_vs_hf_best"]
    paired = statistics.median(round_ratios)
    cpu_paired = statistics.median(result["per_round_cpu_ratio_n1_vs_hf_best"])
    print(f"\nours (n=1) / HF best ({hf_best_name}), wall: {ratio:.2f}x (ratio of medians); per round "
          f"(ours / HF best of that round): median {paired:.2f}x [{min(round_ratios):.2f}, {max(round_ratios):.2f}]; "
          f"CPU time per round: median {cpu_paired:.2f}x")
    print(f"load average (1, 5, 15 min) before {_fmt_load(load_before)}, after {_fmt_load(load_after)}")
    path = write_json("vs_hf_ep.json", {
        "spec": spec.__dict__, **result, "hf_best": hf_best_name, "repeats": args.repeats,
        "ratio_default_n1_vs_hf_best": ratio, "median_per_round_ratio_n1_vs_hf_best": paired,
        "median_per_round_cpu_ratio_n1_vs_hf_best": cpu_paired,
        "loadavg_before": load_before, "loadavg_after": load_after, "machine": machine_note(),
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
