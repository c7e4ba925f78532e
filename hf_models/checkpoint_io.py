"""Sharded loading from, and consolidated export to, Hugging Face checkpoint directories.

Loading (`load_sharded`): the model is built on the meta device, converted (so each experts
tensor already has this rank's `L = E / ep` rows), then materialised and filled from the
safetensors files. Expert tensors are read slice by slice with `safe_open(...).get_slice`:
this rank's rows of a fused `[E, ...]` tensor, or only this rank's per-expert tensors in the
original per-expert format (`experts.{i}.w1.weight`, `experts.expert_{i}.wi.weight`), which
transformers' own conversion mapping turns into the fused layout. A `LoadReport` counts the
bytes each rank asked the files for (safetensors memory-maps the files, so what the OS pages
in follows these slices).

Export, live (`export_pretrained`): each EP rank writes its own experts, global rank 0 the
rest and the index (`sharded_export.py`); no process holds more than its shard plus one
tensor. Offline (`export_from_state_dicts`, from checkpoint files in one process): expert
shards are concatenated along dim 0 in EP-rank order (`consolidate_state_dicts`), mapped back
to HF-native keys by the adapter, and written by transformers' own `save_pretrained` from a
meta-device skeleton of the unmodified model class. Both write into a temporary directory
that replaces the target only once complete.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
from collections import defaultdict
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from torch.distributed import ProcessGroup
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.core_model_loading import (
    Concatenate,
    MergeModulelist,
    WeightConverter,
    WeightRenaming,
    apply_renamings,
    rename_source_key,
)

from lightning_mpipemoe import collectives
from lightning_mpipemoe.atomic_dir import commit_directory, new_token, temporary_directory
from lightning_mpipemoe.config import ExecutorConfig
from lightning_mpipemoe.groups import MoEProcessGroups

from .registry import ADAPTER_ATTR, adapter_for, convert_model
from .sharded_export import export_sharded

__all__ = [
    "TOKENIZER_FILES",
    "LoadReport",
    "consolidate_state_dicts",
    "export_from_state_dicts",
    "export_pretrained",
    "gather_full_state_dict",
    "load_sharded",
    "to_hf_state_dict",
]

logger = logging.getLogger(__name__)

SOURCE_DIR_ATTR = "_mpipemoe_source_dir"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "chat_template.jinja", "chat_template.json",
)  # fmt: skip
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass
class LoadReport:
    """What one rank read from the checkpoint (bytes of the tensors and slices it requested).

    `checkpoint_bytes` / `checkpoint_expert_bytes` are the sizes of all the checkpoint tensors
    the model uses / of those that hold experts, for comparison.
    """

    bytes_read: int = 0
    expert_bytes_read: int = 0
    checkpoint_bytes: int = 0
    checkpoint_expert_bytes: int = 0
    files: list[str] = field(default_factory=list)

    @property
    def shared_bytes_read(self) -> int:
        return self.bytes_read - self.expert_bytes_read

    def summary(self) -> str:
        mib = 1 / 2**20
        return (
            f"read {self.bytes_read * mib:.3f} MiB = experts {self.expert_bytes_read * mib:.3f} MiB "
            f"(of {self.checkpoint_expert_bytes * mib:.3f}) + shared {self.shared_bytes_read * mib:.3f} MiB; "
            f"checkpoint {self.checkpoint_bytes * mib:.3f} MiB"
        )


# ----------------------------------------------------------------------------------------- loading


def _checkpoint_index(model_dir: Path) -> dict[str, Path]:
    """Checkpoint key -> safetensors file."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {key: model_dir / name for key, name in weight_map.items()}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors files in {model_dir} (only safetensors checkpoints are supported)")
    out = {}
    for path in files:
        with safe_open(path, framework="pt") as handle:
            out.update(dict.fromkeys(handle.keys(), path))
    return out


def _model_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    for name in config.architectures or ():
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    raise ValueError(
        f"cannot resolve a transformers class from config.architectures={config.architectures!r} "
        "(a config saved by save_pretrained names it); pass model_class="
    )


def _expert_regex(pattern: str) -> re.Pattern:
    """`experts.*.w1.weight` -> a regex whose group 1 is the expert index."""
    return re.compile(re.escape(pattern.removeprefix("^")).replace(r"\*", r"(\d+)"))


class _Reader:
    """Opens each file once; reads whole tensors or dim-0 slices and counts their bytes."""

    def __init__(self, index: Mapping[str, Path], stack: ExitStack, report: LoadReport) -> None:
        self.index, self.stack, self.report = index, stack, report
        self.handles: dict[Path, object] = {}

    def _slice(self, key: str):
        path = self.index[key]
        if path not in self.handles:
            self.handles[path] = self.stack.enter_context(safe_open(path, framework="pt", device="cpu"))
        return self.handles[path].get_slice(key)

    def nbytes(self, key: str) -> int:
        piece = self._slice(key)
        numel = 1
        for size in piece.get_shape():
            numel *= size
        return numel * _DTYPE_BYTES.get(piece.get_dtype(), 4)

    def read(self, key: str, rows: tuple[int, int] | None = None, expert: bool = False) -> torch.Tensor:
        piece = self._slice(key)
        tensor = piece[rows[0] : rows[1]] if rows is not None else piece[:]
        size = tensor.numel() * tensor.element_size()
        self.report.bytes_read += size
        if expert:
            self.report.expert_bytes_read += size
        return tensor


def _plan_sources(checkpoint_keys, transforms, model: PreTrainedModel, targets: Mapping[str, torch.Tensor]):
    """Target key -> (converter or None, {source pattern: [(expert index or None, checkpoint key)]})."""
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    plan: dict[str, tuple[WeightConverter | None, dict]] = {}
    unexpected = []
    for key in checkpoint_keys:
        target, pattern = rename_source_key(
            key, renamings, converters, base_model_prefix=model.base_model_prefix, meta_state_dict=targets
        )
        if target not in targets:
            unexpected.append(key)
            continue
        converter = index = None
        if pattern is not None:
            # The converter that matched (the first one, as in transformers' own loading).
            renamed = apply_renamings(key, renamings)
            converter = next(c for c in converters if c.rename_source_key(renamed)[1] is not None)
            found = _expert_regex(pattern).search(renamed)
            index = int(found.group(1)) if found else None
        entry = plan.setdefault(target, (converter, defaultdict(list)))
        entry[1][pattern].append((index, key))
    if unexpected:
        logger.warning("checkpoint keys not used by the model: %s", sorted(unexpected)[:20])
    return plan


def _single_source(target: str, sources: dict) -> str:
    keys = [key for entries in sources.values() for _, key in entries]
    if len(keys) != 1:
        raise ValueError(f"{target!r} is fed by several checkpoint tensors {keys} without a conversion rule")
    return keys[0]


def _apply_conversion(converter, collected: dict, target: str, model) -> torch.Tensor:
    """Run a transformers checkpoint conversion over the tensors read for `target`: its one result."""
    for op in converter.operations:
        collected = op.convert(
            collected,
            source_patterns=converter.source_patterns,
            target_patterns=converter.target_patterns,
            full_layer_name=target,
            model=model,
            config=model.config,
        )
    (tensor,) = collected.values()
    return tensor


def _read_expert_target(target, converter, sources, reader: _Reader, num_experts: int, rows, model) -> torch.Tensor:
    start, end = rows
    if converter is None:  # fused `[E, ...]` tensor: read this rank's rows only
        return reader.read(_single_source(target, sources), rows, expert=True)
    for op in converter.operations:
        ok = (isinstance(op, MergeModulelist) and op.dim == 0) or (isinstance(op, Concatenate) and op.dim >= 1)
        if not ok:
            raise ValueError(
                f"cannot read only this rank's experts of {target!r}: its checkpoint conversion uses {op!r}, "
                "which does not act expert by expert"
            )
    collected = {}
    for pattern in converter.source_patterns:
        if pattern not in sources:
            continue
        entries = sorted(sources[pattern], key=lambda item: -1 if item[0] is None else item[0])
        indices = [index for index, _ in entries]
        if indices != list(range(num_experts)):
            raise ValueError(
                f"checkpoint holds experts {indices} for {target!r} ({pattern}); expected 0..{num_experts - 1}"
            )
        collected[pattern] = [reader.read(key, expert=True) for index, key in entries if start <= index < end]
    return _apply_conversion(converter, collected, target, model)


def _read_full_target(target, converter, sources, reader: _Reader, model) -> torch.Tensor:
    if converter is None:
        return reader.read(_single_source(target, sources))
    collected = {}
    for pattern in converter.source_patterns:
        if pattern in sources:
            entries = sorted(sources[pattern], key=lambda item: -1 if item[0] is None else item[0])
            collected[pattern] = [reader.read(key) for _, key in entries]
    return _apply_conversion(converter, collected, target, model)


def load_sharded(
    model_dir: str | os.PathLike,
    groups: MoEProcessGroups | None = None,
    config: ExecutorConfig | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    model_class: type[PreTrainedModel] | None = None,
    report: LoadReport | None = None,
    track_stats: bool = True,
) -> PreTrainedModel:
    """Build a converted model from a local HF checkpoint dir, reading only this rank's experts.

    `model_class` defaults to `config.architectures[0]`; `dtype` to the checkpoint config's.
    Pass a `LoadReport` to get the bytes this rank read. Every EP rank calls this (it does not
    communicate).
    """
    model_dir = Path(model_dir)
    groups = groups or MoEProcessGroups.local()
    report = report if report is not None else LoadReport()
    hf_config = AutoConfig.from_pretrained(model_dir)
    cls = model_class or _model_class(hf_config)
    with torch.device("meta"):
        model = cls._from_config(hf_config, dtype=dtype) if dtype is not None else cls._from_config(hf_config)
    convert_model(model, groups, config, track_stats=track_stats)
    adapter = getattr(model, ADAPTER_ATTR)
    model.to_empty(device=device)
    targets = model.state_dict(keep_vars=True)
    sharded = adapter.sharded_keys(model)
    index = _checkpoint_index(model_dir)
    report.files = sorted({str(path) for path in index.values()})
    plan = _plan_sources(index, adapter.checkpoint_transforms(model), model, targets)
    loaded = set()
    with ExitStack() as stack:
        reader = _Reader(index, stack, report)
        for target, (converter, sources) in plan.items():
            for _, entries in sources.items():
                for _, key in entries:
                    size = reader.nbytes(key)
                    report.checkpoint_bytes += size
                    report.checkpoint_expert_bytes += size if target in sharded else 0
            param = targets[target]
            if target in sharded:
                local = param.shape[0]
                rows = (groups.ep_rank * local, (groups.ep_rank + 1) * local)
                value = _read_expert_target(target, converter, sources, reader, sharded[target], rows, model)
            else:
                value = _read_full_target(target, converter, sources, reader, model)
            with torch.no_grad():
                _assign_loaded(target, param, param, value, "model expects")
            loaded.add(target)
    _finish_loading(model, set(targets) - loaded)
    setattr(model, SOURCE_DIR_ATTR, str(model_dir))
    return model


def _assign_loaded(target: str, param: torch.Tensor, local: torch.Tensor, value: torch.Tensor, expects: str) -> None:
    """Copy a read checkpoint value into `local` (the parameter, or this rank's shard of it) after
    checking its shape, and mark `param` initialised for transformers (no re-init)."""
    if tuple(value.shape) != tuple(local.shape):
        raise ValueError(f"{target}: checkpoint gives shape {tuple(value.shape)}, {expects} {tuple(local.shape)}")
    local.copy_(value.to(local.dtype))
    param._is_hf_initialized = True


def _finish_loading(model: PreTrainedModel, missing: set[str]) -> None:
    """Tie weights and rebuild non-persistent buffers (RoPE tables) the way from_pretrained does."""
    tied = getattr(model, "all_tied_weights_keys", {}) or {}
    untied_missing = sorted(key for key in missing if key not in tied)
    if untied_missing:
        raise ValueError(f"checkpoint lacks {len(untied_missing)} tensors of the model: {untied_missing[:20]}")
    for module in model.modules():
        module._is_hf_initialized = False
    model.initialize_weights()
    model.tie_weights()


# ------------------------------------------------------------------------------------ consolidation


def consolidate_state_dicts(shards: Sequence[Mapping[str, torch.Tensor]], sharded_keys: Mapping[str, int]) -> dict:
    """One full state dict from per-EP-rank state dicts (in EP-rank order) or from one full one.

    Expert-sharded keys (`sharded_keys`: key -> global expert count) are concatenated along
    dim 0; every other key is taken from the first shard.
    """
    if not shards:
        raise ValueError("consolidate_state_dicts needs at least one state dict")
    full = {}
    for key, value in shards[0].items():
        if key not in sharded_keys:
            full[key] = value
            continue
        pieces = [shard[key] for shard in shards]
        merged = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)
        if merged.shape[0] != sharded_keys[key]:
            raise ValueError(
                f"{key}: {len(shards)} shard(s) give {merged.shape[0]} experts, the model has {sharded_keys[key]}"
            )
        full[key] = merged
    return full


def gather_full_state_dict(model: nn.Module, groups: MoEProcessGroups | None = None, *, dst_ep_rank: int = 0):
    """Collective over `groups.ep`: the full (consolidated) state dict on EP rank `dst_ep_rank`,
    None elsewhere. The whole model in one process: for tests and small models; exports use
    `export_pretrained`, where each rank writes its own experts. The expert tensors travel one
    parameter at a time and land on the CPU (the device holds one gathered parameter at most)."""
    groups = groups or MoEProcessGroups.local()
    adapter = getattr(model, ADAPTER_ATTR, None) or adapter_for(model)
    sharded = adapter.sharded_keys(model)
    local = {key: value.detach() for key, value in model.state_dict().items()}
    if groups.ep_size == 1:
        return consolidate_state_dicts([local], sharded)
    mine = groups.ep_rank == dst_ep_rank
    dst = dist.get_global_rank(groups.ep, dst_ep_rank)
    gathered = {}
    for key in sorted(sharded):
        shard = local[key].contiguous()
        pieces = [torch.empty_like(shard) for _ in range(groups.ep_size)] if mine else None
        collectives.gather(shard, pieces, dst=dst, group=groups.ep, site="checkpoint_io.gather_full_state_dict")
        if mine:
            gathered[key] = [piece.cpu() for piece in pieces]
            del pieces
    if not mine:
        return None
    shards = [
        {key: gathered[key][rank] if key in sharded else value for key, value in local.items()}
        for rank in range(groups.ep_size)
    ]
    return consolidate_state_dicts(shards, sharded)


def to_hf_state_dict(model: nn.Module, full_state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Converted-model keys -> the unmodified HF model's keys."""
    adapter = getattr(model, ADAPTER_ATTR, None) or adapter_for(model)
    return adapter.to_hf_state_dict(model, dict(full_state_dict))


# -------------------------------------------------------------------------------------------- export


def _clean_config(config: PretrainedConfig) -> PretrainedConfig:
    """A copy that names no mpipemoe implementation (plain transformers must load the export)."""
    clean = copy.deepcopy(config)
    clean._experts_implementation = None
    return clean


def _write_export(
    hf_config: PretrainedConfig,
    model_class: type[PreTrainedModel],
    hf_state_dict: dict,
    out_dir: Path,
    tokenizer_dir: str | os.PathLike | None,
    overwrite: bool,
    max_shard_size: str,
) -> Path:
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    token = new_token()
    tmp = temporary_directory(out_dir, token)
    try:
        floats = [v.dtype for v in hf_state_dict.values() if v.is_floating_point()]
        dtype = max(set(floats), key=floats.count) if floats else torch.float32
        with torch.device("meta"):
            skeleton = model_class._from_config(_clean_config(hf_config), dtype=dtype)
        skeleton.save_pretrained(tmp, state_dict=dict(hf_state_dict), max_shard_size=max_shard_size)
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                source = Path(tokenizer_dir) / name
                if source.is_file():
                    shutil.copy2(source, tmp / name)
        commit_directory(tmp, out_dir, token)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _hf_class_of(model: nn.Module) -> type[PreTrainedModel]:
    """The unmodified transformers class (conversion keeps the class; only submodules change)."""
    return type(model)


def export_pretrained(
    model: PreTrainedModel,
    out_dir: str | os.PathLike,
    groups: MoEProcessGroups | None = None,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    overwrite: bool = True,
    barrier_group: ProcessGroup | None = None,
    save_original_format: bool = True,
) -> Path:
    """Collective over every rank: write a directory that plain transformers loads
    (`from_pretrained`), each EP rank writing its own experts and global rank 0 the rest, the
    config and the index (`sharded_export.export_sharded`); no rank gathers the model.

    The tokenizer files of `tokenizer_dir` (default: the directory `load_sharded` read) are
    copied alongside. `barrier_group`: the group of the export's barriers (default the world;
    give it a generous timeout, e.g. `MPipeMoEStrategy.checkpoint_group`). `save_original_format`:
    as in transformers' `save_pretrained`. Returns `out_dir` (on every rank).
    """
    tokenizer_dir = tokenizer_dir if tokenizer_dir is not None else getattr(model, SOURCE_DIR_ATTR, None)
    floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
    dtype = max(set(floats), key=floats.count) if floats else torch.float32
    config = _clean_config(model.config)
    with torch.device("meta"):
        skeleton = _hf_class_of(model)._from_config(copy.deepcopy(config), dtype=dtype)
    return export_sharded(
        model,
        out_dir,
        groups,
        config=skeleton.config,
        skeleton=skeleton,
        tokenizer_dir=tokenizer_dir,
        overwrite=overwrite,
        barrier_group=barrier_group,
        tokenizer_files=TOKENIZER_FILES,
        save_original_format=save_original_format,
    )


def export_from_state_dicts(
    shards: Sequence[Mapping[str, torch.Tensor]],
    hf_config: PretrainedConfig,
    out_dir: str | os.PathLike,
    *,
    model_class: type[PreTrainedModel] | None = None,
    sharded_keys: Mapping[str, int] | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    overwrite: bool = True,
    max_shard_size: str = "5GB",
) -> Path:
    """Offline export from a full or per-EP-rank state dict of a converted model (no communication).

    `shards` are the converted model's state dicts in EP-rank order (one full one works too);
    `sharded_keys` defaults to what the adapter reports for `hf_config`'s model.
    """
    cls = model_class or _model_class(hf_config)
    with torch.device("meta"):
        template = convert_model(cls._from_config(copy.deepcopy(hf_config)), track_stats=False)
    keys = sharded_keys if sharded_keys is not None else getattr(template, ADAPTER_ATTR).sharded_keys(template)
    full = consolidate_state_dicts(shards, keys)
    hf_sd = to_hf_state_dict(template, full)
    return _write_export(hf_config, cls, hf_sd, Path(out_dir), tokenizer_dir, overwrite, max_shard_size)
