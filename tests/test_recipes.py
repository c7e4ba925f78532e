"""The Hydra recipes: every config composes and instantiates; the default fine-tuning run works
from the real command line (2 gloo processes, EP = 2) and lowers the held-out loss; `--cfg job`,
a multirun sweep, bad overrides; the tiny checkpoint, data blocks, convert and evaluate.

The command-line tests run exactly what a user types (`python -m
lightning_mpipemoe.recipes.finetune ...`) in a subprocess with small step limits, and read
the run's `summary.json` and files, not its console output.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import lightning_mpipemoe  # noqa: F401  isort: skip  (before transformers; see tests/hf_tiny.py)
import lightning.pytorch as pl
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict
from safetensors.torch import load_file

from lightning_mpipemoe.recipes.convert import main as convert_main
from lightning_mpipemoe.recipes.data import IGNORE_INDEX, TextDataModule, make_blocks, read_documents
from lightning_mpipemoe.recipes.evaluate import evaluate_directory
from lightning_mpipemoe.recipes.finetune import CONFIG_DIR, RecipeError, _multirun_job_port, prepare
from lightning_mpipemoe.recipes.module import heldout_loss_sums
from lightning_mpipemoe.recipes.tiny_checkpoint import SPEC_FILE, TinySpec, ensure_tiny_checkpoint
from lightning_mpipemoe.strategy import MPipeMoEStrategy
from tests.commands import run_command
from tests.dist_utils import agent_store

GROUPS = ("model", "data", "trainer", "strategy", "optim", "peft", "experiment")
FINETUNE = [sys.executable, "-m", "lightning_mpipemoe.recipes.finetune"]
#: The installed console script (what the README tells users to type).
SCRIPT = [str(Path(sys.executable).parent / "mpipemoe-finetune")]
ERROR = "mpipemoe-finetune: error:"
#: Quiet, quick runs: no progress bar, no mid-run validation unless asked.
QUIET = ["trainer.enable_progress_bar=false"]


def _conf_files() -> list[Path]:
    root = Path(CONFIG_DIR)
    return sorted(root.rglob("*.yaml"))


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in Path(CONFIG_DIR).joinpath(group).glob("*.yaml"))


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0", **extra}


def _run(args: list[str], cwd: Path, timeout: float = 600, command=FINETUNE, **env: str) -> subprocess.CompletedProcess:
    return run_command(command + args, cwd=cwd, env=_env(**env), timeout=timeout)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A models cache holding the default tiny checkpoint, generated once for the module."""
    root = tmp_path_factory.mktemp("cache")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("finetune", overrides=[f"paths.cache={root}"])
        ensure_tiny_checkpoint(cfg.model.path, TinySpec(**cfg.model.tiny))
    return root


@pytest.fixture
def seed_env():
    """`prepare` seeds Lightning (PL_GLOBAL_SEED ...): leave the environment as it was."""
    saved = {k: os.environ.get(k) for k in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")}
    yield
    for key, value in saved.items():
        os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


# ------------------------------------------------------------------------------ configs


def _option_overrides(group: str, option: str, tiny: Path, tmp: Path) -> list[str]:
    """What an option needs to instantiate on this CPU machine (no GPUs, no real checkpoints)."""
    overrides = [f"{group}={option}", f"output_dir={tmp}"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("finetune", overrides=overrides)
    if OmegaConf.is_missing(cfg.model, "path"):
        overrides.append(f"model.path={tiny}")
    if OmegaConf.is_missing(cfg.data, "train_files"):
        text = tmp / "train.txt"
        text.write_text("one short paragraph.\n\nanother one.\n")
        overrides.append(f"data.train_files=[{text}]")
    if cfg.trainer.accelerator == "gpu":
        overrides.append("trainer.accelerator=cpu")  # same config otherwise: devices, nodes, precision
    return overrides


@pytest.mark.parametrize("group", GROUPS)
def test_every_config_composes_and_instantiates(group, cache, tmp_path, seed_env):
    tiny = cache / "models" / "mixtral_tiny"
    options = _options(group)
    assert options, f"conf/{group}/ is empty"
    for option in options:
        overrides = _option_overrides(group, option, tiny, tmp_path)
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("finetune", overrides=overrides)
        if cfg.model.get("tiny") is not None:
            TinySpec(**cfg.model.tiny)
        prepared = prepare(cfg)  # model module, data, strategy, trainer, loggers, callbacks
        assert isinstance(prepared.trainer.strategy, MPipeMoEStrategy), option
        assert isinstance(prepared.module, pl.LightningModule) and prepared.module.model is None, option
        assert isinstance(prepared.data, TextDataModule), option
        strategy = prepared.trainer.strategy
        assert strategy.expert_parallel_size == (cfg.strategy.expert_parallel_size or cfg.trainer.devices), option
        assert prepared.trainer.max_steps == cfg.trainer.max_steps, option
        assert prepared.module.hparams.learning_rate == cfg.optim.learning_rate, option


def test_evaluate_config_composes_and_instantiates(cache):
    tiny = cache / "models" / "mixtral_tiny"
    for data in _options("data"):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("evaluate", overrides=[f"model_dir={tiny}", f"data={data}", "data.train_files=[x.txt]"])
        assert isinstance(instantiate(cfg.data, tokenizer=str(tiny)), TextDataModule)


@pytest.mark.parametrize("path", _conf_files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_yaml_begins_with_the_command_that_launches_it(path):
    lines = [line for line in path.read_text().splitlines() if not line.startswith("# @package")]
    if path.name == "__init__.py":
        return
    first = lines[0]
    assert first.startswith("# "), f"{path.name}: first line is not a comment: {first!r}"
    command = shlex.split(first[2:])
    recipe = next((i for i, word in enumerate(command) if word.startswith("lightning_mpipemoe.recipes.")), None)
    assert recipe is not None and command[recipe - 1] == "-m", f"{path.name}: {first!r} does not run a recipe"
    config_name = command[recipe].rsplit(".", 1)[1]
    overrides = [w for w in command[recipe + 1 :] if "=" in w and not w.startswith("-")]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        compose(config_name, overrides=overrides)  # the command's overrides compose (raises if not)
    if path.parent.name in GROUPS:
        assert f"{path.parent.name}={path.stem}" in overrides, f"{path.name}: the command does not select it: {first!r}"


# -------------------------------------------------------------------------- command line


def test_default_recipe_end_to_end(cache, tmp_path):
    """The default recipe (tiny Mixtral, shipped corpus, 2 CPU processes, EP = 2) with a small
    step limit: held-out loss goes down, and export, checkpoint, logs and evaluation agree."""
    run_dir = tmp_path / "run"
    # Lightning's subprocess launcher needs MASTER_PORT: the rendezvous store is hosted here, on
    # a port the OS assigned and that stays bound (no free-port race; tests/dist_utils.py).
    with agent_store() as rendezvous:
        result = _run(
            [f"paths.cache={cache}", f"hydra.run.dir={run_dir}", "trainer.max_steps=16", "trainer.val_check_interval=8",
             "trainer.log_every_n_steps=4"],
            cwd=tmp_path,
            command=SCRIPT,
            **rendezvous,
        )
    assert result.returncode == 0, result.stderr[-4000:]
    # One line of rank layout per run (validate, fit and validate each set the strategy up).
    layout = "MPipeMoEStrategy: 2 ranks = expert_parallel_size 2 x data_parallel 1"
    assert (run_dir / "finetune.log").read_text().count(layout) == 1
    summary = json.loads((run_dir / "summary.json").read_text())
    before, after = summary["heldout"]["before"], summary["heldout"]["after"]
    assert after["loss"] < before["loss"] - 0.3, (before, after)
    assert before["tokens"] == after["tokens"] > 0
    assert summary["run"]["processes"] == 2 and summary["run"]["expert_parallel_size"] == 2
    assert summary["run"]["steps"] == 16
    assert summary["tokens_per_second"] > 0
    layers = summary["moe"]["layers"]
    assert len(layers) == 2 and all(layer["num_partitions"] >= 1 for layer in layers.values())
    assert summary["moe"]["expert_state_bytes_per_rank"] > 0
    # The second process ran in the same Hydra run directory (its own log file there).
    assert (run_dir / "train_ddp_process_1.log").is_file() and (run_dir / ".hydra" / "config.yaml").is_file()
    # CSV logs: every 4th training step (with its loss parts) and the validations (before,
    # mid-run, end of fit, after).
    rows = list(csv.DictReader((run_dir / "logs" / "metrics.csv").open()))
    train_rows = [r for r in rows if r.get("train/loss")]
    assert [int(r["step"]) for r in train_rows] == [3, 7, 11, 15]
    assert all(r.get("train/aux_loss") and r.get("train/moe/load_imbalance") for r in train_rows)
    assert len([r for r in rows if r.get("val/loss")]) >= 3
    assert any(k.startswith("moe/") for k in rows[0])

    # The export loads with plain transformers and gives the reported held-out losses.
    export = Path(summary["export_dir"])
    assert abs(evaluate_directory(export)["loss"] - after["loss"]) < 1e-4
    assert abs(evaluate_directory(cache / "models" / "mixtral_tiny")["loss"] - before["loss"]) < 1e-4
    # The strategy checkpoint converts to the same weights.
    converted = tmp_path / "converted"
    assert convert_main([summary["checkpoint"], str(converted)]) == 0
    def tensors(directory: Path) -> dict:  # the export is sharded: one file per EP rank and one shared
        return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}

    exported, again = tensors(export), tensors(converted)
    assert exported.keys() == again.keys() and all(torch.equal(exported[k], again[k]) for k in exported)
    assert (converted / "tokenizer.json").is_file()
    # Once the model's source directory is gone, --model-dir supplies config and tokenizer; with
    # neither, the export is written without a tokenizer and a line says why, and evaluate
    # then names the missing tokenizer (not sentencepiece).
    source, moved = cache / "models" / "mixtral_tiny", tmp_path / "moved_model"
    source.rename(moved)
    try:
        with_dir, without = tmp_path / "with_model_dir", tmp_path / "without"
        assert convert_main([summary["checkpoint"], str(with_dir), "--model-dir", str(moved)]) == 0
        assert (with_dir / "tokenizer.json").read_bytes() == (moved / "tokenizer.json").read_bytes()
        no_tokenizer = subprocess.run(
            [str(Path(sys.executable).parent / "mpipemoe-convert"), summary["checkpoint"], str(without)],
            cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        moved.rename(source)
    assert no_tokenizer.returncode == 0, no_tokenizer.stderr[-2000:]
    warning = [line for line in no_tokenizer.stderr.splitlines() if line.startswith("mpipemoe-convert: warning:")]
    assert len(warning) == 1 and "has no tokenizer" in warning[0] and "--tokenizer-dir" in warning[0], warning
    assert (without / "config.json").is_file() and not (without / "tokenizer.json").exists()
    refused = subprocess.run(
        [str(Path(sys.executable).parent / "mpipemoe-evaluate"), f"model_dir={without}"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith(f"mpipemoe-evaluate: error: model_dir={without} has no "
                                                             "tokenizer files")  # fmt: skip
    # evaluate's own command line, on the held-out text of the shipped corpus.
    out = subprocess.run(
        [sys.executable, "-m", "lightning_mpipemoe.recipes.evaluate", f"model_dir={export}", "json=true"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert abs(json.loads(out.stdout.strip().splitlines()[-1])["loss"] - after["loss"]) < 1e-4
    assert not list(tmp_path.glob("outputs")), "evaluate wrote an output directory"


def test_cfg_job_prints_the_composed_config(tmp_path):
    overrides = ["trainer.devices=4", "strategy.expert_parallel_size=2", "strategy.granularity=4", "model=switch_tiny"]
    result = _run(["--cfg", "job", *overrides], cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    cfg = yaml.safe_load(result.stdout)
    assert cfg["trainer"]["devices"] == 4 and cfg["strategy"]["expert_parallel_size"] == 2
    assert cfg["strategy"]["granularity"] == 4 and cfg["model"]["name"] == "switch_tiny"
    assert cfg["strategy"]["_target_"] == "lightning_mpipemoe.strategy.MPipeMoEStrategy"
    resolved = _run(["--cfg", "job", "--resolve", f"paths.cache={tmp_path}/c"], cwd=tmp_path, timeout=300)
    assert resolved.returncode == 0, resolved.stderr[-2000:]
    assert yaml.safe_load(resolved.stdout)["model"]["path"] == f"{tmp_path}/c/models/mixtral_tiny"
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "c").exists(), "--cfg must not run anything"


@pytest.fixture
def hydra_job():
    """Hydra's job config as a job of a multirun sees it; `(mode, job number)` set by the test."""
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("finetune", return_hydra_config=True)

    def set_job(mode: RunMode, num: int) -> None:
        with open_dict(cfg):
            cfg.hydra.mode, cfg.hydra.job.num = mode, num
        HydraConfig.instance().set_config(cfg)

    yield set_job
    HydraConfig.instance().cfg = None


@pytest.mark.parametrize(
    "mode, job, port, expected",
    [
        (RunMode.MULTIRUN, 0, "29500", "29500"),
        (RunMode.MULTIRUN, 2, "29500", "29502"),
        (RunMode.RUN, 0, "29500", "29500"),  # one run keeps the user's port
        (RunMode.MULTIRUN, 2, None, None),  # no port given: Lightning picks a free one per job
    ],
)
def test_multirun_jobs_rendezvous_on_their_own_ports(hydra_job, monkeypatch, mode, job, port, expected):
    """The jobs of a multirun run one after another in one process; with a fixed MASTER_PORT
    the second job's ranks met the first job's rendezvous state and waited forever."""
    hydra_job(mode, job)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    if port is not None:
        monkeypatch.setenv("MASTER_PORT", port)
    _multirun_job_port({"MASTER_PORT": port})
    assert os.environ.get("MASTER_PORT") == expected


@pytest.mark.parametrize("port", ["65535", "auto"])
def test_multirun_job_port_out_of_range_is_refused(hydra_job, port):
    hydra_job(RunMode.MULTIRUN, 1)
    with pytest.raises(RecipeError, match=f"MASTER_PORT={port}: job 1 of a multirun rendezvous on MASTER_PORT"):
        _multirun_job_port({"MASTER_PORT": port})


@pytest.mark.slow
def test_multirun_sweeps_granularity(cache, tmp_path):
    sweep = tmp_path / "sweep"
    result = _run(
        ["-m", "strategy.granularity=1,2,4", "strategy.restore=s4", f"paths.cache={cache}", f"hydra.sweep.dir={sweep}",
         "trainer.max_steps=3", "export_dir=null", "~callbacks.checkpoint", *QUIET],
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    summaries = [json.loads((sweep / str(job) / "summary.json").read_text()) for job in range(3)]
    for n, summary in zip((1, 2, 4), summaries):
        assert {layer["num_partitions"] for layer in summary["moe"]["layers"].values()} == {n}
        assert {layer["restore"] for layer in summary["moe"]["layers"].values()} == {"s4"}
        assert summary["run"]["steps"] == 3
    for job in range(3):  # each job's second process ran that job only, in its directory
        assert (sweep / str(job) / "train_ddp_process_1.log").is_file()
    # n and buffer reuse change the schedule, not the result.
    losses = [s["heldout"]["after"]["loss"] for s in summaries]
    assert max(losses) - min(losses) < 1e-4, losses


@pytest.mark.parametrize(
    "overrides, mentions",
    [
        (["model=mixtral_8x7b", "model.path={tmp}/no-such-model"], "model.path="),
        (["model.path={tmp}/no-such-model"], "model.path={tmp}/no-such-model does not exist"),
        (["trainer.devices=4", "strategy.expert_parallel_size=3"], "strategy.expert_parallel_size=3"),
        (["strategy.granularity=0"], "granularity"),
        (["optim.learning_rate=-1"], "optim.learning_rate=-1: must be a number > 0"),
        (["data=text"], "data.train_files"),
    ],
    ids=["missing-model-path", "tiny-model-path-typo", "ep-does-not-divide-devices", "bad-granularity",
         "negative-learning-rate", "no-train-files"],
)  # fmt: skip
def test_bad_overrides_fail_with_one_line_before_any_process(overrides, mentions, cache, tmp_path):
    """Through the console script; nothing is created (no model, no run directory)."""
    args = [o.format(tmp=tmp_path) for o in overrides] + [f"paths.cache={cache}", f"hydra.run.dir={tmp_path}/run"]
    before = sorted(tmp_path.rglob("*"))
    result = _run(args, cwd=tmp_path, timeout=300, command=SCRIPT)
    assert result.returncode == 2, result.stderr[-2000:]
    mentions = mentions.format(tmp=tmp_path)
    assert sorted(tmp_path.rglob("*")) == before, "a refused command created files"
    errors = [line for line in result.stderr.splitlines() if line.startswith(ERROR)]
    assert len(errors) == 1 and mentions in errors[0], result.stderr[-2000:]
    assert result.stderr.rstrip().endswith(errors[0]), "the error is the last line"
    assert "Traceback" not in result.stderr
    assert "Initializing distributed" not in result.stdout + result.stderr, "a process group was started"
    assert not (tmp_path / "run" / "train_ddp_process_1.log").exists(), "a second process was started"


# ------------------------------------------------------------------------- building blocks


def test_tiny_checkpoint_is_deterministic_and_regenerated_only_when_its_spec_changes(tmp_path):
    spec = TinySpec(hidden_size=16, intermediate_size=32, num_layers=1)
    assert ensure_tiny_checkpoint(tmp_path / "a", spec) and ensure_tiny_checkpoint(tmp_path / "b", spec)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert not ensure_tiny_checkpoint(tmp_path / "a", spec)  # same spec: reused
    assert ensure_tiny_checkpoint(tmp_path / "a", TinySpec(hidden_size=16, intermediate_size=32, num_layers=1, seed=1))
    assert json.loads((tmp_path / "a" / SPEC_FILE).read_text())["seed"] == 1
    mine = tmp_path / "mine"
    mine.mkdir()
    assert not ensure_tiny_checkpoint(mine, spec), "a directory without a spec is somebody's checkpoint"
    assert not list(mine.iterdir())
    with pytest.raises(ValueError, match="top_k must be 1"):
        TinySpec(family="switch_transformers", top_k=2)


def test_blocks_heldout_split_and_padding(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(f"paragraph {i} " + "word " * 20 for i in range(20)))
    assert len(read_documents([text])) == 20
    blocks = make_blocks(list(range(50)), 8, "causal_lm")
    assert len(blocks) == 6 and torch.equal(blocks[1]["input_ids"], torch.arange(8, 16))
    assert torch.equal(blocks[1]["labels"], blocks[1]["input_ids"])
    pairs = make_blocks(list(range(50)), 8, "seq2seq")
    assert len(pairs) == 3 and torch.equal(pairs[0]["labels"], torch.arange(8, 16))

    class FakeTrainer:
        world_size = 4

    tokenizer = _word_tokenizer(text.read_text())
    data = TextDataModule(
        corpus=None, train_files=[str(text)], heldout_every=10, seq_len=8, batch_size=2, tokenizer=tokenizer
    )
    data.setup("fit")
    heldout = data._heldout
    assert data.heldout_tokens == 8 * len(heldout)  # paragraphs 9 and 19
    data.trainer = FakeTrainer()
    padded = list(data.val_dataloader().dataset)
    assert len(padded) % 4 == 0 and len(padded) >= len(heldout)
    assert all(bool((b["labels"] == IGNORE_INDEX).all()) for b in padded[len(heldout) :])


def _word_tokenizer(text: str):
    from lightning_mpipemoe.recipes.tiny_checkpoint import build_tokenizer

    return build_tokenizer(text, min_word_count=1)


def test_heldout_loss_ignores_padding_blocks():
    generator = torch.Generator().manual_seed(0)
    logits_BSV = torch.randn(3, 5, 7, generator=generator)  # block 2 is a padding block
    labels_BS = torch.randint(0, 7, (3, 5), generator=generator)
    labels_BS[2] = IGNORE_INDEX

    class Model(torch.nn.Module):
        def forward(self, labels, output_router_logits):
            return type("Output", (), {"logits": logits_BSV})()

    sums = heldout_loss_sums(Model(), {"labels": labels_BS}, "causal_lm")
    expected = torch.nn.functional.cross_entropy(  # position t predicts token t + 1
        logits_BSV[:2, :-1].reshape(-1, 7), labels_BS[:2, 1:].reshape(-1), reduction="sum"
    )
    assert int(sums[1]) == 2 * 4 and torch.allclose(sums[0], expected.double())


def test_jsonl_without_datasets_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed: `import datasets` raises
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "hello"}\n')
    with pytest.raises(ImportError, match=re.escape("lightning-mpipemoe[data]")):
        TextDataModule(corpus=None, train_files=[str(path)], format="json").check()


def test_tensorboard_logger_only_when_installed(tmp_path):
    import importlib.util

    from lightning_mpipemoe.recipes.reporting import tensorboard_logger

    logger = tensorboard_logger(str(tmp_path))
    installed = importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX")
    assert (logger is not None) == bool(installed)


def test_jsonl_and_parquet_give_the_same_documents_as_text(tmp_path):
    """`datasets` (and its pyarrow) are in the `test` extra: this runs everywhere the tests do."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lightning_mpipemoe.recipes.data import shipped_corpus_path

    documents = read_documents([shipped_corpus_path("village")])
    jsonl, parquet = tmp_path / "d.jsonl", tmp_path / "d.parquet"
    jsonl.write_text("".join(json.dumps({"text": d, "n": i}) + "\n" for i, d in enumerate(documents)))
    pq.write_table(pa.table({"body": documents}), parquet)
    assert read_documents([jsonl], "json") == documents
    assert read_documents([parquet], "parquet", text_field="body") == documents
    with pytest.raises(KeyError, match="no column 'text'"):
        read_documents([parquet], "parquet")
