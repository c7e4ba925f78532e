"""The command line of the recipes: `mpipemoe-finetune`, `mpipemoe-convert`, `mpipemoe-evaluate`.

This module parses and checks a command with Hydra, OmegaConf, argparse and the standard
library only; torch, Lightning, transformers and the package itself are imported once the work
starts (`lightning_mpipemoe.recipes.finetune.run` etc.). It is a top-level module on purpose:
importing anything under `lightning_mpipemoe` runs the package's `__init__`, which registers the
strategy with Lightning and the experts implementation with transformers and so imports both
(seconds). Here `--help`, `--cfg job` and a bad option answer in about the time Hydra takes.

Everything checked here is checked before any file is written or process started, and reported
as one line, `<prog>: error: <key>=<value>: <what would be valid>`, exit status 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "CONFIG_DIR",
    "RecipeError",
    "check_finetune_config",
    "check_numbers",
    "convert",
    "evaluate",
    "finetune",
    "model_directory",
    "num_experts_of",
]


def _package_dir() -> Path:
    """`lightning_mpipemoe`'s folder, found without importing (and so registering) the package."""
    spec = importlib.util.find_spec("lightning_mpipemoe")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("lightning_mpipemoe is not installed (pip install lightning-mpipemoe)")
    return Path(next(iter(spec.submodule_search_locations)))


#: The config folder (the repository's `conf/`, installed as `lightning_mpipemoe/conf`).
CONFIG_DIR = str((_package_dir() / "conf").resolve())
#: When this process started: files Hydra wrote for a job that then failed its checks are newer.
_STARTED = time.time()


class RecipeError(ValueError):
    """A configuration the recipe refuses before anything starts (printed as one line)."""


# ----------------------------------------------------------------------------- number checks

# A rule: (accepts(value) -> bool, what a valid value is). Keys absent from a config are skipped.
_Rule = tuple[Callable[[Any], bool], str]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _int_at_least(low: int, *also: Any) -> _Rule:
    extra = "".join(f" or {a}" for a in also)
    return (lambda v: v in also or (_is_int(v) and v >= low)), f"an integer >= {low}{extra}"


def _real(low: float, *, strict: bool, optional: bool = False) -> _Rule:
    op = ">" if strict else ">="
    ok = (lambda v: _is_real(v) and (v > low if strict else v >= low))
    return (lambda v: (optional and v is None) or ok(v)), f"a number {op} {low}" + (" or null" if optional else "")


def _betas(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_real(b) and 0 <= b < 1 for b in v)


def _val_check_interval(v: Any) -> bool:
    return v is None or (_is_int(v) and v >= 1) or (isinstance(v, float) and 0 < v <= 1)


def _devices(v: Any) -> bool:
    if _is_int(v):
        return v >= 1 or v == -1
    if isinstance(v, str):
        s = v.strip()
        return s == "auto" or s == "-1" or (s.isdigit() and int(s) >= 1) or ("," in s and bool(s.strip(",")))
    return isinstance(v, (list, tuple)) and len(v) > 0


def _granularity(v: Any) -> bool:
    return v is None or v == "auto" or (_is_int(v) and v >= 1)


NUMBER_RULES: dict[str, _Rule] = {
    "seed": ((lambda v: _is_int(v) and v >= 0), "an integer >= 0"),
    "optim.learning_rate": _real(0, strict=True),
    "optim.weight_decay": _real(0, strict=False),
    "optim.betas": (_betas, "two numbers in [0, 1), e.g. [0.9,0.95]"),
    "optim.warmup_steps": _int_at_least(0),
    "data.seq_len": _int_at_least(2),
    "data.batch_size": _int_at_least(1),
    "data.heldout_every": _int_at_least(2),
    "data.num_workers": _int_at_least(0),
    "data.max_documents": _int_at_least(1, None),
    "trainer.devices": (_devices, "an integer >= 1, a list or comma-separated string of device ids, -1 or auto"),
    "trainer.num_nodes": _int_at_least(1),
    "trainer.max_steps": _int_at_least(1, -1),
    "trainer.max_epochs": _int_at_least(1, -1, None),
    "trainer.val_check_interval": (_val_check_interval, "an integer >= 1 (steps), a number in (0, 1] or null"),
    "trainer.check_val_every_n_epoch": _int_at_least(1, None),
    "trainer.num_sanity_val_steps": _int_at_least(-1),
    "trainer.log_every_n_steps": _int_at_least(1),
    "trainer.gradient_clip_val": _real(0, strict=False, optional=True),
    "trainer.accumulate_grad_batches": _int_at_least(1),
    "strategy.expert_parallel_size": _int_at_least(1, None),
    "strategy.granularity": (_granularity, "an integer >= 1, auto or null"),
    "strategy.memory_budget": _real(0, strict=True, optional=True),
    "strategy.simulated_link.latency_s": _real(0, strict=False),
    "strategy.simulated_link.bandwidth_bytes_per_s": _real(0, strict=True),
    "strategy.timeout.minutes": _real(0, strict=True),
}
#: The tiny model's sizes (`model.tiny`, see recipes/tiny_checkpoint.TinySpec).
_TINY_SIZES = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "num_experts",
               "top_k", "expert_capacity", "max_position_embeddings", "min_word_count")  # fmt: skip


def _show(value: Any) -> str:
    from omegaconf import OmegaConf

    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value)
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def check_numbers(cfg) -> None:
    """Every numeric option of a composed finetune config against `NUMBER_RULES` (and the tiny
    model's sizes); raises `RecipeError` naming the first bad key, its value and what is valid."""
    from omegaconf import OmegaConf

    rules = dict(NUMBER_RULES)
    rules.update({f"model.tiny.{k}": _int_at_least(1) for k in _TINY_SIZES})
    rules["model.tiny.router_aux_loss_coef"] = _real(0, strict=False)
    for key, (accepts, valid) in rules.items():
        node = OmegaConf.select(cfg, key, default="<absent>", throw_on_missing=False)
        if isinstance(node, str) and node == "<absent>":
            continue
        value = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
        if not accepts(value):
            raise RecipeError(f"{key}={_show(value)}: must be {valid}")


# ------------------------------------------------------------------------------- model paths

def _within(path: Path, root: Path) -> bool:
    try:
        return path.resolve().is_relative_to(root.resolve())
    except OSError:
        return False


def model_directory(cfg) -> tuple[Path, bool]:
    """The model directory of a composed finetune config, and whether the tiny model must be
    (re)generated there first. Nothing is written here.

    `model.generate`: "auto" (the tiny configs' default) generates only inside the package's
    cache (`paths.models`); true generates at any `model.path`; false never does. A missing
    directory that is not to be generated is an error: a typo must not train a random model.
    """
    from omegaconf import OmegaConf

    name = cfg.model.get("name", "?")
    if OmegaConf.is_missing(cfg.model, "path"):
        raise RecipeError(
            f"model={name} needs model.path, the local directory of a Hugging Face checkpoint "
            f"(e.g. model.path=/data/{name})"
        )
    path = Path(str(cfg.model.path)).expanduser()
    generate = cfg.model.get("generate", False)
    if not (generate == "auto" or isinstance(generate, bool)):
        raise RecipeError(f"model.generate={generate}: must be auto, true or false")
    tiny = cfg.model.get("tiny")
    if generate is True and tiny is None:
        raise RecipeError(f"model.generate=true: model={name} has no tiny model to generate (model.tiny is unset)")
    models = cfg.get("paths", {}).get("models")
    in_cache = models is not None and _within(path, Path(str(models)).expanduser())
    wanted = tiny is not None and (generate is True or (generate == "auto" and in_cache))
    if not path.exists():
        if wanted:
            return path, True
        hint = (
            f"; the tiny model is generated only under paths.models ({models}) unless model.generate=true"
            if tiny is not None
            else ""
        )
        raise RecipeError(
            f"model.path={path} does not exist (model={name} expects a local Hugging Face checkpoint directory){hint}"
        )
    if not (path / "config.json").is_file() and not wanted:
        raise RecipeError(f"model.path={path} has no config.json: not a Hugging Face checkpoint directory")
    return path, wanted


def num_experts_of(hf_config: dict) -> int | None:
    """The experts per MoE layer a Hugging Face config.json names (None if it names none)."""
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        value = hf_config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _device_count(devices: Any) -> int | None:
    from omegaconf import OmegaConf

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


def _check_expert_parallel_size(cfg, num_experts: int | None) -> None:
    """EP against the number of processes and of experts, before anything starts (the strategy
    checks the same with `groups.check_parallel_sizes` once the devices are resolved)."""
    devices = _device_count(cfg.trainer.get("devices"))
    if devices is None:
        return
    nodes = int(cfg.trainer.get("num_nodes", 1) or 1)
    ep = cfg.strategy.get("expert_parallel_size")
    ep = devices if ep is None else ep
    world = devices * nodes
    where = f"strategy.expert_parallel_size={ep} with trainer.devices={devices} x trainer.num_nodes={nodes}"
    if world % ep:
        valid = [d for d in range(1, world + 1) if world % d == 0]
        raise RecipeError(f"{where}: expert_parallel_size={ep} does not divide the world size {world}; valid: {valid}")
    if num_experts is not None and num_experts % ep:
        valid = [d for d in range(1, num_experts + 1) if num_experts % d == 0 and world % d == 0]
        raise RecipeError(
            f"{where}: expert_parallel_size={ep} does not divide the {num_experts} experts; valid: {valid}"
        )


def _missing_keys(node: Any, prefix: str = "") -> list[str]:
    """Dotted keys of the `???` values in a config container."""
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in _missing_keys(value, f"{prefix}{key}.")]
    if isinstance(node, list):
        return [k for index, value in enumerate(node) for k in _missing_keys(value, f"{prefix}{index}.")]
    return [prefix[:-1]] if node == "???" else []


def check_finetune_config(cfg) -> tuple[Path, bool]:
    """All checks that need no heavy import: numbers, the model directory, EP against the
    devices and the model's experts. Returns `model_directory(cfg)`."""
    from omegaconf import OmegaConf

    check_numbers(cfg)
    path, generate = model_directory(cfg)
    missing = _missing_keys(OmegaConf.to_container(cfg, resolve=False))  # no interpolation is resolved
    if missing:
        key = missing[0]
        raise RecipeError(f"{key} is required (??? in the config): give it on the command line, {key}=...")
    if generate:
        num_experts = cfg.model.tiny.get("num_experts")
    else:
        try:
            num_experts = num_experts_of(json.loads((path / "config.json").read_text()))
        except ValueError as exc:
            raise RecipeError(f"model.path={path}: config.json is not valid JSON ({exc})") from None
    _check_expert_parallel_size(cfg, num_experts)
    return path, generate


# -------------------------------------------------------------------------------------- entry


def fail(prog: str, exc: BaseException | str) -> None:
    """Print `<prog>: error: <one line>` on stderr and exit with status 2."""
    print(f"{prog}: error: {' '.join(str(exc).split())}", file=sys.stderr)
    sys.exit(2)


def discard_hydra_run_dir() -> None:
    """Remove what Hydra wrote for this job before its checks failed (`.hydra/`, the job log)
    and the folders that are then empty (the run directory, and its parents below the working
    directory), so that a refused command leaves nothing behind. Files older than this process
    and folders that still hold anything are left alone."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir).resolve()
    written = [run_dir / ".hydra" / f"{name}.yaml" for name in ("config", "hydra", "overrides")]
    written.append(run_dir / f"{hydra_cfg.job.name}.log")
    for file in written:
        if file.is_file() and file.stat().st_mtime >= _STARTED - 1:
            file.unlink()
    cwd = Path.cwd().resolve()
    folders = [run_dir / ".hydra", run_dir, *(p for p in run_dir.parents if p.is_relative_to(cwd) and p != cwd)]
    for folder in folders:
        try:
            folder.rmdir()  # only when empty
        except FileNotFoundError:
            continue
        except OSError:
            break


def _finetune_task(cfg) -> None:
    try:
        check_finetune_config(cfg)
    except RecipeError as exc:
        discard_hydra_run_dir()
        fail("mpipemoe-finetune", exc)
    from lightning_mpipemoe.recipes.finetune import run

    run(cfg)


def finetune() -> None:
    """`mpipemoe-finetune [overrides]` (also `python -m lightning_mpipemoe.recipes.finetune`)."""
    import hydra

    hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="finetune")(_finetune_task)()


def _evaluate_task(cfg) -> None:
    from omegaconf import OmegaConf

    prog = "mpipemoe-evaluate"
    if OmegaConf.is_missing(cfg, "model_dir"):
        fail(prog, "model_dir is required: model_dir=<a Hugging Face directory, e.g. a recipe run's hf_export>")
    model_dir = Path(str(cfg.model_dir)).expanduser()
    if not (model_dir / "config.json").is_file():
        fail(prog, f"model_dir={model_dir} is not a Hugging Face directory (no config.json)")
    if cfg.split not in ("validation", "train"):
        fail(prog, f"split={cfg.split}: must be validation or train")
    try:
        check_numbers(OmegaConf.create({"data": OmegaConf.to_container(cfg.data)}))
    except RecipeError as exc:
        fail(prog, exc)
    from lightning_mpipemoe.recipes.evaluate import run

    run(cfg)


def evaluate() -> None:
    """`mpipemoe-evaluate model_dir=... [overrides]` (also `python -m lightning_mpipemoe.recipes.evaluate`)."""
    import hydra

    hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")(_evaluate_task)()


def convert_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpipemoe-convert",
        description="Convert an mpipemoe strategy checkpoint (any EP size) into a Hugging Face directory.",
    )
    parser.add_argument("checkpoint", help="checkpoint directory, e.g. outputs/finetune/<time>/checkpoints/last.ckpt")
    parser.add_argument("out_dir", help="the Hugging Face directory to write")
    parser.add_argument(
        "--model-dir", help="original model directory: its config.json (if the checkpoint lacks one) and tokenizer"
    )
    parser.add_argument(
        "--tokenizer-dir", help="copy tokenizer files from here (default: --model-dir, else the model's source dir)"
    )
    parser.add_argument("--prefix", default="model.", help="the Hugging Face model's key prefix (default: model.)")
    parser.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists")
    return parser


def convert(argv: list[str] | None = None) -> int:
    """`mpipemoe-convert CHECKPOINT OUT_DIR [...]` (also `python -m lightning_mpipemoe.recipes.convert`)."""
    args = convert_parser().parse_args(argv)
    prog = "mpipemoe-convert"
    checkpoint, out_dir = Path(args.checkpoint), Path(args.out_dir)
    problem = None
    if not (checkpoint / "meta.ckpt").is_file():
        problem = f"{checkpoint} is not an mpipemoe strategy checkpoint (a directory with meta.ckpt)"
    elif out_dir.exists() and not args.overwrite:
        problem = f"{out_dir} exists; pass --overwrite to replace it"
    elif args.model_dir is not None and not (Path(args.model_dir) / "config.json").is_file():
        problem = f"--model-dir {args.model_dir} has no config.json"
    elif args.tokenizer_dir is not None and not Path(args.tokenizer_dir).is_dir():
        problem = f"--tokenizer-dir {args.tokenizer_dir} is not a directory"
    if problem:
        print(f"{prog}: error: {problem}", file=sys.stderr)
        return 2
    from lightning_mpipemoe.recipes.convert import run

    return run(args)

