"""Strategy checkpoint -> Hugging Face directory, offline (one process, no process group).

    python -m lightning_mpipemoe.recipes.convert outputs/finetune/2026-01-31_12-00-00/checkpoints/last.ckpt out/hf_model

A checkpoint of `MPipeMoEStrategy` is a directory holding the replicated part once and one
expert shard per EP rank (`lightning_mpipemoe.checkpointing`); any EP size converts. The
experts are consolidated by `checkpointing.consolidate_checkpoint`, mapped back to the
family's own keys and written by transformers' `save_pretrained` (`hf_models`), so the result
loads with plain `AutoModelForCausalLM.from_pretrained` / `AutoModelForSeq2SeqLM`.

The model's config comes from the checkpoint (the recipe's LightningModule stores it), else
from `--model-dir`. The tokenizer files are copied from `--tokenizer-dir`, else `--model-dir`,
else the fine-tuned model's source directory when it still exists; when none of these holds a
tokenizer the directory is written without one and a warning line says why (an explicit
`--tokenizer-dir` without tokenizer files is an error).

Every checkpoint file is verified against the size and SHA-256 recorded when it was saved and
read with `weights_only=True` (`checkpointing.read_checkpoint`): a damaged shard is named, and
no pickled code runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning_mpipemoe  # noqa: F401  isort: skip  (before transformers; see tests/hf_tiny.py)

from lightning_mpipemoe.checkpointing import META_FILE, is_mpipemoe_checkpoint, read_checkpoint
from lightning_mpipemoe.hf_models.checkpoint_io import TOKENIZER_FILES
from lightning_mpipemoe_cli import convert as main

__all__ = ["ConvertError", "convert_checkpoint", "main", "run"]

PROG = "mpipemoe-convert"


class ConvertError(ValueError):
    """A missing or unusable input (printed as one line)."""


def _tokenizer_files(directory: Path) -> list[str]:
    return [name for name in TOKENIZER_FILES if (directory / name).is_file()]


def _tokenizer_source(tokenizer_dir, model_dir, source) -> tuple[Path | None, str | None]:
    """Where to copy the tokenizer from, or None and why there is none."""
    if tokenizer_dir is not None:
        if not _tokenizer_files(Path(tokenizer_dir)):
            raise ConvertError(
                f"--tokenizer-dir {tokenizer_dir} holds no tokenizer file ({', '.join(TOKENIZER_FILES)})"
            )
        return Path(tokenizer_dir), None
    tried = []
    for label, candidate in (("--model-dir", model_dir), ("the model's source directory", source)):
        if candidate is None:
            continue
        if _tokenizer_files(Path(candidate)):
            return Path(candidate), None
        state = "holds no tokenizer file" if Path(candidate).is_dir() else "does not exist"
        tried.append(f"{label} {candidate} {state}")
    if not tried:
        tried.append("the checkpoint records no source directory")
    return None, "; ".join(tried) + "; pass --tokenizer-dir (the export loads, but evaluation and generation need one)"


def convert_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    model_dir: str | Path | None = None,
    tokenizer_dir: str | Path | None = None,
    prefix: str = "model.",
    overwrite: bool = False,
) -> Path:
    """Write the Hugging Face directory of a strategy checkpoint; returns `out_dir`.

    Args:
        checkpoint: the checkpoint directory (e.g. `checkpoints/last.ckpt`).
        out_dir: where the Hugging Face directory goes.
        model_dir: the original model directory: its config.json (used over the checkpoint's)
            and its tokenizer files.
        tokenizer_dir: where to copy tokenizer files from (default: `model_dir`, else the
            model's source directory recorded in the checkpoint, when it exists).
        prefix: the Hugging Face model's attribute path in the LightningModule.
        overwrite: replace an existing `out_dir`.
    """
    from transformers import AutoConfig

    from lightning_mpipemoe.hf_models.api import export_from_state_dicts

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if not is_mpipemoe_checkpoint(checkpoint):
        raise ConvertError(f"{checkpoint} is not an mpipemoe strategy checkpoint (a directory with {META_FILE})")
    if out_dir.exists() and not overwrite:
        raise ConvertError(f"{out_dir} exists; pass --overwrite to replace it")
    if model_dir is not None and not (Path(model_dir) / "config.json").is_file():
        raise ConvertError(f"--model-dir {model_dir} has no config.json")
    if tokenizer_dir is not None:
        _tokenizer_source(tokenizer_dir, None, None)  # an explicit directory without a tokenizer: before the read
    full = read_checkpoint(checkpoint, 1, 0)  # every file verified, every expert, weights_only
    source = (full.get("hyper_parameters") or {}).get("model_path")
    if model_dir is not None:
        hf_config = AutoConfig.from_pretrained(model_dir)
    elif full.get("hf_config"):
        hf_config = AutoConfig.for_model(**full["hf_config"])
    elif source and (Path(source) / "config.json").is_file():
        hf_config = AutoConfig.from_pretrained(source)
    else:
        raise ConvertError(f"{checkpoint} carries no model config; pass --model-dir (the original model's directory)")
    tokenizer_source, why_not = _tokenizer_source(tokenizer_dir, model_dir, source)
    state = {k[len(prefix) :]: v for k, v in full["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise ConvertError(f"{checkpoint} holds no weights under the prefix {prefix!r}; pass --prefix")
    peft_spec = (full.get("hyper_parameters") or {}).get("peft")
    if peft_spec and peft_spec.get("method", "none") != "none":  # a LoRA run: merge the adapters
        from lightning_mpipemoe.hf_models.peft_lora import merged_state_dict

        state = merged_state_dict(state, hf_config, peft_spec)
    written = export_from_state_dicts([state], hf_config, out_dir, tokenizer_dir=tokenizer_source, overwrite=overwrite)
    if why_not:
        print(f"{PROG}: warning: {written} has no tokenizer: {why_not}", file=sys.stderr)
    return written


def run(args) -> int:
    """The work of `mpipemoe-convert` once its arguments passed `lightning_mpipemoe_cli.convert`."""
    try:
        out = convert_checkpoint(
            args.checkpoint, args.out_dir, model_dir=args.model_dir, tokenizer_dir=args.tokenizer_dir,
            prefix=args.prefix, overwrite=args.overwrite,
        )  # fmt: skip
    except (ConvertError, OSError, ValueError) as exc:
        print(f"{PROG}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
