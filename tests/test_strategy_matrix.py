"""MPipeMoEStrategy in two gloo processes created outside Lightning (as torchrun does), many
Trainer runs in one launch: gradient math, logging, the pipelined executor, gradient
accumulation, precisions, a Hugging Face MoE model with export, a dense model, and errors.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from pathlib import Path

import lightning_mpipemoe  # noqa: F401  isort: skip
import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from lightning_mpipemoe import build_process_groups
from lightning_mpipemoe.checkpointing import consolidate_checkpoint
from lightning_mpipemoe.config import RESTORE_STRATEGIES
from lightning_mpipemoe.grad_sync import clip_grad_norm_, global_grad_norm, reduce_dtype, reduce_expert_gradients
from lightning_mpipemoe.strategy import MPipeMoEStrategy
from tests.bf16_check import FP16_U, LAYER_STAGES, assert_bf16_close
from tests.bf16_check import U as BF16_U
from tests.dist_utils import run_distributed
from tests.strategy_models import (
    CLIP,
    GLOBAL_BATCH,
    HPARAMS,
    DenseLM,
    LossRecorder,
    MemoryLogger,
    SaveAt,
    TinyMoELM,
    TokenDataset,
    loader,
    read_losses,
    reference_run,
)

TOL = 1e-5
TIMEOUT = timedelta(seconds=60)
EXPLICIT = {"granularity": 1, "restore": "none"}


def _trainer(root: Path, *, max_steps: int, strategy_kwargs=None, **kwargs) -> pl.Trainer:
    options = dict(
        accelerator="cpu",
        devices=2,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    options.update(kwargs)
    strategy = MPipeMoEStrategy(expert_parallel_size=2, timeout=TIMEOUT, **(strategy_kwargs or {}))
    return pl.Trainer(strategy=strategy, **options)


def _assert_owns_its_storage(param: torch.Tensor) -> None:
    """A shard is a fresh tensor: the other experts' storage is freed, not kept by a view."""
    assert param.untyped_storage().nbytes() == param.numel() * param.element_size()


# ------------------------------------------------------------------------------- scenarios


def _grad_math(rank: int) -> None:
    ep2 = build_process_groups(2, timeout=TIMEOUT)  # expert-dp groups of one rank
    ep1 = build_process_groups(1, timeout=TIMEOUT)  # experts replicated: expert-dp = the world
    # Local expert grad = sum over the EP group of the ranks' loss gradients; the result is / world.
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.full((2,), float(rank + 1))
    reduce_expert_gradients([p], ep2)
    assert torch.equal(p.grad, torch.full((2,), (rank + 1) / 2))
    a, b, c = (torch.nn.Parameter(torch.zeros(3, dtype=t)) for t in (torch.float32, torch.bfloat16, torch.float32))
    a.grad = torch.full((3,), float(rank + 1))
    b.grad = torch.full((3,), float(rank + 1), dtype=torch.bfloat16)
    c.grad = torch.ones(3) if rank == 0 else None  # a grad on one replica only
    d = torch.nn.Parameter(torch.zeros(1))  # no grad anywhere
    reduce_expert_gradients([a, b, c, d], ep1)
    assert torch.equal(a.grad, torch.full((3,), 1.5)) and b.grad.dtype == torch.bfloat16
    assert torch.equal(b.grad, torch.full((3,), 1.5, dtype=torch.bfloat16))
    assert torch.equal(c.grad, torch.full((3,), 0.5)) and d.grad is None
    assert reduce_dtype(torch.bfloat16) == torch.float32 and reduce_dtype(torch.float64) == torch.float64
    # Global norm: replicated part once, expert shards of both EP ranks.
    rep, exp = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    rep.grad, exp.grad = torch.tensor([3.0, 4.0]), (torch.tensor([1.0, 0.0]) if rank == 0 else torch.tensor([0.0, 2.0]))
    assert torch.isclose(global_grad_norm([rep, exp], [exp], ep2), torch.tensor(30.0).sqrt())
    assert float(global_grad_norm([rep, exp], [exp], ep2, norm_type=float("inf"))) == 4.0
    total = clip_grad_norm_([rep, exp], 30**0.5 / 2, [exp], ep2)
    assert torch.isclose(total, torch.tensor(30.0).sqrt())
    assert torch.allclose(rep.grad, torch.tensor([1.5, 2.0]), atol=1e-5)


def _logging_and_pipelined(rank: int, root: Path, reference: dict) -> None:
    """The strategy's executor settings reach the layers (pipelined n = 4 with restore s2 here)
    and the run still matches one process; MoE metrics are logged, synced over the world."""
    logger = MemoryLogger()
    trainer = _trainer(
        root,
        max_steps=2,
        strategy_kwargs={"granularity": 4, "restore": "s2", "log_moe_metrics": "expert"},
        logger=logger,
        log_every_n_steps=1,
        gradient_clip_val=CLIP,
        callbacks=[LossRecorder(root / "losses.jsonl")],
    )
    model = TinyMoELM(**HPARAMS)
    trainer.fit(model, loader(GLOBAL_BATCH // 2))
    if rank == 0:
        losses = read_losses(root / "losses.jsonl")
        assert all(abs(losses[s] - reference["losses"][s - 1]) <= TOL for s in (1, 2)), losses
    executors = trainer.strategy.moe_executors
    assert sorted(executors) == ["blocks.0.moe", "blocks.1.moe"]
    assert all((v.config.num_partitions, v.config.restore) == (4, "s2") for v in executors.values())
    assert sorted(trainer.strategy.expert_parameter_names) == [
        f"blocks.{i}.moe.{w}" for i in range(2) for w in ("down_proj", "gate_up_proj")
    ]
    for layer in (model.blocks[0].moe, model.blocks[1].moe):
        assert layer.num_local_experts == 2 and layer.groups.ep_rank == rank
        for param in layer.expert_parameters():
            _assert_owns_its_storage(param)

    steps = [(step, m) for step, m in logger.records if "moe/blocks.0.moe/tokens_max" in m]
    assert len(steps) == 2, logger.records
    expert_bytes = 2 * (2 * 48 * 16 + 2 * 16 * 24) * 4  # two layers of 2 local experts, fp32
    for index, (_, metrics) in enumerate(steps):
        for layer in ("blocks.0.moe", "blocks.1.moe"):
            tokens = [metrics[f"moe/{layer}/tokens_e{e}"] for e in range(4)]
            # Synced over the world: 2 ranks x 2 sequences x 8 tokens x top-2.
            assert sum(tokens) == 2 * 2 * 8 * 2, tokens
            assert metrics[f"moe/{layer}/tokens_max"] == max(tokens)
            assert metrics[f"moe/{layer}/load_imbalance"] == pytest.approx(max(tokens) / 16)
            assert metrics[f"moe/{layer}/dropped_tokens"] == 0
            assert metrics[f"moe/{layer}/num_partitions"] == 4
            assert metrics[f"moe/{layer}/restore"] == RESTORE_STRATEGIES.index("s2")
            assert metrics[f"moe/{layer}/decisions_held"] == 1  # the layer's executor_metrics()
        assert 0 < metrics["moe/aux_loss"] < 10
        # Logged after each optimizer step: the weights, their gradients and momentum.
        assert metrics["moe/expert_state_bytes"] == expert_bytes * 3


class _CaptureGrads(Callback):
    """Every parameter's gradient before the first optimizer step (after the strategy's reductions)."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}
        self.dtypes: set[tuple[torch.dtype, torch.dtype]] = set()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        for name in trainer.strategy.expert_parameter_names:
            param = pl_module.get_parameter(name)
            self.dtypes.add((param.dtype, param.grad.dtype))
        if not self.grads:
            self.grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}


#: Every expert chosen (top-k = E = 4): no routing decision that a bf16 rounding could flip.
ALL_EXPERTS = {**HPARAMS, "top_k": 4}


def _fp32_first_step(round_to: torch.dtype) -> tuple[float, dict[str, torch.Tensor]]:
    """One process, fp32, the same weights (rounded to `round_to` first: what a "-true" run
    trains): loss and gradients of the first global batch."""
    model = TinyMoELM(**ALL_EXPERTS).to(round_to).float()
    loss = model.training_step(TokenDataset().global_batch(0), 0)["loss"]
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


def _precisions(rank: int, root: Path) -> None:
    """bf16-mixed, bf16-true and 16-true against fp32 on the same weights: the first step's
    loss and every gradient (expert shards and the replicated rest) within the tolerance of
    the format's unit roundoff over the model's stages (tests/bf16_check.py: 2 blocks and the
    head in sequence, 3 x LAYER_STAGES for the loss, twice that for gradients; u = 2^-8 for
    bf16, 2^-11 for fp16, whose CPU kernels, gloo all-to-alls and all-reduces all run here)."""
    runs = (
        ("bf16-mixed", torch.float32, BF16_U),
        ("bf16-true", torch.bfloat16, BF16_U),
        ("16-true", torch.float16, FP16_U),
    )
    for precision, param_dtype, unit_roundoff in runs:
        capture = _CaptureGrads()
        run = root / precision
        trainer = _trainer(
            run,
            max_steps=2,
            precision=precision,
            strategy_kwargs=EXPLICIT,
            gradient_clip_val=CLIP,
            callbacks=[LossRecorder(run / "losses.jsonl"), capture],
        )
        trainer.fit(TinyMoELM(**ALL_EXPERTS), loader(GLOBAL_BATCH // 2))
        # The optimizer's dtype is the gradients' dtype: fp32 expert grads under bf16-mixed.
        assert capture.dtypes == {(param_dtype, param_dtype)}, (precision, capture.dtypes)
        loss, grads = _fp32_first_step(round_to=param_dtype)
        experts = trainer.strategy.expert_parameter_names
        assert set(capture.grads) == set(grads)
        for name, grad in capture.grads.items():
            expected = grads[name][2 * rank : 2 * rank + 2] if name in experts else grads[name]
            assert_bf16_close(grad, expected, f"{precision} d {name}", stages=6 * LAYER_STAGES,
                              unit_roundoff=unit_roundoff)
        if rank == 0:
            got = torch.tensor(read_losses(run / "losses.jsonl")[1])
            assert_bf16_close(got, torch.tensor(loss), f"{precision} loss", stages=3 * LAYER_STAGES,
                              unit_roundoff=unit_roundoff)


def _gradient_accumulation(rank: int, root: Path, reference: dict) -> None:
    """Two micro-batches of one sequence per rank and step: expert gradients are reduced once,
    after the last micro-batch (inside DDP's no_sync they are not)."""
    trainer = _trainer(
        root, max_steps=3, accumulate_grad_batches=2, gradient_clip_val=CLIP, strategy_kwargs=EXPLICIT
    )
    trainer.fit(TinyMoELM(**HPARAMS), loader(1))
    full = trainer.strategy.consolidated_state_dict()
    if rank == 0:
        for key, value in reference["states"][2].items():
            torch.testing.assert_close(full[key], value, atol=TOL, rtol=0, msg=lambda m: f"accumulation {key}: {m}")


def _hf_model(rank: int, root: Path) -> None:
    """A Hugging Face Mixtral inside MoECausalLMModule: found, converted and sharded by the
    strategy; the same losses and weights as one process averaging the two ranks' losses;
    the checkpoint consolidates and exports to a plain transformers directory."""
    from transformers import MixtralForCausalLM

    from lightning_mpipemoe.hf_models.api import MoECausalLMModule, export_from_state_dicts
    from tests.hf_tiny import tiny_batch, tiny_model

    steps, lr = 2, 1e-2
    batches = [[tiny_batch("mixtral", seed=10 * s + r) for r in range(2)] for s in range(steps)]
    module = MoECausalLMModule(tiny_model("mixtral"), learning_rate=lr, log_moe_metrics=False)
    trainer = _trainer(
        root,
        max_steps=steps,
        use_distributed_sampler=False,
        strategy_kwargs=EXPLICIT,
        callbacks=[LossRecorder(root / "losses.jsonl"), SaveAt({steps: root / "hf.ckpt"})],
    )
    trainer.fit(module, DataLoader([batches[s][rank] for s in range(steps)], batch_size=None))
    key = "model.model.layers.0.mlp.experts.gate_up_proj"
    assert trainer.strategy.expert_parameter_names[key] == 8
    assert module.get_parameter(key).shape[0] == 4
    _assert_owns_its_storage(module.get_parameter(key))

    reference = tiny_model("mixtral")
    optimizer = torch.optim.AdamW(reference.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    losses = []
    for s in range(steps):
        loss = sum(reference(**b, output_router_logits=True).loss for b in batches[s]) / 2
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    if rank != 0:
        return
    got = read_losses(root / "losses.jsonl")
    assert all(abs(got[s + 1] - losses[s]) <= TOL for s in range(steps)), (got, losses)
    expected = reference.state_dict()
    full = consolidate_checkpoint(root / "hf.ckpt", prefix="model.")
    assert set(full) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(full[name], value, atol=TOL, rtol=0, msg=lambda m: f"hf {name}: {m}")
    export_from_state_dicts([full], reference.config, root / "export", model_class=MixtralForCausalLM)
    exported = MixtralForCausalLM.from_pretrained(root / "export").state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(exported[name], value, atol=TOL, rtol=0, msg=lambda m: f"export {name}: {m}")


def _dense_model(rank: int, root: Path) -> None:
    warns = pytest.warns(UserWarning, match="found no MoE layer") if rank == 0 else contextlib.nullcontext()
    trainer = _trainer(root, max_steps=1, callbacks=[SaveAt({1: root / "dense.ckpt"})])
    with warns:
        trainer.fit(DenseLM(), loader(2))
    assert trainer.strategy.expert_parameter_names == {}
    if rank == 0:
        assert set(consolidate_checkpoint(root / "dense.ckpt")) == {"embed.weight", "head.weight", "head.bias"}


def _expert_count_error(rank: int, root: Path) -> None:
    trainer = _trainer(root, max_steps=1)
    message = "MoE layer 'blocks.0.moe': expert_parallel_size=2 does not divide the number of experts 3"
    with pytest.raises(ValueError, match=message):
        trainer.fit(TinyMoELM(num_experts=3), loader(2))


def _predict(rank: int, root: Path) -> None:
    """Prediction works with even shares of the data; uneven ones (Lightning's predict sampler
    does not pad) would leave one rank alone in an MoE all-to-all: a clear error instead."""
    outputs = _trainer(root, max_steps=1).predict(TinyMoELM(), DataLoader(TokenDataset(n=4), batch_size=1))
    assert len(outputs) == 2 and outputs[0][0].shape == (1, 9, 32)
    with pytest.raises(ValueError, match="every rank must run the same number"):
        _trainer(root, max_steps=1).predict(TinyMoELM(), DataLoader(TokenDataset(n=3), batch_size=1))


def _matrix_worker(rank: int, world_size: int, root: str) -> None:
    # Processes created outside Lightning, as torchrun does: Lightning joins the existing group.
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0")
    root = Path(root)
    reference = reference_run(HPARAMS, clip=CLIP)
    _grad_math(rank)
    _logging_and_pipelined(rank, root / "logging", reference)
    _gradient_accumulation(rank, root / "accumulation", reference)
    _precisions(rank, root / "precision")
    _hf_model(rank, root / "hf")
    _dense_model(rank, root / "dense")
    _expert_count_error(rank, root / "error")
    _predict(rank, root / "predict")


def test_strategy_matrix(tmp_path):
    run_distributed(_matrix_worker, 2, str(tmp_path), timeout_s=120)
