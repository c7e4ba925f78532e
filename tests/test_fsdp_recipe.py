"""`mpipemoe-finetune strategy=mpipemoe_fsdp`: the default tiny recipe (tiny Mixtral, shipped
corpus, 2 CPU processes, EP 2) with FSDP2 sharding, in a subprocess as a user runs it.

The model is loaded into FSDP shards in `configure_model` (`hf_models.fsdp_load.load_fsdp`:
rank 0 reads about half the checkpoint, and the loaded model gives plain transformers' held-out
loss). Training lowers the held-out loss; the checkpoint is a torch.distributed.checkpoint directory
(one shard file per rank); the export is written one file per rank (`hf_models/fsdp_export.py`)
and, loaded by `evaluate` (plain transformers), gives the held-out loss the run reported.
A run the memory plan says does not fit stops before any process starts, with one line.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning_mpipemoe  # noqa: F401  isort: skip  (before transformers; see tests/hf_tiny.py)
import pytest
import torch
from torch.distributed.fsdp import FSDPModule

from lightning_mpipemoe.recipes.evaluate import evaluate_directory
from tests.commands import run_command
from tests.dist_utils import agent_store

SCRIPT = str(Path(sys.executable).parent / "mpipemoe-finetune")


@pytest.mark.skipif(
    not hasattr(FSDPModule, "set_gradient_divide_factor"),
    reason=f"torch {torch.__version__}: FSDP2 divides by a custom factor on NCCL only (CUDA)",
)
def test_fsdp_recipe_trains_checkpoints_and_exports(tmp_path):
    run_dir = tmp_path / "run"
    args = [
        SCRIPT,
        "strategy=mpipemoe_fsdp",
        f"paths.cache={tmp_path / 'cache'}",
        f"hydra.run.dir={run_dir}",
        "trainer.max_steps=8",
        "trainer.val_check_interval=8",
        "trainer.enable_progress_bar=false",
        "plan.device_memory=8GB",
    ]  # fmt: skip  (planned before launching: it fits)
    with agent_store() as rendezvous:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0", **rendezvous}
        result = run_command(args, cwd=tmp_path, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    before, after = summary["heldout"]["before"], summary["heldout"]["after"]
    assert after["loss"] < before["loss"] - 0.1, (before, after)
    assert summary["run"]["processes"] == 2 and summary["run"]["steps"] == 8
    # Loaded straight into shards (`load_fsdp`): rank 0 read its rows of the dense tensors and its
    # experts' slices, about half of the checkpoint (a full dense copy would be well over half) ...
    load = summary["load"]
    assert 0.4 * load["checkpoint_bytes"] < load["bytes_read"] < 0.55 * load["checkpoint_bytes"], load
    # ... and those shards are the checkpoint's: the held-out loss before training is the one plain
    # transformers gives on the model directory.
    assert abs(evaluate_directory(summary["model"]["path"])["loss"] - before["loss"]) < 1e-5
    checkpoint = Path(summary["checkpoint"])
    assert sorted(p.name for p in checkpoint.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    export = Path(summary["export_dir"])
    index = json.loads((export / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f"model-rank{r:05d}-of-00002.safetensors" for r in range(2)]
    assert abs(evaluate_directory(export)["loss"] - after["loss"]) < 1e-4


_PLAIN_LOGITS = """
import sys, torch, transformers
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
assert not any(name.startswith("lightning_mpipemoe") for name in sys.modules), "the package was imported"
with torch.no_grad():
    torch.save(model(input_ids=torch.arange(2, 18).reshape(2, 8)).logits, sys.argv[2])
"""


@pytest.mark.skipif(
    not hasattr(FSDPModule, "set_gradient_divide_factor"),
    reason=f"torch {torch.__version__}: FSDP2 divides by a custom factor on NCCL only (CUDA)",
)
def test_fsdp_recipe_with_lora_exports_the_merged_model(tmp_path, monkeypatch):
    """`strategy=mpipemoe_fsdp peft=lora peft.targets=attention` (2 processes, EP 2): the LoRA
    weights (FSDP shards) are gathered into a plain PEFT adapter and merged into the exported
    model, which plain transformers loads (this package not imported) to the logits of the
    source model with that adapter (the trained model), and to the held-out loss the run
    reported. LoRA on the routed experts is refused when the recipe is prepared, before anything starts."""
    import peft
    from hydra import compose, initialize_config_dir
    from transformers import AutoModelForCausalLM

    from lightning_mpipemoe.recipes.finetune import CONFIG_DIR, RecipeError, prepare

    common = [SCRIPT, "strategy=mpipemoe_fsdp", "peft=lora", f"paths.cache={tmp_path / 'cache'}",
              "trainer.enable_progress_bar=false"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):  # checked in `prepare`, in this process
        cfg = compose("finetune", overrides=common[1:4])
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")  # prepare seeds (and sets it): restored after the test
    with pytest.raises(RecipeError, match=r"^peft.targets=all with strategy.sharding=fsdp: LoRA on the routed experts"):
        prepare(cfg)
    run_dir = tmp_path / "run"
    with agent_store() as rendezvous:
        result = run_command(
            [*common, "peft.targets=attention", f"hydra.run.dir={run_dir}", "trainer.max_steps=4",
             "trainer.val_check_interval=4"], cwd=tmp_path, env={**env, **rendezvous}, timeout=600,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    export = Path(summary["export_dir"])
    assert abs(evaluate_directory(export)["loss"] - summary["heldout"]["after"]["loss"]) < 1e-4
    done = run_command([sys.executable, "-c", _PLAIN_LOGITS, str(export), str(tmp_path / "logits.pt")],
                       cwd=tmp_path, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    source = AutoModelForCausalLM.from_pretrained(summary["model"]["path"]).eval()
    ids = torch.arange(2, 18).reshape(2, 8)
    with torch.no_grad():
        untrained = source(input_ids=ids).logits
        adapter = export.with_name(export.name + "_adapter")
        expected = peft.PeftModel.from_pretrained(source, adapter).eval()(input_ids=ids).logits
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, atol=1e-5, rtol=0)
    assert (expected - untrained).abs().max() > 1e-3  # the LoRA weights were trained and merged


def test_a_run_that_does_not_fit_stops_before_launching(tmp_path):
    """Mixtral-8x7B (its config only) on 2 ranks of 80 GB with fsdp: the plan says no (about
    370 GB per rank), so the recipe prints one line naming the figures and what would fit, exits
    with status 2, and starts nothing (no run directory is left)."""
    from transformers import AutoConfig

    model = tmp_path / "mixtral"
    AutoConfig.for_model(
        "mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
    ).save_pretrained(model)  # fmt: skip
    run_dir = tmp_path / "run"
    args = [SCRIPT, "model=mixtral_8x7b", f"model.path={model}", "strategy=mpipemoe_fsdp", "plan.device_memory=80GB",
            f"hydra.run.dir={run_dir}", f"paths.cache={tmp_path / 'cache'}"]  # fmt: skip
    result = run_command(args, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "mpipemoe-finetune: error: strategy.sharding=fsdp: the run needs "
    ), lines
    needs = float(lines[0].split("the run needs ")[1].split()[0])
    assert needs > 80 and "the device has 80.0 GB" in lines[0] and "would fit: fsdp fits on" in lines[0], lines[0]
    assert not run_dir.exists() and "Initializing distributed" not in result.stdout + result.stderr
