"""The command line's front (`lightning_mpipemoe_cli`): console scripts named like their error
prefixes; `--help`, `--cfg job` and refused commands answer without importing torch, Lightning
or transformers and leave nothing behind; every numeric option is checked before anything
starts; a model path is never invented (the tiny model is generated only in the package's
cache or when asked).

Speed itself is measured by benchmarks/bench_cli_latency.py, not asserted here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import lightning_mpipemoe_cli as cli
from lightning_mpipemoe_cli import CONFIG_DIR, RecipeError, check_finetune_config, check_numbers, model_directory

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"mpipemoe-finetune": "finetune", "mpipemoe-convert": "convert", "mpipemoe-evaluate": "evaluate"}
HEAVY = ("torch", "lightning", "transformers", "lightning_mpipemoe")


def _compose(*overrides: str, config: str = "finetune"):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config, overrides=list(overrides))


# ----------------------------------------------------------------------------- console scripts


def test_console_scripts_match_the_error_prefixes():
    installed = entry_points(group="console_scripts")
    scripts = {ep.name: ep.value for ep in installed if ep.name.startswith("mpipemoe-")}
    # The planner builds the model with transformers anyway: it needs no fast front.
    expected = {name: f"lightning_mpipemoe_cli:{func}" for name, func in SCRIPTS.items()}
    assert scripts == {**expected, "mpipemoe-plan": "lightning_mpipemoe.recipes.plan:main"}
    from lightning_mpipemoe.recipes import convert, evaluate, finetune, plan

    assert {finetune.PROG, convert.PROG, evaluate.PROG} == set(SCRIPTS) and plan.PROG == "mpipemoe-plan"
    # `python -m lightning_mpipemoe.recipes.<name>` runs the same front.
    assert finetune.main is cli.finetune and convert.main is cli.convert and evaluate.main is cli.evaluate
    bin_dir = Path(sys.executable).parent
    missing = [name for name in SCRIPTS if not (bin_dir / name).is_file()]
    assert not missing, f"not installed: {missing} (pip install -e . installs them)"


def _front(tmp_path: Path, command: str, *args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run `lightning_mpipemoe_cli.<command>` with `args` in a fresh interpreter (cwd `tmp_path`);
    returns the result and the heavy modules it had imported when it finished."""
    code = (
        "import sys, lightning_mpipemoe_cli as cli\n"
        f"sys.argv = ['prog', *{list(args)!r}]\n"
        "try:\n"
        f"    code = cli.{command}() or 0\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        f"print('HEAVY', *[m for m in {HEAVY!r} if m in sys.modules])\n"
        "sys.exit(code)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "0"}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    heavy = next(line.split()[1:] for line in result.stdout.splitlines() if line.startswith("HEAVY"))
    return result, heavy


@pytest.mark.parametrize(
    "command, args, status, error",
    [
        ("finetune", ["--help"], 0, None),
        ("finetune", ["--cfg", "job", "strategy.granularity=4"], 0, None),
        ("finetune", ["optim.learning_rate=-1"], 2, "optim.learning_rate=-1: must be a number > 0"),
        ("finetune", ["model.path={tmp}/typo"], 2, "model.path={tmp}/typo does not exist"),
        ("finetune", ["trainer.devices=4", "strategy.expert_parallel_size=3"], 2, "does not divide the world size 4"),
        ("evaluate", ["model_dir={tmp}/nothing"], 2, "is not a Hugging Face directory"),
        ("convert", ["{tmp}/no.ckpt", "{tmp}/out"], 2, "is not an mpipemoe strategy checkpoint"),
    ],
    ids=["help", "cfg-job", "negative-lr", "model-path-typo", "bad-ep", "evaluate-no-model", "convert-no-ckpt"],
)
def test_answers_without_heavy_imports_and_leaves_nothing(tmp_path, command, args, status, error):
    work = tmp_path / "cwd"
    work.mkdir()
    result, heavy = _front(work, command, *[a.format(tmp=tmp_path) for a in args])
    assert result.returncode == status, result.stderr[-2000:]
    assert heavy == [], f"imported {heavy} before any work started"
    if error is None:
        assert result.stdout.strip() and not result.stderr.strip(), result.stderr[-2000:]
    else:
        prog = next(name for name, func in SCRIPTS.items() if func == command)
        lines = result.stderr.strip().splitlines()
        assert lines == [f"{prog}: error: " + lines[0].split(": error: ", 1)[-1]], result.stderr[-2000:]
        assert error.format(tmp=tmp_path) in lines[0]
    assert list(work.iterdir()) == [], "the command left files behind"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd"], "the command created a path"


# -------------------------------------------------------------------------------- number checks


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.learning_rate=-1", "optim.learning_rate=-1: must be a number > 0"),
        ("optim.learning_rate=0", "optim.learning_rate=0: must be a number > 0"),
        ("optim.learning_rate=nan", "optim.learning_rate=nan: must be a number > 0"),
        ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1: must be a number >= 0"),
        ("optim.betas=[0.9,1.0]", "optim.betas=[0.9, 1.0]: must be two numbers in [0, 1)"),
        ("optim.warmup_steps=-1", "optim.warmup_steps=-1: must be an integer >= 0"),
        ("data.seq_len=1", "data.seq_len=1: must be an integer >= 2"),
        ("data.batch_size=0", "data.batch_size=0: must be an integer >= 1"),
        ("data.heldout_every=1", "data.heldout_every=1: must be an integer >= 2"),
        ("trainer.max_steps=0", "trainer.max_steps=0: must be an integer >= 1 or -1"),
        ("trainer.devices=0", "trainer.devices=0: must be an integer >= 1"),
        ("trainer.num_nodes=0", "trainer.num_nodes=0: must be an integer >= 1"),
        ("trainer.val_check_interval=1.5", "trainer.val_check_interval=1.5: must be an integer >= 1 (steps)"),
        ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val=-1: must be a number >= 0 or null"),
        ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0: must be an integer >= 1"),
        ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps=0: must be an integer >= 1"),
        ("strategy.expert_parallel_size=0", "strategy.expert_parallel_size=0: must be an integer >= 1 or None"),
        ("strategy.granularity=0", "strategy.granularity=0: must be an integer >= 1, auto or null"),
        ("strategy.memory_budget=-5", "strategy.memory_budget=-5: must be a number > 0 or null"),
        ("model.tiny.num_experts=0", "model.tiny.num_experts=0: must be an integer >= 1"),
        ("strategy.timeout.minutes=0", "strategy.timeout.minutes=0: must be a number > 0"),
        ("strategy.simulated_link={latency_s:-1,bandwidth_bytes_per_s:1e9}",
         "strategy.simulated_link.latency_s=-1: must be a number >= 0"),
        ("seed=-1", "seed=-1: must be an integer >= 0"),
        ("optim.learning_rate=fast", "optim.learning_rate=fast: must be a number > 0"),
    ],
)
def test_every_numeric_option_is_checked(override, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        check_numbers(_compose(override))


def test_every_shipped_option_passes_the_number_checks():
    for group in ("model", "data", "trainer", "strategy", "optim", "experiment"):
        for option in sorted(p.stem for p in Path(CONFIG_DIR, group).glob("*.yaml")):
            check_numbers(_compose(f"{group}={option}"))


# ---------------------------------------------------------------------------------- model paths


def test_the_tiny_model_is_generated_only_in_the_cache_or_when_asked(tmp_path):
    cache = f"paths.cache={tmp_path}/cache"
    default = _compose(cache)
    assert model_directory(default) == (tmp_path / "cache/models/mixtral_tiny", True)
    assert model_directory(_compose(cache, f"model.path={tmp_path}/mine", "model.generate=true")) == (
        tmp_path / "mine", True,
    )  # fmt: skip
    with pytest.raises(RecipeError, match=re.escape(f"model.path={tmp_path}/typo does not exist")):
        model_directory(_compose(cache, f"model.path={tmp_path}/typo"))
    with pytest.raises(RecipeError, match="does not exist"):
        model_directory(_compose(cache, "model.generate=false"))
    with pytest.raises(RecipeError, match="model=mixtral_8x7b needs model.path"):
        model_directory(_compose(cache, "model=mixtral_8x7b"))
    with pytest.raises(RecipeError, match="has no tiny model"):
        model_directory(_compose(cache, "model=mixtral_8x7b", f"model.path={tmp_path}/x", "model.generate=true"))
    with pytest.raises(RecipeError, match="model.generate=sometimes: must be auto, true or false"):
        model_directory(_compose(cache, "model.generate=sometimes"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecipeError, match="has no config.json"):
        model_directory(_compose(cache, f"model.path={tmp_path}/empty"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"], "a check created a path"


def test_expert_parallel_size_is_checked_against_the_experts(tmp_path):
    cfg = _compose(f"paths.cache={tmp_path}", "trainer.devices=4", "strategy.expert_parallel_size=4",
                   "model.tiny.num_experts=6")  # fmt: skip
    with pytest.raises(RecipeError, match=re.escape("does not divide the 6 experts; valid: [1, 2]")):
        check_finetune_config(cfg)


def test_generating_says_so_in_one_line(tmp_path, capsys, monkeypatch):
    """`model.generate=true` at a path of the user's: written there, with one line saying why."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    from lightning_mpipemoe.recipes.finetune import _model_dir

    target = tmp_path / "tiny"
    small = ["model.tiny.hidden_size=16", "model.tiny.intermediate_size=16", "model.tiny.num_layers=1"]
    cfg = _compose(f"paths.cache={tmp_path}/cache", f"model.path={target}", "model.generate=true", *small)
    assert _model_dir(cfg) == target and (target / "config.json").is_file()
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"mpipemoe-finetune: generated the tiny mixtral model (random weights) at {target} "
                     "(model.generate=true)"]  # fmt: skip
    assert not (tmp_path / "cache").exists()
