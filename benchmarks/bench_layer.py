"""The side-by-side MoE-layer benchmark: several systems in ONE process launch, rounds interleaved.

    OMP_NUM_THREADS=1 python benchmarks/bench_layer.py --systems hf_ep_grouped_mm ours_n1 ours_auto \
        ours_auto_budget50 --ep 2 --tokens 4096 [--link] [--rounds 5] [--out launch.json]

The workload is the experts call of one MoE layer, forward + backward, exactly as
bench_vs_hf_ep.py sets it up: Mixtral's experts (gated SiLU, `gate_up_proj [E, 2I, H]`,
`down_proj [E, H, I]`), M = 256, I = 512, 8 experts, top-k, T tokens per rank, the same
seeded weights, routing and output gradient for every system. Systems (`SYSTEMS_HELP`):

    hf_ep_grouped_mm / hf_ep_eager   transformers' built-in EP (`apply_expert_parallelism`,
                                     `ep_implementation="all_to_all"`, i.e. AllToAllEP)
    hf_single_grouped_mm / _eager    transformers' experts, all E experts on every rank, no EP
                                     (each rank its own T tokens, no communication)
    ours_n<k>                        fixed n = k, no reuse (n = 1: the plain path, FastMoE-like;
                                     n > 1: FasterMoE/Tutel-like)
    ours_n<k>_<restore>              fixed n = k with a restore strategy (e.g. ours_n4_s4)
    ours_auto                        the default `ExecutorConfig()`: n and restore chosen by the
                                     layer's `LayerTuner`; timed after its profiling settles
    ours_auto_budget<p>              the same with `memory_budget` = p% of the bytes
                                     hf_ep_grouped_mm holds for backward, measured first in
                                     this launch (needs hf_ep_grouped_mm among the systems)

All systems are built in the same launch. After warm-up (and the tuners' profiling), the timed
steps run `--rounds` rounds of one step per system, the order rotating from round to round
(`pipeline_common.timed_round_robin`); each step is the slowest rank's wall time after a
barrier. Each system's time is the median [min, max] over rounds, and its ratio to
hf_ep_grouped_mm is taken per round (the two steps of one round share the machine's load),
median [min, max] over rounds. Memory, after the timed rounds, one extra step per system
measured the same way: bytes held for backward by the layer call (saved-tensor hooks,
`moe.memory.measure_call`; parameters excluded), host bytes held by offload (ours), and the
step's peak RSS above the RSS before it (`pipeline_common.PeakRss`: allocator caching out of
the way), max over ranks. `--link` adds the simulated link (`SimulatedLink`) to our
all-to-alls; HF's AllToAllEP has no such seam, so HF systems refuse it. Rank 0 writes the
launch's rows as JSON (`--out`), which `suite.py` collects.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline_common import (  # noqa: E402
    LayerSpec,
    PeakRss,
    hf_mixtral_experts,
    launch,
    machine_note,
    max_over_ranks,
    mixtral_weights,
    ratio_summaries,
    routed_batch,
    timed_round_robin,
)

from lightning_mpipemoe import RESTORE_STRATEGIES, ExecutorConfig, ExpertWeights, SimulatedLink, build_process_groups  # noqa: E402
from lightning_mpipemoe.moe.executor import expert_parallel_forward, pipelined_expert_parallel_forward  # noqa: E402
from lightning_mpipemoe.moe.memory import PipelineRecord, measure_call  # noqa: E402

HF_SYSTEMS = ("hf_ep_grouped_mm", "hf_ep_eager", "hf_single_grouped_mm", "hf_single_eager")
REFERENCE = "hf_ep_grouped_mm"
BUDGET_PREFIX = "ours_auto_budget"
SYSTEMS_HELP = ("hf_ep_grouped_mm, hf_ep_eager, hf_single_grouped_mm, hf_single_eager, ours_n<k>, "
                "ours_n<k>_<restore>, ours_auto, ours_auto_budget<percent>")
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


def budget_percent(system: str) -> int | None:
    """p of `ours_auto_budget<p>` (1..100); None for any other name."""
    tail = system[len(BUDGET_PREFIX):] if system.startswith(BUDGET_PREFIX) else ""
    return int(tail) if tail.isdigit() and 1 <= int(tail) <= 100 else None


def valid_system(system: str) -> bool:
    return (system in HF_SYSTEMS or system == "ours_auto" or fixed_choice(system) is not None
            or budget_percent(system) is not None)


def system_label(system: str) -> str:
    labels = {
        "hf_ep_grouped_mm": "HF built-in EP (AllToAllEP, grouped_mm)",
        "hf_ep_eager": "HF built-in EP (AllToAllEP, eager)",
        "hf_single_grouped_mm": "HF all experts on every rank, no EP (grouped_mm)",
        "hf_single_eager": "HF all experts on every rank, no EP (eager)",
        "ours_n1": "ours n=1, no reuse (FastMoE-like)",
        "ours_auto": "ours default (tuner: n, restore)",
    }
    if system in labels:
        return labels[system]
    if budget_percent(system) is not None:
        return f"ours default + memory_budget {budget_percent(system)}% of HF EP's held"
    n, restore = fixed_choice(system)
    if restore != "none":
        return f"ours n={n}, restore {restore}"
    return f"ours n={n}, no reuse (FasterMoE/Tutel-like)"


def check_systems(systems: list[str], link: bool) -> None:
    """Refuse bad system lists before anything is launched."""
    bad = [s for s in systems if not valid_system(s)]
    if bad:
        raise ValueError(f"unknown system(s) {bad}: each must be one of {SYSTEMS_HELP}")
    if len(set(systems)) != len(systems):
        raise ValueError(f"systems {systems} name one system twice")
    if link and any(s in HF_SYSTEMS for s in systems):
        raise ValueError(f"HF's AllToAllEP has no simulated-link seam; with --link the systems must be ours only, "
                         f"got {systems}")
    if any(budget_percent(s) for s in systems) and REFERENCE not in systems:
        raise ValueError(f"{BUDGET_PREFIX}<p> takes its budget from {REFERENCE}'s held bytes: add {REFERENCE} "
                         f"to the systems {systems}")


def _quartiles(times: list[float]) -> tuple[float, float]:
    if len(times) < 4:
        return min(times), max(times)
    q = statistics.quantiles(times, n=4)
    return q[0], q[2]


class LayerSystem:
    """One system's module / expert shards, its step, tuning and memory measurement. Every
    system shares the rank's batch (hidden, routing, output gradient)."""

    def __init__(self, name: str, spec: LayerSpec, full: dict, batch: tuple, rank: int, world: int, groups,
                 link, budget_bytes: int | None, tuner_max_rounds: int):
        self.name, self.budget_bytes = name, budget_bytes
        self.hidden_TH, self.index_TK, self.weights_TK, self.grad_TH = batch
        self.tuner = None
        self.chosen = fixed_choice(name)
        self.tuning_calls = 0
        self.timed_profiling = 0
        if name in HF_SYSTEMS:
            implementation = name.split("_", 2)[2]
            self.module = hf_mixtral_experts(spec, implementation, full, world,
                                             expert_parallel=name.startswith("hf_ep"))
            self.params = list(self.module.parameters())
            return
        local = spec.experts // world
        ours = {k: v[rank * local: (rank + 1) * local].clone().requires_grad_() for k, v in full.items()}
        self.experts = ExpertWeights(ours["w_in_EOH"], ours["w_out_EHI"])
        self.params = list(ours.values())
        self.kw = dict(ep_group=groups.ep, combine_group=groups.ep_combine)
        self.link = link
        if self.chosen is None:  # ours_auto, ours_auto_budget<p>
            from lightning_mpipemoe.moe.tuner import LayerTuner

            self.tuner = LayerTuner(name=name, max_rounds=tuner_max_rounds)
            self.config = ExecutorConfig(link=link, memory_budget=budget_bytes)
        else:
            self.config = ExecutorConfig(num_partitions=self.chosen[0], restore=self.chosen[1], link=link)

    def forward(self):
        if self.name in HF_SYSTEMS:
            return self.module(self.hidden_TH, self.index_TK, self.weights_TK)
        return expert_parallel_forward(self.hidden_TH, self.index_TK, self.weights_TK, self.experts,
                                       config=self.config, tuner=self.tuner, **self.kw)

    def clear(self) -> None:
        for t in (self.hidden_TH, self.weights_TK, *self.params):
            t.grad = None

    def backward(self, out_TH) -> None:
        (out_TH * self.grad_TH).sum().backward()

    def step(self) -> None:
        self.clear()
        self.backward(self.forward())

    def timed_step(self) -> None:
        """`step()`, counting whether the tuner profiled in it."""
        before = self.tuner.profile_calls if self.tuner else 0
        self.step()
        if self.tuner and self.tuner.profile_calls > before:
            self.timed_profiling += 1

    def tune(self, max_calls: int) -> None:
        """Steps until the tuner settled (on every rank) or `max_calls`; records its choice."""
        if self.tuner is None:
            return
        while self.tuning_calls < max_calls:
            self.step()
            self.tuning_calls += 1
            if not max_over_ranks(float(self.tuner.tuning)):
                break
        last = self.tuner._last  # (n, restore, key) of the latest call
        self.chosen = (last[0], last[1])

    def _forward_measured(self, record):
        if self.name in HF_SYSTEMS:
            return self.forward()
        # The configuration the call runs (the tuner's settled choice for auto systems), on the
        # pipelined executor with a record so that host (offload) bytes are counted too.
        n, restore = self.chosen
        fixed = ExecutorConfig(num_partitions=n, restore=restore, link=self.link)
        if not fixed.pipelined:
            return expert_parallel_forward(self.hidden_TH, self.index_TK, self.weights_TK, self.experts,
                                           config=fixed, **self.kw)
        return pipelined_expert_parallel_forward(self.hidden_TH, self.index_TK, self.weights_TK, self.experts,
                                                 config=fixed, record=record, **self.kw)

    def memory(self, rss: PeakRss | None) -> dict:
        """held / host bytes (max over ranks) and, with `rss`, the step's peak RSS growth."""
        self.clear()
        record = PipelineRecord() if self.name not in HF_SYSTEMS else None
        # HF's EP parameters are DTensors: the meter excludes their local shards' storage.
        local_params = [p.to_local() if hasattr(p, "to_local") else p for p in self.params]
        base = rss.begin() if rss is not None else None
        measured = measure_call(lambda: self._forward_measured(record), self.backward, parameters=local_params,
                                record=record)
        peak = rss.end(base) if rss is not None else -1
        host = measured.host_held_bytes or 0
        # Host-pool pages are resident before the step (the pool grows only): add what it holds.
        return {"held_bytes": max_over_ranks(measured.device_held_bytes), "host_held_bytes": max_over_ranks(host),
                "peak_step_bytes": max_over_ranks(peak + host) if rss is not None else None}


def run(rank: int, world: int, args: dict) -> dict:
    spec = LayerSpec(tokens=args["tokens"], top_k=args["top_k"])
    full = mixtral_weights(spec)
    batch = routed_batch(spec, rank)
    groups = build_process_groups(world)
    link = SimulatedLink(LINK_LATENCY_S, args["link_bandwidth"]) if args["link"] else None
    names = args["systems"]

    def build(name, budget_bytes=None):
        return LayerSystem(name, spec, full, batch, rank, world, groups, link, budget_bytes,
                           args["tuner_max_rounds"])

    systems = {}
    hf_held = None
    if REFERENCE in names:  # HF EP first: its held bytes set the budget systems' budgets
        systems[REFERENCE] = build(REFERENCE)
        systems[REFERENCE].step()
        hf_held = int(systems[REFERENCE].memory(None)["held_bytes"])
    for name in names:
        if name not in systems:
            pct = budget_percent(name)
            systems[name] = build(name, hf_held * pct // 100 if pct else None)
    systems = {name: systems[name] for name in names}  # the caller's order
    for system in systems.values():
        system.tune(args["max_tuning_calls"])
        for _ in range(args["warmup"]):
            system.step()
    times = timed_round_robin({n: s.timed_step for n, s in systems.items()}, args["rounds"], warmup=0)
    ratios = ratio_summaries(times, REFERENCE) if REFERENCE in systems else {}
    rss = PeakRss()  # after the timed rounds: it fixes the allocator's thresholds
    memory = {name: system.memory(rss) for name, system in systems.items()}
    machine = machine_note()
    rows = []
    for name, system in systems.items():
        t = times[name]
        q1, q3 = _quartiles(t)
        median = statistics.median(t)
        mem = memory[name]
        ref_held = memory[REFERENCE]["held_bytes"] if REFERENCE in memory else None
        rows.append({
            "system": name, "label": system_label(name), "ep": world, "tokens_per_rank": spec.tokens,
            "top_k": spec.top_k, "link": bool(args["link"]),
            "link_bandwidth_bytes_per_s": args["link_bandwidth"] if args["link"] else None,
            "budget_bytes": system.budget_bytes,
            "chosen_n": system.chosen[0] if system.chosen else None,
            "chosen_restore": system.chosen[1] if system.chosen else None,
            "tuning_calls": system.tuning_calls, "timed_steps_profiling": system.timed_profiling,
            "median_s": median, "min_s": min(t), "max_s": max(t), "q1_s": q1, "q3_s": q3,
            "repeats": len(t), "warmup": args["warmup"], "times_s": t,
            "tokens_per_s": spec.tokens * world / median,
            "time_vs_hf_ep": ratios.get(name), "held_vs_hf_ep": mem["held_bytes"] / ref_held if ref_held else None,
            **mem, "spec": spec.__dict__, "machine": machine,
        })
    return {"rows": rows, "reference": REFERENCE if REFERENCE in systems else None, "hf_ep_held_bytes": hf_held}


def print_rows(rows: list[dict]) -> None:
    for row in rows:
        ratio = row["time_vs_hf_ep"]
        print(f"{row['label']:>60} EP={row['ep']} T={row['tokens_per_rank']} link={row['link']}: "
              f"{row['median_s'] * 1e3:.1f} ms [{row['min_s'] * 1e3:.1f}, {row['max_s'] * 1e3:.1f}]"
              + (f", {ratio['median_s']:.2f}x HF EP [{ratio['min_s']:.2f}, {ratio['max_s']:.2f}]" if ratio else "")
              + f", held {row['held_bytes'] / 2**20:.2f} MiB, host {row['host_held_bytes'] / 2**20:.2f} MiB"
              + (f", chose n={row['chosen_n']} {row['chosen_restore']}" if row["tuning_calls"] else ""), flush=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", nargs="+", required=True, help=SYSTEMS_HELP)
    parser.add_argument("--ep", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--link", action="store_true", help="simulated link on our all-to-alls")
    parser.add_argument("--link-bandwidth", type=float, default=1e8, help="simulated link bytes/s")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps per system before the rounds")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds (one step per system each)")
    parser.add_argument("--max-tuning-calls", type=int, default=40)
    parser.add_argument("--tuner-max-rounds", type=int, default=6,
                        help="LayerTuner(max_rounds=...) of the auto systems (the library default is 24)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        check_systems(args.systems, args.link)
    except ValueError as err:
        parser.error(str(err))
    if args.rounds < 1 or args.warmup < 0 or args.ep < 1 or 8 % args.ep:
        parser.error(f"need --rounds >= 1, --warmup >= 0 and --ep dividing the 8 experts; got --rounds "
                     f"{args.rounds}, --warmup {args.warmup}, --ep {args.ep}")
    payload = {k: v for k, v in vars(args).items() if k != "out"}
    start = time.perf_counter()
    result = launch(run, args.ep, payload)
    result["launch_wall_s"] = time.perf_counter() - start
    result["args"] = payload
    print_rows(result["rows"])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
