"""Suite results (JSON) -> CSV, `benchmarks/RESULTS.md` and PNG plots under `benchmarks/plots/`.

    python benchmarks/report.py [benchmarks/results/suite.json]   # regenerate from a saved run

matplotlib is imported only when plots are drawn (the `bench` extra).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import report_model_step  # noqa: E402
MIB = 2**20
CSV_FIELDS = ("key", "group", "system", "label", "ep", "tokens_per_rank", "top_k", "link", "budget_bytes",
              "chosen_n", "chosen_restore", "tuning_calls", "timed_steps_profiling", "median_s", "min_s", "max_s",
              "q1_s", "q3_s", "repeats", "tokens_per_s", "held_bytes", "host_held_bytes", "peak_step_bytes",
              "time_vs_hf_ep", "time_vs_hf_ep_min", "time_vs_hf_ep_max", "held_vs_hf_ep", "error")
REFERENCE = "hf_ep_grouped_mm"  # bench_layer.REFERENCE: every layer ratio is to it, same launch, same round
SWEEP_SYSTEMS = ("ours_n1", "ours_n4", "ours_n4_s4", "ours_auto", "ours_auto_budget50")


def _ok(rows):
    return [r for r in rows if "error" not in r]


def ratio(row: dict) -> dict | None:
    """The row's per-round time ratio to HF EP (grouped_mm) of its own launch: {median_s,
    min_s, max_s} over rounds, or None (no HF row in its launch, or a failed row)."""
    return row.get("time_vs_hf_ep") if "error" not in row else None


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            flat = {k: row.get(k) for k in CSV_FIELDS}
            r = ratio(row)
            flat.update(time_vs_hf_ep=r and r["median_s"], time_vs_hf_ep_min=r and r["min_s"],
                        time_vs_hf_ep_max=r and r["max_s"])
            writer.writerow(flat)


def _f(value, fmt: str, scale: float = 1.0) -> str:
    return "–" if value is None else format(value * scale, fmt)


def _strategy(row) -> str:
    if row.get("chosen_n") is None:
        return "–"
    return f"n={row['chosen_n']}, {row['chosen_restore']}"


def _ratio_text(row: dict) -> str:
    r = ratio(row)
    return "–" if r is None else f"{r['median_s']:.2f}× [{r['min_s']:.2f}, {r['max_s']:.2f}]"


def _label(row: dict) -> str:
    label = row["label"] + (f" ({row['budget_bytes'] / MIB:.1f} MiB)" if row.get("budget_bytes") else "")
    label += " + simulated link" if row.get("link") else ""
    if row.get("timed_steps_profiling"):
        label += f" ({row['timed_steps_profiling']} timed steps still profiling)"
    return label


def _table(rows: list[dict], with_ratios: bool = True) -> list[str]:
    head = ("| system | EP | T/rank | n, restore | step ms: median [min, max] | tokens/s | held for bwd MiB "
            "| host (offload) MiB | step peak MiB |")
    sep = "|---|---:|---:|---|---|---:|---:|---:|---:|"
    if with_ratios:
        head += " time / HF EP per round: median [min, max] | held / HF EP |"
        sep += "---|---:|"
    lines = [head, sep]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['system']} | {r.get('ep', '')} | {r.get('tokens_per_rank', '')} | failed: "
                         f"`{r['error'].strip().splitlines()[-1][:80] if r['error'].strip() else 'error'}` |")
            continue
        peak = r.get("peak_step_bytes")
        line = (f"| {_label(r)} | {r['ep']} | {r['tokens_per_rank']} | {_strategy(r)} | {r['median_s'] * 1e3:.0f} "
                f"[{r['min_s'] * 1e3:.0f}, {r['max_s'] * 1e3:.0f}] | {r['tokens_per_s']:,.0f} | "
                f"{r['held_bytes'] / MIB:.2f} | {r['host_held_bytes'] / MIB:.2f} | {_f(peak, '.1f', 1 / MIB)} |")
        if with_ratios:
            line += f" {_ratio_text(r)} | {_f(r.get('held_vs_hf_ep'), '.2f')}× |"
        lines.append(line)
    return lines


def _checks(rows: list[dict], group: str = "main") -> list[str]:
    main = [r for r in _ok(rows) if r["group"] == group]
    base = next((r for r in main if r["system"] == REFERENCE), None)
    if base is None:
        return [f"No HF built-in EP (grouped_mm) row in the {group} group: no checks."]
    out = [f"HF built-in EP baseline: {base['label']}, {base['median_s'] * 1e3:.0f} ms, "
           f"holds {base['held_bytes'] / MIB:.2f} MiB for backward. Ratios: per round against its step of the "
           "same round, median [min, max] over rounds."]
    free = [r for r in main if r["system"].startswith("ours") and not r.get("budget_bytes") and ratio(r)]
    auto = next((r for r in free if r["system"] == "ours_auto"), None)
    if free:
        best = min(free, key=lambda r: ratio(r)["median_s"])
        verdict = "not behind" if ratio(best)["median_s"] <= 1.0 else "BEHIND"
        out.append(f"1. Without a memory budget: our fastest row ({best['label']}) takes {_ratio_text(best)} "
                   f"HF EP's step time: **{verdict}**.")
        if auto:
            verdict = "not behind" if ratio(auto)["median_s"] <= 1.0 else "BEHIND"
            out.append(f"   The default row (tuner chose {_strategy(auto)}) takes {_ratio_text(auto)}: **{verdict}**.")
    budget = next((r for r in main if r.get("budget_bytes") and ratio(r)), None)
    if budget:
        b = budget["budget_bytes"]
        held, host = budget["held_bytes"], budget["host_held_bytes"]
        within = "within" if held <= b else "OVER"
        within_all = "within" if held + host <= b else "over"
        t_hf = ratio(budget)["median_s"]
        out.append(
            f"2. With `memory_budget` = {b / MIB:.2f} MiB (half of HF EP's held bytes, measured first in the "
            f"launch): the tuner chose {_strategy(budget)}; measured held for backward {held / MIB:.2f} MiB: "
            f"**{within} the budget** (plus {host / MIB:.2f} MiB offloaded to host memory; held + host = "
            f"{(held + host) / MIB:.2f} MiB, {within_all} the budget — on CPU host and device are the same memory). "
            f"Step time **{_ratio_text(budget)} HF EP's** ({'≤' if t_hf <= 1.25 else '>'} 1.25×).")
    return out


def _e2e_lines(e2e: dict | None) -> list[str]:
    if not e2e:
        return ["Not run in this invocation (`--quick` or `--skip-e2e`)."]
    lines = ["| round | run | steps | tokens/s (all ranks) | peak RSS per process MiB | wall s | note |",
             "|---:|---|---:|---:|---:|---:|---|"]
    for i, pair in enumerate(e2e.get("rounds", [])):
        for name in pair.get("order", ("ours", "hf_ep_ddp")):
            r = pair.get(name) or {}
            if "error" in r or not r:
                lines.append(f"| {i} | {r.get('label', name)} | – | – | – | – | {r.get('error', 'not run')[:300]} |")
                continue
            lines.append(f"| {i} | {r['label']} | {r['steps']} | {r['tokens_per_s']:,.0f} | "
                         f"{r['peak_rss_bytes'] / MIB:.0f} | {r['wall_s']:.0f} | {r.get('note', '')} |")
    lines.append("")
    per_round = [f"{p['ratio']:.2f}× (round {i}: {' then '.join(p['order'])})" for i, p in
                 enumerate(e2e.get("rounds", [])) if p.get("ratio")]
    if e2e.get("ratio"):
        r = e2e["ratio"]
        lines.append(f"Ours / HF EP under DDP, tokens/s: **{r['median']:.2f}×** median over "
                     f"{len(e2e['rounds'])} rounds [{r['min']:.2f}, {r['max']:.2f}]; per round " + ", ".join(per_round)
                     + ". Reproduce: `OMP_NUM_THREADS=1 python benchmarks/bench_e2e_finetune.py --rounds 2`.")
    return lines


def _point(rows: list[dict], group: str) -> str:
    r = next((r for r in rows if r["group"] == group), None)
    return "no rows" if r is None else f"EP={r['ep']}, T={r['tokens_per_rank']}/rank, top-{r['top_k']}"


def plot(rows: list[dict], plots_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots_dir.mkdir(parents=True, exist_ok=True)
    ok = _ok(rows)
    made = []

    # 1. Step time vs n (EP = 2, T = 4096): fixed n without and with the link, HF EP as a line.
    fig, ax = plt.subplots(figsize=(6, 4))
    for group, style in (("main", "o-"), ("link", "s--")):
        pts = sorted((r["chosen_n"], r) for r in ok if r["group"] == group and r["system"].startswith("ours_n")
                     and r.get("chosen_restore") == "none")
        if pts:
            ax.errorbar([n for n, _ in pts], [r["median_s"] * 1e3 for _, r in pts],
                        yerr=[[(r["median_s"] - r["min_s"]) * 1e3 for _, r in pts],
                              [(r["max_s"] - r["median_s"]) * 1e3 for _, r in pts]],
                        fmt=style, capsize=3, label=f"ours, no reuse{' + simulated link' if group == 'link' else ''}")
        for r in ok:
            if r["group"] == group and r["system"] == "ours_auto" and not r.get("budget_bytes"):
                ax.plot([r["chosen_n"]], [r["median_s"] * 1e3], "*", ms=14,
                        label=f"ours default{' + link' if group == 'link' else ''} ({_strategy(r)})")
    for r in ok:
        if r["group"] == "main" and r["system"].startswith("hf_ep"):
            ax.axhline(r["median_s"] * 1e3, color="grey", ls=":" if r["system"] == REFERENCE else "-.",
                       label=f"{r['label']} (no link)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("micro-partitions n")
    ax.set_ylabel("step time, fwd+bwd (ms)")
    ax.set_title("MoE layer step time vs n ({})".format(_point(ok, "main")))
    ax.legend(fontsize=7)
    fig.tight_layout()
    made.append(plots_dir / "time_vs_n.png")
    fig.savefig(made[-1], dpi=110)
    plt.close(fig)

    # 2. Memory held per strategy (main group).
    main = [r for r in ok if r["group"] == "main"]
    if main:
        fig, ax = plt.subplots(figsize=(7, 4))
        names = [r["label"].replace(" (", "\n(").replace(" + ", "\n+ ") + (f" ({_strategy(r)})" if r.get("tuning_calls") else "")
                 for r in main]
        held = [r["held_bytes"] / MIB for r in main]
        host = [r["host_held_bytes"] / MIB for r in main]
        x = range(len(main))
        ax.bar(x, held, label="held for backward (device)")
        ax.bar(x, host, bottom=held, label="offloaded (host)")
        ax.set_xticks(list(x))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=6)
        for r in main:
            if r.get("budget_bytes"):
                ax.axhline(r["budget_bytes"] / MIB, color="red", ls="--", lw=1,
                           label=f"memory_budget {r['budget_bytes'] / MIB:.1f} MiB (half of HF EP's held)")
                break
        ax.set_ylabel("MiB per rank")
        ax.set_title("MoE layer memory by system / strategy ({})".format(_point(ok, "main")), fontsize=10)
        ax.legend(fontsize=7)
        fig.tight_layout()
        made.append(plots_dir / "memory_vs_strategy.png")
        fig.savefig(made[-1], dpi=110)
        plt.close(fig)

    # 3. Speed-up over HF EP vs tokens (EP = 2, no link): the per-round ratio's median, its
    # [min, max] over rounds as error bars (every point from one launch, rounds interleaved).
    sweep = [r for r in ok if r["group"] in ("main", "tokens") and r["ep"] == 2 and not r.get("link")
             and r["system"] in SWEEP_SYSTEMS and ratio(r)]
    if sweep:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for i, system in enumerate(SWEEP_SYSTEMS):
            pts = sorted(((r["tokens_per_rank"], r) for r in sweep if r["system"] == system), key=lambda p: p[0])
            if not pts:
                continue
            tokens = [t * 1.03 ** (i - 2) for t, _ in pts]  # a small offset so that error bars do not overlap
            speedup = [1 / ratio(r)["median_s"] for _, r in pts]
            low = [s - 1 / ratio(r)["max_s"] for s, (_, r) in zip(speedup, pts)]
            high = [1 / ratio(r)["min_s"] - s for s, (_, r) in zip(speedup, pts)]
            label = pts[0][1]["label"].replace(" of HF EP's held", "")
            ax.errorbar(tokens, speedup, yerr=[low, high], fmt="o-", capsize=3, label=label)
        ax.axhline(1.0, color="grey", ls=":")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per rank")
        ax.set_ylabel("speed-up over HF built-in EP (×)")
        ax.set_title("Speed-up vs tokens (EP=2, top-2, CPU gloo)\nper-round ratio, median [min, max] over rounds",
                     fontsize=9)
        ax.legend(fontsize=6)
        fig.tight_layout()
        made.append(plots_dir / "speedup_vs_tokens.png")
        fig.savefig(made[-1], dpi=110)
        plt.close(fig)
    return made


def generate(payload: dict, md_path: Path, plots_dir: Path) -> Path:
    rows = payload["rows"]
    plots = plot(rows, plots_dir)
    rel = lambda p: os.path.relpath(p, md_path.parent)  # noqa: E731
    groups = {
        "main": "Main table: T = {T} tokens per rank, EP = {ep}, top-{k}, CPU gloo, no simulated link",
        "link": "With the simulated link, T = {T}, EP = {ep} (ours only; HF's AllToAllEP has no link seam, so no "
                "HF ratio)",
        "ep4": "EP = {ep}, T = {T} per rank (4 processes on 2 cores: oversubscribed; compare rows with each other)",
        "tokens": "Token sweep, EP = {ep} (one launch per T; the main table's T is its last point)",
    }
    rows0 = _ok(rows)
    machine = rows0[0]["machine"] if rows0 else {}
    sections = payload.get("section_wall_s") or {}
    model_step = payload.get("model_step")
    model_plots = report_model_step.plot(model_step, plots_dir) if model_step else []
    lines = [
        "# Benchmark results: MoE layer side by side",
        "",
    ]
    if model_step:
        lines += ["## What to expect", "",
                  "Whole training steps of small HF MoE models against transformers' own expert parallelism, from "
                  "this run (details in the whole-model section below):", "",
                  *report_model_step.what_to_expect(model_step["results"]), "",
                  "A shared 2-core CPU machine is noisy: read the [min, max] spread over rounds beside each "
                  "ratio. Reproduce with `make bench`, or the whole-model part alone with "
                  "`OMP_NUM_THREADS=1 python benchmarks/bench_model_step.py`.", ""]
    lines += [
        f"Generated by `benchmarks/suite.py` ({'quick smoke run' if payload.get('quick') else 'full run'}) on "
        f"{payload.get('created_utc', '?')}, suite wall time {payload.get('suite_wall_s', 0) / 60:.1f} min"
        + (" (" + ", ".join(f"{k.replace('_', ' ')} {v / 60:.1f} min" for k, v in sections.items()) + ")"
           if sections else "")
        + f"; torch {machine.get('torch', '?')}, {machine.get('cpus', '?')} CPUs, CUDA: {machine.get('cuda')}, "
        f"1-minute load average {_f(machine.get('loadavg', [None])[0], '.1f')} at the end of the main launch. "
        "Regenerate with `make bench` (or `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/suite.py`); "
        "raw rows in `benchmarks/results/suite.json` / `suite.csv`.",
        "",
        "Layer-level workload (every table below the whole-model section): the experts call of one MoE layer, "
        "forward + backward, Mixtral experts (gated SiLU), M = 256, I = 512, 8 experts, fixed seeds (weights, "
        "routing, output gradient). **Every system of a table section runs in one process launch** "
        "(`benchmarks/bench_layer.py --systems ...`): after warm-up (and the tuners' profiling: default rows "
        f"are timed after it settled), {payload.get('rounds', '?')} rounds of one step per system, the order "
        "rotating from round to round; each step is the slowest rank's wall time after a barrier. Step time: "
        "median [min, max] over rounds. **time / HF EP**: per round, against HF built-in EP's (grouped_mm) step "
        "of the same round and launch, median [min, max] over rounds — a load change between rounds moves both "
        "sides. HF built-in EP is `apply_expert_parallelism(..., ep_implementation=\"all_to_all\")`, i.e. "
        "AllToAllEP, what `DistributedConfig(ep_size=…)` installs. Memory, one extra step per system after the "
        "timed rounds: bytes the layer call holds for backward (saved-tensor hooks, parameters excluded, the same "
        "meter for HF and ours), bytes offloaded to host, and the step's peak RSS above the RSS before it "
        "(allocator caching out of the way: glibc's mmap threshold fixed, `malloc_trim` before, kernel "
        "high-water mark reset), max over ranks. The budget rows' `memory_budget` is half of what HF EP's call "
        "holds, measured first in the same launch.",
        "",
        "## Checks (main table: top-{top_k}, T = {tokens_per_rank} per rank, EP = {ep})".format(
            **next((r for r in rows0 if r["group"] == "main"), {"top_k": "?", "tokens_per_rank": "?", "ep": "?"})),
        "",
        *_checks(rows),
        "",
    ]
    if model_step:
        lines += report_model_step.section(model_step, model_plots, rel)
    for group, title in groups.items():
        members = [r for r in rows if r.get("group") == group]
        if members:
            title = title.format(T=members[0].get("tokens_per_rank"), ep=members[0].get("ep"),
                                 k=members[0].get("top_k"))
            lines += [f"## {title}", "", *_table(members, with_ratios=group != "link"), ""]
    lines += ["## End to end: fine-tuning recipe vs HF built-in EP under plain Lightning DDP", "",
              *_e2e_lines(payload.get("e2e")), ""]
    lines += ["## Plots", ""] + [f"![{p.stem}]({rel(p)})" for p in plots] + [""]
    lines += ["## Not covered", "",
              "- CUDA rows: `bench_layer.py` runs on CPU gloo only; on a GPU machine use `benchmarks/gpu_check.sh`.",
              "- HF rows over the simulated link: HF's AllToAllEP has no seam for it (ours only in the link table).",
              "- EP = 4 runs 4 processes on 2 cores: absolute times are oversubscribed.",
              "- The layer tables' step peak (RSS growth of one step) is rough: it grows with the number of "
              "systems sharing the launch's process (n = 4 / s4 at T = 4096: 124–137 MiB beside 2 other systems, "
              "159–206 MiB beside 9, a probe of 2026-12-06), so compare it within one table only; held and host "
              "bytes are exact (the saved-tensor meter).",
              "- `memory_budget` bounds what the layer holds on the device; the tuner may meet it by offloading "
              "(s1–s3). On CPU the offload store is the same DRAM, so held + host is what the process holds.",
              "- End to end, HF's EP: `from_pretrained(distributed_config=DistributedConfig(ep_size=2))` needs "
              "`accelerate` (not a dependency) and `ep_size` dividing `tp_size * fsdp_size`; the script applies HF's "
              "EP plan (`apply_expert_parallelism`, AllToAllEP) to each MoE block instead. Plain Lightning DDP cannot "
              "wrap DTensor parameters (its start-up broadcast fails: \"aten.cat got mixed torch.Tensor and "
              "DTensor\"), nor clip gradients or run foreach AdamW over a Tensor/DTensor mix; the expert shards are "
              "left out of DDP (`_ddp_params_and_buffers_to_ignore`; with EP = world they need no reduction), "
              "clipping is by the global norm 1.0 over dense and sharded gradients (the recipe's clipping) and "
              "AdamW runs with foreach=False.", ""]
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text("\n".join(lines))
    return md_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, nargs="?", default=HERE / "results" / "suite.json")
    parser.add_argument("--md", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--plots", type=Path, default=HERE / "plots")
    args = parser.parse_args()
    payload = json.loads(args.json.read_text())
    write_csv(payload["rows"], args.json.with_suffix(".csv"))
    print(f"wrote {generate(payload, args.md, args.plots)}")


if __name__ == "__main__":
    main()
