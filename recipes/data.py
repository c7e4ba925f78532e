"""Fine-tuning data: the corpus shipped with the package, or local text / jsonl / parquet files.

Documents are tokenized, joined with the tokenizer's end-of-sequence token between them and
cut into equal blocks (the usual "group texts" of causal-LM fine-tuning): a causal block is
`seq_len` tokens that are their own labels (Hugging Face shifts them); a seq2seq block is
`2 * seq_len` tokens, the first half the encoder input and the second half the labels.

Held-out text is `validation_files`, or else every `heldout_every`-th document of the
training files (documents of text files are their blank-line separated paragraphs; rows of
jsonl / parquet files are documents). The held-out blocks are padded with blocks whose
labels are all ignored (-100) to a multiple of the world size: every rank then runs the same
number of validation batches (each MoE layer call is a collective) and no block is counted
twice, so the held-out loss is the token mean over exactly the held-out text whatever the
number of processes.

Text files need nothing beyond the standard library; jsonl and parquet files are read with
the `datasets` library (an optional dependency, imported only for them).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "FORMATS",
    "SHIPPED_CORPORA",
    "BlockDataset",
    "TextDataModule",
    "make_blocks",
    "read_documents",
    "shipped_corpus_path",
    "shipped_corpus_text",
]

#: Name -> file inside the package (`lightning_mpipemoe.recipes`).
SHIPPED_CORPORA = {"village": "corpus/village.txt"}
FORMATS = ("text", "json", "parquet")
IGNORE_INDEX = -100
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


def shipped_corpus_path(name: str) -> Path:
    if name not in SHIPPED_CORPORA:
        raise ValueError(f"unknown shipped corpus {name!r}; shipped: {sorted(SHIPPED_CORPORA)}")
    path = Path(str(resources.files("lightning_mpipemoe.recipes").joinpath(SHIPPED_CORPORA[name])))
    if not path.is_file():
        raise FileNotFoundError(f"the shipped corpus {name!r} is missing from the installation: {path}")
    return path


def shipped_corpus_text(name: str) -> str:
    return shipped_corpus_path(name).read_text(encoding="utf-8")


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in _PARAGRAPH_BREAK.split(text) if p.strip()]


def _import_datasets():
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(
            "jsonl and parquet data are read with the `datasets` library, which is not installed: "
            "pip install 'lightning-mpipemoe[data]' (or pip install datasets)"
        ) from exc
    return datasets


def read_documents(files: Sequence[str | os.PathLike], format: str = "text", text_field: str = "text") -> list[str]:
    """The documents of `files`: paragraphs of text files, the `text_field` of jsonl / parquet rows."""
    if format not in FORMATS:
        raise ValueError(f"data format must be one of {FORMATS}, got {format!r}")
    if format == "text":
        return [p for f in files for p in _paragraphs(Path(f).read_text(encoding="utf-8"))]
    datasets = _import_datasets()
    table = datasets.load_dataset(format, data_files=[str(f) for f in files], split="train")
    if text_field not in table.column_names:
        raise KeyError(f"{list(map(str, files))}: no column {text_field!r} (columns: {table.column_names})")
    return [str(text) for text in table[text_field] if text and str(text).strip()]


def make_blocks(token_ids: Sequence[int], seq_len: int, task: str) -> list[dict[str, torch.Tensor]]:
    """Equal blocks of `token_ids` (the remainder is dropped)."""
    width = seq_len if task == "causal_lm" else 2 * seq_len
    ids = torch.tensor(list(token_ids), dtype=torch.long)
    blocks = []
    for start in range(0, len(ids) - width + 1, width):
        chunk = ids[start : start + width]
        if task == "causal_lm":
            blocks.append({"input_ids": chunk, "attention_mask": torch.ones_like(chunk), "labels": chunk.clone()})
        else:
            source, target = chunk[:seq_len], chunk[seq_len:]
            blocks.append({"input_ids": source, "attention_mask": torch.ones_like(source), "labels": target.clone()})
    return blocks


def _ignored_block(seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    ids = torch.full((seq_len,), pad_id, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.full_like(ids, IGNORE_INDEX)}


class BlockDataset(Dataset):
    def __init__(self, blocks: list[dict[str, torch.Tensor]]) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.blocks[index]


class TextDataModule(pl.LightningDataModule):
    """Token blocks for fine-tuning and held-out evaluation.

    Args:
        corpus: name of a shipped corpus (`SHIPPED_CORPORA`), used when `train_files` is empty.
        train_files: local files (or one file) to fine-tune on.
        validation_files: held-out files; None takes every `heldout_every`-th training document.
        format: "text" (paragraphs are documents), "json" (jsonl) or "parquet".
        text_field: the column holding the text (json / parquet).
        heldout_every: with no `validation_files`, documents `k-1, 2k-1, ...` are held out.
        seq_len: tokens per block (seq2seq: per encoder input and per target).
        batch_size: blocks per batch on each process.
        num_workers: DataLoader workers.
        max_documents: read at most this many training documents (None: all).
        tokenizer: a tokenizer directory (the recipe passes the model's) or a tokenizer object.
        task: "causal_lm" or "seq2seq" (the recipe passes the model's).
    """

    def __init__(
        self,
        *,
        corpus: str | None = "village",
        train_files: Sequence[str] | str | None = None,
        validation_files: Sequence[str] | str | None = None,
        format: str = "text",
        text_field: str = "text",
        heldout_every: int = 10,
        seq_len: int = 64,
        batch_size: int = 8,
        num_workers: int = 0,
        max_documents: int | None = None,
        tokenizer=None,
        task: str = "causal_lm",
    ) -> None:
        super().__init__()
        if task not in ("causal_lm", "seq2seq"):
            raise ValueError(f"task must be 'causal_lm' or 'seq2seq', got {task!r}")
        if format not in FORMATS:
            raise ValueError(f"data.format must be one of {FORMATS}, got {format!r}")
        if heldout_every < 2:
            raise ValueError(f"data.heldout_every must be >= 2, got {heldout_every}")
        if seq_len < 2 or batch_size < 1:
            raise ValueError(f"data.seq_len must be >= 2 and data.batch_size >= 1, got {seq_len}, {batch_size}")
        self.corpus = corpus
        self.train_files = [train_files] if isinstance(train_files, (str, os.PathLike)) else list(train_files or [])
        self.validation_files = (
            [validation_files] if isinstance(validation_files, (str, os.PathLike)) else list(validation_files or [])
        )
        if not self.train_files and corpus is None:
            raise ValueError("data needs train_files or a shipped corpus (data.corpus)")
        self.format = format
        self.text_field = text_field
        self.heldout_every = heldout_every
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.max_documents = max_documents
        self.tokenizer = tokenizer
        self.task = task
        self._train: list[dict] | None = None
        self._heldout: list[dict] | None = None
        self.heldout_tokens = 0

    # ---------------------------------------------------------------------------- checks

    def source_files(self) -> tuple[list[Path], list[Path], str]:
        """(training files, held-out files, format) as they will be read."""
        if self.train_files:
            return [Path(f) for f in self.train_files], [Path(f) for f in self.validation_files], self.format
        return [shipped_corpus_path(self.corpus)], [Path(f) for f in self.validation_files], "text"

    def check(self) -> None:
        """Raise a one-line error for missing files or a missing `datasets` library (no reading)."""
        train, heldout, format = self.source_files()
        for path in [*train, *heldout]:
            if not path.is_file():
                raise FileNotFoundError(f"data file {str(path)!r} does not exist")
        if format != "text":
            _import_datasets()

    # ----------------------------------------------------------------------------- blocks

    def _load_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("TextDataModule needs a tokenizer (the recipe passes the model's directory)")
        if isinstance(self.tokenizer, (str, os.PathLike)):
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(str(self.tokenizer))
        return self.tokenizer

    def _tokens(self, documents: list[str]) -> list[int]:
        tokenizer = self._load_tokenizer()
        eos = tokenizer.eos_token_id
        ids: list[int] = []
        for document in tokenizer(documents, add_special_tokens=False)["input_ids"]:
            ids.extend(document)
            if eos is not None:
                ids.append(eos)
        return ids

    def _build(self) -> None:
        train_files, heldout_files, format = self.source_files()
        documents = read_documents(train_files, format, self.text_field)
        if self.max_documents is not None:
            documents = documents[: self.max_documents]
        k = self.heldout_every
        if heldout_files:
            train_docs, heldout_docs = documents, read_documents(heldout_files, format, self.text_field)
        else:
            train_docs = [d for i, d in enumerate(documents) if i % k != k - 1]
            heldout_docs = [d for i, d in enumerate(documents) if i % k == k - 1]
        self._train = make_blocks(self._tokens(train_docs), self.seq_len, self.task)
        self._heldout = make_blocks(self._tokens(heldout_docs), self.seq_len, self.task)
        if not self._train or not self._heldout:
            which = "training" if not self._train else "held-out"
            width = self.seq_len if self.task == "causal_lm" else 2 * self.seq_len
            raise ValueError(
                f"the {which} text is shorter than one block ({width} tokens); use more text or a smaller data.seq_len"
            )
        self.heldout_tokens = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in self._heldout)

    @property
    def num_train_blocks(self) -> int:
        if self._train is None:
            self._build()
        return len(self._train)

    def setup(self, stage: str | None = None) -> None:
        if self._train is None:
            self._build()

    def _world_size(self) -> int:
        trainer = getattr(self, "trainer", None)
        return trainer.world_size if trainer is not None else 1

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            BlockDataset(self._train), batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers,
            drop_last=True,
        )  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        blocks = list(self._heldout)
        world = self._world_size()
        pad_id = self._load_tokenizer().pad_token_id
        pad_id = pad_id if pad_id is not None else self._load_tokenizer().eos_token_id
        width = blocks[0]["input_ids"].shape[0]
        while len(blocks) % world:
            blocks.append(_ignored_block(width, pad_id))
        return DataLoader(BlockDataset(blocks), batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)
