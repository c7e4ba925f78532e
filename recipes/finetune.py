"""Fine-tune a Hugging Face MoE model with `MPipeMoEStrategy`, configured by Hydra.

    python -m lightning_mpipemoe.recipes.finetune                # or: mpipemoe-finetune
    python -m lightning_mpipemoe.recipes.finetune trainer.devices=4 strategy.expert_parallel_size=2 \
        strategy.granularity=4 model=switch_tiny
    python -m lightning_mpipemoe.recipes.finetune --cfg job       # the composed config, nothing runs
    python -m lightning_mpipemoe.recipes.finetune -m strategy.granularity=1,2,4

With no arguments it fine-tunes a tiny Mixtral-style model (written to `paths.models` the
first time, deterministically) on the corpus shipped with the package, on 2 CPU processes
with expert parallelism 2. The run measures the held-out loss, fine-tunes, measures it again,
writes a Hugging Face directory (`export_dir`) and a strategy checkpoint, and prints a
summary (also written as `summary.json` in the run directory).

Order of events: the configuration is checked (model directory, EP size against devices and
experts, data files) and every object is built with `hydra.utils.instantiate` before any
process is started, so a bad override fails with one line (`mpipemoe-finetune: error: ...`,
exit status 2). Lightning's subprocess launcher then starts the other processes by re-running
this command (with `hydra.run.dir` pinned to this run's directory, see `_child_command`).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

if TYPE_CHECKING:
    import lightning.pytorch as pl

# Torch, Lightning and transformers are imported where they are used: `--cfg job`, `--help`
# and configuration errors answer without loading them.

__all__ = ["RecipeError", "Prepared", "main", "prepare", "run"]

PROG = "mpipemoe-finetune"
#: The config folder, found beside this package's folder (the repository's `conf/`, installed as
#: `lightning_mpipemoe/conf`). It has no `__init__.py`, so that it never shadows an installed
#: `conf` package from a clone's root, which rules out Hydra's `pkg://` source (it wants one).
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")
CONFIG_NAME = "finetune"
#: Environment variables Lightning's subprocess launcher sets in the launching process.
_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "PL_GLOBAL_SEED")
#: Command-line flags that choose the config (kept in the children's command).
_CONFIG_FLAGS = ("-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir")
#: Hydra overrides the children must not repeat (Lightning adds its own run dir and job name).
_LAUNCH_OVERRIDES = re.compile(
    r"^(hydra\.(run\.dir|job\.name|output_subdir|mode|sweep|sweeper|launcher)|hydra/(sweeper|launcher))\b"
)


class RecipeError(ValueError):
    """A configuration the recipe refuses before anything starts (printed as one line)."""


# ---------------------------------------------------------------------------------- checks


def _is_launching_process() -> bool:
    """True in the process the user started (Lightning's children get LOCAL_RANK)."""
    return "LOCAL_RANK" not in os.environ


def _device_count(devices: Any) -> int | None:
    if isinstance(devices, bool):
        return None
    if isinstance(devices, int):
        return devices if devices > 0 else None
    if isinstance(devices, str) and devices.strip().isdigit():
        return int(devices)
    if isinstance(devices, str) and "," in devices:
        return len([d for d in devices.split(",") if d.strip()])
    if OmegaConf.is_list(devices) or isinstance(devices, (list, tuple)):
        return len(devices)
    return None  # "auto", -1: resolved by Lightning (the strategy checks again before launching)


def _num_experts(hf_config: dict) -> int | None:
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        value = hf_config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _model_dir(cfg: DictConfig) -> Path:
    """The model directory, generated first when the model config says how."""
    name = cfg.model.get("name", "?")
    if OmegaConf.is_missing(cfg.model, "path"):
        raise RecipeError(
            f"model={name} needs model.path, the local directory of a Hugging Face checkpoint "
            f"(e.g. model.path=/data/{name})"
        )
    path = Path(str(cfg.model.path)).expanduser()
    generate = cfg.model.get("generate")
    if generate is not None and _is_launching_process():
        from lightning_mpipemoe.recipes.tiny_checkpoint import TinySpec, ensure_tiny_checkpoint

        spec = TinySpec(**OmegaConf.to_container(generate, resolve=True))
        if ensure_tiny_checkpoint(path, spec):
            print(f"{PROG}: wrote the tiny {spec.family} checkpoint to {path}", file=sys.stderr)
    if not path.exists():
        raise RecipeError(
            f"model.path={path} does not exist (model={name} expects a local Hugging Face checkpoint directory)"
        )
    if not (path / "config.json").is_file():
        raise RecipeError(f"model.path={path} has no config.json: not a Hugging Face checkpoint directory")
    return path


def _check_layout(cfg: DictConfig, hf_config: dict) -> None:
    from lightning_mpipemoe.groups import check_parallel_sizes
    from lightning_mpipemoe.hf_models.api import covered_model_types

    model_type = hf_config.get("model_type")
    if model_type not in covered_model_types():
        raise RecipeError(
            f"model.path={cfg.model.path}: model_type {model_type!r} has no lightning_mpipemoe adapter "
            f"(covered: {', '.join(covered_model_types())})"
        )
    devices = _device_count(cfg.trainer.get("devices"))
    nodes = int(cfg.trainer.get("num_nodes", 1) or 1)
    ep = cfg.strategy.get("expert_parallel_size")
    if devices is None:
        return
    ep = devices if ep is None else ep
    try:
        check_parallel_sizes(devices * nodes, ep, _num_experts(hf_config))
    except ValueError as exc:
        raise RecipeError(
            f"strategy.expert_parallel_size={ep} with trainer.devices={devices} x trainer.num_nodes={nodes}: {exc}"
        ) from None


def _one_line(exc: BaseException) -> str:
    """A one-line message for an error in the configuration phase."""
    key = None
    if isinstance(exc, InstantiationException):
        match = re.search(r"full_key: (\S+)", str(exc))
        key = match.group(1) if match else None
        exc = exc.__cause__ or exc
    message = str(exc) if str(exc) and not isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
    return " ".join(f"{key + ': ' if key else ''}{message}".split())


# --------------------------------------------------------------------------------- building


@dataclass
class Prepared:
    """Everything built from the configuration, before any process starts."""

    cfg: DictConfig
    model_dir: Path
    hf_config: dict  # the model's config.json
    module: Any  # recipes.module.CausalLMFineTune / Seq2SeqFineTune (its model loads in configure_model)
    data: Any  # recipes.data.TextDataModule
    trainer: Any  # lightning.pytorch.Trainer with MPipeMoEStrategy
    monitor: Any  # recipes.reporting.RunMonitor


def _instantiate_all(node: DictConfig | None) -> list:
    if node is None:
        return []
    return [obj for obj in (instantiate(child) for child in node.values()) if obj is not None]


def prepare(cfg: DictConfig) -> Prepared:
    """Check the configuration and build model module, data, strategy and trainer (no process
    is started and nothing is trained). Raises `RecipeError` (or the failing constructor's
    error) for a bad configuration."""
    import lightning_mpipemoe  # noqa: F401  (before transformers; see tests/hf_tiny.py)
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ProgressBar

    from lightning_mpipemoe.recipes.reporting import RunMonitor

    model_dir = _model_dir(cfg)
    hf_config = json.loads((model_dir / "config.json").read_text())
    _check_layout(cfg, hf_config)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    # _convert_="all": plain lists and dicts. The module's hyper-parameters go into checkpoints,
    # which torch.load(weights_only=True) reads without OmegaConf's classes.
    peft_spec = OmegaConf.to_container(cfg.peft) if cfg.get("peft") is not None else None
    module = instantiate(cfg.model.module, _convert_="all", model_path=str(model_dir), peft=peft_spec, **cfg.optim)
    data = instantiate(cfg.data, tokenizer=str(model_dir), task=module.task)
    data.check()
    top_k = hf_config.get("num_experts_per_tok") or 1
    monitor = RunMonitor(tokens_per_row=2 if module.task == "seq2seq" else 1, top_k=top_k)
    strategy = instantiate(cfg.strategy)
    callbacks = _instantiate_all(cfg.get("callbacks"))
    if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a bar callback then
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    loggers = _instantiate_all(cfg.get("logger")) or False
    trainer = instantiate(cfg.trainer, strategy=strategy, logger=loggers, callbacks=[*callbacks, monitor])
    return Prepared(cfg, model_dir, hf_config, module, data, trainer, monitor)


def _child_command() -> None:
    """Make the command Lightning's launcher re-runs for the other processes start exactly this job.

    Lightning re-runs `sys.argv` with `hydra.run.dir=<HydraConfig run.dir>`; in a multirun
    that would start the whole sweep again in every child, into the wrong directory. The
    children get this job's own overrides instead, and run.dir is pinned to this job's
    output directory (already resolved, so `${now:...}` cannot drift).
    """
    hydra_cfg = HydraConfig.get()
    argv, kept = sys.argv[1:], []
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg in _CONFIG_FLAGS and index + 1 < len(argv):
            kept += argv[index : index + 2]
            index += 2
            continue
        if arg.split("=", 1)[0] in _CONFIG_FLAGS:
            kept.append(arg)
        index += 1
    hydra_overrides = [o for o in hydra_cfg.overrides.hydra if not _LAUNCH_OVERRIDES.match(o)]
    sys.argv = [sys.argv[0], *kept, *hydra_cfg.overrides.task, *hydra_overrides]
    with read_write(hydra_cfg), open_dict(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir


# ----------------------------------------------------------------------------------- running


def _export(prepared: Prepared, export_dir: Path) -> Path | None:
    """Collective: a plain Hugging Face directory of the fine-tuned model (written by rank 0)."""
    from transformers import AutoConfig

    from lightning_mpipemoe.hf_models.api import export_from_state_dicts
    from lightning_mpipemoe.hf_models.peft_lora import check_peft_spec, export_lora_run

    strategy = prepared.trainer.strategy
    if check_peft_spec(prepared.module.hparams.get("peft")) is not None:  # LoRA: merged export, adapter beside it
        written, _ = export_lora_run(prepared.module.model, export_dir, strategy.moe_groups, prepared.model_dir)
        strategy.barrier("mpipemoe-finetune.export")
        return written
    full = strategy.consolidated_state_dict()  # every expert, on EP rank 0 of each EP group
    written = None
    if strategy.is_global_zero:
        state = {k[len("model.") :]: v.detach().cpu() for k, v in full.items() if k.startswith("model.")}
        hf_config = AutoConfig.from_pretrained(prepared.model_dir)
        written = export_from_state_dicts([state], hf_config, export_dir, tokenizer_dir=prepared.model_dir)
    strategy.barrier("mpipemoe-finetune.export")
    return written


def _summary(prepared: Prepared, before: dict, after: dict, seconds: float, export_dir: Path | None) -> dict:
    cfg, trainer, module, monitor = prepared.cfg, prepared.trainer, prepared.module, prepared.monitor
    strategy = trainer.strategy
    groups = strategy.moe_groups
    output_dir = Path(cfg.output_dir)
    checkpoint = next((Path(c.last_model_path) for c in trainer.checkpoint_callbacks if c.last_model_path), None)
    hf = prepared.hf_config
    return {
        "model": {
            "name": cfg.model.get("name"),
            "path": str(prepared.model_dir),
            "class": (hf.get("architectures") or [type(module.model).__name__])[0],
            "num_experts": _num_experts(hf),
            "top_k": hf.get("num_experts_per_tok") or 1,
            "moe_layers": len(monitor.moe.get("layers", {})),
            "parameters": sum(p.numel() for p in module.model.parameters())
            + _other_ranks_expert_params(strategy, module),
        },
        "run": {
            "processes": trainer.world_size,
            "accelerator": type(trainer.accelerator).__name__.removesuffix("Accelerator").lower(),
            "expert_parallel_size": groups.ep_size,
            "data_parallel_size": groups.expert_dp_size,
            "steps": trainer.global_step,
            "train_tokens": monitor.train_tokens,
            "seconds": seconds,
        },
        "heldout": {"before": before, "after": after},
        "tokens_per_second": monitor.tokens_per_second,
        "moe": monitor.moe,
        "export_dir": str(export_dir) if export_dir else None,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "log_dir": str(output_dir / "logs"),
        "summary_file": str(output_dir / "summary.json"),
    }


def _other_ranks_expert_params(strategy, module) -> int:
    """Parameters of the experts this rank does not hold (the model's size, not this rank's)."""
    named = dict(module.named_parameters())
    ep = strategy.moe_groups.ep_size
    return sum(named[k].numel() * (ep - 1) for k in strategy.expert_parameter_names if k in named)


def _finish_job(trainer: pl.Trainer | None, saved_env: dict[str, str | None], failed: bool) -> None:
    """Leave the launching process as it was: children waited for (killed after a failure here:
    they would wait in a collective), process groups destroyed and the launcher's environment
    removed, so that the next job of a multirun starts afresh."""
    import torch.distributed as dist

    launcher = getattr(getattr(trainer, "strategy", None), "launcher", None)
    procs = list(getattr(launcher, "procs", []))
    if failed:
        for proc in procs:
            proc.kill()
    for proc in procs:
        code = proc.wait(timeout=300)
        if code and not failed:
            raise RuntimeError(f"a training process (pid {proc.pid}) exited with status {code}")
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for key, value in saved_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def run(cfg: DictConfig) -> dict | None:
    """The recipe for a composed config; returns the summary on global rank 0 (None elsewhere)."""
    # The held-out blocks are padded to a multiple of the world size with ignored blocks
    # (recipes.data), so no sample is evaluated twice: Lightning's advice does not apply.
    warnings.filterwarnings("ignore", message=r".*During `trainer.validate\(\)`, it is recommended to use `Trainer")
    launching = _is_launching_process()
    saved_env = {key: os.environ.get(key) for key in _LAUNCH_ENV}
    try:
        prepared = prepare(cfg)
    except (RecipeError, InstantiationException, OmegaConfBaseException, ValueError, TypeError, OSError,
            ImportError, KeyError) as exc:  # fmt: skip
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    from lightning_mpipemoe.recipes.reporting import format_summary

    trainer, module, data = prepared.trainer, prepared.module, prepared.data
    finished = False
    try:
        if launching and HydraConfig.initialized():
            _child_command()
        start = time.perf_counter()
        trainer.validate(module, datamodule=data, verbose=False)
        before = dict(module.heldout)
        trainer.fit(module, datamodule=data)
        trainer.validate(module, datamodule=data, verbose=False)
        after = dict(module.heldout)
        export_dir = Path(cfg.export_dir) if cfg.get("export_dir") else None
        written = _export(prepared, export_dir) if export_dir else None
        seconds = time.perf_counter() - start
        finished = True
    finally:
        if launching:
            _finish_job(trainer, saved_env, failed=not finished)
    if not trainer.is_global_zero:
        return None
    summary = _summary(prepared, before, after, seconds, written)
    Path(summary["summary_file"]).write_text(json.dumps(summary, indent=2) + "\n")
    print(format_summary(summary), flush=True)
    return summary


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name=CONFIG_NAME)
def main(cfg: DictConfig) -> None:
    """Entry point of `python -m lightning_mpipemoe.recipes.finetune` and `mpipemoe-finetune`."""
    run(cfg)


if __name__ == "__main__":
    main()
