"""End to end: the default recipe's tokens/s and peak memory against the same fine-tuning with
Hugging Face's built-in EP under plain Lightning DDP (`bench_e2e_hf_ddp.py`).

    OMP_NUM_THREADS=1 python benchmarks/bench_e2e_finetune.py [--steps 80] [--rounds 2] [--out-dir DIR]

`--rounds R` runs R pairs back to back, the order alternating (ours, HF, HF, ours, ...), and
reports each round's tokens/s ratio and their median [min, max].

Both: the tiny Mixtral of `conf/model/mixtral_tiny.yaml` (8 experts, top-2), the shipped
corpus, seq_len 64, batch 8 per rank, 2 CPU processes, EP = 2. Ours is
`python -m lightning_mpipemoe.recipes.finetune trainer.max_steps=N` with its defaults (its
summary.json gives tokens/s after its warm-up steps); peak RSS is the largest of the
processes the command waited for (`RUSAGE_CHILDREN`, so one command per fresh Python).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _models_dir() -> Path:
    cache = os.environ.get("MPIPEMOE_CACHE", os.path.join(os.environ.get("HOME", "."), ".cache", "lightning_mpipemoe"))
    return Path(cache) / "models" / "mixtral_tiny"


def _measured(cmd: list[str], out_dir: Path, name: str) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run `cmd` in a fresh Python that reports its children's peak RSS (bytes)."""
    probe = ("import json,resource,subprocess,sys,time;t=time.perf_counter();"
             "p=subprocess.run(sys.argv[1:]);"
             "print('E2E_PROBE',json.dumps([p.returncode,time.perf_counter()-t,"
             "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss*1024]))")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", probe, *cmd], env=env, capture_output=True, text=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.log").write_text(proc.stdout + proc.stderr)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("E2E_PROBE")), None)
    if line is None:
        return proc, float("nan"), float("nan")
    rc, wall, rss = json.loads(line.split(" ", 1)[1])
    proc.returncode = rc
    return proc, wall, rss


def run_ours(out_dir: Path, steps: int) -> dict:
    # The run directory (checkpoint, HF export: megabytes) is temporary; its summary is kept.
    run_dir = Path(tempfile.mkdtemp(prefix="mpipemoe_e2e_"))
    cmd = [sys.executable, "-m", "lightning_mpipemoe.recipes.finetune", f"trainer.max_steps={steps}",
           f"hydra.run.dir={run_dir}", "trainer.enable_progress_bar=false"]
    proc, wall, rss = _measured(cmd, out_dir, "ours")
    label = "ours: default recipe (MPipeMoEStrategy, EP=2)"
    summary_path = run_dir / "summary.json"
    if proc.returncode != 0 or not summary_path.exists():
        shutil.rmtree(run_dir, ignore_errors=True)
        return {"label": label, "error": f"exit {proc.returncode}: {(proc.stdout + proc.stderr)[-600:]}"}
    summary = json.loads(summary_path.read_text())
    shutil.copy(summary_path, out_dir / "ours_summary.json")
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"label": label, "steps": summary["run"]["steps"], "tokens_per_s": summary["tokens_per_second"],
            "peak_rss_bytes": rss, "wall_s": wall, "note": "tokens/s from summary.json (after its warm-up steps)",
            "moe": summary.get("moe")}


def run_hf_ddp(out_dir: Path, steps: int) -> dict:
    out = out_dir / "hf_ep_ddp.json"
    cmd = [sys.executable, str(HERE / "bench_e2e_hf_ddp.py"), "--model-dir", str(_models_dir()),
           "--steps", str(steps), "--out", str(out)]
    proc, wall, rss = _measured(cmd, out_dir, "hf_ep_ddp")
    label = "HF built-in EP (its EP plan, AllToAllEP) under Lightning DDP"
    if proc.returncode != 0 or not out.exists():
        err = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "Error" in ln or "error" in ln]
        return {"label": label, "error": f"exit {proc.returncode}: " + (err[-1] if err else (proc.stdout + proc.stderr)[-400:])}
    result = json.loads(out.read_text())
    return {"label": label, **result, "peak_rss_bytes": rss, "wall_s": wall, "note": "tokens/s after 5 warm-up steps; expert DTensors left out of DDP, "
            "clipping at global norm 1.0 as the recipe's, AdamW foreach=False (see bench_e2e_hf_ddp.py)"}


def run_pair(out_dir: Path, steps: int = 80, hf_first: bool = False) -> dict:
    """One run of each side, ours first unless `hf_first` (ours writes the tiny checkpoint HF's
    side loads, so the very first run of a fresh machine must be ours)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = {}
    for name in (("hf_ep_ddp", "ours") if hf_first else ("ours", "hf_ep_ddp")):
        result[name] = run_ours(out_dir, steps) if name == "ours" else run_hf_ddp(out_dir, steps)
        r = result[name]
        print(f"  e2e {name}: {r.get('tokens_per_s') or r.get('error')}", flush=True)
    ours, hf = result["ours"].get("tokens_per_s"), result["hf_ep_ddp"].get("tokens_per_s")
    return {"steps": steps, "order": list(result), **result, "ratio": ours / hf if ours and hf else None,
            "wall_s": time.perf_counter() - start}


def run_rounds(out_dir: Path, steps: int = 80, rounds: int = 2) -> dict:
    """`rounds` pairs back to back, the order alternating (ours, HF, HF, ours, ...), so that a
    load change mid-run falls on both sides: each round's ratio and their median."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    start = time.perf_counter()
    pairs = [run_pair(out_dir / f"round{i}", steps, hf_first=bool(i % 2)) for i in range(rounds)]
    ratios = [p["ratio"] for p in pairs if p["ratio"] is not None]
    return {"steps": steps, "rounds": pairs,
            "ratio": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)} if ratios else None,
            "wall_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80,
                        help="training steps of each run (80: the default recipe's, conf/trainer/cpu.yaml)")
    parser.add_argument("--rounds", type=int, default=2, help="pairs back to back, the order alternating")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results" / "e2e")
    args = parser.parse_args()
    if args.steps < 6 or args.rounds < 1:
        parser.error(f"need --steps >= 6 (5 warm-up steps are not timed) and --rounds >= 1; got --steps "
                     f"{args.steps}, --rounds {args.rounds}")
    result = run_rounds(args.out_dir, args.steps, args.rounds)
    (args.out_dir / "e2e.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    for i, pair in enumerate(result["rounds"]):
        ratio = pair["ratio"]
        print(f"round {i} ({' then '.join(pair['order'])}): ours / HF EP under DDP = "
              + (f"{ratio:.2f}x tokens/s" if ratio else "failed"))
    if result["ratio"]:
        r = result["ratio"]
        print(f"median over {len(result['rounds'])} rounds: {r['median']:.2f}x [{r['min']:.2f}, {r['max']:.2f}]")


if __name__ == "__main__":
    main()
