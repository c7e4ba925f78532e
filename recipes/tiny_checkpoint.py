"""Tiny MoE checkpoints written on the fly: a real Hugging Face directory (config, safetensors
weights, tokenizer), deterministic for its spec, so that the default recipe needs no download.

The tokenizer is word-level over the shipped corpus (lower-cased words and punctuation; words
seen fewer than `min_word_count` times map to `<unk>`), so a model of a few hundred thousand
parameters learns something visible in a minute. The weights come from the family's own
initialisation under `torch.manual_seed(spec.seed)`.

A generated directory carries `mpipemoe_tiny.json` (its spec and a digest of the corpus
text). `ensure_tiny_checkpoint` reuses a directory whose spec matches, regenerates one whose
spec differs, and leaves any directory without that file alone (it is somebody's own
checkpoint). Where a checkpoint may be generated at all is the recipe's decision
(`lightning_mpipemoe_cli.model_directory`: only in the package's cache unless asked).
Writes go to a temporary directory that is renamed into place, so a concurrent reader never
sees half a checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import lightning_mpipemoe  # noqa: F401  isort: skip  (before transformers; see tests/hf_tiny.py)
import torch

from lightning_mpipemoe.atomic_dir import commit_directory, new_token, temporary_directory

__all__ = [
    "SPECIAL_TOKENS",
    "SPEC_FILE",
    "TinySpec",
    "build_tokenizer",
    "ensure_tiny_checkpoint",
    "write_tiny_checkpoint",
]

SPEC_FILE = "mpipemoe_tiny.json"
#: Ids 0..3 in every generated tokenizer.
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
FAMILIES = ("mixtral", "switch_transformers")
#: Bumped whenever this module writes a different checkpoint for the same spec.
GENERATOR_VERSION = 1


@dataclass(frozen=True)
class TinySpec:
    """What a generated checkpoint is: family, sizes, seed and the corpus of its vocabulary.

    Args:
        family: "mixtral" (decoder, gated experts, top-k) or "switch_transformers"
            (encoder-decoder, plain ReLU experts, top-1 with an expert capacity).
        hidden_size, intermediate_size: model width and expert hidden width.
        num_layers: decoder layers (Switch: encoder and decoder layers each).
        num_heads, num_kv_heads: attention heads (Mixtral uses grouped KV heads).
        num_experts, top_k: experts per MoE layer and experts per token (Switch: top-1).
        expert_capacity: Switch only, tokens per expert per sequence.
        router_aux_loss_coef: weight of the load-balancing loss in the training loss.
        max_position_embeddings: longest sequence (Mixtral).
        corpus: the shipped corpus (`lightning_mpipemoe.recipes.data.SHIPPED_CORPORA`) the
            vocabulary is built from.
        min_word_count: words seen fewer times than this map to `<unk>`.
        seed: `torch.manual_seed` before the model is initialised.
    """

    family: str = "mixtral"
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    num_experts: int = 8
    top_k: int = 2
    expert_capacity: int = 16
    router_aux_loss_coef: float = 0.02
    max_position_embeddings: int = 512
    corpus: str = "village"
    min_word_count: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"tiny checkpoints exist for the families {FAMILIES}, got family={self.family!r}")
        if self.family == "switch_transformers" and self.top_k != 1:
            raise ValueError(f"Switch Transformers route each token to one expert: top_k must be 1, got {self.top_k}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _word_splitter():
    from tokenizers import normalizers, pre_tokenizers

    return normalizers.Lowercase(), pre_tokenizers.Whitespace()


def build_tokenizer(text: str, min_word_count: int):
    """A word-level `PreTrainedTokenizerFast` over `text`: specials first, then words by count
    (descending) and alphabetically within a count, so the ids depend on the text only."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    normalizer, pre_tokenizer = _word_splitter()
    words = [word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))]
    counts = Counter(words)
    kept = sorted((w for w, c in counts.items() if c >= min_word_count), key=lambda w: (-counts[w], w))
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({word: len(SPECIAL_TOKENS) + index for index, word in enumerate(kept)})
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.normalizer, tokenizer.pre_tokenizer = normalizer, pre_tokenizer
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def _model(spec: TinySpec, vocab_size: int):
    from transformers import MixtralConfig, MixtralForCausalLM, SwitchTransformersConfig
    from transformers import SwitchTransformersForConditionalGeneration

    if spec.family == "mixtral":
        config = MixtralConfig(
            vocab_size=vocab_size,
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads,
            num_key_value_heads=spec.num_kv_heads,
            num_local_experts=spec.num_experts,
            num_experts_per_tok=spec.top_k,
            max_position_embeddings=spec.max_position_embeddings,
            router_aux_loss_coef=spec.router_aux_loss_coef,
            router_jitter_noise=0.0,
            tie_word_embeddings=False,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        return MixtralForCausalLM(config)
    config = SwitchTransformersConfig(
        vocab_size=vocab_size,
        d_model=spec.hidden_size,
        d_ff=spec.intermediate_size,
        d_kv=spec.hidden_size // spec.num_heads,
        num_heads=spec.num_heads,
        num_layers=spec.num_layers,
        num_decoder_layers=spec.num_layers,
        num_experts=spec.num_experts,
        expert_capacity=spec.expert_capacity,
        encoder_sparse_step=1,
        decoder_sparse_step=1,
        router_jitter_noise=0.0,
        # No dropout: the tiny smoke runs stay deterministic (expert dropout itself works on every path).
        dropout_rate=0.0,
        router_aux_loss_coef=spec.router_aux_loss_coef,
        # Tied as in switch-base-8; untied, the `shared` embedding is a parameter no loss uses.
        tie_word_embeddings=True,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=2,
    )
    return SwitchTransformersForConditionalGeneration(config)


def _stamp(spec: TinySpec) -> dict:
    """The spec plus a digest of its corpus and the generator version: a change of either
    regenerates the checkpoint."""
    from lightning_mpipemoe.recipes.data import shipped_corpus_text

    digest = hashlib.sha256(shipped_corpus_text(spec.corpus).encode("utf-8")).hexdigest()
    return {**spec.to_dict(), "corpus_sha256": digest, "generator_version": GENERATOR_VERSION}


@contextlib.contextmanager
def _quiet_progress_bars():
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def write_tiny_checkpoint(path: str | os.PathLike, spec: TinySpec) -> Path:
    """Write the checkpoint of `spec` at `path` (replacing what is there)."""
    from lightning_mpipemoe.recipes.data import shipped_corpus_text

    path = Path(path)
    tokenizer = build_tokenizer(shipped_corpus_text(spec.corpus), spec.min_word_count)
    torch.manual_seed(spec.seed)
    model = _model(spec, vocab_size=len(tokenizer)).float()
    path.parent.mkdir(parents=True, exist_ok=True)
    token = new_token()
    tmp = temporary_directory(path, token)
    try:
        with _quiet_progress_bars():  # the recipe says in one line that it generated the model
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SPEC_FILE).write_text(json.dumps(_stamp(spec), indent=2, sort_keys=True) + "\n")
        commit_directory(tmp, path, token)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def ensure_tiny_checkpoint(path: str | os.PathLike, spec: TinySpec) -> bool:
    """Make sure `path` holds a checkpoint; returns True when it was (re)generated.

    An existing directory without `SPEC_FILE` is used as it is (a real checkpoint); one whose
    spec differs from `spec` is regenerated.
    """
    path = Path(path)
    spec_file = path / SPEC_FILE
    if path.exists():
        if not spec_file.is_file():
            return False
        if json.loads(spec_file.read_text()) == _stamp(spec):
            return False
    write_tiny_checkpoint(path, spec)
    return True
