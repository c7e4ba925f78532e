"""The side-by-side benchmark suite: the whole-model steps against HF's EP (`bench_model_step.py`,
every system interleaved in one launch per shape), the layer-level launches of `suite_configs.py`
(`bench_layer.py`, every system of a launch interleaved in it), then the end-to-end fine-tuning
pair (rounds alternating the order), then the report. Each section's wall time is printed and
recorded (suite.json `section_wall_s`, RESULTS.md's header).

    OMP_NUM_THREADS=1 python benchmarks/suite.py            # full run (< 20 min on 2 cores)
    OMP_NUM_THREADS=1 python benchmarks/suite.py --quick    # smoke run: one small layer launch

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
from suite_configs import LINK_BANDWIDTH, Launch, launches  # noqa: E402


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def launch_one(launch: Launch, rows_dir: Path, rounds: int, warmup: int) -> tuple[list[dict], float]:
    """One `bench_layer.py` launch (all of `launch.systems` interleaved): its rows and wall time."""
    out = rows_dir / f"{launch.key}.json"
    cmd = [sys.executable, str(HERE / "bench_layer.py"), "--systems", *launch.systems, "--ep", str(launch.ep),
           "--tokens", str(launch.tokens), "--top-k", str(launch.top_k), "--rounds", str(launch.rounds or rounds),
           "--warmup", str(warmup), "--out", str(out)]
    if launch.link:
        cmd += ["--link", "--link-bandwidth", str(LINK_BANDWIDTH)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stdout + proc.stderr)[-1500:]
        print(f"  FAILED {launch.key} ({wall:.0f} s):\n{tail}", flush=True)
        return [{"key": f"{launch.key}-{system}", "group": launch.group, "system": system, "ep": launch.ep,
                 "tokens_per_rank": launch.tokens, "top_k": launch.top_k, "link": launch.link, "error": tail}
                for system in launch.systems], wall
    rows = json.loads(out.read_text())["rows"]
    for row in rows:
        row.update(key=f"{launch.key}-{row['system']}", group=launch.group, launch_key=launch.key,
                   launch_wall_s=wall)
    print(proc.stdout.rstrip() + f"\n  ({wall:.0f} s)", flush=True)
    return rows, wall


def run_model_step(results_dir: Path, repeats: int) -> dict | None:
    """The whole-model section: `bench_model_step.py` (both shapes) in its own process; None if it failed."""
    out = results_dir / "model_step.json"
    cmd = [sys.executable, str(HERE / "bench_model_step.py"), "--tokens", "1024", "--repeats", str(repeats),
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
    parser.add_argument("--quick", action="store_true", help="smoke run: one small launch, no whole-model "
                        "section, no end-to-end pair")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="write results, RESULTS.md and plots/ here (default: benchmarks/; "
                             "--quick defaults to benchmarks/results/quick)")
    parser.add_argument("--rounds", "--repeats", dest="rounds", type=int, default=None,
                        help="interleaved rounds of each layer-level launch (default 7; --quick 2)")
    parser.add_argument("--model-step-rounds", type=int, default=5, help="interleaved rounds of bench_model_step.py")
    parser.add_argument("--e2e-rounds", type=int, default=2, help="rounds of the end-to-end pair (order alternating)")
    parser.add_argument("--skip-e2e", action="store_true", help="no end-to-end fine-tuning pair")
    parser.add_argument("--skip-model-step", action="store_true",
                        help="no whole-model section (bench_model_step.py); --quick skips it too")
    args = parser.parse_args(argv)
    for name in ("rounds", "model_step_rounds", "e2e_rounds"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    out_dir = args.out_dir or (HERE / "results" / "quick" if args.quick else None)
    results_dir = out_dir if out_dir else HERE / "results"
    md_path = (out_dir / "RESULTS.md") if out_dir else HERE / "RESULTS.md"
    plots_dir = (out_dir / "plots") if out_dir else HERE / "plots"
    rows_dir = results_dir / "suite_rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    rounds = args.rounds or (2 if args.quick else 7)
    warmup = 1

    started = time.perf_counter()
    sections: dict[str, float] = {}
    plan = launches(args.quick)
    rows: list[dict] = []
    model_step = None
    if not (args.quick or args.skip_model_step):
        t0 = time.perf_counter()
        model_step = run_model_step(results_dir, args.model_step_rounds)
        sections["model_step"] = time.perf_counter() - t0
        print(f"section model_step: {sections['model_step']:.0f} s", flush=True)
    print(f"layer launches: {len(plan)}, {rounds} interleaved rounds each", flush=True)
    launch_walls = {}
    t0 = time.perf_counter()
    for i, launch in enumerate(plan, 1):
        print(f"[{i}/{len(plan)}] {launch.key}: {' '.join(launch.systems)}", flush=True)
        launch_rows, launch_walls[launch.key] = launch_one(launch, rows_dir, rounds, warmup)
        rows += launch_rows
    sections["layer"] = time.perf_counter() - t0
    print(f"section layer: {sections['layer']:.0f} s", flush=True)
    e2e = None
    if not (args.quick or args.skip_e2e):
        import bench_e2e_finetune

        t0 = time.perf_counter()
        e2e = bench_e2e_finetune.run_rounds(results_dir / "e2e", rounds=args.e2e_rounds)
        sections["e2e"] = time.perf_counter() - t0
        print(f"section e2e: {sections['e2e']:.0f} s", flush=True)
    payload = {
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick, "rounds": rounds, "warmup": warmup, "model_step_rounds": args.model_step_rounds,
        "e2e_rounds": args.e2e_rounds, "section_wall_s": sections, "launch_wall_s": launch_walls,
        "link_bandwidth_bytes_per_s": LINK_BANDWIDTH, "rows": rows, "e2e": e2e, "model_step": model_step,
    }
    name = "suite_quick" if args.quick else "suite"
    json_path = results_dir / f"{name}.json"
    csv_path = results_dir / f"{name}.csv"
    t0 = time.perf_counter()
    report.write_csv(rows, csv_path)
    payload["suite_wall_s"] = time.perf_counter() - started  # up to the report (which records its own time)
    report.generate(payload, md_path, plots_dir)
    sections["report"] = time.perf_counter() - t0
    payload["suite_wall_s"] = time.perf_counter() - started
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    print("section wall times: " + ", ".join(f"{k} {v:.0f} s" for k, v in sections.items()))
    print(f"suite wall time {payload['suite_wall_s'] / 60:.1f} min; wrote {json_path}, {csv_path}, {md_path}, "
          f"{plots_dir}/")
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
