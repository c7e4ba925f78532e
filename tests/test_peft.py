"""peft's LoRA under `MPipeMoEStrategy`: attention and fused experts (`target_parameters`),
EP = 2 and EP = 2 x DP = 2, against single-process peft training.

One spawn run per world size (module fixture) serves every assertion: the model is built
and wrapped by peft in the main process (the README's pattern), trained 5 steps with
clipping; the training ranks save a sharded checkpoint, a PEFT adapter directory and a merged
Hugging Face export; the main process gets the trained weights back.

The reference is one process training the same peft model on the same shards: each step's
loss is the mean of the shards' losses (what data parallelism optimises; the router aux loss
is per shard, so this differs from one loss over the whole global batch).
"""

from __future__ import annotations

import copy
from datetime import timedelta
from pathlib import Path

import lightning_mpipemoe  # noqa: F401  isort: skip  (first: registers "mpipemoe"; see tests/hf_tiny.py)
import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Dataset

from lightning_mpipemoe import MPipeMoEStrategy, consolidate_checkpoint
from lightning_mpipemoe.checkpointing import shard_file
from lightning_mpipemoe.discovery import pack_experts
from lightning_mpipemoe.hf_models.api import MoECausalLMModule, convert_model, sharded_expert_keys
from lightning_mpipemoe.hf_models.peft_lora import export_merged, save_lora_adapter
from tests.commands import run_command
from tests.hf_tiny import VOCAB, tiny_batch, tiny_model
from tests.strategy_models import LossRecorder, SaveAt, read_losses

peft = pytest.importorskip("peft")

STEPS = 5
GLOBAL_BATCH = 4
SEQ = 8
LR = 1e-2
#: Between the gradient norms of the reference's steps, so that clipping acts on some of them
#: (`test_clipping_acted` checks it).
CLIP = 2.0
EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def lora_config() -> "peft.LoraConfig":
    return peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], target_parameters=EXPERT_TARGETS,
        init_lora_weights=False,  # B != 0: every LoRA weight gets a gradient from the first step
    )  # fmt: skip


def base_model():
    return tiny_model("mixtral", seed=0)


def peft_model():
    torch.manual_seed(1)
    return peft.get_peft_model(base_model(), lora_config())


class Samples(Dataset):
    """`STEPS * GLOBAL_BATCH` fixed sequences; sample `i` is the same in every process."""

    def __len__(self) -> int:
        return STEPS * GLOBAL_BATCH

    def __getitem__(self, i: int) -> dict:
        generator = torch.Generator().manual_seed(i)
        ids = torch.randint(2, VOCAB, (SEQ,), generator=generator)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def shard(step: int, rank: int, world: int) -> dict:
    """What rank `rank` of `world` trains on at `step` (from 0; `STEPS` per epoch): Lightning
    gives each rank a `DistributedSampler(shuffle=True, seed=0)`, rank r taking positions
    r, r+W, ... of `randperm(n)` seeded with the epoch."""
    data, per_rank = Samples(), GLOBAL_BATCH // world
    epoch, step = divmod(step, STEPS)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(epoch))[rank::world]
    items = [data[int(i)] for i in order[step * per_rank : (step + 1) * per_rank]]
    return {k: torch.stack([item[k] for item in items]) for k in items[0]}


def lora_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def reference_run(world: int, steps: int = STEPS) -> dict:
    module = MoECausalLMModule(peft_model(), learning_rate=LR)
    optimizer = module.configure_optimizers()
    trainable = [p for p in module.parameters() if p.requires_grad]
    losses, norms = [], []
    for step in range(steps):
        loss = sum(module.compute_loss(shard(step, r, world))[0] for r in range(world)) / world
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(trainable, CLIP)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return {"losses": losses, "norms": norms, "lora": lora_weights(module.model), "model": module.model}


class SaveAdapterAndExport(Callback):
    """At the end of training, on every rank (both are collective): the PEFT adapter directory
    and a merged Hugging Face export (of a copy: the trained module stays a peft model)."""

    def __init__(self, root: str) -> None:
        self.root = root

    def on_train_end(self, trainer, pl_module) -> None:
        groups = trainer.strategy.moe_groups
        save_lora_adapter(pl_module.model, Path(self.root) / "adapter", groups)
        export_merged(copy.deepcopy(pl_module.model), Path(self.root) / "merged", groups)


@pytest.fixture(scope="module", params=[2, pytest.param(4, marks=pytest.mark.slow)], ids=["ep2", "ep2xdp2"])
def run(request, tmp_path_factory):
    world = request.param
    root = tmp_path_factory.mktemp(f"peft{world}")
    module = MoECausalLMModule(peft_model(), learning_rate=LR)
    strategy = MPipeMoEStrategy(expert_parallel_size=2, start_method="spawn", timeout=timedelta(seconds=60))
    trainer = pl.Trainer(
        accelerator="cpu", devices=world, strategy=strategy, max_steps=STEPS, gradient_clip_val=CLIP, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
        callbacks=[LossRecorder(root / "losses.jsonl"), SaveAt({STEPS: root / "final.ckpt"}),
                   SaveAdapterAndExport(str(root))],
    )  # fmt: skip
    trainer.fit(module, DataLoader(Samples(), batch_size=GLOBAL_BATCH // world, shuffle=False))
    return {"world": world, "root": root, "module": module, "reference": reference_run(world)}


def _eval_logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def _assert_lora_close(got: dict, expected: dict, what: str) -> None:
    assert set(got) == set(expected), f"{what}: {sorted(set(got) ^ set(expected))[:4]}"
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, atol=1e-5, rtol=0, msg=lambda m: f"{what} {name}: {m}")


def test_losses_equal_single_process(run):
    losses = read_losses(run["root"] / "losses.jsonl")
    expected = run["reference"]["losses"]
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step, loss in losses.items():
        assert abs(loss - expected[step - 1]) < 1e-5, (step, loss, expected[step - 1])


def test_clipping_acted(run):
    norms = run["reference"]["norms"]
    assert min(norms) < CLIP < max(norms), norms


def test_main_process_holds_the_trained_lora_weights(run):
    """The spawn launcher re-assembled every expert's LoRA weights for the main process."""
    expected = run["reference"]["lora"]
    _assert_lora_close(lora_weights(run["module"].model), expected, "main process")
    assert any((expected[n] - v).abs().max() > 1e-3 for n, v in lora_weights(peft_model()).items())  # it trained


def test_sharded_checkpoint_holds_the_lora_weights(run):
    root, expected = run["root"], run["reference"]["lora"]
    full = consolidate_checkpoint(root / "final.ckpt", prefix="model.")
    # The experts' LoRA is stored unpacked (A [E, r, in], B [E, out, r]); attention LoRA as it is.
    def packed(name, value):
        return pack_experts(value, "rows" if ".lora_A." in name else "columns") if value.dim() == 3 else value

    got = {n: packed(n, v) for n, v in full.items() if "lora_" in n}
    _assert_lora_close(got, expected, "checkpoint")
    shard = torch.load(root / "final.ckpt" / shard_file(1, 2), weights_only=True)["state_dict"]
    b_key = "model.base_model.model.model.layers.0.mlp.experts.lora_B.default.weight"
    assert shard[b_key].shape == (4, 32, 2)  # this EP rank's 4 of 8 experts, unpacked


@pytest.mark.parametrize("run", [2], indirect=True, ids=["ep2"])  # one resume suffices: from the EP = 2 run
def test_resume_at_another_ep_size(run, tmp_path):
    """The EP = 2 checkpoint resumes at EP = 1 x DP = 2 (LoRA weights and their Adam state cut
    for the other layout) and the next step equals the reference's sixth."""
    strategy = MPipeMoEStrategy(expert_parallel_size=1, start_method="spawn", timeout=timedelta(seconds=60))
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=STEPS + 1, gradient_clip_val=CLIP, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[LossRecorder(tmp_path / "losses.jsonl")],
    )  # fmt: skip
    module = MoECausalLMModule(peft_model(), learning_rate=LR)
    loader = DataLoader(Samples(), batch_size=GLOBAL_BATCH // 2, shuffle=False)
    trainer.fit(module, loader, ckpt_path=run["root"] / "final.ckpt")
    reference = reference_run(2, steps=STEPS + 1)
    assert list(read_losses(tmp_path / "losses.jsonl")) == [STEPS + 1]
    assert abs(read_losses(tmp_path / "losses.jsonl")[STEPS + 1] - reference["losses"][STEPS]) < 1e-5
    _assert_lora_close(lora_weights(module.model), reference["lora"], "resumed")


def test_adapter_loads_with_plain_peft(run):
    """The adapter directory (all experts) loads onto an unconverted model at EP 1."""
    batch = tiny_batch("mixtral", seed=7)
    loaded = peft.PeftModel.from_pretrained(base_model(), run["root"] / "adapter")
    torch.testing.assert_close(
        _eval_logits(loaded, batch), _eval_logits(run["reference"]["model"], batch), atol=1e-5, rtol=0
    )


def test_merged_export_loads_with_plain_transformers(run):
    from transformers import AutoModelForCausalLM

    batch = tiny_batch("mixtral", seed=7)
    merged = AutoModelForCausalLM.from_pretrained(run["root"] / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(
        _eval_logits(merged, batch), _eval_logits(run["reference"]["model"], batch), atol=1e-5, rtol=0
    )


# ------------------------------------------------------------------------------ in-process


def test_lora_on_fused_experts_equals_peft_locally():
    """EP 1, no strategy: the executor sees W + scaling * B @ A (logits and every LoRA gradient)."""
    ref, ours = peft_model(), peft_model()
    convert_model(ours.base_model.model)
    keys = sharded_expert_keys(ours.base_model.model)
    assert "model.layers.1.mlp.experts.base_layer.lora_B.default.weight" in keys
    batch = tiny_batch("mixtral")
    outs = []
    for model in (ref, ours):
        out = model(**batch, output_router_logits=True)
        out.loss.backward()
        outs.append((out.logits, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-5, rtol=0)
    assert outs[0][1].keys() == outs[1][1].keys() and any("experts.lora_A" in n for n in outs[0][1])
    for name, grad in outs[0][1].items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(outs[1][1][name], grad, atol=1e-5, rtol=0, msg=lambda m: f"{name}: {m}")


def test_gpt_oss_lora_on_transposed_experts_locally():
    """peft's ParamWrapper on GPT-OSS's transposed experts runs on the executor too."""
    def build():
        torch.manual_seed(1)
        return peft.get_peft_model(tiny_model("gpt_oss"), peft.LoraConfig(
            r=2, lora_alpha=4, target_parameters=EXPERT_TARGETS, init_lora_weights=False))  # fmt: skip

    ref, ours = build(), build()
    convert_model(ours.base_model.model)
    batch = tiny_batch("gpt_oss")
    out_ref, out = ref(**batch), ours(**batch)
    torch.testing.assert_close(out.logits, out_ref.logits, atol=1e-5, rtol=0)
    out_ref.loss.backward()
    out.loss.backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    for name, p in ref.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=0, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------------------ the recipe


def test_recipe_peft_lora_end_to_end(tmp_path):
    """`mpipemoe-finetune peft=lora` (2 processes, EP = 2, LoRA on attention and experts): the
    merged export gives the reported held-out loss with plain transformers, and the adapter
    directory beside it loads with plain peft onto the source model to the same logits."""
    import json
    import os
    import sys

    from hydra import compose, initialize_config_dir
    from transformers import AutoModelForCausalLM

    from lightning_mpipemoe.recipes.evaluate import evaluate_directory
    from lightning_mpipemoe.recipes.finetune import CONFIG_DIR
    from lightning_mpipemoe.recipes.tiny_checkpoint import TinySpec, ensure_tiny_checkpoint

    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("finetune", overrides=[f"paths.cache={cache}", "peft=lora"])
    assert cfg.peft.method == "lora" and cfg.peft.targets == "all"
    source = Path(cfg.model.path)
    ensure_tiny_checkpoint(source, TinySpec(**cfg.model.tiny))
    result = run_command(
        [sys.executable, "-m", "lightning_mpipemoe.recipes.finetune", "peft=lora", f"paths.cache={cache}",
         f"hydra.run.dir={run_dir}", "trainer.max_steps=8", "trainer.enable_progress_bar=false"],
        cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    before, after = summary["heldout"]["before"], summary["heldout"]["after"]
    assert after["loss"] < before["loss"], (before, after)
    export = Path(summary["export_dir"])
    assert abs(evaluate_directory(export)["loss"] - after["loss"]) < 1e-4
    adapter = export.with_name(export.name + "_adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == ["experts.down_proj", "experts.gate_up_proj"]
    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(source), adapter)
    batch = {"input_ids": torch.arange(2, 18).reshape(2, 8)}
    merged = AutoModelForCausalLM.from_pretrained(export)
    torch.testing.assert_close(_eval_logits(loaded, batch), _eval_logits(merged, batch), atol=1e-5, rtol=0)
    # recipes.convert merges the LoRA of the strategy checkpoint offline, to the same weights.
    from safetensors.torch import load_file

    from lightning_mpipemoe.recipes.convert import convert_checkpoint

    converted = convert_checkpoint(summary["checkpoint"], tmp_path / "converted")
    def weights(directory: Path) -> dict:  # every shard of the directory (the run's export is sharded by EP rank)
        return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}

    exported, again = weights(export), weights(converted)
    assert exported and exported.keys() == again.keys() and all(torch.equal(exported[k], again[k]) for k in exported)


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"method": "qlora"}, "peft.method"),
        ({"method": "lora", "targets": "mlp", "r": 8, "alpha": 16}, "peft.targets"),
        ({"method": "lora", "targets": "all", "r": 0, "alpha": 16}, "peft.r"),
        ({"method": "lora", "targets": "all", "r": 8, "alpha": 16, "rank": 4}, "unknown keys"),
    ],
)
def test_bad_peft_section_is_refused(spec, message):
    from lightning_mpipemoe.hf_models.peft_lora import check_peft_spec

    with pytest.raises(ValueError, match=message):
        check_peft_spec(spec)
    assert check_peft_spec({"method": "none"}) is None


def test_presets_cover_attention_routed_and_shared_experts():
    """`apply_peft` (the recipe's presets) on Qwen2-MoE: attention projections, the fused routed
    experts and the shared expert's projections; the converted model equals plain peft."""
    from lightning_mpipemoe.hf_models.peft_lora import apply_peft

    spec = {"method": "lora", "targets": "all", "r": 2, "alpha": 4}
    torch.manual_seed(1)
    ref = apply_peft(tiny_model("qwen2_moe"), spec)
    config = ref.peft_config["default"]
    assert set(config.target_modules) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "shared_expert.gate_proj", "shared_expert.up_proj",
        "shared_expert.down_proj",
    }  # fmt: skip
    assert sorted(config.target_parameters) == ["experts.down_proj", "experts.gate_up_proj"]
    torch.manual_seed(1)
    ours = apply_peft(convert_model(tiny_model("qwen2_moe")), spec)  # LoRA after converting works too
    ours.load_state_dict(ref.state_dict())
    batch = tiny_batch("qwen2_moe")
    out_ref, out = ref(**batch, output_router_logits=True), ours(**batch, output_router_logits=True)
    torch.testing.assert_close(out.logits, out_ref.logits, atol=1e-5, rtol=0)
    out_ref.loss.backward()
    out.loss.backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert any("shared_expert.up_proj.lora_A" in n for n in grads)
    for name, p in ref.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=0, msg=lambda m: f"{name}: {m}")


def test_frozen_bf16_base_with_fp32_lora_locally():
    """The low-precision-base pattern the stack allows: bf16 frozen weights (experts included),
    fp32 LoRA weights (peft's autocast_adapter_dtype); equal to plain peft, gradients fp32."""
    def build():
        torch.manual_seed(1)
        return peft.get_peft_model(tiny_model("mixtral").to(torch.bfloat16), lora_config())

    ref, ours = build(), build()
    convert_model(ours.base_model.model)
    assert {p.dtype for p in ours.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in ours.parameters() if not p.requires_grad} == {torch.bfloat16}
    batch = tiny_batch("mixtral")
    out_ref, out = ref(**batch), ours(**batch)
    torch.testing.assert_close(out.logits, out_ref.logits, atol=1e-2, rtol=1e-2)
    out_ref.loss.backward()
    out.loss.backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    for name, p in ref.named_parameters():
        if p.requires_grad:
            assert grads[name].dtype == torch.float32, name
            torch.testing.assert_close(grads[name], p.grad, atol=1e-3, rtol=1e-2, msg=lambda m: f"{name}: {m}")


def _gpt_oss_lora_worker(rank: int, world_size: int) -> None:
    from lightning_mpipemoe import build_process_groups
    from lightning_mpipemoe.discovery import unpack_experts

    groups = build_process_groups(world_size)

    def build():
        torch.manual_seed(1)
        return peft.get_peft_model(tiny_model("gpt_oss"), peft.LoraConfig(
            r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=EXPERT_TARGETS,
            init_lora_weights=False))  # fmt: skip

    ref, ref_grads = build(), []
    for r in range(world_size):
        ref.zero_grad(set_to_none=True)
        out = ref(**tiny_batch("gpt_oss", seed=r), output_router_logits=True)
        out.loss.backward()
        ref_grads.append({n: p.grad.clone() for n, p in ref.named_parameters() if p.requires_grad})
        if r == rank:
            expected_logits = out.logits.detach()
    ours = build()
    convert_model(ours.base_model.model, groups)
    out = ours(**tiny_batch("gpt_oss", seed=rank), output_router_logits=True)
    torch.testing.assert_close(out.logits, expected_logits, atol=1e-5, rtol=0)
    out.loss.backward()
    local = 8 // world_size
    start = rank * local
    checked = 0
    for name, p in ours.named_parameters():
        if not p.requires_grad:
            continue
        if ".experts." in name:  # this rank's experts' LoRA: the sum over every rank's loss
            layout = "rows" if ".lora_A." in name else "columns"
            expected = unpack_experts(sum(g[name] for g in ref_grads), 8, layout)[start : start + local]
            got = unpack_experts(p.grad, local, layout)
            checked += 1
        else:
            expected, got = ref_grads[rank][name], p.grad
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0, msg=lambda m: f"rank {rank} {name}: {m}")
    assert checked == 8  # 2 layers x (gate_up, down) x (A, B)


def test_gpt_oss_lora_sharded_at_ep2():
    """LoRA on GPT-OSS's transposed experts at EP = 2: each rank's slice of A and B, logits and
    every LoRA gradient equal plain peft (expert LoRA: summed over both ranks' losses)."""
    from tests.dist_utils import run_distributed

    run_distributed(_gpt_oss_lora_worker, 2, timeout_s=120)
