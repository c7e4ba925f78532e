"""Held-out loss and perplexity of a Hugging Face directory on a data set, with plain transformers.

    python -m lightning_mpipemoe.recipes.evaluate model_dir=outputs/finetune/2026-01-31_12-00-00/hf_export
    python -m lightning_mpipemoe.recipes.evaluate model_dir=... data=jsonl data.train_files=[valid.jsonl]

The data set is the fine-tuning recipe's `data/` group (the shipped corpus by default) and the
number is the same one the recipe reports: the token mean of the cross-entropy over the
held-out blocks (`recipes.module.heldout_loss_sums`), router losses left out. The model runs
in one process with Hugging Face's own experts, so evaluating the recipe's export also checks
the export independently of the MoE executor.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import lightning_mpipemoe  # noqa: F401  isort: skip  (before transformers; see tests/hf_tiny.py)
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from lightning_mpipemoe.hf_models.checkpoint_io import TOKENIZER_FILES
from lightning_mpipemoe.recipes.data import TextDataModule
from lightning_mpipemoe.recipes.module import heldout_loss_sums
from lightning_mpipemoe_cli import evaluate as main

__all__ = ["evaluate_directory", "main", "run"]

PROG = "mpipemoe-evaluate"


def _load(model_dir: Path, dtype: str | None, device: str):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = AutoConfig.from_pretrained(model_dir)
    task = "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal_lm"
    cls = AutoModelForSeq2SeqLM if task == "seq2seq" else AutoModelForCausalLM
    kwargs = {"dtype": getattr(torch, dtype)} if dtype else {}
    model = cls.from_pretrained(model_dir, **kwargs).to(device)
    return model.eval(), task


@torch.no_grad()
def evaluate_directory(
    model_dir: str | Path, data: TextDataModule | None = None, *, split: str = "validation", device: str = "cpu",
    dtype: str | None = None,
) -> dict:  # fmt: skip
    """{"loss", "perplexity", "tokens"} of the model in `model_dir` on `data`'s `split`
    ("validation": the held-out blocks; "train"). `data` defaults to the shipped corpus with
    the recipe's default blocks; its tokenizer and task are set from the model."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a Hugging Face directory (no config.json)")
    model, task = _load(model_dir, dtype, device)
    data = data if data is not None else TextDataModule()
    data.tokenizer, data.task = data.tokenizer or str(model_dir), task
    data.setup("validate")
    if split not in ("validation", "train"):
        raise ValueError(f"split must be 'validation' or 'train', got {split!r}")
    loader = data.val_dataloader() if split == "validation" else data.train_dataloader()
    sums = torch.zeros(2, dtype=torch.float64)
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        sums += heldout_loss_sums(model, batch, task).cpu()
    loss = float(sums[0] / sums[1])
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(sums[1])}


def _tokenizer_dir(model_dir: Path, tokenizer: str | None) -> str:
    """`tokenizer`, else `model_dir` when it holds tokenizer files (transformers' own error for a
    missing tokenizer speaks of sentencepiece, not of the directory)."""
    directory = Path(tokenizer) if tokenizer else model_dir
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        where = f"tokenizer={tokenizer}" if tokenizer else f"model_dir={model_dir}"
        raise FileNotFoundError(
            f"{where} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...): pass tokenizer=<the original "
            "model's directory>, or convert the checkpoint again with mpipemoe-convert --tokenizer-dir"
        )
    return str(directory)


def run(cfg: DictConfig) -> None:
    """The work of `mpipemoe-evaluate` once its command line passed `lightning_mpipemoe_cli.evaluate`."""
    try:
        tokenizer = _tokenizer_dir(Path(cfg.model_dir), cfg.get("tokenizer"))
        data = instantiate(cfg.data, tokenizer=tokenizer)
        data.check()
        result = evaluate_directory(cfg.model_dir, data, split=cfg.split, device=cfg.device, dtype=cfg.dtype)
    except (OSError, ValueError, ImportError, KeyError) as exc:
        print(f"{PROG}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        sys.exit(2)
    result = {"model_dir": str(cfg.model_dir), "split": cfg.split, **result}
    if cfg.json:
        print(json.dumps(result))
    else:
        print(
            f"{cfg.model_dir}: {cfg.split} loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f} "
            f"over {result['tokens']:,} tokens"
        )


if __name__ == "__main__":
    main()
