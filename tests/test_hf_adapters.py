"""Hugging Face MoE adapters in one process (EP = 1): equivalence, registration, errors, I/O.

The distributed versions (EP = 2 and 4, the round trip, bytes read) are in
test_hf_distributed.py.
"""

from __future__ import annotations

import copy
from unittest import mock

import lightning_mpipemoe  # noqa: F401  isort: skip  (first: registers "mpipemoe"; see tests/hf_tiny.py)
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GptOssConfig, LlamaConfig
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from lightning_mpipemoe import ExecutorConfig
from lightning_mpipemoe.hf_models.api import (
    EXPERTS_IMPLEMENTATION,
    LoadReport,
    UnsupportedExpertsLayout,
    UnsupportedModelError,
    adapter_for,
    consolidate_state_dicts,
    convert_model,
    covered_model_types,
    export_from_state_dicts,
    export_pretrained,
    load_sharded,
    routing_stats,
    to_hf_state_dict,
)
from lightning_mpipemoe.hf_models import checkpoint_io
from lightning_mpipemoe.hf_models.lightning_modules import routing_metrics
from lightning_mpipemoe.hf_models.experts_interface import BINDING_ATTR
from tests.hf_tiny import FAMILIES, check_against_hf, comparable_outputs, is_seq2seq, tiny_batch, tiny_model


@pytest.mark.parametrize("num_partitions", [1, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_hf_locally(family, num_partitions):
    """Logits, loss, router losses and every gradient equal the unmodified model (EP = 1)."""
    check_against_hf(family, config=ExecutorConfig(num_partitions=num_partitions))


@pytest.mark.parametrize("capacity", [1, 2, 3])
def test_switch_capacity_drops_match_hf_token_by_token(capacity):
    """The executor drops exactly the (token, expert) slots HF's Top1 router masks out."""
    batch = tiny_batch("switch_transformers", batch_size=3, seq_len=12)
    ref = tiny_model("switch_transformers", expert_capacity=capacity).eval()
    model = convert_model(tiny_model("switch_transformers", expert_capacity=capacity)).eval()
    outputs: dict[str, list] = {"ref": [], "ours": []}
    for tag, net in (("ref", ref), ("ours", model)):
        for name, module in net.named_modules():
            if name.endswith("layer.1.mlp") or name.endswith("layer.2.mlp"):
                if hasattr(module, "router"):
                    module.register_forward_hook(lambda m, i, o, tag=tag: outputs[tag].append(o.detach()))
    with torch.no_grad():
        logits_ref, logits = ref(**batch).logits, model(**batch).logits
    torch.testing.assert_close(logits, logits_ref, atol=1e-5, rtol=0)
    assert len(outputs["ref"]) == len(outputs["ours"]) == 2  # one sparse MLP per stack
    dropped = 0
    for out_ref, out in zip(outputs["ref"], outputs["ours"]):
        dropped_ref = (out_ref == 0).all(-1)
        assert torch.equal((out == 0).all(-1), dropped_ref)
        torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=0)
        dropped += int(dropped_ref.sum())
    assert dropped == sum(s.dropped for s in routing_stats(model).values()) > 0


@pytest.mark.parametrize("family", ["mixtral", "switch_transformers"])
def test_router_jitter_stays_hf(family):
    """Jitter is HF's own code: same RNG draws, same result."""
    check_against_hf(family, jitter_seed=11, router_jitter_noise=0.2)


@pytest.mark.parametrize("family", ["qwen2_moe", "switch_transformers"])
def test_gradient_checkpointing_and_frozen_experts_locally(family):
    check_against_hf(family, config=ExecutorConfig(num_partitions=4), gradient_checkpointing=True)
    check_against_hf(family, frozen_experts=True)


@pytest.mark.parametrize("restore", ["s1", "s2", "s3", "s4"])
def test_memory_reuse_strategies_locally(restore):
    check_against_hf("olmoe", config=ExecutorConfig(num_partitions=4, restore=restore))
    check_against_hf("switch_transformers", config=ExecutorConfig(num_partitions=2, restore=restore))


def test_switch_expert_dropout():
    """Dropout inside Switch experts trains on every path (the pipeline replays the mask in
    backward: tests/test_pipeline.py checks the gradients); "auto" tunes it like any layer."""
    model = convert_model(tiny_model("switch_transformers", dropout_rate=0.1)).train()
    batch = tiny_batch("switch_transformers")
    model(**batch).loss.backward()
    model.eval()
    ref = tiny_model("switch_transformers", dropout_rate=0.1).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, ref(**batch).logits, atol=1e-5, rtol=0)

    def train_step(net, seed):
        torch.manual_seed(seed)
        net.zero_grad()
        loss = net(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    for config in (ExecutorConfig(num_partitions=2, restore="s4"), ExecutorConfig()):
        pipelined = convert_model(copy.deepcopy(model), config=config).train()
        loss, grads = train_step(pipelined, seed=3)
        assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads.values())
        assert not torch.equal(loss, train_step(pipelined, seed=4)[0])  # dropout is active
    bindings = [getattr(m, BINDING_ATTR) for m in pipelined.modules() if hasattr(m, "router") and hasattr(m, BINDING_ATTR)]
    assert len(bindings) == 2 and all(b.tuner.profile_calls > 0 for b in bindings)  # profiled, not sent to n = 1


def _experts_module(kind: str):
    from transformers import BeamConfig, NemotronHConfig
    from transformers.models.beam.modeling_beam import BeamExperts
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts

    if kind == "custom_gate":  # Beam: its own _apply_gate (activation in fp32)
        return BeamExperts(BeamConfig(hidden_size=16, moe_intermediate_size=12, num_experts=4, hidden_act="silu"))
    config = NemotronHConfig(hidden_size=16, moe_intermediate_size=12, n_routed_experts=4, mlp_hidden_act="relu2")
    return NemotronHExperts(config)  # no gate: up_proj [E, I, H]


@pytest.mark.parametrize("kind", ["custom_gate", "no_gate"])
def test_experts_module_variants(kind):
    """The experts-interface path for a custom `_apply_gate` and for gate-less (up_proj) experts."""
    torch.manual_seed(0)
    ref = _experts_module(kind)
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ref.config._experts_implementation = "grouped_mm"
    ours = copy.deepcopy(ref)
    ours.config = copy.deepcopy(ref.config)
    ours.config._experts_implementation = EXPERTS_IMPLEMENTATION
    hidden = torch.randn(10, 16, requires_grad=True)
    index = torch.randint(0, 4, (10, 2))
    weights = torch.rand(10, 2, requires_grad=True)
    outs = []
    for module in (ref, ours):
        h, w = hidden.detach().clone().requires_grad_(), weights.detach().clone().requires_grad_()
        out = module(h, index, w)
        out.pow(2).sum().backward()
        outs.append((out, h.grad, w.grad, [p.grad for p in module.parameters()]))
    for a, b in zip(outs[0][:3], outs[1][:3]):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    for a, b in zip(outs[0][3], outs[1][3]):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_registered_with_transformers(tmp_path):
    """`import lightning_mpipemoe` registers "mpipemoe"; both HF switches reach the executor."""
    assert EXPERTS_IMPLEMENTATION in ALL_EXPERTS_FUNCTIONS
    ref = tiny_model("mixtral").eval()
    ref.save_pretrained(tmp_path)
    batch = tiny_batch("mixtral")
    with torch.no_grad():
        expected = ref(**batch).logits

        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation=EXPERTS_IMPLEMENTATION).eval()
        assert loaded.config._experts_implementation == EXPERTS_IMPLEMENTATION
        switched = copy.deepcopy(ref)
        switched.set_experts_implementation(EXPERTS_IMPLEMENTATION)
        for model in (loaded, switched):
            with mock.patch(
                "lightning_mpipemoe.hf_models.experts_interface.expert_parallel_forward",
                wraps=lightning_mpipemoe.hf_models.experts_interface.expert_parallel_forward,
            ) as spy:
                torch.testing.assert_close(model(**batch).logits, expected, atol=1e-5, rtol=0)
            assert spy.call_count == ref.config.num_hidden_layers


def test_unbound_module_runs_locally_with_default_config():
    ref = tiny_model("olmoe").eval()
    model = copy.deepcopy(ref)
    model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    batch = tiny_batch("olmoe")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, ref(**batch).logits, atol=1e-5, rtol=0)


def test_uncovered_family_lists_covered_ones():
    with pytest.raises(UnsupportedModelError) as error:
        adapter_for(LlamaConfig())
    message = str(error.value)
    assert "'llama'" in message
    for model_type in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "switch_transformers"):
        assert model_type in message
    with pytest.raises(UnsupportedModelError, match="transposed"):
        adapter_for(AutoConfig.for_model("aria_text"))
    assert adapter_for(GptOssConfig()).name == "gpt_oss"
    assert {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "switch_transformers"} <= set(covered_model_types())


def test_covered_families_use_the_standard_experts_layout():
    """Every family the generic adapter claims decorates its experts with the standard layout
    (the families this transformers has: the list also names newer releases' families)."""
    from pathlib import Path

    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name

    from lightning_mpipemoe.hf_models.registry import MIXTRAL_STYLE_MODEL_TYPES

    models_dir = Path(transformers.__file__).parent / "models"
    present = [model_type for model_type in MIXTRAL_STYLE_MODEL_TYPES if model_type in CONFIG_MAPPING_NAMES]
    assert {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"} <= set(present), present
    for model_type in present:
        module = model_type_to_module_name(model_type)
        source = (models_dir / module / f"modeling_{module}.py").read_text()
        assert "@use_experts_implementation" in source, model_type
        for flag in ("is_transposed=True", "is_concatenated=False", "has_post_expert_norm=True"):
            assert flag not in source, (model_type, flag)
        assert adapter_for(transformers.AutoConfig.for_model(model_type)).name == "mixtral_style"


def test_unsupported_layout_is_rejected():
    model = tiny_model("mixtral")
    model.model.layers[0].mlp.experts.is_concatenated = False  # interleaved rows with the default (chunking) gate
    with pytest.raises(UnsupportedExpertsLayout, match="interleaves"):
        convert_model(model)


def test_reconvert_rebinds_but_refuses_another_layout():
    model = convert_model(tiny_model("qwen3_moe"), config=ExecutorConfig(num_partitions=2))
    convert_model(model, config=ExecutorConfig(num_partitions=4))
    bindings = [m._mpipemoe_binding for m in model.modules() if hasattr(m, "_mpipemoe_binding")]
    assert bindings and all(b.config.num_partitions == 4 for b in bindings)


def test_peft_lora_on_non_expert_layers():
    import peft

    ref = tiny_model("mixtral")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(3)
    ref_peft = peft.get_peft_model(copy.deepcopy(ref), lora)
    torch.manual_seed(3)
    ours = convert_model(peft.get_peft_model(copy.deepcopy(ref), lora))  # converting the wrapped model works too
    ours.load_state_dict(ref_peft.state_dict())
    batch = tiny_batch("mixtral")
    out_ref, out = ref_peft(**batch, output_router_logits=True), ours(**batch, output_router_logits=True)
    out_ref.loss.backward()
    out.loss.backward()
    torch.testing.assert_close(out.logits, out_ref.logits, atol=1e-5, rtol=0)
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    for name, p in ref_peft.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=0)


# bf16 weights and bf16 autocast: tests/test_bf16_tolerance.py (against fp32 at a derived tolerance).


def test_switch_state_dict_maps_back_to_hf_keys():
    ref = tiny_model("switch_transformers")
    model = convert_model(copy.deepcopy(ref))
    assert any(key.endswith("mlp.experts.wi") for key in model.state_dict())
    hf_sd = to_hf_state_dict(model, model.state_dict())
    ref_sd = ref.state_dict()
    assert set(hf_sd) == set(ref_sd)
    for key, value in ref_sd.items():
        assert torch.equal(hf_sd[key], value), key


def test_consolidation_of_rank_shards():
    """Per-rank state dicts (as EP ranks would hold them) consolidate into the full one."""
    for family in ("mixtral", "switch_transformers"):
        full_model = convert_model(tiny_model(family))
        full = full_model.state_dict()
        sharded = adapter_for(full_model).sharded_keys(full_model)
        assert sharded and all(full[key].shape[0] == n for key, n in sharded.items())
        shards = [{k: (v[r * 4 : (r + 1) * 4] if k in sharded else v) for k, v in full.items()} for r in range(2)]
        merged = consolidate_state_dicts(shards, sharded)
        assert all(torch.equal(merged[k], full[k]) for k in full)
        assert all(torch.equal(v, full[k]) for k, v in consolidate_state_dicts([full], sharded).items())
        with pytest.raises(ValueError, match="experts"):
            consolidate_state_dicts(shards[:1], sharded)


def _save_with_tokenizer(model, path, *, fused=False):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model.save_pretrained(path, save_original_format=not fused)
    vocab = {f"w{i}": i for i in range(64)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w0").save_pretrained(path)


@pytest.mark.parametrize("family,fused", [("qwen3_moe", False), ("mixtral", True), ("switch_transformers", False)])
def test_load_and_export_locally(tmp_path, family, fused):
    """load_sharded (per-expert or fused checkpoint, tied embeddings) and export_pretrained at EP = 1."""
    overrides = {"tie_word_embeddings": True} if family == "qwen3_moe" else {}
    ref = tiny_model(family, **overrides).eval()
    _save_with_tokenizer(ref, tmp_path / "src", fused=fused)
    report = LoadReport()
    model = load_sharded(tmp_path / "src", report=report).eval()
    assert report.bytes_read == report.checkpoint_bytes > report.checkpoint_expert_bytes == report.expert_bytes_read > 0
    batch = tiny_batch(family)
    with torch.no_grad():
        expected = ref(**batch).logits
        torch.testing.assert_close(model(**batch).logits, expected, atol=0, rtol=0)
    assert export_pretrained(model, tmp_path / "out") == tmp_path / "out"
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    cls = type(ref)
    plain = cls.from_pretrained(tmp_path / "out").eval()
    assert plain.config._experts_implementation != EXPERTS_IMPLEMENTATION
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, expected, atol=0, rtol=0)


def test_offline_export_from_rank_shards(tmp_path):
    model = convert_model(tiny_model("olmoe")).eval()
    full = model.state_dict()
    sharded = adapter_for(model).sharded_keys(model)
    shards = [{k: (v[r * 2 : (r + 1) * 2] if k in sharded else v) for k, v in full.items()} for r in range(4)]
    export_from_state_dicts(shards, model.config, tmp_path / "out", model_class=type(model))
    plain = type(model).from_pretrained(tmp_path / "out").eval()
    batch = tiny_batch("olmoe")
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, model(**batch).logits, atol=1e-5, rtol=0)


def test_export_never_clobbers_a_good_export(tmp_path):
    model = convert_model(tiny_model("mixtral"))
    out = tmp_path / "export"
    export_pretrained(model, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FileExistsError):
        export_pretrained(model, out, overwrite=False)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    (tokenizer_dir / "tokenizer.json").write_text("{}")
    with mock.patch.object(checkpoint_io.shutil, "copy2", side_effect=OSError("disk full")):
        with pytest.raises(OSError, match="disk full"):
            export_pretrained(model, out, tokenizer_dir=tokenizer_dir)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "tok"]  # no temporary left behind
    export_pretrained(model, out, tokenizer_dir=tokenizer_dir)
    assert (out / "tokenizer.json").read_text() == "{}"
    assert {p.name: p.read_bytes() for p in out.iterdir()}["model-shared.safetensors"] != before["model-shared.safetensors"]


@pytest.mark.parametrize("family", ["olmoe", "switch_transformers"])
def test_lightning_modules(family, tmp_path):
    """One Lightning fit step: the module's loss is HF's (LM loss + coef x router losses); metrics logged."""
    import lightning.pytorch as pl

    from lightning_mpipemoe.hf_models.api import MoECausalLMModule, MoESeq2SeqModule

    model = convert_model(tiny_model(family))
    cls = MoESeq2SeqModule if is_seq2seq(family) else MoECausalLMModule
    module = cls(model, learning_rate=1e-3, warmup_steps=2)
    batch = tiny_batch(family)
    ref = tiny_model(family).train()
    loss, parts = module.compute_loss(batch)
    out_ref = ref(**batch, output_router_logits=True)
    lm_only = ref(**batch).loss
    torch.testing.assert_close(loss, out_ref.loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(parts["lm_loss"], lm_only.detach(), atol=1e-5, rtol=0)
    expected_router = {k: v for k, v in comparable_outputs(out_ref).items() if k not in ("loss", "logits")}
    assert expected_router
    if is_seq2seq(family):
        expected_z = expected_router["encoder_z_loss"] + expected_router["decoder_z_loss"]
        torch.testing.assert_close(parts["z_loss"], expected_z)
    else:
        torch.testing.assert_close(parts["aux_loss"], expected_router["aux_loss"])

    loader = torch.utils.data.DataLoader([{k: v[0] for k, v in batch.items()}] * 4, batch_size=2)
    trainer = pl.Trainer(
        max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, log_every_n_steps=1,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, loader, loader)
    metrics = trainer.callback_metrics
    for name in ("train/loss", "train/lm_loss", "train/aux_loss", "train/moe/load_imbalance", "val/loss"):
        assert name in metrics, sorted(metrics)
    if is_seq2seq(family):
        assert metrics["train/moe/dropped_fraction"] > 0
    assert routing_stats(model)
    # The summary of the last step's routing, against the same figures computed by hand.
    counts = [s.tokens_per_expert_E.tolist() for s in routing_stats(model).values() if s.tokens_per_expert_E is not None]
    dropped = sum(s.dropped for s in routing_stats(model).values())
    summary = {k: v.item() for k, v in routing_metrics(model).items()}
    assert summary["moe/load_imbalance"] == pytest.approx(sum(max(c) * len(c) / sum(c) for c in counts) / len(counts))
    assert summary["moe/experts_used"] == pytest.approx(sum(sum(x > 0 for x in c) / len(c) for c in counts) / len(counts))
    sent = sum(sum(c) for c in counts)
    assert summary["moe/dropped_fraction"] == pytest.approx(dropped / (sent + dropped))
