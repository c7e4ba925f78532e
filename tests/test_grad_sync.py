"""Expert-gradient reduction (`grad_sync.ExpertGradReducer`): in place, bucketed, started
during backward, nothing communicated with one expert-dp replica or inside accumulation;
and the EP x DP strategy run with gradient accumulation against one process.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import lightning_mpipemoe  # noqa: F401  isort: skip
import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import Callback
import torch
from torch import nn

from lightning_mpipemoe import build_process_groups, collectives
from lightning_mpipemoe.grad_sync import ExpertGradReducer, reduce_expert_gradients
from lightning_mpipemoe.groups import MoEProcessGroups
from lightning_mpipemoe.strategy import MPipeMoEStrategy
from tests.dist_utils import run_distributed
from tests.strategy_models import CLIP, HPARAMS, LossRecorder, TinyMoELM, TokenDataset, loader, read_losses

TOL = 1e-5
TIMEOUT = timedelta(seconds=60)
BUCKET_SITE = "grad_sync.expert_bucket"


def _params(dtype=torch.float32) -> list[nn.Parameter]:
    """Four 'expert' parameters of 40, 24, 64 and 8 elements (fp32: 160, 96, 256, 32 bytes)."""
    torch.manual_seed(0)
    return [nn.Parameter(torch.randn(*shape).to(dtype)) for shape in ((5, 8), (2, 12), (4, 4, 4), (8,))]


def _loss(params: list[nn.Parameter], rank: int, micro: int = 0) -> torch.Tensor:
    """A rank-dependent loss that touches every parameter."""
    scale = float(rank + 1 + 10 * micro)
    return sum((p.float() * scale).sin().sum() * (i + 1) for i, p in enumerate(params))


def _expected(params: list[nn.Parameter], world: int, ranks: range, micros: int = 1) -> list[torch.Tensor]:
    """sum over `ranks` (the expert-dp replicas) of each rank's accumulated gradient, / world."""
    totals = [torch.zeros(p.shape, dtype=torch.float64) for p in params]
    for rank in ranks:
        copies = [nn.Parameter(p.detach().clone()) for p in params]
        for micro in range(micros):
            _loss(copies, rank, micro).backward()
        for total, c in zip(totals, copies):
            total += c.grad.double()
    return [t / world for t in totals]


def _bucket_calls(calls) -> list:
    return [c for c in calls if c.site == BUCKET_SITE]


def _reducer_worker(rank: int, world_size: int) -> None:
    ep2 = build_process_groups(2, timeout=TIMEOUT)  # one expert-dp replica: nothing to communicate
    ep1 = build_process_groups(1, timeout=TIMEOUT)  # experts replicated over both ranks

    # Expert-dp size 1: no hooks, no buffers, no collective; only the division by the world.
    params = _params()
    reducer = ExpertGradReducer(params, ep2, bucket_bytes=200).attach()
    assert reducer.buckets == [] and reducer._handles == []
    with collectives.record_collectives() as calls:
        reducer.start(sync=True)
        _loss(params, rank).backward()
        reducer.finish()
    assert calls == [], calls
    for p, want in zip(params, _expected(params, 2, range(rank, rank + 1))):
        torch.testing.assert_close(p.grad.double(), want, atol=1e-6, rtol=1e-6)

    # Expert-dp size 2, buckets of at most 200 bytes, filled in reverse order: p3 (32 B) and
    # p2 (256 B) do not fit together, nor p2 and p1 (96 B), nor p1 and p0 (160 B): four buckets.
    params = _params()
    reducer = ExpertGradReducer(params, ep1, bucket_bytes=200).attach()
    assert [[id(p) for p in b.params] for b in reducer.buckets] == [[id(params[i])] for i in (3, 2, 1, 0)]
    with collectives.record_collectives() as calls:
        reducer.start(sync=True)
        _loss(params, rank).backward()
        during_backward = len(_bucket_calls(calls))  # the hooks started them; finish() not called yet
        reducer.finish()
    assert during_backward == 4, calls
    assert len(_bucket_calls(calls)) == 4 and all(c.op == "all_reduce" for c in calls), calls
    views = [reducer.buckets[3 - i].views[0] for i in range(4)]
    for p, bucket_view, want in zip(params, views, _expected(params, 2, range(2))):
        assert p.grad.data_ptr() == bucket_view.data_ptr(), "the gradient is a view into its bucket (in place)"
        torch.testing.assert_close(p.grad.double(), want, atol=1e-6, rtol=1e-6)

    # The next step (after the optimizer's zero_grad(set_to_none=True)): the buckets start during
    # backward again (their readiness counts were reset), the fresh gradients are copied into the
    # buckets, and every bucket of the previous step was waited for (or start() would refuse).
    for p in params:
        p.grad = None
    with collectives.record_collectives() as calls:
        reducer.start(sync=True)
        _loss(params, rank).backward()
        during_backward = len(_bucket_calls(calls))
        reducer.finish()
    assert during_backward == 4 and len(_bucket_calls(calls)) == 4, calls
    for p, want in zip(params, _expected(params, 2, range(2))):
        torch.testing.assert_close(p.grad.double(), want, atol=1e-6, rtol=1e-6)

    # Gradient accumulation: no collective on the first micro-batch, one per bucket on the last;
    # the optimizer's zero_grad(set_to_none=True) in between steps is fine.
    for p in params:
        p.grad = None
    one_bucket = ExpertGradReducer(params, ep1).attach()  # default bucket size: all in one
    reducer.detach()
    assert len(one_bucket.buckets) == 1
    with collectives.record_collectives() as first:
        one_bucket.start(sync=False)
        _loss(params, rank, micro=0).backward()
        one_bucket.finish()
    with collectives.record_collectives() as last:
        one_bucket.start(sync=True)
        _loss(params, rank, micro=1).backward()
        one_bucket.finish()
    assert first == [] and len(_bucket_calls(last)) == 1, (first, last)
    for p, want in zip(params, _expected(params, 2, range(2), micros=2)):
        torch.testing.assert_close(p.grad.double(), want, atol=1e-6, rtol=1e-6)
    one_bucket.detach()

    # bf16 gradients: reduced in bf16 by default, through an fp32 copy of the bucket on request.
    for in_fp32 in (False, True):
        params = _params(torch.bfloat16)
        reducer = ExpertGradReducer(params, ep1, reduce_in_fp32=in_fp32).attach()
        reducer.start(sync=True)
        _loss(params, rank).backward()
        reducer.finish()
        reducer.detach()
        for p, want in zip(params, _expected(params, 2, range(2))):
            assert p.grad.dtype == torch.bfloat16
            torch.testing.assert_close(p.grad.double(), want, atol=0.05 * want.abs().max().item(), rtol=0)

    # A parameter with a gradient on one replica only gets one everywhere; none anywhere: None.
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    a.grad = torch.full((3,), 2.0) if rank == 0 else None
    reduce_expert_gradients([a, b], ep1)
    assert torch.equal(a.grad, torch.full((3,), 1.0)) and b.grad is None

    # Bad input: a clear error before anything collective.
    with pytest.raises(ValueError, match="bucket_bytes must be a positive int, got 0"):
        ExpertGradReducer(params, ep1, bucket_bytes=0)


def test_reducer_buckets_overlap_and_accumulation():
    run_distributed(_reducer_worker, 2, timeout_s=60)


def test_single_process_reducer_is_a_no_op():
    params = _params()
    _loss(params, 0).backward()
    before = [p.grad.clone() for p in params]
    with collectives.record_collectives() as calls:
        reducer = ExpertGradReducer(params, MoEProcessGroups.local()).attach()
        reducer.start(sync=True)
        reducer.finish()
    assert calls == [] and reducer.buckets == []
    assert all(torch.equal(p.grad, g) for p, g in zip(params, before))


# --------------------------------------------------------------- EP x DP with accumulation


#: 16 sequences, 4 ranks x 1 sequence x 2 micro-batches = 8 per optimizer step, 2 steps an epoch.
ACC_DATA = 16
ACC_STEPS = 3


def _accumulation_reference() -> dict:
    model = TinyMoELM(**HPARAMS)
    optimizer = model.configure_optimizers()
    data = TokenDataset(n=ACC_DATA)
    losses = []
    for step in range(ACC_STEPS):
        loss = model.training_step(data.global_batch(step, size=8), step)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return {"losses": losses, "state": model.state_dict()}


def test_ep2_dp2_gradient_accumulation_matches_single_process(tmp_path):
    """4 processes, EP = 2 x DP = 2, accumulate_grad_batches=2, small buckets (several per
    step): the expert buckets reduce on the last micro-batch only; the losses and final
    weights equal one process on the 8-sequence global batches."""
    strategy = MPipeMoEStrategy(
        expert_parallel_size=2,
        start_method="spawn",
        timeout=TIMEOUT,
        checkpoint_timeout=CHECKPOINT_TIMEOUT,
        expert_bucket_bytes=4096,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=4,
        strategy=strategy,
        max_steps=ACC_STEPS,
        accumulate_grad_batches=2,
        gradient_clip_val=CLIP,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[_AccumulationLosses(tmp_path / "losses.jsonl"), _CheckGroupTimeouts()],
    )
    model = TinyMoELM(**HPARAMS)
    trainer.fit(model, loader(1, TokenDataset(n=ACC_DATA)))
    reference = _accumulation_reference()
    got = read_losses(tmp_path / "losses.jsonl")
    assert sorted(got) == list(range(1, ACC_STEPS + 1)), got
    for step in range(1, ACC_STEPS + 1):
        assert abs(got[step] - reference["losses"][step - 1]) <= TOL, (got, reference["losses"])
    state = model.state_dict()  # the spawn launcher hands back consolidated weights
    assert set(state) == set(reference["state"])
    for key, value in reference["state"].items():
        torch.testing.assert_close(state[key], value, atol=TOL, rtol=0, msg=lambda m: f"{key}: {m}")


CHECKPOINT_TIMEOUT = timedelta(minutes=7)


class _CheckGroupTimeouts(Callback):
    """The collectives fail fast; checkpoint barriers have their own group and limit. The
    workers reached the default group through the store the spawn launcher holds (clients
    only: no worker bound a port)."""

    def on_train_start(self, trainer, pl_module) -> None:
        strategy = trainer.strategy
        assert os.environ["TORCHELASTIC_USE_AGENT_STORE"] == "True"

        def timeout(group):
            return group._get_backend(torch.device("cpu")).options._timeout

        assert timeout(strategy.moe_groups.expert_dp) == TIMEOUT
        assert timeout(strategy.checkpoint_group) == CHECKPOINT_TIMEOUT


class _AccumulationLosses(LossRecorder):
    """The loss of each optimizer step: the mean over ranks of the sum over micro-batches
    (Lightning's `outputs["loss"]` is the micro-batch loss / accumulate_grad_batches)."""

    def __init__(self, path) -> None:
        super().__init__(path)
        self.pending: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.pending.append(outputs["loss"].detach().float())
        if len(self.pending) < trainer.accumulate_grad_batches:
            return
        mean = trainer.strategy.reduce(torch.stack(self.pending).sum(), reduce_op="mean")
        self.pending.clear()
        if trainer.is_global_zero:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": trainer.global_step, "loss": float(mean)}) + "\n")
