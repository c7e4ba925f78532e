"""Checkpoint integrity: the strategy records each file's size and SHA-256 when it saves; a
truncated, empty or altered file is an error naming that file on resume, in
`consolidate_checkpoint` and in `recipes.convert`; and no read runs a checkpoint's pickled code.

One in-process run (one rank, EP = 1, two steps) writes a real strategy checkpoint; each test
damages a copy of it.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from datetime import timedelta
from pathlib import Path

import lightning_mpipemoe  # noqa: F401  isort: skip
import lightning.pytorch as pl
import pytest
import torch

from lightning_mpipemoe.checkpointing import (
    INTEGRITY_SUFFIX,
    META_FILE,
    CheckpointIntegrityError,
    consolidate_checkpoint,
    read_checkpoint,
    record_files,
    shard_file,
    split_checkpoint,
    verify_checkpoint,
)
from lightning_mpipemoe.recipes.convert import main as convert_main
from lightning_mpipemoe.strategy import MPipeMoEStrategy
from tests.strategy_models import SaveAt, TinyMoELM, loader

SHARD = shard_file(0, 1)
#: Set by `Payload.__reduce__` when a load would run a checkpoint's own code.
EXECUTED: list[str] = []


def _mark(what: str) -> str:
    EXECUTED.append(what)
    return what


class Payload:
    """A pickled object whose unpickling calls a function: what weights_only loading refuses."""

    def __reduce__(self):
        return (_mark, ("the checkpoint's code ran",))


from tests.dist_utils import in_process_world as _in_process_world  # noqa: E402


def _trainer(root: Path, max_steps: int, callbacks=()) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root, callbacks=list(callbacks),
        strategy=MPipeMoEStrategy(expert_parallel_size=1, timeout=timedelta(seconds=60)),
    )  # fmt: skip


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("saved")
    with _in_process_world():
        _trainer(root, 2, [SaveAt({2: root / "step2.ckpt"})]).fit(TinyMoELM(), loader(4))
    return root / "step2.ckpt"


@pytest.fixture
def ckpt(saved, tmp_path) -> Path:
    """A fresh copy of the saved checkpoint, for a test to damage."""
    return Path(shutil.copytree(saved, tmp_path / "copy.ckpt"))


def _truncate(file: Path, size: int) -> None:
    with open(file, "r+b") as handle:
        handle.truncate(size)


def test_save_records_size_and_sha256_of_every_file(saved):
    for name in (META_FILE, SHARD):
        record = json.loads((saved / (name + INTEGRITY_SUFFIX)).read_text())
        data = (saved / name).read_bytes()
        assert record == {"file": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert verify_checkpoint(saved) == sorted([META_FILE, SHARD])
    # What the strategy writes needs no allow-listed type: weights_only loading reads it as it is.
    for name in (META_FILE, SHARD):
        assert torch.serialization.get_unsafe_globals_in_checkpoint(saved / name) == []


@pytest.mark.parametrize("damage", ["truncated", "empty", "altered", "missing"])
def test_damaged_shard_is_named_by_consolidate_and_convert(ckpt, tmp_path, capsys, damage):
    shard = ckpt / SHARD
    size = shard.stat().st_size
    if damage == "truncated":
        _truncate(shard, size // 2)
    elif damage == "empty":
        _truncate(shard, 0)
    elif damage == "altered":  # same size, one byte flipped in the middle
        data = bytearray(shard.read_bytes())
        data[size // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    else:
        shard.unlink()
    expected = {"truncated": "is truncated", "empty": "is empty", "altered": "SHA-256", "missing": "is missing"}[damage]
    with pytest.raises(CheckpointIntegrityError, match=expected) as error:
        consolidate_checkpoint(ckpt)
    assert str(shard) in str(error.value) and "restore the directory from a complete copy" in str(error.value)

    assert convert_main([str(ckpt), str(tmp_path / "hf")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mpipemoe-convert: error: ") and str(shard) in lines[0], lines
    assert expected in lines[0]
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("size", [0, 100])
def test_damaged_shard_without_records_still_names_the_file(ckpt, size):
    """A checkpoint from before records existed: torch's own read error, with the file named."""
    for record in ckpt.glob("*" + INTEGRITY_SUFFIX):
        record.unlink()
    _truncate(ckpt / SHARD, size)
    with pytest.raises(CheckpointIntegrityError, match="could not be read") as error:
        consolidate_checkpoint(ckpt)
    assert str(ckpt / SHARD) in str(error.value)


def test_resume_from_a_truncated_shard_names_the_file(ckpt, tmp_path):
    _truncate(ckpt / SHARD, (ckpt / SHARD).stat().st_size - 1)
    with _in_process_world(), pytest.raises(CheckpointIntegrityError, match="is truncated") as error:
        _trainer(tmp_path, 3).fit(TinyMoELM(), loader(4), ckpt_path=ckpt)
    assert str(ckpt / SHARD) in str(error.value)


def test_loading_never_runs_pickled_code(ckpt, tmp_path, capsys):
    """A meta.ckpt carrying an object whose unpickling calls a function (records rewritten, so
    only weights_only stands in the way): resume-style reads and convert both refuse it."""
    meta = torch.load(ckpt / META_FILE, weights_only=True)
    meta["hyper_parameters"]["payload"] = Payload()
    torch.save(meta, ckpt / META_FILE)
    record_files(ckpt, [META_FILE])
    EXECUTED.clear()
    with pytest.raises(CheckpointIntegrityError, match="weights_only") as error:
        read_checkpoint(ckpt, 1, 0)
    assert str(ckpt / META_FILE) in str(error.value)
    assert convert_main([str(ckpt), str(tmp_path / "hf")]) == 2
    assert "weights_only" in capsys.readouterr().err
    assert EXECUTED == [], "a checkpoint read ran pickled code"
    # The caller who trusts the file can still say so explicitly.
    read_checkpoint(ckpt, 1, 0, weights_only=False)
    assert EXECUTED == ["the checkpoint's code ran"]


def _write_ep2_checkpoint(path: Path) -> torch.Tensor:
    """A two-shard checkpoint (EP = 2, 4 experts) written the way the strategy writes one."""
    path.mkdir()
    weight_E2 = torch.arange(8.0).view(4, 2)
    for ep_rank in (0, 1):
        local = {"state_dict": {"experts.w": weight_E2[2 * ep_rank : 2 * ep_rank + 2], "bias": torch.ones(2)}}
        meta, shard = split_checkpoint(local, {"experts.w": 4}, ep_size=2, world_size=2, executor_state={})
        if ep_rank == 0:
            torch.save(meta, path / META_FILE)
        torch.save(shard, path / shard_file(ep_rank, 2))
    record_files(path, [META_FILE, shard_file(0, 2), shard_file(1, 2)])
    return weight_E2


@pytest.mark.parametrize("damage", ["truncated", "missing with its record"])
def test_every_rank_stops_alike_for_a_shard_only_another_rank_reads(tmp_path, damage):
    """EP rank 0 reads only shard 0; a damaged shard 1 must stop it too (else it would wait in
    the next collective for the rank that stopped)."""
    ckpt = tmp_path / "ep2.ckpt"
    weight_E2 = _write_ep2_checkpoint(ckpt)
    assert torch.equal(read_checkpoint(ckpt, 2, 0)["state_dict"]["experts.w"], weight_E2[:2])
    bad = ckpt / shard_file(1, 2)
    if damage == "truncated":
        _truncate(bad, 10)
    else:
        bad.unlink()
        (ckpt / (bad.name + INTEGRITY_SUFFIX)).unlink()
    for ep_rank in (0, 1):
        with pytest.raises(CheckpointIntegrityError, match=re.escape(str(bad))):
            read_checkpoint(ckpt, 2, ep_rank)


def test_truncated_meta_is_named(ckpt):
    _truncate(ckpt / META_FILE, 0)
    with pytest.raises(CheckpointIntegrityError, match=re.escape(f"{ckpt / META_FILE} is empty")):
        consolidate_checkpoint(ckpt)
