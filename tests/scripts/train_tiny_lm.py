"""Train the tests' TinyMoELM with `Trainer(strategy="mpipemoe")` from the command line.

One machine, two processes (Lightning launches the second one by re-running this script):

    OMP_NUM_THREADS=1 python tests/scripts/train_tiny_lm.py --devices 2 --out /tmp/run

Two "nodes" on one machine, two processes each (run both commands, e.g. in two shells):

    OMP_NUM_THREADS=1 torchrun --nnodes 2 --nproc-per-node 2 --node-rank 0 --master-addr 127.0.0.1 \
        --master-port 29511 tests/scripts/train_tiny_lm.py --devices 2 --num-nodes 2 --out /tmp/run2
    OMP_NUM_THREADS=1 torchrun --nnodes 2 --nproc-per-node 2 --node-rank 1 --master-addr 127.0.0.1 \
        --master-port 29511 tests/scripts/train_tiny_lm.py --devices 2 --num-nodes 2 --out /tmp/run2

Writes to --out: `losses.jsonl` (mean loss over ranks per step), `final.ckpt/` (the strategy's
checkpoint after the last step) and `layout-rank{r}.json` (this rank's node and EP group).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `tests.*`

import lightning.pytorch as pl  # noqa: E402
import torch.distributed as dist  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

import lightning_mpipemoe.strategy  # noqa: E402, F401  registers "mpipemoe"
from tests.strategy_models import (  # noqa: E402
    CLIP,
    GLOBAL_BATCH,
    HPARAMS,
    STEPS,
    LossRecorder,
    SaveAt,
    TinyMoELM,
    loader,
)


class WriteLayout(Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_start(self, trainer, pl_module) -> None:
        groups = trainer.strategy.moe_groups
        layout = {
            "rank": trainer.global_rank,
            "node_rank": trainer.node_rank,
            "ep_ranks": dist.get_process_group_ranks(groups.ep),
            "expert_dp_ranks": dist.get_process_group_ranks(groups.expert_dp),
        }
        (self.out / f"layout-rank{trainer.global_rank}.json").write_text(json.dumps(layout))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    world = args.devices * args.num_nodes
    trainer = pl.Trainer(
        strategy="mpipemoe",
        accelerator="cpu",
        devices=args.devices,
        num_nodes=args.num_nodes,
        max_steps=STEPS,
        gradient_clip_val=CLIP,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=args.out,
        callbacks=[
            LossRecorder(args.out / "losses.jsonl"),
            SaveAt({STEPS: args.out / "final.ckpt"}),
            WriteLayout(args.out),
        ],
    )
    trainer.fit(TinyMoELM(**HPARAMS), loader(GLOBAL_BATCH // world))


if __name__ == "__main__":
    main()
