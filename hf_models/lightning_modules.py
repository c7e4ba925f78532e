"""LightningModules for fine-tuning Hugging Face MoE models (causal LM and seq2seq).

The loss is Hugging Face's own: with `output_router_logits=True` and labels, a causal MoE LM
returns `lm_loss + router_aux_loss_coef * aux_loss` and Switch returns
`lm_loss + router_z_loss_coef * (z_enc + z_dec) + router_aux_loss_coef * (aux_enc + aux_dec)`.
The modules log those parts and routing metrics of the MoE executor (tokens per expert,
dropped tokens) read from the `RoutingStats` that `convert_model` attaches; in training, on
the steps the trainer writes (`log_every_n_steps`), the loss itself on every step.

The model is converted by whoever owns the process groups (the Lightning strategy calls
`convert_model`); these modules only train it. Expert-parallel gradient reduction is the
strategy's job too.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from typing_extensions import override

from lightning_mpipemoe.moe_metrics import trainer_logs_this_step
from .registry import routing_stats

__all__ = ["MoECausalLMModule", "MoEFineTuneModule", "MoESeq2SeqModule", "routing_metrics"]


def routing_metrics(model: nn.Module) -> dict[str, torch.Tensor]:
    """Summary of the routing since the stats were last reset (this rank's tokens).

    0-dim tensors on the counts' device: nothing here waits for the device (Lightning converts
    logged tensors when a logger writes them, every `log_every_n_steps`)."""
    stats = [s for s in routing_stats(model).values() if s.tokens_per_expert_E is not None]
    if not stats:
        return {}
    counts = [s.tokens_per_expert_E.float() for s in stats]
    dropped = float(sum(s.dropped for s in stats))  # a host count already (the dispatch plans')
    sent = torch.stack([c.sum() for c in counts]).sum()
    imbalance = torch.stack([c.max() / c.mean().clamp_min(1e-9) for c in counts])
    used = torch.stack([(c > 0).float().mean() for c in counts])
    return {
        "moe/dropped_fraction": dropped / (sent + dropped).clamp_min(1.0),
        "moe/load_imbalance": imbalance.mean(),
        "moe/experts_used": used.mean(),
    }


class MoEFineTuneModule(pl.LightningModule):
    """Fine-tunes a (converted) Hugging Face MoE model with its own loss plus router losses.

    Args:
        model: the transformers model (already converted with `convert_model`, or not).
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay (not applied to biases and norms).
        betas: AdamW betas.
        warmup_steps: linear warm-up steps of the learning rate (0: none).
        log_moe_metrics: log `routing_metrics` every step.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 0,
        log_moe_metrics: bool = True,
    ) -> None:
        super().__init__()
        self.model = model
        self.save_hyperparameters(ignore=["model"])

    @override
    def forward(self, **batch):
        return self.model(**batch)

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss and its logged parts."""
        raise NotImplementedError

    def _reset_stats(self) -> None:
        for stats in routing_stats(self.model).values():
            stats.reset()

    def _step(self, batch: dict, stage: str) -> torch.Tensor:
        self._reset_stats()
        loss, parts = self.compute_loss(batch)
        batch_size = batch["input_ids"].shape[0] if "input_ids" in batch else None
        # Validation values are epoch means over every rank's share; training ones are per step.
        sync = stage != "train"
        self.log(f"{stage}/loss", loss.detach(), prog_bar=True, batch_size=batch_size, sync_dist=sync)
        # The loss parts and routing diagnostics of a training step only on the steps the
        # trainer writes (`log_every_n_steps`; each `self.log` costs about a millisecond);
        # validation ones are epoch means, so every batch counts.
        if not (sync or trainer_logs_this_step(self._trainer)):
            return loss
        for name, value in parts.items():
            self.log(f"{stage}/{name}", value, batch_size=batch_size, sync_dist=sync)
        if self.hparams.log_moe_metrics:
            for name, value in routing_metrics(self.model).items():
                self.log(f"{stage}/{name}", value, batch_size=batch_size, sync_dist=sync)
        return loss

    @override
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    @override
    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    @override
    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.dim() < 2 or "norm" in name.lower() else decay).append(param)
        groups = [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(
            [g for g in groups if g["params"]], lr=self.hparams.learning_rate, betas=tuple(self.hparams.betas)
        )
        warmup = self.hparams.warmup_steps
        if warmup <= 0:
            return optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _as_tensor(value, like: torch.Tensor) -> torch.Tensor:
    return value.detach() if isinstance(value, torch.Tensor) else torch.tensor(float(value or 0.0), device=like.device)


class MoECausalLMModule(MoEFineTuneModule):
    """Causal-LM fine-tuning: `loss = lm_loss + router_aux_loss_coef * aux_loss` (HF's)."""

    @override
    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.model(**batch, output_router_logits=True)
        aux = _as_tensor(out.aux_loss, out.loss)
        coef = getattr(self.model, "router_aux_loss_coef", getattr(self.model.config, "router_aux_loss_coef", 0.0))
        return out.loss, {"lm_loss": out.loss.detach() - coef * aux, "aux_loss": aux}


class MoESeq2SeqModule(MoEFineTuneModule):
    """Seq2seq (Switch) fine-tuning: HF's loss with router z-loss and aux loss of both stacks."""

    @override
    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.model(**batch, output_router_logits=True)
        loss = out.loss
        z = _as_tensor(out.encoder_z_loss, loss) + _as_tensor(out.decoder_z_loss, loss)
        aux = _as_tensor(out.encoder_aux_loss, loss) + _as_tensor(out.decoder_aux_loss, loss)
        z_coef = getattr(self.model.config, "router_z_loss_coef", 0.0)
        aux_coef = getattr(self.model.config, "router_aux_loss_coef", 0.0)
        lm = loss.detach() - z_coef * z - aux_coef * aux
        return loss, {"lm_loss": lm, "z_loss": z, "aux_loss": aux}
