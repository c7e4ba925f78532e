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

Order of events: the command line is parsed and checked by `lightning_mpipemoe_cli` (numbers,
model directory, EP size against devices and experts) without importing torch, Lightning or
transformers; `run` then builds every object with `hydra.utils.instantiate` (and checks the
model family and the data files) before any process is started, so a bad override fails with
one line (`mpipemoe-finetune: error: ...`, exit status 2) and leaves nothing behind. Lightning's
subprocess launcher then starts the other processes by re-running this command (with
`hydra.run.dir` pinned to this run's directory, see `_child_command`).

Model directory: `model.path`, used as it is. The tiny configs (`model.tiny` holds the spec)
generate it only inside the package's cache (`paths.models`, the default, `model.generate=auto`)
or when asked (`model.generate=true`); a path that does not exist is otherwise an error.
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

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

from lightning_mpipemoe_cli import (
    CONFIG_DIR,
    RecipeError,
    check_finetune_config,
    discard_hydra_run_dir,
    num_experts_of,
)
from lightning_mpipemoe_cli import finetune as main

if TYPE_CHECKING:
    import lightning.pytorch as pl

# Torch, Lightning and transformers are imported where they are used: `--cfg job`, `--help`
# and configuration errors answer without loading them.

__all__ = ["CONFIG_DIR", "RecipeError", "Prepared", "main", "prepare", "run"]

PROG = "mpipemoe-finetune"
#: Environment variables Lightning's subprocess launcher sets in the launching process.
_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "PL_GLOBAL_SEED")
#: Command-line flags that choose the config (kept in the children's command).
_CONFIG_FLAGS = ("-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir")
#: Hydra overrides the children must not repeat (Lightning adds its own run dir and job name).
_LAUNCH_OVERRIDES = re.compile(
    r"^(hydra\.(run\.dir|job\.name|output_subdir|mode|sweep|sweeper|launcher)|hydra/(sweeper|launcher))\b"
)


# ---------------------------------------------------------------------------------- checks


def _is_launching_process() -> bool:
    """True in the process the user started (Lightning's children get LOCAL_RANK)."""
    return "LOCAL_RANK" not in os.environ


def _model_dir(cfg: DictConfig) -> Path:
    """The checked model directory; the tiny model is generated there first when the config
    says so (`lightning_mpipemoe_cli.model_directory`), by the launching process only."""
    path, generate = check_finetune_config(cfg)
    if generate and _is_launching_process():
        from lightning_mpipemoe.recipes.tiny_checkpoint import TinySpec, ensure_tiny_checkpoint

        spec = TinySpec(**OmegaConf.to_container(cfg.model.tiny, resolve=True))
        if ensure_tiny_checkpoint(path, spec):
            why = "model.generate=true" if cfg.model.generate is True else "the package's model cache, paths.models"
            print(f"{PROG}: generated the tiny {spec.family} model (random weights) at {path} ({why})", file=sys.stderr)
    if not (path / "config.json").is_file():
        raise RecipeError(f"model.path={path} has no config.json: not a Hugging Face checkpoint directory")
    return path


def _check_model_type(cfg: DictConfig, hf_config: dict) -> None:
    from lightning_mpipemoe.hf_models.api import covered_model_types

    model_type = hf_config.get("model_type")
    if model_type not in covered_model_types():
        raise RecipeError(
            f"model.path={cfg.model.path}: model_type {model_type!r} has no lightning_mpipemoe adapter "
            f"(covered: {', '.join(covered_model_types())})"
        )


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

    from lightning_mpipemoe.hf_models.peft_lora import check_peft_spec
    from lightning_mpipemoe.recipes.reporting import RunMonitor

    model_dir = _model_dir(cfg)
    if _is_launching_process():
        _check_memory_plan(cfg)  # before any process starts (the model's config.json is there now)
    hf_config = json.loads((model_dir / "config.json").read_text())
    _check_model_type(cfg, hf_config)
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
    peft = check_peft_spec(peft_spec)
    if getattr(strategy, "_sharding", "ddp") == "fsdp" and peft is not None and peft.get("targets") != "attention":
        raise RecipeError(
            f"peft.targets={peft.get('targets')} with strategy.sharding=fsdp: LoRA on the routed experts is not sharded "
            "by FSDP (peft's ParamWrapper reads the expert weights outside FSDP's unshard); use peft.targets=attention, "
            "or strategy=mpipemoe (ddp)"
        )
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
    """Collective: a plain Hugging Face directory of the fine-tuned model, each EP rank writing
    its own experts (no rank gathers the model; `hf_models.export_pretrained`). A LoRA run
    writes the merged model there and the adapter beside it."""
    from lightning_mpipemoe.hf_models.api import export_pretrained
    from lightning_mpipemoe.hf_models.peft_lora import check_peft_spec, export_lora_run

    strategy = prepared.trainer.strategy
    groups = getattr(strategy, "moe_groups", None)
    if check_peft_spec(prepared.module.hparams.get("peft")) is not None:  # LoRA: merged export, adapter beside it
        written, _ = export_lora_run(prepared.module.model, export_dir, groups, prepared.model_dir)
        return written
    return export_pretrained(
        prepared.module.model,
        export_dir,
        groups,
        tokenizer_dir=prepared.model_dir,
        barrier_group=getattr(strategy, "checkpoint_group", None),
    )


def _summary(prepared: Prepared, before: dict, after: dict, seconds: float, export_dir: Path | None) -> dict:
    cfg, trainer, module, monitor = prepared.cfg, prepared.trainer, prepared.module, prepared.monitor
    strategy = trainer.strategy
    groups = strategy.moe_groups
    output_dir = Path(cfg.output_dir)
    report = getattr(module, "load_report", None)
    checkpoint = next((Path(c.last_model_path) for c in trainer.checkpoint_callbacks if c.last_model_path), None)
    hf = prepared.hf_config
    return {
        "model": {
            "name": cfg.model.get("name"),
            "path": str(prepared.model_dir),
            "class": (hf.get("architectures") or [type(module.model).__name__])[0],
            "num_experts": num_experts_of(hf),
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
        # What global rank 0 read of the model's checkpoint tensors (its slices only).
        "load": {"bytes_read": report.bytes_read, "checkpoint_bytes": report.checkpoint_bytes} if report else None,
        "log_dir": str(output_dir / "logs"),
        "summary_file": str(output_dir / "summary.json"),
    }


def _other_ranks_expert_params(strategy, module) -> int:
    """Parameters of the experts this rank does not hold (the model's size, not this rank's)."""
    named = dict(module.named_parameters())
    ep = strategy.moe_groups.ep_size
    return sum(named[k].numel() * (ep - 1) for k in strategy.expert_parameter_names if k in named)


def _multirun_job_port(saved_env: dict[str, str | None]) -> None:
    """Give this job of a multirun its own rendezvous port when the user fixed one.

    A multirun runs its jobs one after another in this process. Jobs that rendezvous on one
    port meet the rendezvous state of the job before (seen: every rank of the second job waiting
    in `init_process_group` until the timeout). Without `MASTER_PORT` Lightning picks a free port
    per job; with it, job k uses `MASTER_PORT + k`, which every node of a multi-node sweep
    computes alike.
    """
    base = saved_env.get("MASTER_PORT")
    if base is None or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    job = HydraConfig.get().job.num
    if not base.isdigit() or not 0 < int(base) + job <= 65535:
        raise RecipeError(
            f"MASTER_PORT={base}: job {job} of a multirun rendezvous on MASTER_PORT + {job}, which must be a "
            "port number (1..65535)"
        )
    os.environ["MASTER_PORT"] = str(int(base) + job)


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


def _check_memory_plan(cfg: DictConfig) -> None:
    """Raise a `RecipeError` when the configured run does not fit its devices by the memory
    plan (`recipes.plan`); only where the device memory is known: `plan.device_memory`, or
    CUDA's own for a GPU run on a machine with one (CPU runs are not planned)."""
    memory = (cfg.get("plan") or {}).get("device_memory")
    if memory is None and str(cfg.trainer.get("accelerator")) in ("gpu", "cuda"):
        import torch

        memory = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    if memory is None:
        return
    from lightning_mpipemoe.recipes.plan import plan_from_config

    _, plans, chosen, suggestions = plan_from_config(cfg)
    plan = plans[chosen]
    if plan.fits is False:
        what = f"; would fit: {'; '.join(suggestions)}" if suggestions else ""
        raise RecipeError(
            f"strategy.sharding={chosen}: the run needs {plan.total / 1e9:.1f} GB per rank by the memory plan, the "
            f"device has {plan.device_memory / 1e9:.1f} GB (python -m lightning_mpipemoe.recipes.plan with the same "
            f"overrides prints the table){what}"
        )


def run(cfg: DictConfig) -> dict | None:
    """The recipe for a composed config; returns the summary on global rank 0 (None elsewhere)."""
    # The held-out blocks are padded to a multiple of the world size with ignored blocks
    # (recipes.data), so no sample is evaluated twice: Lightning's advice does not apply.
    warnings.filterwarnings("ignore", message=r".*During `trainer.validate\(\)`, it is recommended to use `Trainer")
    launching = _is_launching_process()
    saved_env = {key: os.environ.get(key) for key in _LAUNCH_ENV}
    try:
        if launching and HydraConfig.initialized():
            _multirun_job_port(saved_env)
        prepared = prepare(cfg)
    except (RecipeError, InstantiationException, OmegaConfBaseException, ValueError, TypeError, OSError,
            ImportError, KeyError) as exc:  # fmt: skip
        if launching:
            discard_hydra_run_dir()
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


# `main` (lightning_mpipemoe_cli.finetune): the entry point of `mpipemoe-finetune` and of
# `python -m lightning_mpipemoe.recipes.finetune`; it checks the command line, then calls `run`.

if __name__ == "__main__":
    main()
