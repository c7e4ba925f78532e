"""LightningModules, data and callbacks for the strategy tests (module level: spawn pickles
them by name), and the plain single-process training loop they are compared with.

The loss of `TinyMoELM` is a mean over sequences of per-sequence terms (token cross-entropy
over equally long sequences, plus a load-balancing loss computed per sequence), so the
mean of the ranks' losses over their shards equals the loss of one process on the whole
global batch: the single-process run is an exact reference for any split of the batch.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Mapping
from functools import partial
from pathlib import Path

import lightning_mpipemoe  # noqa: F401  isort: skip  (before transformers; see tests/hf_tiny.py)
import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_mpipemoe import ExecutorConfig, MoELayer, TopKRouter, load_balancing_loss

VOCAB = 32
SEQ = 8
GLOBAL_BATCH = 4
STEPS = 5
#: Epochs of 3 steps: the step-3 checkpoint of the resume test is at an epoch boundary.
#: (Lightning restarts a plain dataloader from its first batch when resuming mid-epoch.)
STEPS_PER_EPOCH = 3
#: What every equivalence run trains: TinyMoELM(**HPARAMS), Trainer(gradient_clip_val=CLIP).
#: The clip value is between the gradient norms of the first steps, so clipping acts on some.
HPARAMS = {"record_decisions": True}
CLIP = 0.85


class TokenDataset(Dataset):
    """`n` random sequences of `SEQ + 1` tokens (inputs and next-token targets), fixed by `seed`."""

    def __init__(self, n: int = GLOBAL_BATCH * STEPS_PER_EPOCH, seed: int = 0) -> None:
        self.tokens = torch.randint(0, VOCAB, (n, SEQ + 1), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.tokens[index]

    def global_batch(self, step: int, size: int = GLOBAL_BATCH) -> torch.Tensor:
        """The rows that all ranks together train on at optimizer step `step` (from 0).

        Lightning gives each rank a `DistributedSampler(shuffle=True, seed=0)`: in epoch e one
        permutation `randperm(n)` seeded with e, rank r of W taking positions r, r+W, ...; with
        a per-rank batch of size/W, step i of an epoch covers positions [i*size, (i+1)*size)
        of that permutation, for any W.
        """
        epoch, index = divmod(step, len(self.tokens) // size)
        order = torch.randperm(len(self.tokens), generator=torch.Generator().manual_seed(epoch))
        return self.tokens[order[index * size : (index + 1) * size]]


class RecordingMoELayer(MoELayer):
    """An MoE layer with executor state, like the tuner's: the n it used per token count."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.decisions: dict[str, int] = {}
        self.loaded_state: dict | None = None

    def forward(self, hidden):
        self.decisions[str(hidden.numel() // hidden.shape[-1])] = self.config.num_partitions
        return super().forward(hidden)

    def executor_state_dict(self) -> dict:
        return {"decisions": dict(self.decisions)}

    def executor_metrics(self) -> dict[str, float]:
        return {"decisions_held": len(self.decisions)}

    def load_executor_state_dict(self, state: dict) -> None:
        self.loaded_state = dict(state)
        self.decisions = dict(state["decisions"])


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int, intermediate: int, num_experts: int, top_k: int, layer_cls) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(hidden)
        self.attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(hidden)
        self.moe = layer_cls(hidden, intermediate, num_experts, top_k, init_std=0.2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.ln1(x)
        attended, _ = self.attn(h, h, h, attn_mask=mask, need_weights=False)
        x = x + attended
        y, router_logits = self.moe(self.ln2(x))
        return x + y, router_logits


class TinyMoELM(pl.LightningModule):
    """A two-block MoE language model (attention + MoE FFN), SGD with momentum."""

    def __init__(
        self,
        hidden: int = 16,
        intermediate: int = 24,
        num_experts: int = 4,
        top_k: int = 2,
        layers: int = 2,
        lr: float = 0.2,
        momentum: float = 0.9,
        aux_coef: float = 0.05,
        record_decisions: bool = False,
        num_partitions: int = 1,
        restore: str = "none",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(seed)
        config = ExecutorConfig(num_partitions=num_partitions, restore=restore)
        layer_cls = partial(RecordingMoELayer if record_decisions else MoELayer, config=config)
        self.embed = nn.Embedding(VOCAB, hidden)
        self.blocks = nn.ModuleList(
            Block(hidden, 2, intermediate, num_experts, top_k, layer_cls) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, VOCAB)

    def forward(self, tokens_BS: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        seq = tokens_BS.shape[1]
        mask = torch.triu(torch.full((seq, seq), float("-inf"), device=tokens_BS.device), diagonal=1)
        x = self.embed(tokens_BS)
        router_logits = []
        for block in self.blocks:
            x, logits = block(x, mask.to(x.dtype))
            router_logits.append(logits)
        return self.head(self.norm(x)), router_logits

    def losses(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits_BSV, router_logits = self(inputs)
        ce = F.cross_entropy(logits_BSV.float().reshape(-1, VOCAB), targets.reshape(-1))
        batch_size, seq = inputs.shape
        per_sequence = [logits.view(batch_size, seq, -1) for logits in router_logits]
        hp = self.hparams
        aux = torch.stack([
            load_balancing_loss(tuple(lg[b] for lg in per_sequence), hp.num_experts, hp.top_k)
            for b in range(batch_size)
        ]).mean()
        return {"loss": ce + hp.aux_coef * aux, "aux_loss": aux.detach()}

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> dict[str, torch.Tensor]:
        return self.losses(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)


class ReplicasStartApart(TinyMoELM):
    """TinyMoELM whose replicas start different, as when every rank initialises its own model
    (or one rank loads weights): in `configure_model` (before the strategy shards and wraps
    the model) every rank but 0 re-draws its dense weights, and every rank of expert-dp rank
    > 0 its experts too, from a seed of its own. The strategy must make the replicas equal
    (DDP broadcasts the dense part from rank 0, `_broadcast_expert_shards` each expert shard
    from expert-dp rank 0). Ranks 0..ep-1 keep the experts of the unchanged model and rank 0
    its dense weights, so the single-process run of `TinyMoELM` stays the reference."""

    def configure_model(self) -> None:
        strategy = self.trainer.strategy
        rank, groups = strategy.global_rank, strategy.moe_groups
        gen = torch.Generator().manual_seed(1000 + rank)
        with torch.no_grad():
            for name, param in self.named_parameters():
                expert = name.endswith((".moe.gate_up_proj", ".moe.down_proj"))
                if (expert and groups.expert_dp_rank > 0) or (not expert and rank > 0):
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.3)


class DumpState(Callback):
    """Each rank writes its parameters (its expert shards, the replicated rest) at the end of fit."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = str(root)

    def on_train_end(self, trainer, pl_module) -> None:
        state = {k: v.detach().clone() for k, v in pl_module.named_parameters()}
        torch.save(state, Path(self.root) / f"params-rank{trainer.global_rank}.pt")


class SkewedMoELM(TinyMoELM):
    """TinyMoELM whose routers favour the first half of the experts (a router bias of +3 on
    them): under EP = 2 rank 0's experts get most tokens and rank 1's few or none."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        torch.manual_seed(self.hparams.seed + 1)
        for block in self.blocks:
            moe = block.moe
            router = TopKRouter(self.hparams.hidden, moe.num_experts, moe.top_k, bias=True)
            with torch.no_grad():
                router.gate.bias.zero_()
                router.gate.bias[: moe.num_experts // 2] = 3.0
            moe.router = router


class FrozenExpertsLM(SkewedMoELM):
    """SkewedMoELM with every expert weight frozen (routers, attention and the rest train)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for block in self.blocks:
            for param in block.moe.expert_parameters():
                param.requires_grad_(False)


class AdamWMoELM(TinyMoELM):
    """TinyMoELM trained with AdamW (weight decay): optimizer state beyond a momentum buffer.

    eps = 1e-4: the attention's key bias has a zero gradient up to rounding (softmax ignores
    it), and Adam with a tiny eps turns that rounding noise (1e-9, different in a sharded
    run) into full-size steps; the real gradients here are far above 1e-4."""

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.02, weight_decay=0.1, eps=1e-4)


class DenseLM(pl.LightningModule):
    """No MoE layer at all: the strategy warns and trains it as plain DDP."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, VOCAB)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self.head(self.embed(batch[:, :-1])).reshape(-1, VOCAB), batch[:, 1:].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader(batch_size: int, dataset: Dataset | None = None) -> DataLoader:
    return DataLoader(dataset if dataset is not None else TokenDataset(), batch_size=batch_size, shuffle=False)


def reference_run(hparams: Mapping, steps: int = STEPS, clip: float | None = None, dtype=torch.float32,
                  model_cls: type = None) -> dict:
    """Single-process training on the global batches: losses, gradient norms, state after each step."""
    model = (model_cls or TinyMoELM)(**hparams).to(dtype)
    optimizer = model.configure_optimizers()
    data = TokenDataset()
    out = {"losses": [], "norms": [], "states": []}
    for step in range(steps):
        loss = model.training_step(data.global_batch(step), step)["loss"]
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        out["losses"].append(loss.item())
        out["norms"].append(norm.item())
        out["states"].append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return out


# ------------------------------------------------------------------------------------ callbacks


class LossRecorder(Callback):
    """Appends `{"step", "loss"}` (the mean over ranks of their losses) to a JSON-lines file."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, Mapping) else outputs
        mean = trainer.strategy.reduce(loss.detach().float(), reduce_op="mean")
        if trainer.is_global_zero:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": trainer.global_step, "loss": float(mean)}) + "\n")


def read_losses(path: str | os.PathLike) -> dict[int, float]:
    lines = Path(path).read_text().splitlines()
    return {record["step"]: record["loss"] for record in map(json.loads, lines)}


class SaveAt(Callback):
    """`trainer.save_checkpoint(path)` after the given optimizer steps (`{step: path}`)."""

    def __init__(self, paths: Mapping[int, str]) -> None:
        self.paths = {int(k): str(v) for k, v in paths.items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        path = self.paths.get(trainer.global_step)
        if path is not None:
            trainer.save_checkpoint(path)


class KillDuringSave(TorchCheckpointIO):
    """The job is killed in the middle of its `save_number`-th checkpoint save: each rank starts
    writing its expert shard file, then SIGKILLs its own process (rank 0 has written the meta
    file by then)."""

    def __init__(self, save_number: int) -> None:
        super().__init__()
        self.save_number, self.saves = save_number, 0

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if Path(path).name.startswith("experts-"):
            self.saves += 1
            if self.saves == self.save_number:
                Path(path).write_bytes(b"half a checkpoint")
                os.kill(os.getpid(), signal.SIGKILL)
        super().save_checkpoint(checkpoint, path, storage_options)


class MemoryLogger(Logger):
    """Keeps every `log_metrics` call (for the logging test)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, dict]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.records.append((step, dict(metrics)))
