"""Per-step overhead of `MPipeMoEStrategy`: the default recipe's model and batch under plain
Lightning DDP (experts replicated) against `MPipeMoEStrategy` at EP = 1, interleaved in one launch.

    OMP_NUM_THREADS=1 python benchmarks/bench_strategy_overhead.py [--rounds 6] [--steps 14] [--skip 4]

Both sides: the tiny Mixtral of `conf/model/mixtral_tiny.yaml` (`CausalLMFineTune`, the
recipe's AdamW settings), the shipped corpus at seq_len 64, batch 8 per rank, 2 CPU processes
(gloo), `gradient_clip_val=1.0`, `log_every_n_steps=1` and a CSV logger as in the recipe. Under
`strategy="ddp"` the module loads the model with EP = 1 layers (every rank holds all experts,
DDP reduces them with the rest); under `MPipeMoEStrategy(expert_parallel_size=1)` the experts
are left out of DDP and reduced by the strategy's own bucketed reducer, clipping takes the
global norm and the per-step MoE metrics are logged.

One launch: the script starts itself under `torch.distributed.run` (2 processes), and each
process pair alternates short fits of the two strategies (the order rotating every round), so
both see the same machine load. A callback times every training step (batch start to batch
end, after a barrier-free `perf_counter`); the first `--skip` steps of each fit are dropped.
Printed: each side's median step time per round, the per-round ratio mpipemoe / ddp, and the
median and spread (min-max) of those ratios; `--out` writes them as JSON.
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
        """Wall time of every training step (forward, backward, clipping, optimizer step, logging)."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self._t = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self._t = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.times.append(time.perf_counter() - self._t)

    return StepTimer()


def _fit(kind: str, model_dir: Path, log_dir: Path, steps: int, timeout, log_moe_metrics: str = "layer") -> list[float]:
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
        log_every_n_steps=1,
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
        medians = {}
        for kind in order:
            times = _fit(kind, model_dir, log_dir, args.steps, timeout, args.log_moe_metrics)[args.skip :]
            # The slower rank sets the pace: the median of each step's max over ranks.
            local = torch.tensor(times, dtype=torch.float64)
            dist.all_reduce(local, op=dist.ReduceOp.MAX)
            medians[kind] = statistics.median(local.tolist())
        rounds.append(
            {
                "order": order,
                "ddp_s": medians["ddp"],
                "mpipemoe_s": medians["mpipemoe"],
                "ratio": medians["mpipemoe"] / medians["ddp"],
            }
        )
        if rank == 0:
            row = rounds[-1]
            print(
                f"round {r}: ddp {row['ddp_s'] * 1e3:7.1f} ms  mpipemoe {row['mpipemoe_s'] * 1e3:7.1f} ms  "
                f"ratio {row['ratio']:.3f}",
                flush=True,
            )
    if rank == 0:
        ratios = [row["ratio"] for row in rounds]
        summary = {
            "rounds": rounds,
            "steps_per_fit": args.steps,
            "skipped_per_fit": args.skip,
            "ddp_median_s": statistics.median(row["ddp_s"] for row in rounds),
            "mpipemoe_median_s": statistics.median(row["mpipemoe_s"] for row in rounds),
            "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
        }
        print(
            f"median step: ddp {summary['ddp_median_s'] * 1e3:.1f} ms, "
            f"mpipemoe {summary['mpipemoe_median_s'] * 1e3:.1f} ms; "
            f"ratio mpipemoe/ddp median {summary['ratio_median']:.3f} (min {min(ratios):.3f}, max "
            f"{max(ratios):.3f}) over {len(ratios)} interleaved rounds",
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
