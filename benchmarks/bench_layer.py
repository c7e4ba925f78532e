"""One configuration of the side-by-side MoE-layer benchmark, one process launch per call.

    OMP_NUM_THREADS=1 python benchmarks/bench_layer.py --system ours_n1 --ep 2 --tokens 4096 \
        [--link] [--budget-bytes N] [--repeats 7] [--out row.json]

The workload is the experts call of one MoE layer, forward + backward, exactly as
bench_vs_hf_ep.py sets it up: Mixtral's experts (gated SiLU, `gate_up_proj [E, 2I, H]`,
`down_proj [E, H, I]`), M = 256, I = 512, 8 experts, top-k, T tokens per rank, the same
seeded weights, routing and output gradient on every system. Systems (`SYSTEMS`):

    hf_ep_grouped_mm / hf_ep_eager   transformers' built-in EP (`apply_expert_parallelism`,
                                     `ep_implementation="all_to_all"`, i.e. AllToAllEP)
    hf_single_grouped_mm / _eager    transformers' experts, all E on one process (EP = 1)
    ours_n1                          n = 1, no reuse: the plain path (FastMoE-like)
    ours_n4                          pipelined, fixed n = 4, no reuse (FasterMoE/Tutel-like)
    ours_n<k>                        the same at n = k (the time-vs-n sweep)
    ours_n<k>_<restore>              fixed n = k with a restore strategy (e.g. ours_n4_s4)
    ours_auto                        n and restore chosen by the layer's `LayerTuner`
                                     (`num_partitions="auto", restore="auto"`, optional
                                     `memory_budget`); timed after its profiling settles

Time: `--warmup` unmeasured steps, then `--repeats` steps, each the slowest rank's wall time
after a barrier; median, min, max and quartiles are kept. Memory, from one extra step
measured the same way on every system: bytes held for backward by the layer call
(saved-tensor hooks, `moe.memory.measure_call`; parameters excluded), host bytes held by
offload (ours), and each process's peak RSS. `--link` adds the simulated link
(`SimulatedLink`) to our all-to-alls; HF's AllToAllEP has no such seam, so HF systems
refuse it. Rank 0 writes one JSON row (`--out`) that `suite.py` collects.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline_common import (  # noqa: E402
    LayerSpec,
    hf_mixtral_experts,
    launch,
    machine_note,
    max_over_ranks,
    mixtral_weights,
    routed_batch,
    timed_once,
)

from lightning_mpipemoe import RESTORE_STRATEGIES, ExecutorConfig, ExpertWeights, SimulatedLink, build_process_groups  # noqa: E402
from lightning_mpipemoe.moe.executor import expert_parallel_forward, pipelined_expert_parallel_forward  # noqa: E402
from lightning_mpipemoe.moe.memory import PipelineRecord, measure_call  # noqa: E402

HF_SYSTEMS = ("hf_ep_grouped_mm", "hf_ep_eager", "hf_single_grouped_mm", "hf_single_eager")
LINK_LATENCY_S = 1e-4


def fixed_choice(system: str) -> tuple[int, str] | None:
    """(n, restore) of a fixed system: `ours_n<k>` (no reuse) or `ours_n<k>_<restore>`; else None."""
    if not system.startswith("ours_n"):
        return None
    n, _, restore = system[6:].partition("_")
    restore = restore or "none"
    if not n.isdigit() or int(n) < 1 or restore not in RESTORE_STRATEGIES:
        return None
    return int(n), restore


def system_label(system: str) -> str:
    labels = {
        "hf_ep_grouped_mm": "HF built-in EP (AllToAllEP, grouped_mm)",
        "hf_ep_eager": "HF built-in EP (AllToAllEP, eager)",
        "hf_single_grouped_mm": "HF single process (grouped_mm)",
        "hf_single_eager": "HF single process (eager)",
        "ours_n1": "ours n=1, no reuse (FastMoE-like)",
        "ours_auto": "ours adaptive (tuner: n, restore)",
    }
    if system in labels:
        return labels[system]
    n, restore = fixed_choice(system)
    if restore != "none":
        return f"ours n={n}, restore {restore}"
    return f"ours n={n}, no reuse (FasterMoE/Tutel-like)"


def _quartiles(times: list[float]) -> tuple[float, float]:
    if len(times) < 4:
        return min(times), max(times)
    q = statistics.quantiles(times, n=4)
    return q[0], q[2]


def run(rank: int, world: int, args: dict) -> dict:
    spec = LayerSpec(tokens=args["tokens"], top_k=args["top_k"])
    system = args["system"]
    full = mixtral_weights(spec)
    hidden_TH, index_TK, weights_TK, grad_TH = routed_batch(spec, rank)
    link = SimulatedLink(LINK_LATENCY_S, args["link_bandwidth"]) if args["link"] else None
    tuner = None
    chosen = None

    if system in HF_SYSTEMS:
        implementation = system.split("_", 2)[2]
        module = hf_mixtral_experts(spec, implementation, full, world, expert_parallel=system.startswith("hf_ep"))
        params = list(module.parameters())

        def forward():
            return module(hidden_TH, index_TK, weights_TK)

        def forward_measured(record):
            return forward()
    else:
        groups = build_process_groups(world)
        local = spec.experts // world
        ours = {k: v[rank * local : (rank + 1) * local].clone().requires_grad_() for k, v in full.items()}
        experts = ExpertWeights(ours["w_in_EOH"], ours["w_out_EHI"])
        params = list(ours.values())
        kw = dict(ep_group=groups.ep, combine_group=groups.ep_combine)
        if system == "ours_auto":
            from lightning_mpipemoe.moe.tuner import LayerTuner

            tuner = LayerTuner(name="bench")
            config = ExecutorConfig(num_partitions="auto", restore="auto", memory_budget=args["budget_bytes"], link=link)
        else:
            n, restore = fixed_choice(system)
            config = ExecutorConfig(num_partitions=n, restore=restore, link=link)

        def forward():
            return expert_parallel_forward(hidden_TH, index_TK, weights_TK, experts, config=config, tuner=tuner, **kw)

        def forward_measured(record):
            # The configuration the call runs (the tuner's settled choice for ours_auto), on the
            # pipelined executor with a record so that host (offload) bytes are counted too.
            n, restore = (chosen if chosen else (config.num_partitions, config.restore))
            fixed = ExecutorConfig(num_partitions=n, restore=restore, link=link)
            if not fixed.pipelined:
                return expert_parallel_forward(hidden_TH, index_TK, weights_TK, experts, config=fixed, **kw)
            return pipelined_expert_parallel_forward(hidden_TH, index_TK, weights_TK, experts, config=fixed,
                                                     record=record, **kw)

    def clear():
        for t in (hidden_TH, weights_TK, *params):
            t.grad = None

    def backward(out_TH):
        (out_TH * grad_TH).sum().backward()

    def step():
        clear()
        backward(forward())

    tuning_calls = 0
    if tuner is not None:  # let the tuner profile and settle on real training calls first
        while tuner.tuning or tuning_calls == 0:
            step()
            tuning_calls += 1
            if tuning_calls >= args["max_tuning_calls"]:
                break
        last = tuner._last  # (n, restore, key) of the latest call
        chosen = (last[0], last[1])
    for _ in range(args["warmup"]):
        step()
    times = [timed_once(step) for _ in range(args["repeats"])]

    clear()
    record = PipelineRecord() if system not in HF_SYSTEMS else None
    # HF's EP parameters are DTensors: the meter excludes their local shards' storage.
    local_params = [p.to_local() if hasattr(p, "to_local") else p for p in params]
    measured = measure_call(lambda: forward_measured(record), backward, parameters=local_params, record=record)
    held = max_over_ranks(measured.device_held_bytes)
    host = max_over_ranks(measured.host_held_bytes or 0)
    rss = max_over_ranks(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    q1, q3 = _quartiles(times)
    median = statistics.median(times)
    return {
        "system": system, "label": system_label(system), "ep": world, "tokens_per_rank": spec.tokens,
        "top_k": spec.top_k, "link": bool(args["link"]),
        "link_bandwidth_bytes_per_s": args["link_bandwidth"] if args["link"] else None,
        "budget_bytes": args["budget_bytes"],
        "chosen_n": chosen[0] if chosen else (fixed_choice(system) or (None, None))[0],
        "chosen_restore": chosen[1] if chosen else (fixed_choice(system) or (None, None))[1],
        "tuning_calls": tuning_calls,
        "median_s": median, "min_s": min(times), "max_s": max(times), "q1_s": q1, "q3_s": q3,
        "repeats": len(times), "warmup": args["warmup"], "times_s": times,
        "tokens_per_s": spec.tokens * world / median,
        "held_bytes": held, "host_held_bytes": host, "peak_rss_bytes": rss,
        "spec": spec.__dict__, "machine": machine_note(),
    }


def main(argv: list[str] | None = None) -> dict:
    systems_help = ("hf_ep_grouped_mm, hf_ep_eager, hf_single_grouped_mm, hf_single_eager, ours_n<k>, "
                    "ours_n<k>_<restore>, ours_auto")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system", required=True, help=systems_help)
    parser.add_argument("--ep", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--link", action="store_true", help="simulated link on our all-to-alls")
    parser.add_argument("--link-bandwidth", type=float, default=1e8, help="simulated link bytes/s")
    parser.add_argument("--budget-bytes", type=int, default=None, help="memory_budget of ours_auto (bytes)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--max-tuning-calls", type=int, default=80)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    system = args.system
    if not (system in HF_SYSTEMS or system == "ours_auto" or fixed_choice(system) is not None):
        parser.error(f"--system {system!r}: one of {systems_help}")
    if system in HF_SYSTEMS and args.link:
        parser.error("HF's AllToAllEP has no simulated-link seam; --link applies to ours only")
    if args.budget_bytes is not None and system != "ours_auto":
        parser.error("--budget-bytes applies to ours_auto only")
    world = 1 if system.startswith("hf_single") else args.ep
    payload = {k.replace("-", "_"): v for k, v in vars(args).items() if k != "out"}
    row = launch(run, world, payload)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(row, indent=2) + "\n")
    print(f"{row['label']:>44} EP={row['ep']} T={row['tokens_per_rank']} link={row['link']} "
          f"budget={row['budget_bytes']}: {row['median_s'] * 1e3:.1f} ms [{row['min_s'] * 1e3:.1f}, "
          f"{row['max_s'] * 1e3:.1f}], held {row['held_bytes'] / 2**20:.2f} MiB, host {row['host_held_bytes'] / 2**20:.2f} MiB"
          + (f", chose n={row['chosen_n']} {row['chosen_restore']}" if system == "ours_auto" else ""))
    return row


if __name__ == "__main__":
    main()
