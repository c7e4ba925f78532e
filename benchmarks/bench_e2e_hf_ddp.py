"""The end-to-end counterpart of the recipe: the same tiny Mixtral fine-tuning with Hugging
Face's built-in expert parallelism (its EP plan, AllToAllEP) under plain Lightning DDP.

    OMP_NUM_THREADS=1 python benchmarks/bench_e2e_hf_ddp.py --model-dir DIR --steps 40 --out result.json

Same model directory, corpus, sequence length, batch size and optimizer (AdamW, lr 2e-3) as
the default recipe, and its clipping (global norm 1.0); 2 CPU processes (`strategy="ddp"`). The model is loaded in
`configure_model` (the process group exists there) with `distributed_config`, so that HF
shards the experts over the 2 ranks and installs AllToAllEP. Rank 0 writes tokens/s (after
`--skip` warm-up steps, all ranks' tokens) and the peak RSS of the processes.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import lightning_mpipemoe  # noqa: F401  isort: skip  (before transformers)
import lightning as L
import torch
import torch.distributed as dist


class HFEPModule(L.LightningModule):
    """Causal-LM fine-tuning of a model loaded with HF's own expert parallelism."""

    def __init__(self, model_dir: str, ep_size: int, lr: float = 2e-3, skip: int = 5):
        super().__init__()
        self.model_dir, self.ep_size, self.lr, self.skip = model_dir, ep_size, lr, skip
        self.model = None
        self.tokens = 0
        self.start = None

    def configure_model(self):
        if self.model is not None:
            return
        from torch.distributed.device_mesh import init_device_mesh
        from transformers import AutoModelForCausalLM
        from transformers.distributed.expert_parallel import apply_expert_parallelism

        # `from_pretrained(distributed_config=DistributedConfig(ep_size=2))` needs
        # `accelerate` (not a dependency here) and `ep_size` dividing `tp_size * fsdp_size`;
        # applying HF's own EP plan to each MoE block is what it installs for training.
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32).train()
        mesh = init_device_mesh("cpu", (self.ep_size, 1), mesh_dim_names=("ep", "tp"))
        plan = {"experts.gate_up_proj": "grouped_gemm", "experts.down_proj": "grouped_gemm",
                "experts": "ep_dispatch_experts"}
        for layer in self.model.model.layers:
            apply_expert_parallelism(layer.mlp, mesh["ep"], mesh["tp"], plan, ep_implementation="all_to_all")
        # Plain DDP cannot wrap DTensor parameters (its start-up broadcast fails with "aten.cat
        # got mixed torch.Tensor and DTensor"); the expert shards are left out of DDP. With
        # EP = world there is no expert-data-parallel replica, so they need no reduction.
        self._ddp_params_and_buffers_to_ignore = [
            name for name, p in self.named_parameters() if hasattr(p, "to_local")]

    def training_step(self, batch, batch_idx):
        if self.global_step == self.skip:
            self.start, self.tokens = time.perf_counter(), 0
        out = self.model(input_ids=batch["input_ids"], labels=batch["labels"],
                         attention_mask=batch.get("attention_mask"))
        self.tokens += int(batch["input_ids"].numel())
        return out.loss

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Clip by the global gradient norm, as the recipe's strategy does: the replicated part
        (already all-reduced by DDP, the same on every rank) plus every rank's own expert shards
        (summed over the world: with EP = world each rank holds different experts). Lightning's
        own `clip_gradients` cannot take the mix of Tensor and DTensor gradients."""
        if not gradient_clip_val:
            return
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
        sharded = torch.zeros((), dtype=torch.float64)
        dense = torch.zeros((), dtype=torch.float64)
        for g, plain in zip(grads, local):
            square = plain.detach().double().pow(2).sum()
            if hasattr(g, "to_local"):
                sharded += square
            else:
                dense += square
        if dist.is_initialized():
            dist.all_reduce(sharded)
        coef = float(gradient_clip_val) / (float(dense + sharded) ** 0.5 + 1e-6)
        if coef < 1.0:
            for plain in local:
                plain.mul_(coef)

    def configure_optimizers(self):
        # foreach kernels reject a mix of Tensor and DTensor parameters.
        return torch.optim.AdamW(self.parameters(), lr=self.lr, foreach=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip", type=int, default=5)
    parser.add_argument("--gradient-clip-val", type=float, default=1.0,
                        help="global-norm clipping, the recipe's (conf/trainer/cpu.yaml); 0: none")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from lightning_mpipemoe.recipes.data import TextDataModule

    torch.manual_seed(0)
    data = TextDataModule(corpus="village", tokenizer=args.model_dir, seq_len=64, batch_size=8)
    module = HFEPModule(args.model_dir, ep_size=2, skip=args.skip)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=args.steps, logger=False,
                        gradient_clip_val=args.gradient_clip_val or None,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - module.start
    tokens = torch.tensor([module.tokens], dtype=torch.float64)
    rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(tokens)
        dist.all_reduce(rss, op=dist.ReduceOp.MAX)
    if trainer.global_rank == 0:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "steps": trainer.global_step, "tokens_per_s": float(tokens) / seconds, "peak_rss_bytes": float(rss),
            "wall_s": time.perf_counter() - start, "measured_steps": trainer.global_step - args.skip,
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
