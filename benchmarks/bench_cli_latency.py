"""Wall-clock time of the command line's quick answers: `--help`, `--cfg job` and refused options.

    python benchmarks/bench_cli_latency.py [--repeats 5]
    python benchmarks/bench_cli_latency.py --command "python -m lightning_mpipemoe.recipes.finetune" \\
        --cwd /path/to/older/checkout --cases help,cfg_job,bad_ep     # an older version, for before/after

Each case runs `repeats` times as a fresh process (interpreter start-up, imports, Hydra's
composition: what a user waits for) and reports the median and the range of the wall-clock
time, and the median CPU time (user + system: what the command costs, whatever the load). The cases run in
turn, one run of each per round, so a shared machine's changing load falls on all of them
alike. Issue 16 asks for a median under 1.5 s; the figure depends on the machine's load, so
the load average is written next to it. Cases `negative_lr` and `model_typo` start training in
versions from before their checks existed (do not run them on those). Writes
benchmarks/results/cli_latency.json (or `--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPT = str(Path(sys.executable).parent / "mpipemoe-finetune")
CASES = {
    "help": (["--help"], 0),
    "cfg_job": (["--cfg", "job"], 0),
    "bad_ep": (["trainer.devices=4", "strategy.expert_parallel_size=3"], 2),
    "negative_lr": (["optim.learning_rate=-1"], 2),
    "model_typo": (["model.path=/nonexistent/model"], 2),
}


def _cpu_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _once(command: list[str], args: list[str], status: int, cwd: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the command and its children)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    cpu, start = _cpu_children(), time.perf_counter()
    result = subprocess.run(command + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    seconds, cpu = time.perf_counter() - start, _cpu_children() - cpu
    if result.returncode != status:
        raise SystemExit(f"{shlex.join(command + args)}: exit status {result.returncode}, expected {status}:\n"
                         f"{result.stderr[-2000:]}")  # fmt: skip
    return seconds, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--command", default=SCRIPT, help="the finetune command (default: the installed script)")
    parser.add_argument("--cwd", default=None, help="run from here (default: an empty temporary directory)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "cli_latency.json"))
    args = parser.parse_args()
    command = shlex.split(args.command)
    cases = args.cases.split(",")
    times: dict[str, list[float]] = {case: [] for case in cases}
    cpu: dict[str, list[float]] = {case: [] for case in cases}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as empty:
        cwd = args.cwd or empty
        for _ in range(args.repeats):
            for case in cases:
                wall, used = _once(command, *CASES[case], cwd)
                times[case].append(wall)
                cpu[case].append(used)
    rows = {
        case: {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "runs_s": ts,
               "cpu_median_s": statistics.median(cpu[case])}
        for case, ts in times.items()
    }
    for case, row in rows.items():
        print(f"{case:12s} median {row['median_s']:.2f} s  (min {row['min_s']:.2f}, max {row['max_s']:.2f}), "
              f"CPU {row['cpu_median_s']:.2f} s")
    load_after = os.getloadavg()
    print(f"load average (1 min) {load_before[0]:.1f} before, {load_after[0]:.1f} after; {os.cpu_count()} CPUs")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    record = {"command": args.command, "repeats": args.repeats, "cases": rows,
              "load_average_1min": [load_before[0], load_after[0]], "cpus": os.cpu_count()}  # fmt: skip
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
