"""Export of a live expert-parallel model: every EP rank writes its own experts, nobody gathers.

Layout of the exported directory (standard Hugging Face sharded safetensors, which plain
`from_pretrained` loads):

    config.json, generation_config.json     global rank 0
    model-shared.safetensors                global rank 0: every non-expert tensor
    model-ep00001-of-00004.safetensors      EP rank 1 (of the first data-parallel replica):
                                            its own experts, under their global indices
    model.safetensors.index.json            global rank 0, from the ranks' index fragments

A model trained with `sharding="fsdp"` (DTensor parameters) is written one file per rank,
each with what that rank owns (`fsdp_export`), under the same index.

The expert tensors are written in the checkpoint format transformers saves (its own reversal
of the load-time conversion, `revert_weight_conversion`: fused `experts.gate_up_proj` back
to per-expert `experts.{i}.w1.weight` ...), renumbered from local to global expert indices.
Families whose saved format keeps experts fused (`[E, ...]` in one tensor, which one file
must hold whole) have those tensors gathered onto EP rank 0 one tensor at a time.

Memory: the files are written by a streaming safetensors writer, one tensor group at a time
(moved to the CPU, written, freed), so a rank holds its own shard plus the conversion of one
parameter (at most the largest tensor) and nothing else. The directory appears atomically
(`atomic_dir`): all ranks write into a temporary sibling that global rank 0 renames into
place after a barrier on `barrier_group` (give that group a generous timeout: writes of many
GB take longer than a collective should).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup
from transformers import PretrainedConfig, PreTrainedModel
from transformers.core_model_loading import WeightConverter, WeightRenaming, apply_renamings, revert_weight_conversion
from transformers.modeling_utils import remove_tied_weights_from_state_dict

from lightning_mpipemoe import collectives
from lightning_mpipemoe.atomic_dir import commit_directory, fsync_files, new_token, remove_stale, temporary_directory
from lightning_mpipemoe.groups import MoEProcessGroups

from .fsdp_export import has_dtensors, write_rank_file
from .registry import ADAPTER_ATTR, adapter_for

__all__ = ["INDEX_FILE", "export_sharded", "write_safetensors"]

INDEX_FILE = "model.safetensors.index.json"
SHARED_FILE = "model-shared.safetensors"
FUSED_FILE = "model-fused-experts.safetensors"
_FRAGMENT = ".index-part-{:05d}.json"

_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip

#: (name -> (shape, dtype) of each tensor it yields, a function that yields those tensors)
TensorGroup = tuple[dict[str, tuple[tuple[int, ...], torch.dtype]], Callable[[], Mapping[str, torch.Tensor]]]


def expert_file(ep_rank: int, ep_size: int) -> str:
    return f"model-ep{ep_rank:05d}-of-{ep_size:05d}.safetensors"


# ------------------------------------------------------------------------------ streaming writer


def write_safetensors(path: Path, groups: Iterable[TensorGroup], metadata: Mapping[str, str] | None = None) -> int:
    """Write a safetensors file group by group: the header first (from the declared shapes),
    then each group's tensors, produced on demand, moved to the CPU and written one at a
    time. Returns the bytes of tensor data."""
    groups = list(groups)
    header: dict = {}
    offset = 0
    for declared, _ in groups:
        for name, (shape, dtype) in declared.items():
            if dtype not in _ST_DTYPES:
                raise ValueError(f"{name}: dtype {dtype} cannot be written to safetensors (valid: {list(_ST_DTYPES)})")
            size = _numel(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
    header["__metadata__"] = dict(metadata or {"format": "pt"})
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % 64)  # the data starts 64-byte aligned (memory-mapped loads)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for declared, produce in groups:
            tensors = produce()
            if set(tensors) != set(declared):
                raise RuntimeError(f"{path.name}: produced {sorted(tensors)}, declared {sorted(declared)}")
            for name in declared:  # the header's order
                value = tensors[name].detach()
                want_shape, want_dtype = declared[name]
                if tuple(value.shape) != tuple(want_shape) or value.dtype != want_dtype:
                    raise RuntimeError(f"{name}: produced {tuple(value.shape)} {value.dtype}, declared {want_shape}")
                cpu = value.to("cpu").contiguous().reshape(-1)
                f.write(memoryview(cpu.view(torch.uint8).numpy()))
                del cpu, value
            del tensors
        f.flush()
    return offset


def _numel(shape) -> int:
    n = 1
    for size in shape:
        n *= int(size)
    return n


# ------------------------------------------------------------------------------- key conversion


def _meta(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in tensors.items()}


def _expert_index_patterns(adapter, model: nn.Module) -> tuple[list[re.Pattern], list]:
    """Regexes of the per-expert checkpoint keys (group 1: the expert index), and the renamings
    to apply before matching (as the loader does)."""
    transforms = adapter.checkpoint_transforms(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    patterns = []
    for transform in transforms:
        if isinstance(transform, WeightConverter):
            for source in transform.source_patterns:
                if "*" in source:
                    patterns.append(re.compile(re.escape(source.removeprefix("^")).replace(r"\*", r"(\d+)")))
    return patterns, renamings


def _global_name(name: str, offset: int, patterns: list[re.Pattern], renamings: list) -> str | None:
    """A reverted per-expert key with a local index -> the same key with the global index."""
    renamed = apply_renamings(name, renamings)
    for pattern in patterns:
        found = pattern.search(renamed)
        if found is None:
            continue
        local = int(found.group(1))
        tail = f"{local}{renamed[found.end(1):]}"
        if not name.endswith(tail):
            raise ValueError(f"cannot renumber the expert of {name!r}: its renamed form is {renamed!r}")
        return f"{name[: -len(tail)]}{local + offset}{renamed[found.end(1):]}"
    return None


class _Converter:
    """Converted-model tensors -> the saved checkpoint's tensors, one parameter at a time."""

    def __init__(self, model: PreTrainedModel, skeleton: PreTrainedModel, original_format: bool = True) -> None:
        self.model, self.skeleton, self.original_format = model, skeleton, original_format
        self.adapter = getattr(model, ADAPTER_ATTR, None) or adapter_for(model)
        self.patterns, self.renamings = _expert_index_patterns(self.adapter, model)

    def revert(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        hf = self.adapter.to_hf_state_dict(self.model, dict(tensors))
        return dict(revert_weight_conversion(self.skeleton, hf)) if self.original_format else hf

    def expert_group(self, key: str, local: torch.Tensor, offset: int) -> TensorGroup | None:
        """The per-expert tensors of one local expert parameter under global names; None when
        the saved format keeps them fused (no per-expert key)."""
        declared_local = self.revert(_meta({key: local}))
        names = {name: _global_name(name, offset, self.patterns, self.renamings) for name in declared_local}
        if any(v is None for v in names.values()):
            return None
        declared = {names[n]: (tuple(t.shape), t.dtype) for n, t in declared_local.items()}

        def produce() -> dict[str, torch.Tensor]:
            return {names[n]: t for n, t in self.revert({key: local}).items()}

        return declared, produce

    def dense_group(self, key: str, value: torch.Tensor) -> TensorGroup:
        declared = {n: (tuple(t.shape), t.dtype) for n, t in self.revert(_meta({key: value})).items()}
        return declared, lambda: self.revert({key: value})


# ------------------------------------------------------------------------------------- export


def _object_device(group: ProcessGroup | None) -> torch.device:
    served = collectives.group_device_types(group)
    if "cpu" in served:
        return torch.device("cpu")
    return torch.device(served[0], torch.cuda.current_device() if served[0] == "cuda" else None)


def _broadcast_token(group: ProcessGroup | None) -> str:
    token = new_token()
    if not dist.is_initialized():
        return token
    data = torch.tensor(list(token.encode()), dtype=torch.uint8, device=_object_device(group))
    collectives.broadcast(data, dist.get_global_rank(group, 0) if group is not None else 0, group=group,
                          site="export.token")  # fmt: skip
    return bytes(data.cpu().tolist()).decode()


def _barrier(group: ProcessGroup | None, site: str) -> None:
    if dist.is_initialized():
        collectives.barrier(group=group, site=site)


def export_sharded(
    model: PreTrainedModel,
    out_dir: str | os.PathLike,
    groups: MoEProcessGroups | None = None,
    *,
    config: PretrainedConfig,
    skeleton: PreTrainedModel,
    tokenizer_dir: str | os.PathLike | None = None,
    overwrite: bool = True,
    barrier_group: ProcessGroup | None = None,
    tokenizer_files: Iterable[str] = (),
    save_original_format: bool = True,
) -> Path:
    """Collective over every rank (`barrier_group`, default the world): write `out_dir` as
    described in the module docstring. `skeleton`: a meta-device model of the unmodified
    class (for transformers' reversal of its key conversions). `save_original_format`: as
    in `save_pretrained` (False keeps transformers' fused in-memory layout, whose expert
    tensors are then gathered one at a time). Returns `out_dir`."""
    groups = groups or MoEProcessGroups.local()
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
    rank = dist.get_rank() if dist.is_initialized() else 0
    token = _broadcast_token(barrier_group)
    tmp = temporary_directory(out_dir, token)
    if rank == 0:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(out_dir)
        tmp.mkdir()
    _barrier(barrier_group, "export.mkdir")
    try:
        converter = _Converter(model, skeleton, save_original_format)
        adapter = converter.adapter
        sharded = adapter.sharded_keys(model)
        local = {k: v.detach() for k, v in model.state_dict().items()}
        written: list[str] = []
        weight_map: dict[str, str] = {}
        total = 0
        if has_dtensors(local):  # sharding="fsdp": every rank writes what it owns (fsdp_export)
            written, weight_map, total = write_rank_file(tmp, converter, local, sharded, groups, skeleton)
        # One data-parallel replica writes the experts (with groups of one process on a larger
        # world, e.g. plain DDP, every rank holds all of them: rank 0 writes).
        elif groups.expert_dp_rank == 0 and (groups.ep_size > 1 or rank == 0):
            fused = []
            name = expert_file(groups.ep_rank, groups.ep_size)
            expert_groups = []
            for key in sorted(sharded):
                offset = groups.ep_rank * local[key].shape[0]
                group = converter.expert_group(key, local[key], offset)
                (expert_groups if group is not None else fused).append(group if group is not None else key)
            if expert_groups:
                total += write_safetensors(tmp / name, expert_groups)
                weight_map.update(dict.fromkeys((n for declared, _ in expert_groups for n in declared), name))
                written.append(name)
            if fused:
                total += _write_fused(tmp, converter, local, fused, groups, sharded, weight_map, written)
        if rank == 0 and not has_dtensors(local):
            dense = {k: v for k, v in local.items() if k not in sharded}
            dense = remove_tied_weights_from_state_dict(dense, skeleton)
            dense_groups = [converter.dense_group(k, v) for k, v in dense.items()]
            total += write_safetensors(tmp / SHARED_FILE, dense_groups)
            weight_map.update(dict.fromkeys((n for declared, _ in dense_groups for n in declared), SHARED_FILE))
            written.append(SHARED_FILE)
        if rank == 0:
            config.architectures = [type(skeleton).__name__]  # as save_pretrained records it
            config.save_pretrained(tmp)
            generation = getattr(model, "generation_config", None)
            if generation is not None and model.can_generate():
                generation.save_pretrained(tmp)
            if tokenizer_dir is not None:
                for file_name in tokenizer_files:
                    source = Path(tokenizer_dir) / file_name
                    if source.is_file():
                        shutil.copy2(source, tmp / file_name)
        fragment = _FRAGMENT.format(rank)
        (tmp / fragment).write_text(json.dumps({"total_size": total, "weight_map": weight_map}))
        fsync_files(tmp, written + [fragment])
        _barrier(barrier_group, "export.written")
        if rank == 0:
            _write_index(tmp)
            commit_directory(tmp, out_dir, token)
        _barrier(barrier_group, "export.committed")
    finally:
        if rank == 0 and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _write_fused(tmp, converter, local, keys, groups, sharded, weight_map, written) -> int:
    """Experts the saved format keeps fused: gathered onto EP rank 0 one parameter at a time
    (collective over `groups.ep`, in the same key order on every EP rank)."""
    mine = groups.ep_rank == 0
    groups_out = []
    for key in keys:
        shard = local[key].contiguous()
        full_shape = (sharded[key], *shard.shape[1:])

        def gathered(key=key, shard=shard) -> torch.Tensor:
            if groups.ep_size == 1:
                return shard
            pieces = [torch.empty_like(shard) for _ in range(groups.ep_size)] if mine else None
            collectives.gather(shard, pieces, dst=dist.get_global_rank(groups.ep, 0), group=groups.ep,
                               site="export.fused_experts")  # fmt: skip
            return torch.cat([piece.cpu() for piece in pieces]) if mine else None

        if not mine:
            gathered()
            continue
        declared = {
            n: (tuple(t.shape), t.dtype)
            for n, t in converter.revert({key: torch.empty(full_shape, dtype=shard.dtype, device="meta")}).items()
        }
        groups_out.append((declared, lambda key=key, gathered=gathered: converter.revert({key: gathered()})))
    if not mine:
        return 0
    size = write_safetensors(tmp / FUSED_FILE, groups_out)
    weight_map.update(dict.fromkeys((n for declared, _ in groups_out for n in declared), FUSED_FILE))
    written.append(FUSED_FILE)
    return size


def _write_index(tmp: Path) -> None:
    weight_map: dict[str, str] = {}
    total = 0
    for fragment in sorted(tmp.glob(".index-part-*.json")):
        part = json.loads(fragment.read_text())
        clash = set(part["weight_map"]) & set(weight_map)
        if clash:
            raise RuntimeError(f"export: tensors written by two ranks: {sorted(clash)[:5]}")
        weight_map.update(part["weight_map"])
        total += part["total_size"]
        fragment.unlink()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    fsync_files(tmp, [INDEX_FILE])
