"""Hugging Face MoE models on the executor over gloo: EP = 2 and 4, round trip, bytes read.

One spawn per world size runs many checks (each spawn costs seconds). EP rank r feeds batch
r; the unmodified model is the reference (see `tests.hf_tiny.check_against_hf`).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from lightning_mpipemoe import ExecutorConfig, build_process_groups
from lightning_mpipemoe.grad_sync import reduce_expert_gradients
from tests.dist_utils import run_distributed
from tests.hf_tiny import FAMILIES, check_against_hf, is_seq2seq, tiny_batch, tiny_model

ROUND_TRIP_FAMILIES = FAMILIES
TRAIN_STEPS = 3
LR = 0.2


def train_batch(family: str, step: int, rank: int) -> dict:
    return tiny_batch(family, seed=100 * step + rank)


def single_process_training(family: str, src: Path):
    """The reference of the EP = 2 round trip: one process, the plain model from `src`, the
    same optimizer, each step on the mean of the two ranks' losses (what DDP's averaging and
    the expert-gradient reduction give)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    model = (AutoModelForSeq2SeqLM if is_seq2seq(family) else AutoModelForCausalLM).from_pretrained(src)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    for step in range(TRAIN_STEPS):
        loss = sum(model(**train_batch(family, step, r), output_router_logits=True).loss for r in range(2)) / 2
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model.eval()


def _equivalence_worker(rank: int, world_size: int, extra: bool) -> None:
    groups = build_process_groups(world_size)
    for family in FAMILIES:
        for n in (1, 4):
            check_against_hf(family, groups, ExecutorConfig(num_partitions=n))
    if not extra:
        return
    # Gradient checkpointing: the executor's collectives replay during recomputation.
    for family in FAMILIES:
        check_against_hf(family, groups, ExecutorConfig(num_partitions=4), gradient_checkpointing=True)
    reentrant = {"use_reentrant": True}
    check_against_hf("mixtral", groups, ExecutorConfig(num_partitions=2), gradient_checkpointing=reentrant)
    for restore in ("s2", "s4"):  # memory reuse that re-communicates T_DI in backward
        check_against_hf("olmoe", groups, ExecutorConfig(num_partitions=4, restore=restore))
        check_against_hf("switch_transformers", groups, ExecutorConfig(4, restore), gradient_checkpointing=True)
    check_against_hf("switch_transformers", groups, frozen_experts=True)
    check_against_hf("qwen2_moe", groups, frozen_experts=True, gradient_checkpointing=True)
    check_against_hf("switch_transformers", groups, jitter_seed=5, router_jitter_noise=0.2)
    # bf16 weights: every MoE layer against Hugging Face's fp32 module on the inputs it received
    # (tolerance from bf16's unit roundoff: tests/bf16_check.py).
    from lightning_mpipemoe.hf_models.api import convert_model
    from tests.test_bf16_tolerance import check_layers_against_hf

    batch = tiny_batch("mixtral", seed=rank)
    for family in ("mixtral", "switch_transformers"):
        reference = tiny_model(family).to(torch.bfloat16).float()
        converted = convert_model(copy.deepcopy(reference).to(torch.bfloat16), groups, ExecutorConfig(2))
        check_layers_against_hf(converted, reference, tiny_batch(family, seed=rank), groups=groups)
    model = convert_model(tiny_model("mixtral").to(torch.bfloat16), groups)
    out = model(**batch)
    # A converted model deep-copies (process groups are shared, not copied).
    clone = copy.deepcopy(model)
    with torch.no_grad():
        torch.testing.assert_close(clone(**batch).logits, out.logits.detach(), atol=0, rtol=0)


@pytest.mark.parametrize("world_size", [2, 4])
def test_matches_hf_expert_parallel(world_size):
    """Logits, loss, aux/z losses and all gradients equal the unmodified model at EP = 2, 4; n in {1, 4}.

    At EP = 2 also: gradient checkpointing (non-reentrant and reentrant), memory-reuse
    restore strategies, frozen experts, Switch jitter, bf16 weights, deep copy.
    """
    run_distributed(_equivalence_worker, world_size, world_size == 2, timeout_s=120)


def _round_trip_worker(rank: int, world_size: int, root: str) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from lightning_mpipemoe.hf_models.api import LoadReport, export_pretrained, load_sharded, sharded_expert_keys

    root = Path(root)
    groups = build_process_groups(world_size)
    reports = {}
    for family in ROUND_TRIP_FAMILIES:
        src = root / "src" / family
        report = LoadReport()
        model = load_sharded(src, groups, ExecutorConfig(num_partitions=2), report=report)
        reports[family] = {
            "bytes_read": report.bytes_read,
            "expert_bytes_read": report.expert_bytes_read,
            "shared_bytes_read": report.shared_bytes_read,
            "checkpoint_bytes": report.checkpoint_bytes,
            "checkpoint_expert_bytes": report.checkpoint_expert_bytes,
        }
        # Exactly this rank's half of the experts, all of the rest.
        assert report.expert_bytes_read * world_size == report.checkpoint_expert_bytes
        assert report.shared_bytes_read == report.checkpoint_bytes - report.checkpoint_expert_bytes

        plain_cls = AutoModelForSeq2SeqLM if is_seq2seq(family) else AutoModelForCausalLM
        plain = plain_cls.from_pretrained(src).eval()
        model.eval()
        batch = tiny_batch(family, seed=rank)
        with torch.no_grad():
            torch.testing.assert_close(model(**batch).logits, plain(**batch).logits, atol=1e-5, rtol=0)

        # Training as the Lightning strategy does it: DDP for the replicated part (the experts
        # ignored by it), `reduce_expert_gradients` for the expert shards. SGD with momentum: a
        # wrong scale of the expert gradients shows (Adam would mostly hide it).
        model.train()
        sharded = sharded_expert_keys(model)
        named = dict(model.named_parameters())
        experts = [named[k] for k in sorted(sharded) if named[k].requires_grad]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sorted(sharded))
        ddp = DistributedDataParallel(model, find_unused_parameters=True)
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
        for step in range(TRAIN_STEPS):
            loss = ddp(**train_batch(family, step, rank), output_router_logits=True).loss
            loss.backward()
            reduce_expert_gradients(experts, groups)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        model.eval()
        eval_batch = torch.load(root / "eval" / f"{family}.pt")
        with torch.no_grad():
            trained_logits = model(**eval_batch).logits
        out = export_pretrained(model, root / "out" / family, groups)
        if rank == 0:
            assert out == root / "out" / family
            torch.save(trained_logits, root / "trained" / f"{family}.pt")
    (root / "bytes" / f"rank{rank}.json").write_text(json.dumps(reports))


def _save_source(family: str, path: Path, *, fused: bool = False) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tiny_model(family).save_pretrained(path, save_original_format=not fused)
    tok = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(64)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w0").save_pretrained(path)


# Loads every export with plain transformers, in a fresh interpreter that never imports
# lightning_mpipemoe, and writes the logits for the parent to compare.
_PLAIN_LOAD = textwrap.dedent(
    """
    import sys, torch
    from pathlib import Path
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
    root = Path(sys.argv[1])
    for family in sys.argv[2:]:
        cls = AutoModelForSeq2SeqLM if family == "switch_transformers" else AutoModelForCausalLM
        model = cls.from_pretrained(root / "out" / family).eval()
        with torch.no_grad():
            logits = model(**torch.load(root / "eval" / f"{family}.pt")).logits
        torch.save(logits, root / "plain" / f"{family}.pt")
        tok = AutoTokenizer.from_pretrained(root / "out" / family)
        assert tok("w3 w5 w7")["input_ids"] == [3, 5, 7], tok("w3 w5 w7")
    assert not any(name.startswith("lightning_mpipemoe") for name in sys.modules), "imported lightning_mpipemoe"
    """
)


def test_round_trip_at_ep2(tmp_path, capsys):
    """HF dir -> sharded load at EP = 2 -> 3 steps -> export -> plain from_pretrained gives the trained logits,
    and the weights of one process training the plain model on both ranks' batches.

    Also checks (and prints) the bytes each rank read: its half of the experts plus the rest.
    """
    for sub in ("src", "eval", "out", "trained", "plain", "bytes"):
        (tmp_path / sub).mkdir()
    for family in ROUND_TRIP_FAMILIES:
        # Mixtral from a fused checkpoint (dim-0 slices), the others from HF's per-expert format.
        _save_source(family, tmp_path / "src" / family, fused=family == "mixtral")
        batch = tiny_batch(family, seed=7)
        batch.pop("labels")
        if is_seq2seq(family):
            batch["decoder_input_ids"] = tiny_batch(family, seed=8)["input_ids"]
        torch.save(batch, tmp_path / "eval" / f"{family}.pt")

    run_distributed(_round_trip_worker, 2, str(tmp_path), timeout_s=120)

    # cwd outside the repository: its top-level `kernels/` folder would shadow HF's `kernels` package.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", _PLAIN_LOAD, str(tmp_path), *ROUND_TRIP_FAMILIES],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    for family in ROUND_TRIP_FAMILIES:
        trained = torch.load(tmp_path / "trained" / f"{family}.pt")
        plain = torch.load(tmp_path / "plain" / f"{family}.pt")
        eval_batch = torch.load(tmp_path / "eval" / f"{family}.pt")
        untrained = tiny_model(family).eval()
        reference = single_process_training(family, tmp_path / "src" / family)
        with torch.no_grad():
            before = untrained(**eval_batch).logits
            expected = reference(**eval_batch).logits
        assert (expected - before).abs().max() > 1e-2, f"{family}: training did not change the model"
        torch.testing.assert_close(plain, trained, atol=1e-5, rtol=0, msg=lambda m: f"{family}: {m}")
        # The exported weights are the single-process reference's (not merely changed).
        torch.testing.assert_close(trained, expected, atol=1e-4, rtol=0, msg=lambda m: f"{family} logits: {m}")
        cls = AutoModelForSeq2SeqLM if is_seq2seq(family) else AutoModelForCausalLM
        exported = cls.from_pretrained(tmp_path / "out" / family).state_dict()
        for name, value in reference.state_dict().items():
            torch.testing.assert_close(exported[name], value, atol=1e-5, rtol=0, msg=lambda m: f"{family} {name}: {m}")

    with capsys.disabled():
        print("\nbytes read per rank at EP = 2 (sharded load):")
        for rank in range(2):
            for family, b in json.loads((tmp_path / "bytes" / f"rank{rank}.json").read_text()).items():
                print(
                    f"  rank {rank} {family:20s} read {b['bytes_read']:8d} B = experts {b['expert_bytes_read']:7d} "
                    f"(of {b['checkpoint_expert_bytes']:7d}) + shared {b['shared_bytes_read']:7d}; "
                    f"checkpoint {b['checkpoint_bytes']:8d} B"
                )
