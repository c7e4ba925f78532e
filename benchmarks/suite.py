"""The side-by-side benchmark suite: the whole-model steps against HF's EP (`bench_model_step.py`,
every system interleaved in one launch per shape), every configuration of `suite_configs.py`,
one process launch each (`bench_layer.py`), then the end-to-end fine-tuning pair, then the report.

    OMP_NUM_THREADS=1 python benchmarks/suite.py            # full run (< 20 min on 2 cores)
    OMP_NUM_THREADS=1 python benchmarks/suite.py --quick    # smoke run: a few small launches

Writes benchmarks/results/suite.{json,csv}, benchmarks/RESULTS.md and benchmarks/plots/*.png
(with --quick, or --out-dir DIR: results, RESULTS.md and plots/ under that folder instead,
so that a smoke run never overwrites the real results).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import report  # noqa: E402
from suite_configs import HALF_OF_HF, LINK_BANDWIDTH, Run, runs  # noqa: E402


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _hf_held(rows: list[dict], run: Run) -> int | None:
    for row in rows:
        if (row.get("system") == "hf_ep_grouped_mm" and row["ep"] == run.ep and row["tokens_per_rank"] == run.tokens
                and row["top_k"] == run.top_k):
            return int(row["held_bytes"])
    return None


def launch_one(run: Run, rows: list[dict], rows_dir: Path, repeats: int, warmup: int) -> dict:
    out = rows_dir / f"{run.key}.json"
    cmd = [sys.executable, str(HERE / "bench_layer.py"), "--system", run.system, "--ep", str(run.ep),
           "--tokens", str(run.tokens), "--top-k", str(run.top_k), "--repeats", str(repeats),
           "--warmup", str(warmup), "--out", str(out)]
    if run.link:
        cmd += ["--link", "--link-bandwidth", str(LINK_BANDWIDTH)]
    if run.budget == HALF_OF_HF:
        held = _hf_held(rows, run)
        if held is None:
            return {"key": run.key, "group": run.group, "system": run.system, "error": "no HF EP row to take the budget from"}
        cmd += ["--budget-bytes", str(held // 2)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stdout + proc.stderr)[-1500:]
        print(f"  FAILED {run.key} ({wall:.0f} s):\n{tail}", flush=True)
        return {"key": run.key, "group": run.group, "system": run.system, "ep": run.ep, "tokens_per_rank": run.tokens,
                "top_k": run.top_k, "link": run.link, "error": tail}
    row = json.loads(out.read_text())
    row.update(key=run.key, group=run.group, launch_wall_s=wall, budget_rule=run.budget)
    print(f"  {proc.stdout.strip().splitlines()[-1].strip()}  ({wall:.0f} s)", flush=True)
    return row


def run_model_step(results_dir: Path) -> dict | None:
    """The whole-model section: `bench_model_step.py` (both shapes) in its own process; None if it failed."""
    out = results_dir / "model_step.json"
    cmd = [sys.executable, str(HERE / "bench_model_step.py"), "--tokens", "1024", "--repeats", "5",
           "--out", str(out)]
    print("whole-model steps: " + " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    print(proc.stdout[-4000:], flush=True)
    if proc.returncode != 0 or not out.exists():
        print(f"  FAILED whole-model steps ({time.perf_counter() - start:.0f} s):\n{proc.stderr[-1500:]}", flush=True)
        return None
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: a few small launches, no end-to-end pair")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="write results, RESULTS.md and plots/ here (default: benchmarks/; "
                             "--quick defaults to benchmarks/results/quick)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--skip-e2e", action="store_true", help="no end-to-end fine-tuning pair")
    parser.add_argument("--skip-model-step", action="store_true",
                        help="no whole-model section (bench_model_step.py); --quick skips it too")
    args = parser.parse_args(argv)
    out_dir = args.out_dir or (HERE / "results" / "quick" if args.quick else None)
    results_dir = out_dir if out_dir else HERE / "results"
    md_path = (out_dir / "RESULTS.md") if out_dir else HERE / "RESULTS.md"
    plots_dir = (out_dir / "plots") if out_dir else HERE / "plots"
    rows_dir = results_dir / "suite_rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    repeats = args.repeats or (3 if args.quick else 7)
    warmup = 1 if args.quick else 2

    started = time.perf_counter()
    plan = runs(args.quick)
    rows: list[dict] = []
    model_step = None
    if not (args.quick or args.skip_model_step):
        model_step = run_model_step(results_dir)
    print(f"suite: {len(plan)} launches, {repeats} timed steps each", flush=True)
    for i, run in enumerate(plan, 1):
        print(f"[{i}/{len(plan)}] {run.key}", flush=True)
        rows.append(launch_one(run, rows, rows_dir, repeats, warmup))
    e2e = None
    if not (args.quick or args.skip_e2e):
        import bench_e2e_finetune

        e2e = bench_e2e_finetune.run_pair(results_dir / "e2e")
    wall = time.perf_counter() - started
    payload = {
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick, "repeats": repeats, "warmup": warmup, "suite_wall_s": wall,
        "link_bandwidth_bytes_per_s": LINK_BANDWIDTH, "rows": rows, "e2e": e2e, "model_step": model_step,
    }
    name = "suite_quick" if args.quick else "suite"
    json_path = results_dir / f"{name}.json"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    csv_path = results_dir / f"{name}.csv"
    report.write_csv(rows, csv_path)
    report.generate(payload, md_path, plots_dir)
    print(f"suite wall time {wall / 60:.1f} min; wrote {json_path}, {csv_path}, {md_path}, {plots_dir}/")
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
