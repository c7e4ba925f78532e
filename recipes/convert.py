"""Strategy checkpoint -> Hugging Face directory, offline (one process, no process group).

    python -m lightning_mpipemoe.recipes.convert outputs/finetune/2026-01-31_12-00-00/checkpoints/last.ckpt out/hf_model

A checkpoint of `MPipeMoEStrategy` is a directory holding the replicated part once and one
expert shard per EP rank (`lightning_mpipemoe.checkpointing`); any EP size converts. The
experts are consolidated by `checkpointing.consolidate_checkpoint`, mapped back to the
family's own keys and written by transformers' `save_pretrained` (`hf_models`), so the result
loads with plain `AutoModelForCausalLM.from_pretrained` / `AutoModelForSeq2SeqLM`.

The model's config comes from the checkpoint (the recipe's LightningModule stores it), else
from `--model-dir`; the tokenizer files are copied from `--tokenizer-dir`, else from the
fine-tuned model's source directory when it still exists.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning_mpipemoe  # noqa: F401  isort: skip  (before transformers; see tests/hf_tiny.py)
import torch

from lightning_mpipemoe.checkpointing import META_FILE, consolidate_checkpoint, is_mpipemoe_checkpoint

__all__ = ["convert_checkpoint", "main"]

PROG = "mpipemoe-convert"


class ConvertError(ValueError):
    """A missing or unusable input (printed as one line)."""


def _meta(checkpoint: Path) -> dict:
    # mmap: the replicated weights in meta.ckpt are not read, only the small entries used here.
    return torch.load(checkpoint / META_FILE, map_location="cpu", mmap=True, weights_only=False)


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
        model_dir: the original model directory, for its config.json (needed only when the
            checkpoint does not carry the config).
        tokenizer_dir: where to copy tokenizer files from (default: the model's source
            directory recorded in the checkpoint, when it exists).
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
    meta = _meta(checkpoint)
    source = (meta.get("hyper_parameters") or {}).get("model_path")
    if model_dir is not None:
        if not (Path(model_dir) / "config.json").is_file():
            raise ConvertError(f"--model-dir {model_dir} has no config.json")
        hf_config = AutoConfig.from_pretrained(model_dir)
    elif meta.get("hf_config"):
        hf_config = AutoConfig.for_model(**meta["hf_config"])
    elif source and (Path(source) / "config.json").is_file():
        hf_config = AutoConfig.from_pretrained(source)
    else:
        raise ConvertError(f"{checkpoint} carries no model config; pass --model-dir (the original model's directory)")
    if tokenizer_dir is None and source and Path(source).is_dir():
        tokenizer_dir = source
    state = consolidate_checkpoint(checkpoint, prefix=prefix)
    if not state:
        raise ConvertError(f"{checkpoint} holds no weights under the prefix {prefix!r}; pass --prefix")
    peft_spec = (meta.get("hyper_parameters") or {}).get("peft")
    if peft_spec and peft_spec.get("method", "none") != "none":  # a LoRA run: merge the adapters
        from lightning_mpipemoe.hf_models.peft_lora import merged_state_dict

        state = merged_state_dict(state, hf_config, peft_spec)
    return export_from_state_dicts([state], hf_config, out_dir, tokenizer_dir=tokenizer_dir, overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_mpipemoe.recipes.convert",
        description="Convert an mpipemoe strategy checkpoint (any EP size) into a Hugging Face directory.",
    )
    parser.add_argument("checkpoint", help="checkpoint directory, e.g. outputs/finetune/<time>/checkpoints/last.ckpt")
    parser.add_argument("out_dir", help="the Hugging Face directory to write")
    parser.add_argument("--model-dir", help="original model directory (for config.json, if the checkpoint lacks it)")
    parser.add_argument("--tokenizer-dir", help="copy tokenizer files from here (default: the model's source dir)")
    parser.add_argument("--prefix", default="model.", help="the Hugging Face model's key prefix (default: model.)")
    parser.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists")
    args = parser.parse_args(argv)
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
