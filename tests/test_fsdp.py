"""MPipeMoEStrategy(sharding="fsdp"): FSDP2 over expert parallelism, against single-process
training (gloo, spawn).

A tiny Qwen2-MoE causal LM (8 experts, top-2, shared expert, 2 layers, hidden 32) is trained
for 5 AdamW steps with gradient clipping by norm on a global batch of 4 sequences, at 2
processes (EP 2, model given in `__init__`) and 4 processes (EP 2 x expert-dp 2, model built
in `configure_model`). The reference is one process running the unmodified transformers model
on the same global batch split the same way: rank r's loss L_r is HF's loss (LM + router aux
loss) of its sub-batch, the optimised loss (1/W) sum_r L_r. Every rank's loss at every step
and the final parameters (handed back by the spawn launcher, consolidated) match within 1e-5.
A wrong gradient divide factor (experts divided by expert_dp instead of the world), a clipping
norm that double counts or misses shards, or unsynchronised replicas would show.

The 4-process run also records the bytes every rank holds (parameters + gradients + AdamW
state, its shards only): within 5% of a quarter of the full model's, for the dense part and
for the experts.
"""

from __future__ import annotations

import functools
import json
import warnings
from datetime import timedelta
from pathlib import Path

import lightning_mpipemoe  # noqa: F401  isort: skip
import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import HalfPrecision, MixedPrecision, Precision
from lightning.pytorch.strategies import StrategyRegistry
from torch.distributed.fsdp import FSDPModule
from torch.utils.data import DataLoader, Dataset

from lightning_mpipemoe.fsdp import (
    _set_divide_factor,
    local_state_bytes,
    local_tensor,
    mixed_precision_policy,
    warn_bf16_true,
)
from lightning_mpipemoe.hf_models.lightning_modules import MoECausalLMModule
from lightning_mpipemoe.memory_plan import count_model, meta_model, plan_rank
from lightning_mpipemoe.strategy import MPipeMoEStrategy
from tests.hf_tiny import VOCAB, tiny_config, tiny_model
from tests.strategy_models import SaveAt

TOL = 1e-5
FAMILY = "qwen2_moe"
GLOBAL_BATCH = 4
SEQ = 8
STEPS = 5
LR = 1e-3
WEIGHT_DECAY = 0.1
CLIP = 4.5
#: Epochs of 3 steps: the step-3 checkpoint is at an epoch boundary (Lightning restarts a plain
#: dataloader from its first batch when resuming mid-epoch).
STEPS_PER_EPOCH = 3
TIMEOUT = timedelta(seconds=120)
#: torch 2.7's FSDP2 has no gloo-capable custom gradient divide factor (`fsdp._set_divide_factor`
#: raises there, tested below); the CPU runs need torch >= 2.8.
needs_divide_factor = pytest.mark.skipif(
    not hasattr(FSDPModule, "set_gradient_divide_factor"),
    reason=f"torch {torch.__version__}: FSDP2 divides by a custom factor on NCCL only (CUDA)",
)


class TokenData(Dataset):
    """GLOBAL_BATCH x STEPS_PER_EPOCH fixed sequences (labels = inputs: HF shifts them)."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(7)
        self.ids = torch.randint(2, VOCAB, (GLOBAL_BATCH * STEPS_PER_EPOCH, SEQ), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    def rank_batch(self, step: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        """What `rank` trains on at `step`: Lightning's training sampler is
        `DistributedSampler(shuffle=True, seed=0)`, one `randperm(n)` seeded with the epoch, rank r
        of W taking positions r, r+W, ... of it."""
        per_rank = GLOBAL_BATCH // world
        epoch, step = divmod(step, STEPS_PER_EPOCH)
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(epoch))
        index = [int(order[rank + world * (step * per_rank + j)]) for j in range(per_rank)]
        return {k: torch.stack([self[i][k] for i in index]) for k in ("input_ids", "attention_mask", "labels")}


def hparams() -> dict:
    return {"learning_rate": LR, "weight_decay": WEIGHT_DECAY, "log_moe_metrics": False}


class BuiltInConfigureModel(MoECausalLMModule):
    """The model is built in `configure_model` (on every rank, and in the main process later)."""

    def __init__(self) -> None:
        super().__init__(None, **hparams())

    def configure_model(self) -> None:
        if self.model is None:
            self.model = tiny_model(FAMILY)


class BuiltOnMeta(MoECausalLMModule):
    """Built on the meta device in `configure_model` (Hugging Face's `from_config` under
    `torch.device("meta")`): the strategy shards it, then allocates and initialises the shards
    (`fsdp.materialize`); in the main process the consolidated weights are assigned."""

    def __init__(self) -> None:
        super().__init__(None, **hparams())

    def configure_model(self) -> None:
        if self.model is None:
            from transformers import AutoModelForCausalLM

            with torch.device("meta"):
                self.model = AutoModelForCausalLM.from_config(tiny_config(FAMILY))


class FreshShards(Callback):
    """At fit start (after the strategy's setup, before a checkpoint loads): this rank's freshly
    materialised shards (meta or not finite, global and local shapes, a few values) and the
    loss of the initialised model on this rank's first batch."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @torch.no_grad()
    def on_fit_start(self, trainer, pl_module) -> None:
        from torch.distributed.tensor import DTensor

        named = dict(pl_module.named_parameters())
        rank, world = trainer.global_rank, trainer.world_size
        record = {
            "bad": [k for k, p in named.items() if p.is_meta or not isinstance(p, DTensor)
                    or not bool(torch.isfinite(p.to_local()).all())],  # fmt: skip
            "shapes": {k: [list(p.shape), list(p.to_local().shape)] for k, p in named.items()},
            "values": {k: p.to_local().flatten()[:4].tolist() for k, p in named.items()},
            "moments": {k: [float(p.to_local().mean()), float(p.to_local().std()), p.to_local().numel()]
                        for k, p in named.items() if p.to_local().numel() >= 64},  # fmt: skip
            "loss": float(pl_module.model(**TokenData().rank_batch(0, rank, world)).loss),
        }
        (self.root / f"fresh{rank}.json").write_text(json.dumps(record))


class CheckpointedLayers(MoECausalLMModule):
    """Hugging Face's activation checkpointing, switched on in the workers (its input hook
    does not pickle, so not before the spawn)."""

    def configure_model(self) -> None:
        self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


class Record(Callback):
    """Each rank's loss per step, and at the end the bytes it holds (dense / experts)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss.detach()))

    def on_train_end(self, trainer, pl_module) -> None:
        strategy = trainer.strategy
        named = dict(pl_module.named_parameters())
        experts = [named[k] for k in strategy._expert_keys]
        dense = [p for k, p in named.items() if k not in strategy._expert_keys]
        record = {
            "losses": self.losses,
            "dense_bytes": local_state_bytes(dense, strategy.optimizers),
            "expert_bytes": local_state_bytes(experts, strategy.optimizers),
            "checkpointing": bool(getattr(pl_module.model, "is_gradient_checkpointing", False)),
        }
        (self.root / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


class ExportAtEnd(Callback):
    """A plain Hugging Face directory of the trained model, written by every rank
    (`export_pretrained` on FSDP's sharded parameters: each rank writes what it owns)."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module) -> None:
        from lightning_mpipemoe.hf_models.api import export_pretrained

        strategy = trainer.strategy
        export_pretrained(pl_module.model, self.out_dir, strategy.moe_groups, barrier_group=strategy.checkpoint_group)


@functools.cache
def reference(worlds: tuple[int, ...]) -> dict:
    """One process, unmodified HF model, step s split as `worlds[s]` ranks would split it:
    per-rank losses per step, final state, clip norms."""
    model = tiny_model(FAMILY)
    model.train()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.dim() < 2 or "norm" in name.lower() else decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR,
        betas=(0.9, 0.95),
    )
    data = TokenData()
    losses, norms = [], []
    for step, world in enumerate(worlds):
        per_rank = [model(**data.rank_batch(step, r, world), output_router_logits=True).loss for r in range(world)]
        (sum(per_rank) / world).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append([float(x.detach()) for x in per_rank])
    state = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    return {"losses": losses, "norms": norms, "state": state}


def _fit(
    world: int, module: pl.LightningModule, root: Path, ep: int = 2, callbacks=(), batch_size=None,
    accumulate_grad_batches: int = 1, strategy_kwargs=None, **fit_kwargs,
) -> list[dict]:  # fmt: skip
    strategy = MPipeMoEStrategy(
        expert_parallel_size=ep, sharding="fsdp", start_method="spawn", timeout=TIMEOUT, **(strategy_kwargs or {})
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=strategy,
        max_steps=STEPS,
        gradient_clip_val=CLIP,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=[Record(root), *callbacks],
        accumulate_grad_batches=accumulate_grad_batches,
    )
    batch_size = batch_size or GLOBAL_BATCH // world
    trainer.fit(module, DataLoader(TokenData(), batch_size=batch_size, shuffle=False), **fit_kwargs)
    return [json.loads((root / f"rank{r}.json").read_text()) for r in range(world)]


def _check_against_reference(worlds: tuple[int, ...], records: list[dict], state: dict, first_step: int = 0) -> None:
    """`records` (one per rank) hold the losses of steps first_step.. of the reference split by `worlds`."""
    ref = reference(worlds)
    clipped = [n > CLIP for n in ref["norms"]]
    assert any(clipped) and not all(clipped), f"CLIP={CLIP} should clip some steps only; norms {ref['norms']}"
    for rank, record in enumerate(records):
        got = record["losses"]
        expected = [ref["losses"][s][rank] for s in range(first_step, STEPS)]
        assert len(got) == len(expected) and all(abs(a - b) <= TOL for a, b in zip(got, expected)), (
            rank,
            got,
            expected,
        )
    assert set(state) == set(ref["state"]), sorted(set(state) ^ set(ref["state"]))
    moved = 0.0
    for key, value in ref["state"].items():
        torch.testing.assert_close(state[key], value, atol=TOL, rtol=0, msg=lambda m, key=key: f"final {key}: {m}")
        moved = max(moved, float((value - tiny_model(FAMILY).state_dict()[key[len("model.") :]]).abs().max()))
    assert moved > 100 * TOL, f"training barely moved the weights ({moved}); the comparison would be vacuous"


# ----------------------------------------------------------------------------- arguments


def test_sharding_argument_and_registry():
    with pytest.raises(ValueError, match=r"sharding must be one of \('ddp', 'fsdp'\), got 'zero3'"):
        MPipeMoEStrategy(sharding="zero3")
    with pytest.raises(ValueError, match="sharding='fsdp' does not take DDP's arguments"):
        MPipeMoEStrategy(sharding="fsdp", find_unused_parameters=True)
    assert MPipeMoEStrategy()._sharding == "ddp"
    for name, start in (("mpipemoe_fsdp", "popen"), ("mpipemoe_fsdp_spawn", "spawn")):
        assert StrategyRegistry[name]["init_params"] == {"start_method": start, "sharding": "fsdp"}
        strategy = StrategyRegistry.get(name)
        assert isinstance(strategy, MPipeMoEStrategy) and strategy._sharding == "fsdp"


# ----------------------------------------------------------------------------- distributed runs


@needs_divide_factor
def test_fsdp_ep2_with_accumulation_matches_single_process(tmp_path):
    """2 processes, EP 2 (expert-dp 1: the experts' FSDP group is one rank), model in `__init__`,
    2 micro-batches of 1 sequence per step (`accumulate_grad_batches=2`: the first backward
    runs with FSDP's gradient sync off), and Hugging Face's activation checkpointing on (each
    decoder layer, an FSDP unit, recomputed in backward). Rank r's micro-batch m holds the
    sequence that rank 2m + r of 4 gets without accumulation, so the reference is the 4-way split."""
    module = CheckpointedLayers(tiny_model(FAMILY), **hparams())
    records = _fit(2, module, tmp_path, batch_size=1, accumulate_grad_batches=2)
    assert all(r["checkpointing"] for r in records)
    # Lightning reports each micro-batch's loss divided by the accumulation factor.
    virtual = [{"losses": [2 * x for x in r["losses"][m::2]]} for m in range(2) for r in records]
    _check_against_reference((4,) * STEPS, virtual, module.state_dict())


@pytest.fixture(scope="module")
def dp2_run(tmp_path_factory):
    """4 processes, EP 2 x expert-dp 2, model built in `configure_model`, the pipelined executor
    (2 micro-partitions, buffers restored by re-communication and recomputation: s4) inside
    FSDP's unshard / reshard of the experts; a DCP checkpoint after step 3."""
    root = tmp_path_factory.mktemp("fsdp_dp2")
    module = BuiltInConfigureModel()
    pipelined = {"granularity": 2, "restore": "s4"}
    callbacks = [SaveAt({3: root / "step3.ckpt"}), ExportAtEnd(root / "hf")]
    records = _fit(4, module, root, callbacks=callbacks, strategy_kwargs=pipelined)
    return root, records, module.state_dict()


@needs_divide_factor
def test_fsdp_ep2_dp2_matches_single_process_and_shards_state(dp2_run):
    """4 processes, EP 2 x expert-dp 2, model built in `configure_model`; per-rank state bytes."""
    _, records, state = dp2_run
    _check_against_reference((4,) * STEPS, records, state)
    # Full model state under AdamW in fp32: weights + gradients + two moments = 4 copies.
    full = tiny_model(FAMILY)
    expert_keys = {k for k in full.state_dict() if ".mlp.experts." in k}
    params = dict(full.named_parameters())
    full_expert = 4 * sum(params[k].numel() * 4 for k in expert_keys)
    full_dense = 4 * sum(p.numel() * 4 for k, p in params.items() if k not in expert_keys)
    # The planner's fsdp figure (config only, meta device) for the same setting.
    plan = plan_rank(
        count_model(meta_model(full.config)), sharding="fsdp", world_size=4, ep_size=2, tokens_per_rank=8,
        precision="32-true",
    )  # fmt: skip
    planned = sum(plan.rows[k] for k in ("parameters", "gradients", "optimizer state"))
    for rank, record in enumerate(records):
        # AdamW's `step` counters (a scalar tensor per parameter, on every rank) are in the 5%.
        for what, full_bytes in (("dense", full_dense), ("expert", full_expert)):
            got = record[f"{what}_bytes"]
            assert abs(got - full_bytes / 4) <= 0.05 * full_bytes / 4, (rank, what, got, full_bytes / 4)
        measured = record["dense_bytes"] + record["expert_bytes"]
        assert abs(planned - measured) <= 0.10 * measured, (rank, planned, measured)
        print(
            f"rank {rank}: dense {record['dense_bytes']} B (full/4 {full_dense / 4:.0f}), experts "
            f"{record['expert_bytes']} B (full/4 {full_expert / 4:.0f}), planner {planned} B"
        )


def test_divide_factor_without_the_torch_2_8_api_refuses_cpu():
    """torch 2.7's FSDPModule has only `set_reduce_scatter_divide_factor` (NCCL's PreMulSum)."""

    class Torch27Module:
        def set_reduce_scatter_divide_factor(self, factor: float) -> None:
            self.factor = factor

    with pytest.raises(RuntimeError, match=r"sharding='fsdp' on 'cpu' devices needs torch >= 2.8"):
        _set_divide_factor(Torch27Module(), 4, "cpu", 2)
    module = Torch27Module()
    _set_divide_factor(module, 4, "cuda", 2)
    assert module.factor == 4.0


def test_bf16_policies():
    """bf16-mixed: fp32 master weights with bf16 compute and fp32 reduction; bf16-true warns
    when an lr-sized update is below half a bf16 ulp of the weights."""
    policy = mixed_precision_policy(MixedPrecision("bf16-mixed", "cpu"))
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert mixed_precision_policy(Precision()) is None
    assert mixed_precision_policy(HalfPrecision("bf16-true")) is None
    weights = torch.nn.Parameter(torch.full((64,), 0.02, dtype=torch.bfloat16))
    with pytest.warns(UserWarning, match=r"lr=1e-05: an update of lr on a weight of RMS 0.02 is below half a bf16 ulp"):
        warn_bf16_true(HalfPrecision("bf16-true"), [torch.optim.AdamW([weights], lr=1e-5)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_bf16_true(HalfPrecision("bf16-true"), [torch.optim.AdamW([weights], lr=1e-3)])
        warn_bf16_true(MixedPrecision("bf16-mixed", "cpu"), [torch.optim.AdamW([weights], lr=1e-5)])


# ----------------------------------------------------------------------------- checkpoints


_LOAD_PLAIN = """
import sys, torch, transformers
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
assert not any(name.startswith("lightning_mpipemoe") for name in sys.modules), "the package was imported"
ids = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(input_ids=ids).logits, sys.argv[3])
"""


@needs_divide_factor
def test_fsdp_export_loads_with_plain_transformers(dp2_run, tmp_path):
    """The 4-process run's export (EP 2 x expert-dp 2: every rank one file, its own 2 of the 8
    experts of each layer and the dense tensors it was given) loads with plain transformers in
    a subprocess (this package not imported, cwd outside the repository) and gives the logits
    of the trained model (the reference model with the run's final parameters)."""
    import sys

    from tests.commands import run_command

    root, _, state = dp2_run
    out = root / "hf"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-rank{r:05d}-of-00004.safetensors" for r in range(4)], files
    ids = TokenData().ids[:2]
    torch.save(ids, tmp_path / "ids.pt")
    done = run_command(
        [sys.executable, "-c", _LOAD_PLAIN, str(out), str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")],
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    trained = tiny_model(FAMILY)
    trained.load_state_dict({k[len("model.") :]: v for k, v in state.items()})
    with torch.no_grad():
        expected = trained.eval()(input_ids=ids).logits
        untrained = tiny_model(FAMILY).eval()(input_ids=ids).logits
    got = torch.load(tmp_path / "logits.pt")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (expected - untrained).abs().max() > 100 * TOL  # the export is of the trained model


#: A model whose experts dominate: 2 layers of 8 experts of 3 x 256 x 4096 fp32 weights, 201 MB in
#: all, 50 MB per rank at EP 2 x expert-dp 2 (the whole is 4x a rank's share).
BIG = {"hidden_size": 256, "moe_intermediate_size": 4096}
#: What a rank may allocate during the export beyond its own shards and the tensors in flight:
#: the interpreter's, safetensors' and the conversion's fixed costs.
EXPORT_OVERHEAD = 48 * 2**20


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _export_memory_worker(rank: int, world: int, out_dir: Path, results: Path) -> None:
    """Convert (EP 2) and `fully_shard` the big model (no Lightning), then export it, measuring this
    rank's peak RSS during the export alone (VmHWM reset just before, `/proc/self/clear_refs`);
    then the tied-embedding phase (`_tied_phase`), to spare the suite a launch."""
    import ctypes
    import gc

    from torch.distributed.tensor import DTensor

    from lightning_mpipemoe.fsdp import shard_model
    from lightning_mpipemoe.groups import build_process_groups
    from lightning_mpipemoe.hf_models.api import LoadReport, convert_model, export_pretrained, sharded_expert_keys
    from lightning_mpipemoe.hf_models.fsdp_load import load_fsdp

    groups = build_process_groups(2, timeout=TIMEOUT)
    model = convert_model(tiny_model(FAMILY, **BIG), groups, track_stats=False)
    keys = sharded_expert_keys(model)
    shard_model(model, keys, groups, "cpu")
    state = model.state_dict()
    own = sum(local_tensor(v).numel() * v.element_size() for v in state.values())
    largest_local = max(local_tensor(v).numel() * v.element_size() for v in state.values())
    # The largest tensor a file holds: a dense one whole, or one expert's slice of an expert parameter.
    largest = max(
        v.numel() // (keys[k] // groups.ep_size if k in keys else 1) * v.element_size() for k, v in state.items()
    )
    experts = sum(v.numel() * v.element_size() * groups.ep_size for k, v in state.items() if k in keys)
    del state
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # the full model built before sharding goes back to the OS
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_bytes("VmRSS")
    export_pretrained(model, out_dir, groups)
    peak = _status_bytes("VmHWM")
    # Loaded back into shards (meta device, fully_shard, each rank reading its slices).
    Path("/proc/self/clear_refs").write_text("5")
    load_before = _status_bytes("VmRSS")
    report = LoadReport()
    loaded = load_fsdp(out_dir, groups, report=report)
    load_peak = _status_bytes("VmHWM")
    mine, theirs = model.state_dict(), loaded.state_dict()
    assert sorted(mine) == sorted(theirs), sorted(set(mine) ^ set(theirs))
    for key, value in mine.items():
        assert type(theirs[key]) is type(value), key
        if isinstance(value, DTensor):
            assert theirs[key].placements == value.placements and theirs[key].shape == value.shape, key
        torch.testing.assert_close(local_tensor(theirs[key]), local_tensor(value), atol=0, rtol=0, msg=key)
    for (name, buffer), (_, original) in zip(loaded.named_buffers(), model.named_buffers()):
        torch.testing.assert_close(buffer, original, atol=0, rtol=0, msg=name)
    record = {"before": before, "peak": peak, "own": own, "largest": largest, "largest_local": largest_local,
              "experts": experts, "load_before": load_before, "load_peak": load_peak,
              "bytes_read": report.bytes_read, "checkpoint_bytes": report.checkpoint_bytes}  # fmt: skip
    (results / f"rank{rank}.json").write_text(json.dumps(record))
    del model, loaded, mine, theirs
    _tied_phase(rank, world, groups, results / "tied")  # a second phase of the same launch


@pytest.fixture(scope="module")
def export_memory_run(tmp_path_factory):
    """One 4-process launch (EP 2 x expert-dp 2, no Lightning): the big model's export and load
    (memory), then the tied-embedding phase (`_tied_phase`) on a checkpoint written here."""
    from tests.dist_utils import run_distributed

    root = tmp_path_factory.mktemp("fsdp_export_memory")
    tied = tiny_model(FAMILY, tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    tied.save_pretrained(root / "tied" / "src")
    run_distributed(_export_memory_worker, 4, root / "hf", root, timeout_s=300)
    return root, tied


@needs_divide_factor
def test_fsdp_export_and_load_memory_stay_within_own_shard_and_one_tensor(export_memory_run):
    """4 processes (EP 2 x expert-dp 2), experts 4x a rank's share: during the export each rank's
    peak RSS grows by at most its largest local parameter (converted whole), the largest tensor of
    the files (gathered or converted) and a fixed overhead, far below the experts' full size:
    no rank gathers the model. Loading the export back (`load_fsdp`) gives every rank the same
    shards (and buffers) as the model that was exported, reading only its own slices, its RSS
    growing by its new shards plus the same per-tensor bound."""
    tmp_path = export_memory_run[0]
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    for rank, r in enumerate(records):
        bound = r["largest_local"] + r["largest"] + EXPORT_OVERHEAD
        assert r["experts"] > 2 * bound, (rank, r)  # a gather of the experts would break the bound
        print(
            f"rank {rank}: export peak RSS growth {(r['peak'] - r['before']) / 2**20:.1f} MiB, bound "
            f"{bound / 2**20:.1f} MiB, own shards {r['own'] / 2**20:.1f} MiB, experts {r['experts'] / 2**20:.1f} MiB"
        )
        assert r["peak"] - r["before"] <= bound, (rank, r["peak"] - r["before"], bound, r)
        # Loading: the new model's own shards, the pages of the slices it read (safetensors memory-maps
        # the files: file-backed, counted in RSS while the files are open), one tensor in flight.
        load_bound = r["own"] + r["bytes_read"] + bound
        print(
            f"rank {rank}: load peak RSS growth {(r['load_peak'] - r['load_before']) / 2**20:.1f} MiB, bound "
            f"{load_bound / 2**20:.1f} MiB, read {r['bytes_read'] / 2**20:.1f} of {r['checkpoint_bytes'] / 2**20:.1f} MiB"
        )
        assert r["load_peak"] - r["load_before"] <= load_bound, (rank, r)
        assert r["bytes_read"] <= r["own"] * 1.01 < r["checkpoint_bytes"] / 3, (rank, r)  # its slices only
    weight_map = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    per_expert = [k for k in weight_map if ".mlp.experts." in k]
    assert len(per_expert) == 2 * 8 * 3 and len(set(weight_map.values())) == 4, sorted(weight_map)


@needs_divide_factor
def test_dcp_checkpoint_resumes_at_another_world_size(dp2_run, tmp_path):
    """The step-3 checkpoint of the 4-process run (EP 2 x expert-dp 2), resumed on 2 processes
    (EP 2): DCP reshards dense state 4 -> 2 ways and experts 2 -> 1 ways per EP rank; steps 4
    and 5 give the losses and final weights of single-process training on the same global
    batches. Each rank wrote only its shards: one DCP file per rank, no full copy."""
    root = dp2_run[0]
    checkpoint = root / "step3.ckpt"
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "__2_0.distcp", "__3_0.distcp", "meta.pt",
    ]  # fmt: skip
    assert not list(root.glob(".step3.ckpt.tmp-*"))
    module = MoECausalLMModule(tiny_model(FAMILY, seed=1), **hparams())  # other weights: all must come from the file
    records = _fit(2, module, tmp_path, ckpt_path=checkpoint)
    _check_against_reference((4, 4, 4, 2, 2), records, module.state_dict(), first_step=3)


@needs_divide_factor
def test_dcp_checkpoint_resumes_at_another_ep_size(dp2_run, tmp_path):
    """The same checkpoint on 4 processes at EP 4 (2 experts per rank, expert-dp 1): DCP cuts
    the global expert tensors anew; steps 4 and 5 match single-process training."""
    records = _fit(4, module := BuiltInConfigureModel(), tmp_path, ep=4, ckpt_path=dp2_run[0] / "step3.ckpt")
    _check_against_reference((4,) * STEPS, records, module.state_dict(), first_step=3)


@needs_divide_factor
def test_meta_built_model_is_initialised_and_resumes_at_the_same_layout(dp2_run, tmp_path):
    """The step-3 checkpoint of the 4-process run, resumed at the same layout (EP 2 x expert-dp 2)
    by a model built on the meta device. After setup every parameter is a DTensor shard on the
    CPU, finite, of the global shape of the model (experts: this EP rank's E/ep) cut by
    torch.chunk over its mesh, initialised as HF's own init does (each shard has the mean and
    std of the parameter initialised in one process); the ranks drew different values (each its
    own stream) and the initialised model's loss is finite and near ln(vocab). The checkpoint
    then replaces every value: steps 4 and 5 match single-process training."""
    import math

    world, ep = 4, 2
    records = _fit(world, module := BuiltOnMeta(), tmp_path, callbacks=[FreshShards(tmp_path)],
                   ckpt_path=dp2_run[0] / "step3.ckpt")  # fmt: skip
    _check_against_reference((4,) * STEPS, records, module.state_dict(), first_step=3)
    full = {f"model.{k}": v for k, v in tiny_model(FAMILY).named_parameters()}
    fresh = [json.loads((tmp_path / f"fresh{r}.json").read_text()) for r in range(world)]
    for rank, record in enumerate(fresh):
        assert record["bad"] == [], (rank, record["bad"][:5])
        assert set(record["shapes"]) == set(full)
        for key, (global_shape, local_shape) in record["shapes"].items():
            expert = ".mlp.experts." in key
            expected = [full[key].shape[0] // ep if expert else full[key].shape[0], *full[key].shape[1:]]
            parts, index = (world // ep, rank // ep) if expert else (world, rank)
            rows = torch.arange(expected[0]).chunk(parts)
            assert global_shape == expected and local_shape == [len(rows[index]) if index < len(rows) else 0,
                                                                *expected[1:]], (rank, key)  # fmt: skip
        # Initialised as HF's `_init_weights` does (as in one process): N(0, initializer_range)
        # weights, zero biases, unit norms: each shard of n >= 64 values has the distribution's mean
        # and std (those of the whole, within 5 standard errors: sigma / sqrt(n), sigma / sqrt(2n)).
        for key, (mean, std, n) in record["moments"].items():
            whole = full[key].detach()
            sigma, mu = float(whole.std()), 0.0 if whole.std() > 0 else float(whole.mean())
            assert abs(std - sigma) <= 5 * sigma / math.sqrt(2 * n) + 1e-6, (rank, key, std, sigma)
            assert abs(mean - mu) <= 5 * sigma / math.sqrt(n) + 1e-6, (rank, key, mean, mu)
        assert math.isfinite(record["loss"]) and record["loss"] < math.log(VOCAB) + 2, (rank, record["loss"])
    for key in ("model.model.embed_tokens.weight", "model.model.layers.0.mlp.experts.gate_up_proj"):
        values = [tuple(record["values"][key]) for record in fresh]
        assert len(set(values)) == world, (key, values)  # no two ranks drew the same shard


def test_dcp_save_interrupted_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """One process (no process group: DCP and the barriers run locally): a save that dies after
    some shards are written leaves only a temporary directory; `path` still holds the previous
    checkpoint, which loads. (The 4-process runs above check the multi-rank files.)"""
    import types

    import torch.distributed.checkpoint as dcp

    from lightning_mpipemoe import dcp_checkpoint

    def strategy_for(module):
        return types.SimpleNamespace(
            lightning_module=module, optimizers=[torch.optim.SGD(module.parameters(), lr=0.1)], _expert_keys={},
            _fsdp=types.SimpleNamespace(expert_mesh=None), _checkpoint_group=None, is_global_zero=True,
            broadcast=lambda obj: obj, _executor_state=dict,
        )  # fmt: skip

    torch.manual_seed(0)
    saved = strategy_for(torch.nn.Linear(4, 3))
    path = tmp_path / "latest.ckpt"
    dcp_checkpoint.save(saved, {"global_step": 1}, path)
    expected = {k: v.clone() for k, v in saved.lightning_module.state_dict().items()}

    real_save = dcp.save

    def dies_half_way(state, checkpoint_id, **kwargs):
        real_save(state, checkpoint_id=checkpoint_id, **kwargs)  # the shards are on disk ...
        raise KeyboardInterrupt("killed before the commit")  # ... the rename never comes

    monkeypatch.setattr(dcp, "save", dies_half_way)
    with torch.no_grad():
        saved.lightning_module.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        dcp_checkpoint.save(saved, {"global_step": 2}, path)
    assert len(list(tmp_path.glob(".latest.ckpt.tmp-*"))) == 1
    fresh = strategy_for(torch.nn.Linear(4, 3))
    meta = dcp_checkpoint.load(fresh, path)
    assert meta["global_step"] == 1
    for key, value in expected.items():
        torch.testing.assert_close(fresh.lightning_module.state_dict()[key], value, atol=0, rtol=0)


def _save_then_die_worker(rank: int, world: int, path: Path) -> None:
    """Both ranks save a checkpoint of their own Linear (step 1); then rank 1 is killed
    (`os._exit`, no exception, no cleanup) in the middle of the next save, right after
    writing its shard file."""
    import os
    import types

    import torch.distributed as dist
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    from lightning_mpipemoe import dcp_checkpoint

    def broadcast(obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    torch.manual_seed(0)
    module = torch.nn.Module()
    setattr(module, f"rank{rank}", torch.nn.Linear(4, 3))  # every rank its own tensors
    strategy = types.SimpleNamespace(
        lightning_module=module, optimizers=[], _expert_keys={},
        _fsdp=types.SimpleNamespace(expert_mesh=None), _checkpoint_group=None, is_global_zero=rank == 0,
        broadcast=broadcast, _executor_state=dict,
    )  # fmt: skip
    dcp_checkpoint.save(strategy, {"global_step": 1}, path)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)
    if rank == 1:
        write_data = FileSystemWriter.write_data

        def write_then_die(self, plan, planner):
            future = write_data(self, plan, planner)
            future.wait()  # the shard is on disk, then the process is gone
            os._exit(9)

        FileSystemWriter.write_data = write_then_die
    dcp_checkpoint.save(strategy, {"global_step": 2}, path)


def test_dcp_save_with_a_killed_rank_keeps_the_previous_checkpoint(tmp_path):
    """2 processes: rank 1 dies (os._exit) half-way through the second save. The job fails;
    `path` still holds the first checkpoint, complete: it loads, with the step-1 weights of both
    ranks' modules (the model only: the ranks' optimizers differ, so none is saved)."""
    import types

    from torch.multiprocessing import ProcessExitedException

    from lightning_mpipemoe import dcp_checkpoint
    from tests.dist_utils import run_distributed

    path = tmp_path / "latest.ckpt"
    with pytest.raises((ProcessExitedException, AssertionError)) as failed:
        run_distributed(_save_then_die_worker, 2, path, timeout_s=30)
    # Either rank 1's exit is seen first, or rank 0's collective failing on the vanished peer.
    if isinstance(failed.value, ProcessExitedException):
        assert (failed.value.error_index, failed.value.exit_code) == (1, 9), failed.value
    else:
        assert "--- rank 0 ---" in str(failed.value) and "--- rank 1 ---" not in str(failed.value), failed.value
    assert len(list(tmp_path.glob(".latest.ckpt.tmp-*"))) == 1  # the unfinished save, never renamed
    module, expected = torch.nn.Module(), {}
    for r in range(2):
        torch.manual_seed(0)  # as rank r built its Linear
        expected.update({f"rank{r}.{k}": v for k, v in torch.nn.Linear(4, 3).state_dict().items()})
        setattr(module, f"rank{r}", torch.nn.Linear(4, 3))
        torch.nn.init.zeros_(getattr(module, f"rank{r}").weight)
    fresh = types.SimpleNamespace(
        lightning_module=module, optimizers=[], _expert_keys={}, _fsdp=types.SimpleNamespace(expert_mesh=None),
        _checkpoint_group=None, is_global_zero=True, broadcast=lambda obj: obj, _executor_state=dict,
    )  # fmt: skip
    meta = dcp_checkpoint.load(fresh, path)
    assert meta["global_step"] == 1
    for key, value in expected.items():
        torch.testing.assert_close(module.state_dict()[key], value, atol=0, rtol=0, msg=key)


def _tied_phase(rank: int, world: int, groups, root: Path) -> None:
    """Load the tied-embedding checkpoint `root/src` into FSDP shards, one backward of this
    rank's batch (gradients saved whole over their mesh), an SGD step, a DCP save loaded back
    into a fresh copy of the source, and an export."""
    import types

    import torch.distributed as dist

    from lightning_mpipemoe import dcp_checkpoint
    from lightning_mpipemoe.fsdp import layout_of
    from lightning_mpipemoe.hf_models.api import export_pretrained, sharded_expert_keys
    from lightning_mpipemoe.hf_models.fsdp_load import load_fsdp

    model = load_fsdp(root / "src", groups)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied as from_pretrained ties them
    batch = TokenData().rank_batch(0, rank, world)
    model(**batch).loss.backward()
    grads = {k: p.grad.full_tensor() for k, p in model.named_parameters()}  # experts: this EP rank's
    torch.save(grads, root / f"grads{rank}.pt")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    optimizer.step()

    def broadcast(obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def strategy_for(module):
        keys = sharded_expert_keys(module)
        return types.SimpleNamespace(
            lightning_module=module, optimizers=[], _expert_keys=keys, _fsdp=layout_of(module, keys, groups, "cpu"),
            _checkpoint_group=None, is_global_zero=rank == 0, broadcast=broadcast, _executor_state=dict,
        )  # fmt: skip

    dcp_checkpoint.save(strategy_for(model), {"global_step": 1}, root / "step1.ckpt")
    fresh = load_fsdp(root / "src", groups)
    dcp_checkpoint.load(strategy_for(fresh), root / "step1.ckpt")
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    for (key, got), (_, want) in zip(fresh.state_dict().items(), model.state_dict().items()):
        torch.testing.assert_close(local_tensor(got), local_tensor(want), atol=0, rtol=0, msg=key)
    export_pretrained(model, root / "hf", groups)


@needs_divide_factor
def test_tied_embeddings_load_train_checkpoint_and_export(export_memory_run):
    """`tie_word_embeddings=True` (lm_head is the embedding) under FSDP at 4 processes, EP 2 x
    expert-dp 2 (a phase of the export-memory launch): loaded into shards still tied; the tied
    weight's gradient (both uses) and every other one equal single-process backward of the mean
    of the ranks' losses; a DCP checkpoint loads back exactly and tied; the export stores the
    weight once and plain transformers ties it again, giving the logits of the single-process
    model after the same SGD step."""
    from transformers import AutoModelForCausalLM

    root, model = export_memory_run
    tmp_path, world, ep = root / "tied", 4, 2
    data = TokenData()
    (sum(model(**data.rank_batch(0, r, world)).loss for r in range(world)) / world).backward()
    per_ep = 8 // ep
    for rank in range(world):
        grads = torch.load(tmp_path / f"grads{rank}.pt")
        assert set(grads) == {k for k, _ in model.named_parameters()}, sorted(grads)
        ep_rank = rank % ep  # groups.py: rank = expert_dp_rank * ep + ep_rank
        for key, param in model.named_parameters():
            expert = ".mlp.experts." in key
            want = param.grad[ep_rank * per_ep : (ep_rank + 1) * per_ep] if expert else param.grad
            torch.testing.assert_close(grads[key], want, atol=TOL, rtol=0, msg=lambda m, key=key: f"{key}: {m}")
    with torch.no_grad():
        for param in model.parameters():
            param -= 0.5 * param.grad
    weight_map = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.embed_tokens.weight" in weight_map and "lm_head.weight" not in weight_map
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert exported.lm_head.weight is exported.model.embed_tokens.weight
    ids = data.ids[:2]
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, model.eval()(input_ids=ids).logits, atol=TOL, rtol=0)


def test_unshardable_models_are_refused_by_name():
    """Raised in setup before any collective: what FSDP over two meshes cannot shard."""
    from lightning_mpipemoe.fsdp import check_shardable

    class Direct(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(1))

    with pytest.raises(ValueError, match=r"Direct holds parameters directly \(\['scale'\]\)"):
        check_shardable(Direct(), {})
    mixed = torch.nn.Module()
    mixed.moe = torch.nn.Module()
    mixed.moe.w_EHD = torch.nn.Parameter(torch.ones(4, 2, 2))
    mixed.moe.bias = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match=r"module 'moe' holds expert parameters and the dense parameters \['bias'\]"):
        check_shardable(mixed, {"moe.w_EHD": 4})
    with torch.device("meta"):
        lazy = torch.nn.Module()
        lazy.body = torch.nn.Linear(2, 2)
    assert check_shardable(lazy, {}) == {}  # all on the meta device: materialised after sharding
    lazy.head = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"partly on the meta device \(\['body.weight', 'body.bias'\], ...\)"):
        check_shardable(lazy, {})
    owners = check_shardable(_only_experts(), {"moe.w_EHD": 4})
    assert list(owners) == ["moe"]
    from lightning_mpipemoe.hf_models.peft_lora import apply_peft

    lora = torch.nn.Module()
    lora.model = apply_peft(tiny_model(FAMILY), {"method": "lora", "targets": "experts", "r": 2, "alpha": 4})
    with pytest.raises(ValueError, match=r"sharding='fsdp' does not shard LoRA on routed experts \(peft's"):
        check_shardable(lora, {})


def test_materialize_initialises_a_meta_model_or_names_what_it_cannot():
    """No process group (one rank, stream = seed): torch layers get `reset_parameters()`, so the
    result equals the same modules built on the CPU under that seed; a Hugging Face model gets
    its `init_weights()` (RoPE tables included); the global RNG is left as it was; a parameter
    no initialisation writes is an error naming it."""
    import math

    from transformers import AutoModelForCausalLM

    from lightning_mpipemoe.fsdp import materialize

    with torch.device("meta"):
        lazy = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    state = torch.get_rng_state()
    materialize(lazy, torch.device("cpu"), seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(5)
    expected = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    for (name, got), (_, want) in zip(lazy.state_dict().items(), expected.state_dict().items()):
        torch.testing.assert_close(got, want, atol=0, rtol=0, msg=name)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(tiny_config(FAMILY))
    materialize(hf, torch.device("cpu"))
    built = tiny_model(FAMILY)
    for (name, buffer), (_, want) in zip(hf.named_buffers(), built.named_buffers()):
        torch.testing.assert_close(buffer, want, atol=0, rtol=0, msg=name)  # RoPE tables rebuilt
    with torch.no_grad():
        for name, param in hf.named_parameters():  # HF's distribution: std within 5 standard errors
            sigma, n = float(dict(built.named_parameters())[name].std()), param.numel()
            assert n < 64 or abs(float(param.std()) - sigma) <= 5 * sigma / math.sqrt(2 * n) + 1e-6, name

    class Raw(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(2))

    with torch.device("meta"):
        raw = torch.nn.Sequential(torch.nn.Linear(2, 2), Raw())
    with pytest.raises(ValueError, match=r"initialisation left 1 tensors unset \(e.g. \['1.scale'\]\)"):
        materialize(raw, torch.device("cpu"))


def _only_experts() -> torch.nn.Module:
    module = torch.nn.Module()
    module.moe = torch.nn.Module()
    module.moe.w_EHD = torch.nn.Parameter(torch.ones(4, 2, 2))
    module.moe.router = torch.nn.Linear(2, 4)  # dense, in a child: sharded over the world
    return module
