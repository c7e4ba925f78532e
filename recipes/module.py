"""The recipe's LightningModules: `hf_models`' fine-tuning modules, loading their model from a
local Hugging Face directory inside `configure_model` and measuring held-out loss exactly.

Why `configure_model`: under `MPipeMoEStrategy` the process groups exist from there on, so
each rank reads only its own experts from the checkpoint (`hf_models.load_sharded`); a
Mixtral-8x7B never exists whole in one process. With `sharding="fsdp"` the model is built on
the meta device and `fully_shard`ed first, and each rank reads only its dense shard and its
experts' shard (`hf_models.fsdp_load.load_fsdp`): no rank holds even the full dense part
(LoRA runs, `peft=lora`, still load the dense part whole and let the strategy shard it). The
strategy then binds the executor with its settings (granularity, restore strategy, ...) in
`setup`.

Held-out loss: the summed token cross-entropy and the token count are accumulated over the
validation batches and summed over all ranks at the end of the epoch, so `val/loss` is the
token mean over the whole held-out set (labels -100 are ignored), the router losses left out.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning_mpipemoe  # noqa: F401  isort: skip  (before transformers; see tests/hf_tiny.py)
import torch
import torch.nn.functional as F
from typing_extensions import override

from lightning_mpipemoe.config import ExecutorConfig
from lightning_mpipemoe.fsdp import mixed_precision_policy
from lightning_mpipemoe.hf_models.api import LoadReport, load_sharded
from lightning_mpipemoe.hf_models.fsdp_load import load_fsdp
from lightning_mpipemoe.hf_models.peft_lora import apply_peft, check_peft_spec
from lightning_mpipemoe.hf_models.lightning_modules import MoECausalLMModule, MoESeq2SeqModule

__all__ = ["CausalLMFineTune", "Seq2SeqFineTune", "heldout_loss_sums"]

IGNORE_INDEX = -100


def heldout_loss_sums(model: torch.nn.Module, batch: dict, task: str) -> torch.Tensor:
    """`[summed token cross-entropy, tokens]` (float64) of one batch, router losses left out."""
    out = model(**batch, output_router_logits=False)
    logits, labels = out.logits, batch["labels"]
    if task == "causal_lm":  # position t predicts token t + 1, as in Hugging Face's loss
        logits, labels = logits[:, :-1], labels[:, 1:]
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    tokens = (labels != IGNORE_INDEX).sum()
    return torch.stack([nll.detach().double(), tokens.double()])


class _FromCheckpoint:
    """Loading, held-out evaluation and checkpoint metadata shared by the two task modules."""

    task: str

    def __init__(
        self,
        model_path: str,
        dtype: str | None = None,
        gradient_checkpointing: bool = False,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 0,
        log_moe_metrics: bool = True,
        peft: dict | None = None,
    ) -> None:
        """
        Args:
            model_path: a local Hugging Face checkpoint directory (config, safetensors weights).
            dtype: parameter dtype ("float32", "bfloat16", ...); None keeps the checkpoint's.
            gradient_checkpointing: recompute each layer in backward (Hugging Face's own).
            learning_rate, weight_decay, betas, warmup_steps: AdamW and its linear warm-up.
            log_moe_metrics: log routing metrics (dropped tokens, load imbalance) every step.
            peft: the recipe's `peft` section (`conf/peft/*.yaml`): LoRA adapters, or None / method none.
        """
        check_peft_spec(peft)  # before any process starts
        super().__init__(
            None,
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            betas=tuple(betas),
            warmup_steps=warmup_steps,
            log_moe_metrics=log_moe_metrics,
        )
        self._sums: torch.Tensor | None = None
        self.heldout: dict[str, float] | None = None
        self._hf_config: dict | None = None
        self.load_report: LoadReport | None = None  # what this rank read from the checkpoint

    @override
    def configure_model(self) -> None:
        if self.model is not None:  # validate() then fit(): loaded once
            return
        strategy = self.trainer.strategy
        groups = getattr(strategy, "moe_groups", None)  # MPipeMoEStrategy; None: one process, EP = 1
        dtype = getattr(torch, self.hparams.dtype) if self.hparams.dtype else None
        path = Path(self.hparams.model_path)
        self._hf_config = json.loads((path / "config.json").read_text())
        peft = check_peft_spec(self.hparams.get("peft"))
        self.load_report = LoadReport()
        if groups is not None and getattr(strategy, "_sharding", "ddp") == "fsdp" and peft is None:
            # Straight into FSDP shards: built on the meta device, each rank reading its dense
            # rows and its experts from the safetensors files; no rank holds the full model.
            self.model = load_fsdp(
                path, groups, ExecutorConfig(), dtype=dtype, device=strategy.root_device,
                mp_policy=mixed_precision_policy(strategy.precision_plugin), report=self.load_report,
            )  # fmt: skip
        else:
            # (LoRA under fsdp: the adapters are added to the loaded model, which the strategy then shards.)
            self.model = load_sharded(
                path, groups, ExecutorConfig(), dtype=dtype, device=strategy.root_device, report=self.load_report
            )
            self.model = apply_peft(self.model, self.hparams.get("peft"))
        if self.hparams.gradient_checkpointing:
            # transformers 5 renamed gradient_checkpointing_enable to activation_checkpointing_enable.
            enable = getattr(self.model, "activation_checkpointing_enable", None)
            (enable or self.model.gradient_checkpointing_enable)()
        self.model.train()

    @override
    def on_validation_epoch_start(self) -> None:
        self._sums = torch.zeros(2, dtype=torch.float64, device=self.device)

    @override
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._sums += heldout_loss_sums(self.model, batch, self.task).to(self._sums.device)

    @override
    def on_validation_epoch_end(self) -> None:
        total = self.trainer.strategy.reduce(self._sums.clone(), reduce_op="sum")
        nll, tokens = float(total[0]), int(total[1])
        loss = nll / max(tokens, 1)
        self.heldout = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}
        # Already the same on every rank; sync_dist (a mean of equal values) keeps Lightning content.
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/perplexity", self.heldout["perplexity"], sync_dist=True)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # What `recipes.convert` needs to write a Hugging Face directory without the source checkpoint.
        checkpoint["hf_config"] = self._hf_config
        checkpoint["hf_task"] = self.task


class CausalLMFineTune(_FromCheckpoint, MoECausalLMModule):
    """Causal-LM fine-tuning of a local Hugging Face MoE checkpoint (Mixtral, Qwen-MoE, OLMoE, ...)."""

    task = "causal_lm"


class Seq2SeqFineTune(_FromCheckpoint, MoESeq2SeqModule):
    """Seq2seq fine-tuning of a local Hugging Face Switch Transformers checkpoint."""

    task = "seq2seq"

