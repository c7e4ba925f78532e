"""Checkpoints of expert-parallel training: one directory, the replicated part once and the
expert shards of every EP rank, written atomically; loadable at any EP size.

Layout of a checkpoint `path` (a directory, e.g. `epoch=0-step=3.ckpt/`)::

    meta.ckpt                        global rank 0: Lightning's checkpoint (loops, callbacks,
                                     schedulers, hparams, ...) with the replicated weights and
                                     the replicated optimizer state, and a "mpipemoe" section:
                                     format version, EP size, expert keys with their global
                                     expert counts, executor (tuner) state per MoE layer
    experts-ep00000-of-00002.ckpt    EP rank 0 (written by its expert-dp rank 0): its expert
    experts-ep00001-of-00002.ckpt    shards and their optimizer state

Optimizer state is keyed by parameter name, not by position, so that it can be split by name
and re-sliced for another EP size: an expert's state tensors that have the shape of its
shard are cut along dim 0 like the weights; scalars (Adam's `step`) are shared.

Atomicity: every rank writes into `.{name}.tmp-{token}/` next to the target; after a barrier
global rank 0 renames it into place (an existing checkpoint of that name is first renamed
to `.{name}.old-{token}` and removed after). A crash before the rename leaves the previous
checkpoint as it was, and only a temporary directory behind (removed by the next save of
that name). The directory must be on a filesystem every rank sees (like any sharded
checkpoint), and local: renames on object stores are not atomic.

Integrity: the rank that writes a file also writes `<file>.integrity.json` beside it (its size
in bytes and SHA-256, `record_files`), so no rank reads another's shard at save time. Loading
first checks that every file exists with its recorded size (every rank alike, so that all ranks
stop together), then checks each file it reads against its SHA-256 before `torch.load` sees it
(`verify_file`); every read is `weights_only=True` unless the caller explicitly passes False.
A truncated, empty, missing or altered shard is an error naming the file and what to do, never
torch's generic zip or EOF error. Checkpoints written before records existed load unverified
(their read errors still name the file).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections.abc import Iterable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO
from torch import nn
from torch.distributed import ProcessGroup
from torch.optim import Optimizer

from lightning_mpipemoe import collectives
from lightning_mpipemoe.atomic_dir import fsync_files
from lightning_mpipemoe.groups import MoEProcessGroups

__all__ = [
    "DEFAULT_CHECKPOINT_TIMEOUT",
    "FORMAT_VERSION",
    "INTEGRITY_SUFFIX",
    "META_FILE",
    "SECTION",
    "CheckpointIntegrityError",
    "assemble_checkpoint",
    "build_checkpoint_group",
    "checkpoint_barrier",
    "consolidate_checkpoint",
    "expert_rows",
    "gather_full_state_dict",
    "is_mpipemoe_checkpoint",
    "needed_shards",
    "optimizer_state_by_index",
    "optimizer_state_by_name",
    "read_checkpoint",
    "record_files",
    "shard_file",
    "split_checkpoint",
    "verify_checkpoint",
    "verify_file",
]

FORMAT_VERSION = 1
META_FILE = "meta.ckpt"
SECTION = "mpipemoe"
#: How long a checkpoint barrier waits for the slowest writer (multi-GB shards on a shared
#: filesystem), apart from the short timeout that makes a dead peer end a collective soon.
DEFAULT_CHECKPOINT_TIMEOUT = timedelta(minutes=60)


def build_checkpoint_group(timeout: timedelta = DEFAULT_CHECKPOINT_TIMEOUT) -> ProcessGroup | None:
    """A group over the world for the barriers around checkpoint and export writes, with its
    own generous `timeout`. Gloo (host side): a barrier carries no tensor, and a gloo group's
    timeout is its own, whatever watchdog the device groups have. Collective: every rank calls
    it, once, at setup. None without torch.distributed."""
    if not isinstance(timeout, timedelta) or timeout.total_seconds() <= 0:
        raise TypeError(f"the checkpoint timeout must be a positive datetime.timedelta, got {timeout!r}")
    if not dist.is_available() or not dist.is_initialized():
        return None
    return dist.new_group(backend="gloo", timeout=timeout)


def checkpoint_barrier(group: ProcessGroup | None, site: str) -> None:
    """A barrier on the checkpoint group (`build_checkpoint_group`); nothing in one process."""
    if dist.is_available() and dist.is_initialized():
        collectives.barrier(group=group, site=site)


#: `<file><INTEGRITY_SUFFIX>`: the size and SHA-256 recorded when `<file>` was written.
INTEGRITY_SUFFIX = ".integrity.json"
_HASH_CHUNK_BYTES = 16 << 20


class CheckpointIntegrityError(ValueError):
    """A checkpoint file that is missing, damaged or not what the save wrote (names the file)."""


def shard_file(ep_rank: int, ep_size: int) -> str:
    return f"experts-ep{ep_rank:05d}-of-{ep_size:05d}.ckpt"


def expert_rows(num_experts: int, ep_size: int, ep_rank: int) -> tuple[int, int]:
    """`[start, end)` of the global experts that EP rank `ep_rank` of `ep_size` holds."""
    if num_experts % ep_size:
        raise ValueError(f"{num_experts} experts cannot be split over an EP size of {ep_size}")
    local = num_experts // ep_size
    return ep_rank * local, (ep_rank + 1) * local


# ------------------------------------------------------------------------------ optimizer state


def optimizer_state_by_name(optimizer: Optimizer, names: Mapping[int, str]) -> dict[str, Any]:
    """`optimizer.state_dict()` with parameter names (`names`: id(param) -> name) for indices."""
    state_dict = optimizer.state_dict()
    index_to_name: dict[int, str] = {}
    for group, saved in zip(optimizer.param_groups, state_dict["param_groups"]):
        for param, index in zip(group["params"], saved["params"]):
            if id(param) not in names:
                raise ValueError(
                    f"the optimizer holds a parameter of shape {tuple(param.shape)} that is not a parameter of the "
                    "LightningModule; the mpipemoe strategy saves optimizer state by parameter name"
                )
            index_to_name[index] = names[id(param)]
    return {
        "state": {index_to_name[index]: state for index, state in state_dict["state"].items()},
        "param_groups": [{**g, "params": [index_to_name[i] for i in g["params"]]} for g in state_dict["param_groups"]],
    }


def optimizer_state_by_index(
    named: Mapping[str, Any], optimizer: Optimizer, names: Mapping[int, str]
) -> dict[str, Any]:
    """The inverse of `optimizer_state_by_name` for `optimizer` (its parameters in its order)."""
    current = [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
    saved = [list(g["params"]) for g in named["param_groups"]]
    if current != saved:
        raise ValueError(
            "the checkpoint's optimizer holds other parameters than this optimizer "
            f"(checkpoint: {sum(map(len, saved))} in {len(saved)} groups, now: {sum(map(len, current))} in "
            f"{len(current)} groups); first difference: "
            f"{next((s, c) for s, c in zip(sum(saved, []) + [None], sum(current, []) + [None]) if s != c)}"
        )
    name_to_index = {name: index for index, name in enumerate(sum(current, []))}
    return {
        "state": {name_to_index[name]: state for name, state in named["state"].items()},
        "param_groups": [{**g, "params": [name_to_index[n] for n in g["params"]]} for g in named["param_groups"]],
    }


# ------------------------------------------------------------------------------ split / assemble


def split_checkpoint(
    checkpoint: Mapping[str, Any], expert_keys: Mapping[str, int], ep_size: int, world_size: int, executor_state: dict
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Lightning's checkpoint dict -> (meta for global rank 0, this EP rank's expert shard).

    `checkpoint["optimizer_states"]` must be name-keyed (`optimizer_state_by_name`).
    """
    state_dict = checkpoint["state_dict"]
    missing = sorted(k for k in expert_keys if k not in state_dict)
    if missing:
        raise KeyError(f"expert parameters missing from the LightningModule's state dict: {missing[:5]}")
    meta = dict(checkpoint)
    meta["state_dict"] = {k: v for k, v in state_dict.items() if k not in expert_keys}
    shard: dict[str, Any] = {
        "state_dict": {k: state_dict[k] for k in expert_keys},
        "param_shapes": {k: tuple(state_dict[k].shape) for k in expert_keys},
    }
    if "optimizer_states" in checkpoint:
        meta["optimizer_states"], shard["optimizer_states"] = [], []
        for named in checkpoint["optimizer_states"]:
            state = named["state"]
            replicated = {n: s for n, s in state.items() if n not in expert_keys}
            meta["optimizer_states"].append({"state": replicated, "param_groups": named["param_groups"]})
            shard["optimizer_states"].append({"state": {n: s for n, s in state.items() if n in expert_keys}})
    meta[SECTION] = {
        "format_version": FORMAT_VERSION,
        "ep_size": ep_size,
        "world_size": world_size,
        "expert_keys": dict(expert_keys),
        "executor_state": executor_state,
    }
    return meta, shard


def _covering(num_experts: int, old_ep_size: int, start: int, end: int) -> range:
    """The saved EP ranks whose shards hold global experts `[start, end)`."""
    old_local = num_experts // old_ep_size
    return range(start // old_local, (end - 1) // old_local + 1)


def needed_shards(expert_keys: Mapping[str, int], old_ep_size: int, new_ep_size: int, new_ep_rank: int) -> list[int]:
    """The EP ranks of the saved layout whose shard files hold experts of `new_ep_rank`."""
    ranks: set[int] = set()
    for num_experts in set(expert_keys.values()):
        ranks.update(_covering(num_experts, old_ep_size, *expert_rows(num_experts, new_ep_size, new_ep_rank)))
    return sorted(ranks)


def _take_rows(
    pieces: Mapping[int, torch.Tensor], num_experts: int, old_ep_size: int, start: int, end: int
) -> torch.Tensor:
    """Global expert rows `[start, end)` out of the saved shards `pieces` (saved rank -> tensor)."""
    old_local = num_experts // old_ep_size
    parts = []
    for rank in _covering(num_experts, old_ep_size, start, end):
        lo, hi = max(start, rank * old_local) - rank * old_local, min(end, (rank + 1) * old_local) - rank * old_local
        parts.append(pieces[rank][lo:hi])
    if len(parts) > 1:
        return torch.cat(parts)
    whole = hi - lo == old_local
    return parts[0] if whole else parts[0].clone()  # a slice would keep the other experts' storage alive


def _reshard_state(
    key: str, saved: Mapping[int, Mapping[str, Any]], num_experts: int, old_ep_size: int, rows: tuple[int, int]
) -> dict | None:
    """One expert parameter's optimizer state for expert rows `rows` from the saved shards:
    tensors shaped like the saved parameter shard are cut along dim 0, the rest (Adam's
    `step`) is shared. `saved`: saved EP rank -> shard file content."""
    per_rank = {r: saved[r]["optimizer_state"].get(key) for r in _covering(num_experts, old_ep_size, *rows)}
    present = {r: s for r, s in per_rank.items() if s is not None}
    if not present:
        return None
    if len(present) != len(per_rank):
        raise ValueError(
            f"optimizer state of {key!r} is saved by EP ranks {sorted(present)} only, needed {sorted(per_rank)}"
        )
    first = min(present)
    shard_shape = tuple(saved[first]["param_shapes"][key])
    out = {}
    for name, value in present[first].items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) == shard_shape:
            out[name] = _take_rows({r: s[name] for r, s in present.items()}, num_experts, old_ep_size, *rows)
        else:
            out[name] = value
    return out


def assemble_checkpoint(
    meta: Mapping[str, Any], shards: Mapping[int, Mapping[str, Any]], ep_size: int, ep_rank: int
) -> dict:
    """The checkpoint dict of EP rank `ep_rank` of `ep_size` from the saved meta and the shard
    files it needs (`needed_shards`), at any saved EP size; optimizer state stays name-keyed."""
    info = meta[SECTION]
    old_ep_size, expert_keys = info["ep_size"], info["expert_keys"]
    checkpoint = dict(meta)
    state_dict = dict(meta["state_dict"])
    for key, num_experts in expert_keys.items():
        rows = expert_rows(num_experts, ep_size, ep_rank)
        pieces = {r: shards[r]["state_dict"][key] for r in _covering(num_experts, old_ep_size, *rows)}
        state_dict[key] = _take_rows(pieces, num_experts, old_ep_size, *rows)
    checkpoint["state_dict"] = state_dict
    if "optimizer_states" in meta:
        optimizer_states = []
        for index, named in enumerate(meta["optimizer_states"]):
            state = dict(named["state"])
            saved = {
                r: {"optimizer_state": shard["optimizer_states"][index]["state"], "param_shapes": shard["param_shapes"]}
                for r, shard in shards.items()
            }
            for key, num_experts in expert_keys.items():
                rows = expert_rows(num_experts, ep_size, ep_rank)
                resharded = _reshard_state(key, saved, num_experts, old_ep_size, rows)
                if resharded is not None:
                    state[key] = resharded
            optimizer_states.append({"state": state, "param_groups": named["param_groups"]})
        checkpoint["optimizer_states"] = optimizer_states
    return checkpoint


# ---------------------------------------------------------------------------------- integrity


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def record_files(directory: str | os.PathLike, names: Iterable[str]) -> None:
    """Record the size and SHA-256 of each freshly written file `directory/name` in
    `name + INTEGRITY_SUFFIX`, then fsync the files and their records. Called by the rank that
    wrote the files (each rank hashes only what it wrote)."""
    directory, names = Path(directory), list(names)
    records = []
    for name in names:
        file = directory / name
        record = {"file": name, "bytes": file.stat().st_size, "sha256": _sha256(file)}
        (directory / (name + INTEGRITY_SUFFIX)).write_text(json.dumps(record) + "\n")
        records.append(name + INTEGRITY_SUFFIX)
    fsync_files(directory, names + records)


_WHAT_TO_DO = (
    "the checkpoint is damaged (an interrupted copy or a failing disk?): restore the directory from a "
    "complete copy, or resume from another checkpoint"
)


def verify_file(file: str | os.PathLike, *, checksum: bool = True) -> bool:
    """Check `file` against the record written with it (its size; also its SHA-256 unless
    `checksum=False`); False when it has no record (a checkpoint from before records existed).
    Raises `CheckpointIntegrityError` naming the file."""
    file = Path(file)
    record_file = file.with_name(file.name + INTEGRITY_SUFFIX)
    if not record_file.is_file():
        if not file.is_file():
            raise CheckpointIntegrityError(f"{file} is missing; {_WHAT_TO_DO}")
        return False
    try:
        record = json.loads(record_file.read_text())
        expected_bytes, expected_sha = int(record["bytes"]), str(record["sha256"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointIntegrityError(
            f"{record_file} is not a valid integrity record ({exc}); {_WHAT_TO_DO}"
        ) from None
    if not file.is_file():
        raise CheckpointIntegrityError(f"{file} is missing (the save wrote {expected_bytes} bytes); {_WHAT_TO_DO}")
    size = file.stat().st_size
    if size != expected_bytes:
        what = "empty" if size == 0 else ("truncated" if size < expected_bytes else "longer than saved")
        raise CheckpointIntegrityError(
            f"{file} is {what}: {size} bytes, the save wrote {expected_bytes}; {_WHAT_TO_DO}"
        )
    if checksum and _sha256(file) != expected_sha:
        raise CheckpointIntegrityError(
            f"{file} does not match its SHA-256 recorded at save time (same size, different content); {_WHAT_TO_DO}"
        )
    return True


def verify_checkpoint(path: str | os.PathLike) -> list[str]:
    """Verify every file of a checkpoint directory that has a record (plus meta.ckpt); returns
    the names verified. Raises `CheckpointIntegrityError` naming the first bad file."""
    path = Path(path)
    if not is_mpipemoe_checkpoint(path):
        raise _missing_checkpoint_error(path)
    names = sorted({META_FILE} | {p.name[: -len(INTEGRITY_SUFFIX)] for p in path.glob("*" + INTEGRITY_SUFFIX)})
    return [name for name in names if verify_file(path / name)]


def _check_presence_and_sizes(path: Path, ep_size: int | None = None) -> None:
    """Every recorded file (and, given the saved EP size, every expert shard) exists with its
    recorded size. Cheap (no file is read) and the same on every rank: a truncated, empty or
    missing file stops all ranks alike before any loads, instead of one rank raising while the
    others wait in the next collective. (A same-size alteration is caught by the checksum of
    the ranks that read the file.)"""
    names = {p.name[: -len(INTEGRITY_SUFFIX)] for p in path.glob("*" + INTEGRITY_SUFFIX)}
    if ep_size is not None:
        names |= {shard_file(r, ep_size) for r in range(ep_size)}
    for name in sorted(names):
        verify_file(path / name, checksum=False)


def _load_file(io: CheckpointIO, file: Path, weights_only: bool | None) -> Any:
    """`file` verified against its record, then loaded (`weights_only=True` unless the caller
    explicitly passed False); a file torch cannot read is an error naming it."""
    verify_file(file)
    try:
        return io.load_checkpoint(file, weights_only=True if weights_only is None else weights_only)
    except pickle.UnpicklingError as exc:
        if "weights_only" not in str(exc) and "Weights only" not in str(exc):
            raise CheckpointIntegrityError(f"{file} could not be read ({exc}); {_WHAT_TO_DO}") from exc
        raise CheckpointIntegrityError(
            f"{file} holds pickled objects that weights_only loading refuses to construct "
            f"({' '.join(str(exc).split())[:300]}). Loading never runs a checkpoint's own code: save plain "
            "containers (e.g. hyper-parameters as dicts, not OmegaConf objects), or, for a checkpoint you trust, "
            "load it with weights_only=False"
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise CheckpointIntegrityError(f"{file} is missing; {_WHAT_TO_DO}") from exc
        raise CheckpointIntegrityError(
            f"{file} could not be read ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); {_WHAT_TO_DO}"
        ) from exc


# -------------------------------------------------------------------------------------- files


def is_mpipemoe_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / META_FILE).is_file()


def _missing_checkpoint_error(path: Path) -> FileNotFoundError:
    leftovers = sorted(p.name for p in path.parent.glob(f".{path.name}.old-*")) if path.parent.is_dir() else []
    hint = (
        f"; a save was interrupted between its two renames: the previous checkpoint is {leftovers[-1]!r} in "
        f"{str(path.parent)!r} (rename it to {path.name!r})"
        if leftovers
        else ""
    )
    return FileNotFoundError(f"no mpipemoe checkpoint at {str(path)!r} (expected a directory with {META_FILE}){hint}")


def read_checkpoint(
    path: str | os.PathLike,
    ep_size: int,
    ep_rank: int,
    checkpoint_io: CheckpointIO | None = None,
    weights_only: bool | None = None,
) -> dict:
    """Read what EP rank `ep_rank` of `ep_size` needs from a checkpoint directory (any saved EP
    size). Each file is verified against its integrity record first and read with
    `weights_only=True` (None means True here; only an explicit False loads arbitrary pickles)."""
    path = Path(path)
    if not is_mpipemoe_checkpoint(path):
        raise _missing_checkpoint_error(path)
    io = checkpoint_io or TorchCheckpointIO()
    _check_presence_and_sizes(path)
    meta = _load_file(io, path / META_FILE, weights_only)
    info = meta.get(SECTION, {})
    if info.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: mpipemoe checkpoint format {info.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    old_ep_size = info["ep_size"]
    _check_presence_and_sizes(path, old_ep_size)
    shards = {
        r: _load_file(io, path / shard_file(r, old_ep_size), weights_only)
        for r in needed_shards(info["expert_keys"], old_ep_size, ep_size, ep_rank)
    }
    return assemble_checkpoint(meta, shards, ep_size, ep_rank)


def consolidate_checkpoint(
    path: str | os.PathLike,
    *,
    prefix: str | None = None,
    checkpoint_io: CheckpointIO | None = None,
    weights_only: bool | None = None,
) -> dict[str, torch.Tensor]:
    """One full state dict (every expert, replicated part once) from a checkpoint directory,
    offline (no process group). `prefix` keeps only keys under it, with the prefix removed:
    `consolidate_checkpoint(ckpt, prefix="model.")` gives a wrapped Hugging Face model's
    (converted) state dict, which `hf_models.export_from_state_dicts([sd], config, out_dir)`
    writes as a plain transformers checkpoint."""
    state_dict = read_checkpoint(path, 1, 0, checkpoint_io, weights_only)["state_dict"]
    if prefix is None:
        return state_dict
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


# ------------------------------------------------------------------------------------ live gather


def gather_full_state_dict(
    module: nn.Module,
    expert_keys: Mapping[str, int],
    groups: MoEProcessGroups,
    dst_ep_rank: int = 0,
    device: torch.device | None = None,
    local: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor] | None:
    """Collective over `groups.ep`: `module`'s state dict with every expert (concatenated in
    EP-rank order) on EP rank `dst_ep_rank`; None on the other ranks. `device`: where the
    shards travel (the backend's device; the module may have been moved to the CPU).

    The whole model in one process (the spawn launcher hands it to the main process; tests):
    the experts travel one parameter at a time and land on the CPU at once, so the device
    holds one gathered parameter at most. Exports do not gather (`hf_models.export_pretrained`).
    `local`: this rank's state dict to use instead of `module.state_dict()` (FSDP: its DTensors
    gathered over their meshes, `fsdp.full_state_dict`)."""
    local = {k: v.detach() for k, v in (module.state_dict() if local is None else local).items()}
    if groups.ep_size == 1 or not expert_keys:
        return local
    mine = groups.ep_rank == dst_ep_rank
    dst = dist.get_global_rank(groups.ep, dst_ep_rank)
    for key in sorted(expert_keys):
        shard = local[key].to(device or local[key].device).contiguous()
        pieces = [torch.empty_like(shard) for _ in range(groups.ep_size)] if mine else None
        collectives.gather(shard, pieces, dst=dst, group=groups.ep, site="checkpointing.gather_full_state_dict")
        del shard
        if mine:
            local[key] = torch.cat([piece.cpu() for piece in pieces])
            del pieces
    return local if mine else None
