"""restore = "auto" under a memory budget: the chosen strategy against all of them, measured.

    OMP_NUM_THREADS=1 python benchmarks/bench_tuner_strategy.py [--tokens 4096] [--repeats 7]

EP = 2 on gloo, the layer of bench_tuner_granularity.py over its "comm ~ compute" link
(wire time of a step = compute at n = 1). Two budgets, both below `none`'s smallest
footprint (DESIGN.md §1.3's analytic model, as the tuner prices it), so `none` is excluded:

    A  a little below `none` at n = 8: every reuse strategy fits at n = 4 and 8, none at 1, 2
    B  tighter: at n = 4 only the recompute strategies fit, at n = 8 all four

With `ExecutorConfig(link=..., memory_budget=...)` (n and restore "auto") the layer's tuner
calibrates (compute, all-to-all, copy throughput and overlaps), profiles the candidate n
that fit the budget, each with the strategy the cost model picks for it, and takes the
fastest pair. Then, in the same run, every (n, strategy) pair of the candidate n (`none`
included, marked infeasible) runs `--repeats` interleaved rounds of forward + backward
(slowest rank, median): the tables show the chosen strategy against all strategies at the
chosen n, and the chosen pair against every feasible pair, by medians and by the paired measure of
bench_tuner_granularity.py (each round divided by its geometric mean, then the median: the
verdict, robust to a shared machine's load). Writes benchmarks/results/tuner_strategy.json.
"""

from __future__ import annotations

import argparse
import io
import logging
import statistics
import time

from bench_tuner_granularity import SPEC, _calibrate_links, _layer, paired_relative
from pipeline_common import LayerSpec, launch, machine_note, route, timed_round_robin, write_json

from lightning_mpipemoe import ExecutorConfig, build_process_groups
from lightning_mpipemoe.config import RESTORE_STRATEGIES, SimulatedLink
from lightning_mpipemoe.moe.cost_model import footprint_bytes, predict_seconds
from lightning_mpipemoe.moe.memory import LayerShape
from lightning_mpipemoe.moe.tuner import LayerTuner, agree_load

LATENCY_S = 5e-4
CANDIDATES = (1, 2, 4, 8)
MIB = 2.0**20


def _bench(rank: int, world: int, tokens: int, repeats: int) -> dict:
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    logging.getLogger("lightning_mpipemoe.tuner").addHandler(handler)
    logging.getLogger("lightning_mpipemoe.tuner").setLevel(logging.INFO)
    groups = build_process_groups(world)
    compute_s, wire_bytes = _calibrate_links(rank, world, groups, 7)
    link = SimulatedLink(LATENCY_S, wire_bytes / compute_s)
    spec = LayerSpec(**{**SPEC.__dict__, "tokens": tokens})
    make_step = _layer(spec, rank, world, groups)

    # The key the tuner will see (this batch is the same every step) and the footprints it prices.
    from pipeline_common import build_layer

    params, hidden_TH = build_layer(spec, rank, world)
    index_TK, _ = route(hidden_TH, params["gate_HE"], spec.top_k)
    key, _ = agree_load(index_TK, spec.experts, groups.ep)
    shape = LayerShape(tokens=-(-key // spec.top_k), top_k=spec.top_k, hidden=spec.hidden,
                       intermediate=spec.intermediate, gated=spec.gated, ep_size=world, dtype_bytes=4)
    footprint = {(n, s): footprint_bytes(shape, n, s) for n in CANDIDATES for s in RESTORE_STRATEGIES}
    none_min = min(footprint[(n, "none")] for n in CANDIDATES)
    reuse_at_4 = sorted(footprint[(4, s)] for s in ("s1", "s2", "s3", "s4"))
    budgets = {"A": none_min - 1, "B": (reuse_at_4[1] + reuse_at_4[2]) // 2}

    out = {"key_rows": key, "footprints_mib": {f"{n}/{s}": b / MIB for (n, s), b in footprint.items()},
           "link": {"latency_s": link.latency_s, "bandwidth_bytes_per_s": link.bandwidth_bytes_per_s},
           "budgets": {}}
    for name, budget in budgets.items():
        tuner = LayerTuner(name=f"budget {name}")
        step = make_step(ExecutorConfig(link=link, memory_budget=int(budget)), tuner)
        tune_start, steps = time.perf_counter(), 0
        while steps == 0 or (tuner.tuning and steps < 40):
            step()
            steps += 1
        tune_s = time.perf_counter() - tune_start
        step()
        metrics = tuner.metrics()
        chosen = (int(metrics["num_partitions"]), RESTORE_STRATEGIES[int(metrics["restore"])])
        cal = tuner.calibration
        pairs = [(n, s) for n in CANDIDATES for s in RESTORE_STRATEGIES
                 if footprint[(n, s)] <= budget or n == chosen[0]]
        times = timed_round_robin({p: make_step(ExecutorConfig(p[0], p[1], link=link)) for p in pairs}, repeats)
        relative = paired_relative(times)
        rows = []
        for (n, s), t in times.items():
            rows.append({
                "n": n, "restore": s, "footprint_mib": footprint[(n, s)] / MIB, "feasible": footprint[(n, s)] <= budget,
                "predicted_ms": predict_seconds(cal, shape, n, s) * 1e3 if cal is not None else None,
                "median_ms": statistics.median(t) * 1e3, "min_ms": min(t) * 1e3, "max_ms": max(t) * 1e3,
                "relative": relative[(n, s)],
                "chosen": (n, s) == chosen,
            })
        out["budgets"][name] = {
            "budget_mib": budget / MIB, "chosen": list(chosen), "rows": rows, "tuning_steps": steps, "tuning_s": tune_s,
            "tuner_profile_ms": {k: v for k, v in metrics.items() if k.startswith("candidate_ms")},
            "calibration": cal.to_dict() if cal is not None else None, "loadavg": machine_note()["loadavg"],
        }
    logging.getLogger("lightning_mpipemoe.tuner").removeHandler(handler)
    out["log"] = log.getvalue().splitlines()
    return out


def _print_budget(name: str, result: dict) -> dict:
    chosen_n, chosen_s = result["chosen"]
    print(f"\nbudget {name}: {result['budget_mib']:.2f} MiB -> chosen n={chosen_n}, restore={chosen_s} "
          f"({result['tuning_steps']} tuning steps)")
    at_n = [r for r in result["rows"] if r["n"] == chosen_n]
    header = (f"{'restore':>8} | {'MiB':>6} | {'fits':>4} | {'model ms':>8} | {'measured median [min, max] ms':>29} | "
              f"{'paired':>6} |")
    print(f"all strategies at the chosen n={chosen_n}:")
    print(header)
    print("-" * len(header))
    for r in at_n:
        model = f"{r['predicted_ms']:.1f}" if r["predicted_ms"] is not None else "-"
        print(f"{r['restore']:>8} | {r['footprint_mib']:6.2f} | {'yes' if r['feasible'] else 'no':>4} | {model:>8} | "
              f"{r['median_ms']:9.1f} [{r['min_ms']:7.1f}, {r['max_ms']:7.1f}] | {r['relative']:6.3f} | "
              f"{'<- chosen' if r['chosen'] else ''}")
    feasible_at_n = [r for r in at_n if r["feasible"]]
    best_at_n = min(feasible_at_n, key=lambda r: r["relative"])
    chosen_row = next(r for r in at_n if r["chosen"])
    print("every feasible (n, strategy) pair:")
    feasible = [r for r in result["rows"] if r["feasible"]]
    for r in sorted(feasible, key=lambda r: r["relative"]):
        model = f"{r['predicted_ms']:.1f}" if r["predicted_ms"] is not None else "-"
        print(f"    n={r['n']} {r['restore']:>4}  {r['footprint_mib']:6.2f} MiB  model {model:>6} ms  measured "
              f"{r['median_ms']:7.1f} ms (paired {r['relative']:.3f}){'  <- chosen' if r['chosen'] else ''}")
    best = min(feasible, key=lambda r: r["relative"])
    summary = {
        "chosen_over_fastest_strategy_at_n": chosen_row["relative"] / best_at_n["relative"],
        "fastest_strategy_at_n": best_at_n["restore"],
        "chosen_over_fastest_feasible_pair": chosen_row["relative"] / best["relative"],
        "fastest_feasible_pair": [best["n"], best["restore"]],
    }
    # What choosing the strategy first would give: the model's pick at the largest n (where the
    # most strategies fit), then the fastest n at which that strategy fits.
    largest = max(r["n"] for r in feasible)
    first = min((r for r in feasible if r["n"] == largest), key=lambda r: r["predicted_ms"] or 0.0)["restore"]
    sequential = min((r for r in feasible if r["restore"] == first), key=lambda r: r["relative"])
    summary["strategy_first"] = [sequential["n"], first, sequential["relative"] / chosen_row["relative"]]
    print(f"strategy first (model's pick at n={largest}: {first}, then the best n where it fits: n={sequential['n']}) "
          f"measures {sequential['median_ms']:.1f} ms, {summary['strategy_first'][2]:.2f}x the joint choice")
    print(f"chosen / fastest feasible strategy at n={chosen_n} ({best_at_n['restore']}): "
          f"{summary['chosen_over_fastest_strategy_at_n']:.3f}; chosen / fastest feasible pair "
          f"(n={best['n']} {best['restore']}): {summary['chosen_over_fastest_feasible_pair']:.3f}")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    started, load_before = time.perf_counter(), machine_note()["loadavg"]
    result = launch(_bench, 2, args.tokens, args.repeats)
    print(f"restore='auto' under a memory budget, EP=2 gloo, M={SPEC.hidden}, I={SPEC.intermediate}, {SPEC.experts} "
          f"experts, top-{SPEC.top_k} gated, T={args.tokens} tokens/rank (key {result['key_rows']} rows), link comm ~ "
          "compute")
    print("tuner log (rank 0):")
    for line in result["log"]:
        print(f"    {line}")
    print("analytic footprints, MiB (n x strategy):")
    for n in CANDIDATES:
        sizes = result["footprints_mib"]
        print(f"    n={n}: " + "  ".join(f"{s} {sizes[f'{n}/{s}']:6.2f}" for s in RESTORE_STRATEGIES))
    summaries = {name: _print_budget(name, b) for name, b in result["budgets"].items()}
    summary = {"budgets": summaries, "wall_s": time.perf_counter() - started, "loadavg_before": load_before,
               "loadavg_after": machine_note()["loadavg"]}
    print(f"\nload average before {load_before}, after {summary['loadavg_after']}; {summary['wall_s']:.0f} s")
    path = write_json("tuner_strategy.json", {"spec": {**SPEC.__dict__, "tokens": args.tokens}, **result,
                                              "summary": summary, "machine": machine_note()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
