"""Export from a live EP run without gathers: each EP rank writes its own experts into its
own safetensors file, global rank 0 the rest and one standard index; plain transformers
loads the directory and reproduces the logits of the unsharded model.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import lightning_mpipemoe  # noqa: F401  isort: skip
import pytest
import torch
from safetensors import safe_open

from lightning_mpipemoe import ExecutorConfig, build_process_groups, collectives
from lightning_mpipemoe.hf_models.api import convert_model, export_pretrained
from lightning_mpipemoe.hf_models.sharded_export import INDEX_FILE, write_safetensors
from tests.dist_utils import run_distributed
from tests.hf_tiny import is_seq2seq, tiny_batch, tiny_model

#: (family, save_original_format): per-expert keys written by their own rank; transformers'
#: fused layout (one [E, ...] tensor per parameter, gathered onto EP rank 0 one at a time).
CASES = (("mixtral", True), ("qwen3_moe", True), ("switch_transformers", True), ("mixtral", False))


def _export_worker(rank: int, world_size: int, root: str) -> None:
    root = Path(root)
    groups = build_process_groups(world_size)
    for family, original in CASES:
        name = f"{family}-{'original' if original else 'fused'}"
        reference = tiny_model(family).eval()  # same seed on both ranks: the unsharded model
        batch = tiny_batch(family, seed=3)
        if rank == 0:
            with torch.no_grad():
                torch.save(reference(**batch).logits, root / f"{name}.expected.pt")
        model = convert_model(tiny_model(family), groups, ExecutorConfig(num_partitions=2)).eval()
        with collectives.record_collectives() as calls:
            out = export_pretrained(model, root / name, groups, save_original_format=original)
        assert out == root / name
        gathers = [c for c in calls if c.op == "gather"]
        sharded = len(_sharded_keys(model))
        # Per-expert format: nothing gathered. Fused: one gather per expert parameter (recorded
        # once per tensor it touches: the shard, and on the receiving rank each piece).
        per_gather = 1 + world_size if rank == 0 else 1
        assert len(gathers) == (0 if original else sharded * per_gather), (name, calls)
        assert all(not c.mismatched for c in calls), calls
    # Two processes that each hold the whole model (plain DDP: no EP groups): rank 0 writes it.
    export_pretrained(convert_model(tiny_model("mixtral")).eval(), root / "replicated")


def _sharded_keys(model) -> dict:
    from lightning_mpipemoe.hf_models.api import sharded_expert_keys

    return sharded_expert_keys(model)


def test_two_rank_export_loads_with_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    run_distributed(_export_worker, 2, str(tmp_path), timeout_s=120)
    for family, original in CASES:
        name = f"{family}-{'original' if original else 'fused'}"
        out = tmp_path / name
        assert not list(tmp_path.glob(f".{name}.*")), "a temporary directory was left behind"
        index = json.loads((out / INDEX_FILE).read_text())
        files = sorted({*index["weight_map"].values()})
        expert_files = [f for f in files if f.startswith("model-ep")]
        if original:
            assert expert_files == ["model-ep00000-of-00002.safetensors", "model-ep00001-of-00002.safetensors"]
            # Each rank's file holds its own half of the experts, under global indices.
            held = []
            for file_name in expert_files:
                with safe_open(out / file_name, framework="pt") as handle:
                    held.append({_expert_index(key) for key in handle.keys()})
            num_experts = max(held[1]) + 1
            assert held == [set(range(num_experts // 2)), set(range(num_experts // 2, num_experts))], held
        else:
            assert expert_files == [] and "model-fused-experts.safetensors" in files
        total = 0
        for file_name in files:
            with safe_open(out / file_name, framework="pt") as handle:
                for key in handle.keys():
                    assert index["weight_map"][key] == file_name
                    piece = handle.get_slice(key)
                    total += _nbytes(piece)
        assert index["metadata"]["total_size"] == total
        cls = AutoModelForSeq2SeqLM if is_seq2seq(family) else AutoModelForCausalLM
        plain = cls.from_pretrained(out).eval()
        batch = tiny_batch(family, seed=3)
        with torch.no_grad():
            logits = plain(**batch).logits
        torch.testing.assert_close(logits, torch.load(tmp_path / f"{name}.expected.pt"), atol=1e-5, rtol=0)


    index = json.loads((tmp_path / "replicated" / INDEX_FILE).read_text())
    assert sorted({*index["weight_map"].values()}) == ["model-ep00000-of-00001.safetensors", "model-shared.safetensors"]
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "replicated").eval()
    batch = tiny_batch("mixtral", seed=3)
    with torch.no_grad():
        logits = plain(**batch).logits
    torch.testing.assert_close(logits, torch.load(tmp_path / "mixtral-original.expected.pt"), atol=1e-5, rtol=0)


def _expert_index(key: str) -> int:
    """The expert index of a per-expert key (`...experts.5.w1.weight`, `...experts.expert_5.wi.weight`)."""
    parts = key.split(".")
    at = parts.index("experts")
    return int(parts[at + 1].removeprefix("expert_"))


_SIZES = {"F32": 4, "BF16": 2, "F16": 2, "I64": 8, "F64": 8}


def _nbytes(piece) -> int:
    n = 1
    for size in piece.get_shape():
        n *= size
    return n * _SIZES[piece.get_dtype()]


def test_streaming_writer_round_trips_and_checks(tmp_path):
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.arange(7, dtype=torch.int64),
        "c": torch.randn(2, 2, dtype=torch.bfloat16).t(),  # not contiguous
        "d": torch.tensor(1.5),
    }
    groups = [
        ({k: (tuple(v.shape), v.dtype) for k, v in part.items()}, lambda part=part: part)
        for part in ({"a": tensors["a"], "b": tensors["b"]}, {"c": tensors["c"]}, {"d": tensors["d"]})
    ]
    size = write_safetensors(tmp_path / "x.safetensors", groups)
    assert size == 15 * 4 + 7 * 8 + 4 * 2 + 4
    from safetensors.torch import load_file

    loaded = load_file(tmp_path / "x.safetensors")
    assert set(loaded) == set(tensors)
    for key, value in tensors.items():
        assert torch.equal(loaded[key], value), key
    with pytest.raises(RuntimeError, match="declared"):
        write_safetensors(tmp_path / "y.safetensors", [({"a": ((3, 5), torch.float32)}, lambda: {"a": torch.ones(2)})])
    with pytest.raises(ValueError, match="cannot be written to safetensors"):
        write_safetensors(tmp_path / "z.safetensors", [({"q": ((1,), torch.complex64)}, lambda: {})])


# ------------------------------------------------------------------- checkpoint barrier timeout


def _group_timeout(group) -> timedelta:
    return group._get_backend(torch.device("cpu")).options._timeout


def _barrier_timeout_worker(rank: int, world_size: int) -> None:
    import time

    from lightning_mpipemoe.checkpointing import build_checkpoint_group, checkpoint_barrier

    groups = build_process_groups(2, timeout=timedelta(minutes=5))
    checkpoint = build_checkpoint_group(timedelta(minutes=60))
    # The collectives keep their fast failure; the checkpoint barriers have their own limit.
    assert _group_timeout(groups.ep) == timedelta(minutes=5)
    assert _group_timeout(checkpoint) == timedelta(minutes=60)
    if rank == 1:
        time.sleep(2)  # a slow writer
    with collectives.record_collectives() as calls:
        checkpoint_barrier(checkpoint, "test.slow_write")
    assert [(c.site, c.op, c.group_devices) for c in calls] == [("test.slow_write", "barrier", ("cpu",))]
    with pytest.raises(TypeError, match="positive datetime.timedelta"):
        build_checkpoint_group(timedelta(0))


def test_checkpoint_barriers_have_their_own_timeout():
    run_distributed(_barrier_timeout_worker, 2, timeout_s=60)
