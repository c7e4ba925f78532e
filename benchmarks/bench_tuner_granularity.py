"""n = "auto" against an exhaustive sweep of n, over three simulated links and 512..16384 tokens.

    OMP_NUM_THREADS=1 python benchmarks/bench_tuner_granularity.py [--repeats 5] [--sizes 512 ... 16384]

EP = 2 on gloo, a small gated top-2 layer (M=64, I=128, 8 experts) so that 16384 tokens per
rank stay affordable on a 2-core machine. The all-to-alls cross a simulated link (a wait
that holds no core; see bench_pipeline_speed.py) at three settings: its bandwidth makes a
step's wire time A at 4096 tokens equal to 0.2x, 1x and 5x the measured compute C of that
step (n = 1, no link), with 0.5 ms latency per all-to-all (so small calls favour small n).

For each setting one `LayerTuner` (as a layer owns one) sees the token counts in increasing
order: at each it tunes on real training steps (`ExecutorConfig(link=...)`, n and restore
"auto"), until its profiling session ends. Then, in the same run, every candidate n runs
`--repeats` interleaved rounds (the slowest rank's forward + backward time per step). On a
shared, loaded machine single steps vary by tens of per cent, so the sweep's verdict is the
paired one (`paired_relative`: each round divided by its geometric mean, the median over
rounds); the ratio t(auto's n) / t(best n) by that measure is the figure of merit (issue 4:
<= 1.05 at every point). Medians of the raw step times are printed beside it.
Writes benchmarks/results/tuner_granularity.json.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import time

import torch
import torch.distributed as dist
from pipeline_common import (
    LayerSpec,
    build_layer,
    experts_of,
    launch,
    machine_note,
    route,
    timed_once,
    timed_round_robin,
    write_json,
)

from lightning_mpipemoe import ExecutorConfig, build_process_groups
from lightning_mpipemoe.config import SimulatedLink
from lightning_mpipemoe.moe.executor import expert_parallel_forward, pipelined_expert_parallel_forward
from lightning_mpipemoe.moe.memory import PipelineRecord
from lightning_mpipemoe.moe.profiling import paired_gap
from lightning_mpipemoe.moe.tuner import LayerTuner

LATENCY_S = 5e-4
SETTINGS = (("comm << compute", 0.2), ("comm ~ compute", 1.0), ("comm >> compute", 5.0))
CALIBRATION_TOKENS = 4096
SPEC = LayerSpec(hidden=64, intermediate=128, experts=8, top_k=2)


def _layer(spec: LayerSpec, rank: int, world: int, groups):
    params, hidden_TH = build_layer(spec, rank, world)
    hidden_TH.requires_grad_()
    experts = experts_of(params, spec)
    grad_scale = torch.cos(torch.arange(spec.hidden, dtype=torch.float32))
    kw = dict(ep_group=groups.ep, combine_group=groups.ep_combine)

    def make_step(config: ExecutorConfig, tuner: LayerTuner | None = None, record: PipelineRecord | None = None):
        def step():
            for p in (*params.values(), hidden_TH):
                p.grad = None
            index_TK, weights_TK = route(hidden_TH, params["gate_HE"], spec.top_k)
            if record is not None:
                out_TH = pipelined_expert_parallel_forward(hidden_TH, index_TK, weights_TK, experts, config=config,
                                                           record=record, **kw)
            else:
                out_TH = expert_parallel_forward(hidden_TH, index_TK, weights_TK, experts, config=config,
                                                 tuner=tuner, **kw)
            (out_TH * grad_scale).sum().backward()

        return step

    return make_step


def paired_relative(times: dict) -> dict:
    """Each configuration's step time relative to the others, robust to a shared machine's
    load: every round (one step of each configuration, back to back) is divided by its
    geometric mean, then the median over rounds. Load that slows a whole round cancels; a
    burst that hits one step is outvoted."""
    names = list(times)
    rounds = len(next(iter(times.values())))
    normalised = {name: [] for name in names}
    for r in range(rounds):
        mean_log = statistics.fmean(math.log(times[name][r]) for name in names)
        for name in names:
            normalised[name].append(times[name][r] / math.exp(mean_log))
    return {name: statistics.median(v) for name, v in normalised.items()}


def _calibrate_links(rank: int, world: int, groups, repeats: int) -> tuple[float, float]:
    """(compute C of one step at CALIBRATION_TOKENS, n = 1, no link, best of `repeats`; wire
    bytes of that step)."""
    spec = LayerSpec(**{**SPEC.__dict__, "tokens": CALIBRATION_TOKENS})
    make_step = _layer(spec, rank, world, groups)
    times = timed_round_robin({1: make_step(ExecutorConfig(1, "none"))}, repeats)[1]
    compute_s = min(times)  # the link is hardware: what compute takes unloaded, not under a burst
    probe = PipelineRecord()
    make_step(ExecutorConfig(1, "none", link=SimulatedLink(0.0, 1e12)), record=probe)()
    wire = torch.tensor([(probe.forward_wire_s + probe.backward_wire_s) * 1e12], dtype=torch.float64)
    dist.all_reduce(wire, op=dist.ReduceOp.MAX)
    return compute_s, float(wire)


def _bench(rank: int, world: int, sizes: list[int], repeats: int, candidates: tuple[int, ...], max_tune_steps: int,
           sweep_s: float):
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="    %(message)s")
    groups = build_process_groups(world)
    compute_s, wire_bytes = _calibrate_links(rank, world, groups, 7)
    rows, links, ranges = [], {}, {}
    for setting, ratio in SETTINGS:
        link = SimulatedLink(LATENCY_S, wire_bytes / (ratio * compute_s))
        links[setting] = {"latency_s": link.latency_s, "bandwidth_bytes_per_s": link.bandwidth_bytes_per_s,
                          "wire_over_compute_at_4096": ratio}
        tuner = LayerTuner(name=setting)
        auto = ExecutorConfig(link=link, candidates=candidates)
        for tokens in sizes:
            make_step = _layer(LayerSpec(**{**SPEC.__dict__, "tokens": tokens}), rank, world, groups)
            tune_step = make_step(auto, tuner)
            # Train until the tuner has seen this token count (it agrees a call's load in the
            # background, every EXCHANGE_EVERY calls outside a session) and settled on it.
            start, steps = time.perf_counter(), 0
            while steps <= LayerTuner.EXCHANGE_EVERY or (tuner.tuning and steps < max_tune_steps):
                tune_step()
                steps += 1
            tune_s = time.perf_counter() - start
            timed_once(tune_step)  # the first call after the session runs the decision
            metrics = tuner.metrics()
            chosen = int(metrics["num_partitions"])
            # Rounds enough for ~sweep_s seconds of sweep: short steps are the noisiest (a
            # scheduler slice is a large part of them) and the cheapest to repeat.
            # (From the slowest rank's figure: every rank must run as many rounds.)
            step_s = torch.tensor([tune_s / steps], dtype=torch.float64)
            dist.all_reduce(step_s, op=dist.ReduceOp.MAX)
            rounds = max(repeats, min(48, math.ceil(sweep_s / (len(candidates) * float(step_s)))))
            sweep = timed_round_robin({n: make_step(ExecutorConfig(n, "none", link=link)) for n in candidates},
                                      rounds)
            median = {n: statistics.median(t) for n, t in sweep.items()}
            relative = paired_relative(sweep)
            best = min(candidates, key=lambda n: (relative[n], n))
            _, se = paired_gap([a / b for a, b in zip(sweep[chosen], sweep[best])])
            rows.append({
                "setting": setting, "tokens": tokens, "key_rows": int(metrics["key_rows"]), "chosen_n": chosen,
                "best_n": best, "ratio": relative[chosen] / relative[best], "sweep_median_s": median,
                "sweep_relative": relative, "median_ratio": median[chosen] / min(median.values()),
                "ratio_2se": 2 * se if chosen != best else 0.0, "sweep_rounds": rounds,
                "sweep_spread": {n: [min(t), max(t)] for n, t in sweep.items()},
                "tuner_profile_ms": {k.split("/n")[1]: v for k, v in metrics.items() if k.startswith("candidate_ms")},
                "tuning_steps": steps, "tuned": not tuner.tuning, "profiled_calls": tuner.profile_calls,
                "tuning_s": tune_s, "loadavg": machine_note()["loadavg"],
            })
        ranges[setting] = tuner.table.ranges()
    return {"rows": rows, "links": links, "ranges": ranges, "calibration_compute_s": compute_s,
            "wire_bytes_at_4096": wire_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--candidates", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--max-tune-steps", type=int, default=120)
    parser.add_argument("--sweep-s", type=float, default=3.0,
                        help="seconds of sweep per point (more rounds for short steps)")
    args = parser.parse_args()
    started = time.perf_counter()
    load_before = machine_note()["loadavg"]
    result = launch(_bench, 2, args.sizes, args.repeats, tuple(args.candidates), args.max_tune_steps, args.sweep_s)
    print(f"\nn='auto' vs exhaustive sweep, EP=2 gloo, M={SPEC.hidden}, I={SPEC.intermediate}, {SPEC.experts} "
          f"experts, top-{SPEC.top_k} gated; compute at {CALIBRATION_TOKENS} tokens "
          f"{result['calibration_compute_s'] * 1e3:.0f} ms")
    sweep_title = "sweep median ms  n=" + "/".join(map(str, args.candidates))
    header = (f"{'setting':>16} | {'tokens':>6} | {'auto n':>6} | {'best n':>6} | {'ratio (±2se)':>15} | "
              f"{'by med':>6} | {sweep_title:>34} | {'tuner ms (nearest key)':>24} | steps")
    print("ratio: t(auto n) / t(best n), paired per round (the verdict; ±2 standard errors of the sweep's own "
          "estimate); by med: the same from raw medians")
    print(header)
    print("-" * len(header))
    for row in result["rows"]:
        sweep = "/".join(f"{row['sweep_median_s'][n] * 1e3:.0f}" for n in args.candidates)
        prof = "/".join(f"{v:.0f}" for _, v in sorted(row["tuner_profile_ms"].items(), key=lambda kv: int(kv[0])))
        flag = "" if row["ratio"] <= 1.05 else "  > 1.05"
        print(f"{row['setting']:>16} | {row['tokens']:>6} | {row['chosen_n']:>6} | {row['best_n']:>6} | "
              f"{row['ratio']:6.3f} (±{row['ratio_2se']:.3f}) | {row['median_ratio']:6.3f} | {sweep:>34} | "
              f"{prof:>24} | {row['tuning_steps']:>5}{flag}")
    for setting, ranges in result["ranges"].items():
        text = ", ".join(f"[{lo:.0f}, {hi:.0f}) -> {n}" for lo, hi, n in ranges)
        print(f"ranges ({setting}, key = busiest rank's rows): {text}")
    worst = max(row["ratio"] for row in result["rows"])
    within = sum(row["ratio"] <= 1.05 for row in result["rows"])
    unresolved = sum(row["ratio"] > 1.05 and row["ratio"] - row["ratio_2se"] <= 1.05 for row in result["rows"])
    print(f"\n{within}/{len(result['rows'])} points within 5% of the best n; worst ratio {worst:.3f}; "
          f"{unresolved} more within 5% of it inside the sweep's own 2 standard errors")
    summary = {"worst_ratio": worst, "points_within_5pct": within, "points": len(result["rows"]),
               "points_beyond_5pct_within_sweep_noise": unresolved,
               "wall_s": time.perf_counter() - started, "loadavg_before": load_before,
               "loadavg_after": machine_note()["loadavg"]}
    print(f"load average before {load_before}, after {summary['loadavg_after']}; {summary['wall_s']:.0f} s")
    path = write_json("tuner_granularity.json", {"spec": SPEC.__dict__, "latency_s": LATENCY_S, **result,
                                                 "summary": summary, "machine": machine_note()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
