"""Per-step overhead of `MPipeMoEStrategy`: the default recipe's model and batch under plain
Lightning DDP (experts replicated) against `MPipeMoEStrategy` at EP = 1, interleaved in one launch.

    OMP_NUM_THREADS=1 python benchmarks/bench_strategy_overhead.py [--rounds 6] [--steps 14] [--skip 4]

Both sides: the tiny Mixtral of `conf/model/mixtral_tiny.yaml` (`CausalLMFineTune`, the
recipe's AdamW settings), the shipped corpus at seq_len 64, batch 8 per rank, 2 CPU processes
(gloo), `gradient_clip_val=1.0`, `log_every_n_steps=10` and a CSV logger as in the recipe. Under
`strategy="ddp"` the module loads the model with EP = 1 layers (every rank holds all experts,
DDP reduces them with the rest); under `MPipeMoEStrategy(expert_parallel_size=1)` the experts
are left out of DDP and reduced by the strategy's own bucketed reducer, clipping takes the
global norm and the per-step MoE metrics are logged.

One launch: the script starts itself under `torch.distributed.run` (2 processes), and each
process pair alternates short fits of the two strategies (the order rotating every round), so
both see the same machine load. A callback times every training step (batch start to batch
end); the first `--skip` steps of each fit are dropped.
Printed, for wall time and for CPU time (summed over the two processes; much less sensitive to
other programs' load on a shared machine than wall time): each side's median step per round, the
per-round ratio mpipemoe / ddp, the median and spread (min-max) of those ratios, and the ratio of
the two sides' fastest rounds; `--out` writes them as JSON.
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


def _model_dir() -> Path:
    """The recipe's tiny Mixtral in the package's model cache, written there first if missing."""
    from omegaconf import OmegaConf

    from lightning_mpipemoe.recipes.tiny_checkpoint import TinySpec, ensure_tiny_checkpoint

    cache = os.environ.get("MPIPEMOE_CACHE", os.path.join(os.environ.get("HOME", "."), ".cache", "lightning_mpipemoe"))
    path = Path(cache) / "models" / "mixtral_tiny"
    spec = OmegaConf.load(HERE.parent / "conf" / "model" / "mixtral_tiny.yaml").tiny
    ensure_tiny_checkpoint(path, TinySpec(**OmegaConf.to_container(spec)))
    return path


def _step_timer():
    import lightning as L

    class StepTimer(L.Callback):
        """Wall and CPU time (this process, all its threads) of every training step: forward,
        backward, clipping, optimizer step, logging."""

        def __init__(self) -> None:
            self.times: list[tuple[float, float]] = []
            self._t = (0.0, 0.0)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self._t = (time.perf_counter(), time.process_time())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.times.append((time.perf_counter() - self._t[0], time.process_time() - self._t[1]))

    return StepTimer()


def _fit(
    kind: str, model_dir: Path, log_dir: Path, steps: int, timeout, log_moe_metrics: str = "layer"
) -> list[tuple[float, float]]:
    import lightning as L
    import torch
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.strategies import DDPStrategy

    from lightning_mpipemoe.recipes.data import TextDataModule
    from lightning_mpipemoe.recipes.module import CausalLMFineTune
    from lightning_mpipemoe.strategy import MPipeMoEStrategy

    torch.manual_seed(0)
    if kind == "ddp":
        strategy = DDPStrategy(process_group_backend="gloo", timeout=timeout)
    else:
        strategy = MPipeMoEStrategy(
            expert_parallel_size=1, start_method="popen", timeout=timeout, log_moe_metrics=log_moe_metrics
        )
    module = CausalLMFineTune(str(model_dir), learning_rate=2e-3, weight_decay=0.1, betas=(0.9, 0.95), warmup_steps=10)
    data = TextDataModule(corpus="village", tokenizer=str(model_dir), seq_len=64, batch_size=8)
    timer = _step_timer()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=steps,
        logger=CSVLogger(log_dir, name=kind),
        precision="32-true",
        gradient_clip_val=1.0,
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[timer],
    )
    trainer.fit(module, datamodule=data)
    return timer.times


def worker(args: argparse.Namespace) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    timeout = datetime.timedelta(minutes=5)
    dist.init_process_group("gloo", timeout=timeout)
    rank = dist.get_rank()
    model_dir = Path(args.model_dir)
    log_dir = Path(tempfile.mkdtemp(prefix="mpipemoe_overhead_"))
    rounds = []
    for r in range(args.rounds):
        order = ["ddp", "mpipemoe"] if r % 2 == 0 else ["mpipemoe", "ddp"]
        row: dict = {"order": order}
        for kind in order:
            times = _fit(kind, model_dir, log_dir, args.steps, timeout, args.log_moe_metrics)[args.skip :]
            # The slower rank sets the pace: each step's max over ranks (wall), sum over ranks (CPU).
            wall = torch.tensor([w for w, _ in times], dtype=torch.float64)
            cpu = torch.tensor([c for _, c in times], dtype=torch.float64)
            dist.all_reduce(wall, op=dist.ReduceOp.MAX)
            dist.all_reduce(cpu)
            row[f"{kind}_wall_s"] = statistics.median(wall.tolist())
            row[f"{kind}_cpu_s"] = statistics.median(cpu.tolist())
        for what in ("wall", "cpu"):
            row[f"ratio_{what}"] = row[f"mpipemoe_{what}_s"] / row[f"ddp_{what}_s"]
        rounds.append(row)
        if rank == 0:
            print(
                f"round {r}: wall ddp {row['ddp_wall_s'] * 1e3:6.1f} ms, mpipemoe {row['mpipemoe_wall_s'] * 1e3:6.1f} "
                f"ms, ratio {row['ratio_wall']:.3f} | CPU ddp {row['ddp_cpu_s'] * 1e3:6.1f} ms, mpipemoe "
                f"{row['mpipemoe_cpu_s'] * 1e3:6.1f} ms, ratio {row['ratio_cpu']:.3f}",
                flush=True,
            )
    if rank == 0:
        summary: dict = {"rounds": rounds, "steps_per_fit": args.steps, "skipped_per_fit": args.skip}
        for what in ("wall", "cpu"):
            ratios = [row[f"ratio_{what}"] for row in rounds]
            ddp = [row[f"ddp_{what}_s"] for row in rounds]
            ours = [row[f"mpipemoe_{what}_s"] for row in rounds]
            summary[what] = {
                "ddp_median_s": statistics.median(ddp),
                "mpipemoe_median_s": statistics.median(ours),
                "ratio_median": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                # The least loaded fit of each side: the floor both reach when the machine is quiet.
                "ratio_of_floors": min(ours) / min(ddp),
            }
            m = summary[what]
            print(
                f"{what}: median step ddp {m['ddp_median_s'] * 1e3:.1f} ms, "
                f"mpipemoe {m['mpipemoe_median_s'] * 1e3:.1f} ms; "
                f"ratio mpipemoe/ddp median {m['ratio_median']:.3f} "
                f"(min {m['ratio_min']:.3f}, max {m['ratio_max']:.3f}) over {len(ratios)} interleaved rounds; "
                f"ratio of floors {m['ratio_of_floors']:.3f}",
                flush=True,
            )
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(summary, indent=2) + "\n")
    dist.destroy_process_group()
    shutil.rmtree(log_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=14, help="steps per fit (its warm-up included)")
    parser.add_argument("--skip", type=int, default=4, help="warm-up steps of each fit left out")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--log-moe-metrics",
        default="layer",
        choices=["layer", "expert", "off"],
        help="the strategy's per-step MoE metrics (the recipe's default: layer)",
    )
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 1 or args.skip < 0 or args.steps <= args.skip:
        raise ValueError(
            f"need rounds >= 1 and steps > skip >= 0, got rounds={args.rounds}, steps={args.steps}, skip={args.skip}"
        )
    if args.worker:
        worker(args)
        return
    model_dir = _model_dir()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        __file__,
        "--worker",
        "--model-dir",
        str(model_dir),
        "--rounds",
        str(args.rounds),
        "--steps",
        str(args.steps),
        "--skip",
        str(args.skip),
    ] + (["--out", str(args.out)] if args.out is not None else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sys.exit(subprocess.run(cmd, check=False, env=env).returncode)


if __name__ == "__main__":
    main()
