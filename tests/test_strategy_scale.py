"""MPipeMoEStrategy beyond the two-layer, four-expert model, against single-process training
(1e-5), in one two-process launch: 4 MoE layers x 64 experts with routing skewed onto one EP
rank's experts, gradient accumulation and the pipelined executor (n = 4, restore s4) together;
frozen experts with skewed routing under the tuner (n = "auto"); a run saved at EP = 1 with
AdamW state resumed at EP = 2; and a run saved at EP = 2 resumed at EP = 4 on four processes
laid out as two nodes of two (the EP group spans both nodes).
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from pathlib import Path

import lightning_mpipemoe  # noqa: F401  isort: skip
import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist

from lightning_mpipemoe import build_process_groups
from lightning_mpipemoe.checkpointing import consolidate_checkpoint
from lightning_mpipemoe.strategy import MPipeMoEStrategy
from tests.dist_utils import run_distributed
from tests.strategy_models import (
    CLIP,
    GLOBAL_BATCH,
    AdamWMoELM,
    FrozenExpertsLM,
    LossRecorder,
    SaveAt,
    SkewedMoELM,
    TokenDataset,
    loader,
    read_losses,
    reference_run,
)
from tests.test_strategy import _in_process_world  # one-process Lightning runs inside pytest
from tests.test_strategy_matrix import _trainer

TOL = 1e-5
TIMEOUT = timedelta(seconds=60)
#: 4 MoE layers of 64 experts (32 per EP rank), top-2, narrow experts.
BIG = {"layers": 4, "num_experts": 64, "intermediate": 8}
#: Saved at step 3 (an epoch end: 3 steps an epoch), resumed for steps 4 and 5. (Not a
#: checkpoint saved at an epoch end by a run that was itself resumed: Lightning 2.6 resumes
#: that one by replaying the epoch it ended (seen: step 7 trained on step 4's batch), which no
#: uninterrupted run does.)
RESUME_AT, RESUME_STEPS = 3, 5


def _assert_states_close(got: dict, expected: dict, what: str) -> None:
    assert set(got) == set(expected), sorted(set(got) ^ set(expected))
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=TOL, rtol=0, msg=lambda m: f"{what} {key}: {m}")


def _big_skewed_accumulated(rank: int, root: Path) -> None:
    """Two micro-batches of one sequence per rank and step, n = 4 with restore s4."""
    reference = reference_run(BIG, steps=3, clip=CLIP, model_cls=SkewedMoELM)
    model = SkewedMoELM(**BIG)
    with torch.no_grad():  # the skew is real: most rows go to EP rank 0's experts (the first 32)
        _, router_logits = model(TokenDataset().global_batch(0)[:, :-1])
        index = torch.cat([lg.topk(2, dim=-1).indices.reshape(-1) for lg in router_logits])
    assert (index < 32).float().mean() > 0.9, (index < 32).float().mean()
    trainer = _trainer(root, max_steps=3, accumulate_grad_batches=2, gradient_clip_val=CLIP,
                       strategy_kwargs={"granularity": 4, "restore": "s4"})
    trainer.fit(model, loader(1))
    assert all(v.config.num_partitions == 4 for v in trainer.strategy.moe_executors.values())
    assert len(trainer.strategy.moe_executors) == 4
    full = trainer.strategy.consolidated_state_dict()
    if rank == 0:
        _assert_states_close(full, reference["states"][-1], "4 x 64 skewed, accumulated")


def _frozen_experts(rank: int, root: Path) -> None:
    reference = reference_run({}, steps=3, clip=CLIP, model_cls=FrozenExpertsLM)
    initial = FrozenExpertsLM().state_dict()
    # Skewed routing and the tuner choosing n (real timings; every decision agreed by both ranks).
    trainer = _trainer(root, max_steps=3, gradient_clip_val=CLIP, strategy_kwargs={"granularity": "auto"})
    trainer.fit(FrozenExpertsLM(), loader(GLOBAL_BATCH // 2))
    assert trainer.strategy._expert_params == []  # nothing to reduce
    assert all(v.config.num_partitions == "auto" for v in trainer.strategy.moe_executors.values())
    full = trainer.strategy.consolidated_state_dict()
    if rank == 0:
        _assert_states_close(full, reference["states"][-1], "frozen experts")
        for key in trainer.strategy.expert_parameter_names:
            assert torch.equal(full[key], initial[key]), key
        assert not torch.equal(full["blocks.0.moe.router.gate.weight"], initial["blocks.0.moe.router.gate.weight"])


def _resume_at_larger_ep(rank: int, root: Path, checkpoint: Path) -> None:
    """The EP = 1 run's step-3 checkpoint (weights, AdamW moments and step) resumed at EP = 2."""
    callbacks = [LossRecorder(root / "losses.jsonl"), SaveAt({RESUME_STEPS: root / "final.ckpt"})]
    trainer = _trainer(root, max_steps=RESUME_STEPS, gradient_clip_val=CLIP, callbacks=callbacks)
    trainer.fit(AdamWMoELM(), loader(GLOBAL_BATCH // 2), ckpt_path=checkpoint)


def _ep4_on_two_nodes_worker(rank: int, world_size: int, root: str) -> None:
    """Four processes as two nodes of two devices (what a cluster launcher sets: NODE_RANK and
    LOCAL_RANK; global rank = node x 2 + local)."""
    os.environ.update(LOCAL_RANK=str(rank % 2), NODE_RANK=str(rank // 2))
    root = Path(root)
    node = rank // 2
    # The groups on this layout: EP 2 stays within a node, its expert-dp replicas span nodes.
    groups = build_process_groups(2, timeout=TIMEOUT)
    assert dist.get_process_group_ranks(groups.ep) == [2 * node, 2 * node + 1]
    assert dist.get_process_group_ranks(groups.expert_dp) == [rank % 2, rank % 2 + 2]
    # EP 4 over both nodes (the strategy warns: every all-to-all crosses the inter-node link),
    # resuming the EP 2 run's step-3 checkpoint (weights, AdamW moments, step) for steps 4, 5.
    callbacks = [LossRecorder(root / "losses.jsonl"), SaveAt({RESUME_STEPS: root / "final.ckpt"})]
    warns = pytest.warns(UserWarning, match="puts EP groups across nodes") if rank == 0 else contextlib.nullcontext()
    with warns:
        trainer = pl.Trainer(
            accelerator="cpu", devices=2, num_nodes=2, max_steps=RESUME_STEPS, gradient_clip_val=CLIP, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=root, callbacks=callbacks,
            strategy=MPipeMoEStrategy(expert_parallel_size=4, timeout=TIMEOUT),
        )  # fmt: skip
        trainer.fit(AdamWMoELM(), loader(GLOBAL_BATCH // 4), ckpt_path=root.parent / "ep2" / "step3.ckpt")
    groups = trainer.strategy.moe_groups
    assert trainer.global_rank == rank and (trainer.node_rank, trainer.local_rank) == (node, rank % 2)
    assert dist.get_process_group_ranks(groups.ep) == [0, 1, 2, 3] and groups.expert_dp_size == 1
    assert trainer.lightning_module.blocks[0].moe.num_local_experts == 1


def _saved_at_ep2(rank: int, root: Path) -> None:
    """AdamW at EP = 2 from the start, saved at step 3: what the EP = 4 run resumes."""
    callbacks = [SaveAt({RESUME_AT: root / "step3.ckpt"})]
    trainer = _trainer(root, max_steps=RESUME_AT, gradient_clip_val=CLIP, callbacks=callbacks)
    trainer.fit(AdamWMoELM(), loader(GLOBAL_BATCH // 2))


def _worker(rank: int, world_size: int, root: str) -> None:
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0")
    root = Path(root)
    _big_skewed_accumulated(rank, root / "big")
    _frozen_experts(rank, root / "frozen")
    _resume_at_larger_ep(rank, root / "resume", root / "ep1" / "step3.ckpt")
    _saved_at_ep2(rank, root / "ep2")


def test_scale_frozen_experts_and_resume_at_larger_ep(tmp_path):
    # The EP = 1 part of the resume: one process, the whole global batch, AdamW, saved at step 3.
    with _in_process_world():
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, max_steps=RESUME_AT, gradient_clip_val=CLIP, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=tmp_path, callbacks=[SaveAt({RESUME_AT: tmp_path / "ep1" / "step3.ckpt"})],
            strategy=MPipeMoEStrategy(expert_parallel_size=1, timeout=timedelta(seconds=60)),
        )  # fmt: skip
        trainer.fit(AdamWMoELM(), loader(GLOBAL_BATCH))
    saved = torch.load(tmp_path / "ep1" / "step3.ckpt" / "meta.ckpt", weights_only=False)
    assert saved["optimizer_states"][0]["state"], "the EP = 1 checkpoint holds no AdamW state"

    run_distributed(_worker, 2, str(tmp_path), timeout_s=180)

    reference = reference_run({}, steps=RESUME_STEPS, clip=CLIP, model_cls=AdamWMoELM)
    losses = read_losses(tmp_path / "resume" / "losses.jsonl")
    assert sorted(losses) == [4, 5]
    for step, loss in losses.items():
        assert abs(loss - reference["losses"][step - 1]) <= TOL, (step, loss, reference["losses"][step - 1])
    _assert_states_close(consolidate_checkpoint(tmp_path / "resume" / "final.ckpt"), reference["states"][-1],
                         "resumed at EP = 2")

    run_distributed(_ep4_on_two_nodes_worker, 4, str(tmp_path / "ep4"), timeout_s=180)
    losses = read_losses(tmp_path / "ep4" / "losses.jsonl")
    assert sorted(losses) == [4, 5]
    for step, loss in losses.items():
        assert abs(loss - reference["losses"][step - 1]) <= TOL, (step, loss, reference["losses"][step - 1])
    _assert_states_close(consolidate_checkpoint(tmp_path / "ep4" / "final.ckpt"), reference["states"][-1],
                         "resumed at EP = 4 on two nodes")
