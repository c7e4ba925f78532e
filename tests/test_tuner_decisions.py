"""What the tuner decides by: backward time counts, the key is the busiest rank's rows, and a
real `LayerTuner`'s decisions survive a Lightning checkpoint.

Timing without a wall clock: `ProfileSample._now` (the one clock read of a profiled call) is
replaced by a scripted clock that reads the forward and backward durations of the candidate
being measured from a table, while the rest of the measurement (start, output hook, the
identity Function on the input, `per_row`) and the whole decision logic run for real.
"""

from __future__ import annotations

from dataclasses import replace

from datetime import timedelta

import lightning_mpipemoe  # noqa: F401  isort: skip
import lightning.pytorch as pl
import pytest
import torch

from lightning_mpipemoe.checkpointing import META_FILE, SECTION
from lightning_mpipemoe.moe import tuner as tuner_module
from lightning_mpipemoe.moe.executor import expert_parallel_forward
from lightning_mpipemoe.moe.load_key import load_of
from lightning_mpipemoe.moe.tuner import LayerTuner
from lightning_mpipemoe.strategy import MPipeMoEStrategy
from tests.strategy_models import GLOBAL_BATCH, SaveAt, TinyMoELM, loader
from tests.test_strategy import _in_process_world  # one-process Lightning runs inside pytest
from tests.test_tuner import E, fwd_bwd, make_batch, make_experts

FORWARD_S = 1.0


def scripted_clock(tuner: LayerTuner, backward_s: dict[int, float]):
    """`ProfileSample._now`: 0 at the start, FORWARD_S when the forward is done (equal for every
    candidate), 10 when the output's gradient arrives, 10 + backward_s[n] when the input's leaves."""

    def now(sample) -> float:
        if sample._t0 is None:
            return 0.0
        if sample.forward_s is None:
            return FORWARD_S
        if sample._bwd_start is None:
            return 10.0
        return 10.0 + backward_s[tuner._session.candidates[sample.candidate].n]

    return now


class Recording(LayerTuner):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls: list[tuple[int, bool]] = []

    def begin(self, config, **kw):
        call = super().begin(config, **kw)
        self.calls.append((call.config.num_partitions, call.sample is not None))
        return call


@pytest.mark.parametrize("inputs_need_grad", [True, False])
def test_backward_time_decides_when_forward_times_tie(monkeypatch, inputs_need_grad):
    """Forward ties everywhere; backward makes n = 4 fastest (fwd + bwd: 4, 3, 1.5, 2 x). A
    tuner blind to backward sees a tie and takes the smallest n (1). The backward end is marked
    on the input, or on the first expert weight when the input needs no gradient."""
    tuner = Recording()
    monkeypatch.setattr(tuner_module.ProfileSample, "_now", scripted_clock(tuner, {1: 3.0, 2: 2.0, 4: 0.5, 8: 1.0}))
    experts = make_experts(E)
    for step in range(24):
        batch = make_batch(40, E, seed=step)
        if not inputs_need_grad:
            batch = (batch[0].detach(), batch[1], batch[2].detach())
            out = expert_parallel_forward(*batch, experts, tuner=tuner)
            out.square().sum().backward()
        else:
            fwd_bwd(expert_parallel_forward, batch, experts, tuner=tuner)
        if not tuner.tuning and tuner.table.points:
            break
    assert tuner.profile_calls >= 8, tuner.calls
    assert tuner.table.points == [(80, 4)], tuner.table.points
    fwd_bwd(expert_parallel_forward, make_batch(40, E, seed=99), experts, tuner=tuner)
    assert tuner.calls[-1] == (4, False)
    # The recorded times are per row (key 80): forward + backward, and forward.
    metrics = tuner.metrics()
    assert metrics["candidate_ms/n4"] == pytest.approx((FORWARD_S + 0.5) * 1e3)
    assert metrics["candidate_ms/n1"] == pytest.approx((FORWARD_S + 3.0) * 1e3)


def test_load_key_is_the_busiest_ranks_rows():
    """EP = 2, 4 experts (2 per rank), summed packet `[kept per expert | sent per rank | tokens
    per rank]`, built by hand. Rank 0 sends 10 rows, all to its own experts; rank 1 sends 6
    rows, 4 to rank 0's experts and 2 to its own. Received: rank 0 14, rank 1 2. Key: max over
    ranks of max(sent, received) = 14 (a sum over ranks would be 16; the sent rows alone 10)."""
    kept_E = torch.tensor([9, 5, 2, 0])  # rank 0: 6 + 4 to e0/e1; rank 1: 3 + 1 to e0/e1, 2 to e2
    summed = torch.cat([kept_E, torch.tensor([10, 6]), torch.tensor([5, 3])])
    assert load_of(summed, 4, 2) == (14, 5)
    # The sender is the busiest: rank 1 sends 30 rows, 20 of them to rank 0 (received 26, 10).
    summed = torch.cat([torch.tensor([20, 6, 4, 6]), torch.tensor([6, 30]), torch.tensor([3, 15])])
    assert load_of(summed, 4, 2) == (30, 15)
    # EP = 4, one expert per rank: the published key (largest per-expert count) when it dominates.
    summed = torch.cat([torch.tensor([3, 17, 5, 1]), torch.tensor([7, 6, 7, 6]), torch.tensor([7, 6, 7, 6])])
    assert load_of(summed, 4, 4) == (17, 7)
    # EP = 1: all rows of the rank.
    assert load_of(torch.tensor([4, 3, 2, 1, 10, 5]), 4, 1) == (10, 5)


# -- a real LayerTuner through a Lightning checkpoint ------------------------------------------------

TUNED_STEPS = 18  # a session of at most 4 rounds x 4 candidates per layer, then its end


class TunedMoELM(TinyMoELM):
    """TinyMoELM with `num_partitions="auto"`: each MoE layer's own LayerTuner picks n (sessions
    bounded at 4 rounds to keep the test short)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(num_partitions="auto", **kwargs)
        for block in self.blocks:
            # Named candidates: the strategy keeps them on this one-rank group (the default set
            # is narrowed to n = 1 there, with nothing to profile).
            block.moe.config = replace(block.moe.config, candidates=(1, 2, 4, 8))
            block.moe.tuner = Recording(max_rounds=4)

    @property
    def tuners(self) -> list[Recording]:
        return [block.moe.tuner for block in self.blocks]


def _fit(model, root, max_steps, callbacks=(), ckpt_path=None) -> None:
    with _in_process_world():
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, default_root_dir=root, callbacks=list(callbacks),
            strategy=MPipeMoEStrategy(expert_parallel_size=1, timeout=timedelta(seconds=60)),
        )  # fmt: skip
        trainer.fit(model, loader(GLOBAL_BATCH), ckpt_path=ckpt_path)


def test_layer_tuner_decisions_survive_a_lightning_checkpoint(tmp_path):
    tuned = TunedMoELM()
    ckpt = tmp_path / "tuned.ckpt"
    _fit(tuned, tmp_path, TUNED_STEPS, callbacks=[SaveAt({TUNED_STEPS: ckpt})])
    points = [t.table.points for t in tuned.tuners]
    assert all(not t.tuning and len(p) == 1 and t.profile_calls > 0 for t, p in zip(tuned.tuners, points)), points
    saved = torch.load(ckpt / META_FILE, weights_only=False)[SECTION]["executor_state"]
    assert [saved[f"blocks.{i}.moe"]["points"] for i in range(2)] == [t.table.state() for t in tuned.tuners]

    resumed = TunedMoELM()
    _fit(resumed, tmp_path, TUNED_STEPS + 3, ckpt_path=ckpt)
    for before, after in zip(tuned.tuners, resumed.tuners):
        assert after.profile_calls == 0 and not after.tuning, after.calls  # nothing re-profiled
        assert after.table.points == before.table.points  # the same decisions
        assert [n for n, _ in after.calls] == [before.table.points[0][1]] * 3  # ... and they are used
