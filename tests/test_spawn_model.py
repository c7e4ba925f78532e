"""`strategy="mpipemoe_spawn"` with a Hugging Face MoE model: the README's pattern (model
loaded in the main process, pickled into the workers) trains with transformers' router aux
loss, and after `fit` the main process's module holds the trained weights (every expert),
also when the model is built in `configure_model`. One spawn run per pattern.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import lightning_mpipemoe  # noqa: F401  isort: skip  (first: registers "mpipemoe"; see tests/hf_tiny.py)
import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_mpipemoe import consolidate_checkpoint
from lightning_mpipemoe.hf_models.api import MoECausalLMModule
from lightning_mpipemoe.hf_models.output_capturing import restore_output_capturing
from tests.hf_tiny import tiny_batch, tiny_model
from tests.strategy_models import LossRecorder, SaveAt, read_losses
from tests.test_peft import GLOBAL_BATCH, Samples, shard

STEPS = 3
LR = 1e-2


class ConfiguredLM(MoECausalLMModule):
    """Builds its model in `configure_model` (only the workers run it during `fit`)."""

    def __init__(self) -> None:
        super().__init__(None, learning_rate=LR)

    def configure_model(self) -> None:
        if self.model is None:
            self.model = tiny_model("mixtral", seed=0)


def _fit(module: pl.LightningModule, root: Path) -> None:
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="mpipemoe_spawn", max_steps=STEPS, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
        callbacks=[LossRecorder(root / "losses.jsonl"), SaveAt({STEPS: root / "final.ckpt"})],
    )  # fmt: skip
    trainer.fit(module, DataLoader(Samples(), batch_size=GLOBAL_BATCH // 2, shuffle=False))


@pytest.fixture(scope="module")
def loaded_in_main(tmp_path_factory):
    root = tmp_path_factory.mktemp("main_model")
    module = MoECausalLMModule(tiny_model("mixtral", seed=0), learning_rate=LR)
    with torch.no_grad():  # a forward in the main process installs transformers' (unpicklable) hooks
        module.model(**tiny_batch("mixtral"), output_router_logits=True)
    _fit(module, root)
    return root, module


def _assert_state_equal(got: dict, expected: dict) -> None:
    assert set(got) == set(expected), sorted(set(got) ^ set(expected))[:4]
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=0, rtol=0, msg=lambda m: f"{key}: {m}")


def test_readme_pattern_trains_with_the_router_aux_loss(loaded_in_main):
    """The model even ran a forward in the main process first. Step 1's loss (mean over both
    ranks) equals the single-process loss of the initial model on the same shards, aux loss
    included (a lost aux loss would crash or lower it)."""
    root, _ = loaded_in_main
    reference = MoECausalLMModule(tiny_model("mixtral", seed=0), learning_rate=LR)
    parts = [reference.compute_loss(shard(0, r, 2)) for r in range(2)]
    assert all(p[1]["aux_loss"] > 0 for p in parts)
    expected = sum(float(p[0].detach()) for p in parts) / 2
    assert abs(read_losses(root / "losses.jsonl")[1] - expected) < 1e-5


def test_readme_pattern_main_process_holds_trained_weights(loaded_in_main):
    root, module = loaded_in_main
    trained = consolidate_checkpoint(root / "final.ckpt")
    _assert_state_equal(module.state_dict(), trained)
    initial = tiny_model("mixtral", seed=0).state_dict()
    key = "model.layers.1.mlp.experts.gate_up_proj"
    assert module.model.state_dict()[key].shape == initial[key].shape  # every expert, re-assembled
    assert (module.model.state_dict()[key] - initial[key]).abs().max() > 1e-4  # and trained


def test_model_built_in_configure_model_reaches_the_main_process(tmp_path):
    module = ConfiguredLM()
    _fit(module, tmp_path)
    assert module.model is not None
    _assert_state_equal(module.state_dict(), consolidate_checkpoint(tmp_path / "final.ckpt"))
    initial = tiny_model("mixtral", seed=0).state_dict()
    assert any((module.model.state_dict()[k] - v).abs().max() > 1e-4 for k, v in initial.items())


def test_output_capturing_is_rebuilt_after_unpickling():
    """In-process stand-in for a spawned worker: the model arrives by pickle, and transformers'
    registry lacks its classes (filled at construction in the main process only)."""
    from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY

    clone = pickle.loads(pickle.dumps(tiny_model("mixtral")))
    batch = {k: v for k, v in tiny_batch("mixtral").items() if k != "labels"}
    saved = dict(_CAN_RECORD_REGISTRY)
    try:
        for key in [k for k in saved if "Mixtral" in k]:
            del _CAN_RECORD_REGISTRY[key]
        lost = clone(**batch, output_router_logits=True).aux_loss
        assert not isinstance(lost, torch.Tensor)  # transformers' int 0: the worker's symptom
        assert restore_output_capturing(clone) == 2  # MixtralForCausalLM and MixtralModel
        aux = clone(**batch, output_router_logits=True).aux_loss
        assert isinstance(aux, torch.Tensor) and aux > 0
    finally:
        _CAN_RECORD_REGISTRY.update(saved)
