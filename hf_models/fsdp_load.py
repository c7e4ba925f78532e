"""Loading a Hugging Face checkpoint straight into FSDP2 shards (`sharding="fsdp"`): every rank
reads only the slices of the safetensors files it owns, and no rank builds the full model.

`load_fsdp` builds the model on the meta device, converts it (experts sharded over EP),
`fully_shard`s it (`fsdp.shard_model`: experts over expert_dp, the rest over the world),
allocates the local shards only (`to_empty`) and fills each from the checkpoint:

- an expert parameter (`[E/ep, ...]` sharded on dim 0 over expert_dp): the experts
  `expert_offset .. + local` of the checkpoint's per-expert tensors (or rows of a fused one),
  converted as transformers converts them (`checkpoint_io._read_expert_target`);
- a dense parameter (sharded on dim 0 over the world): its rows of the checkpoint tensor, read
  as a slice when the tensor maps to the parameter one to one; a parameter built by a
  conversion from several tensors is read whole, converted, and cut (one tensor at a time);
- anything else (plain buffers): read whole.

Non-persistent buffers (RoPE tables) are rebuilt and tied weights tied as `from_pretrained` does.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor
from transformers import AutoConfig, PreTrainedModel

from lightning_mpipemoe.config import ExecutorConfig
from lightning_mpipemoe.groups import MoEProcessGroups

from .checkpoint_io import (
    SOURCE_DIR_ATTR,
    LoadReport,
    _checkpoint_index,
    _assign_loaded,
    _finish_loading,
    _model_class,
    _plan_sources,
    _read_expert_target,
    _read_full_target,
    _Reader,
    _single_source,
)
from .fsdp_export import expert_offset
from .registry import ADAPTER_ATTR, convert_model

__all__ = ["dense_rows", "load_fsdp"]


def dense_rows(param: DTensor) -> tuple[int, int]:
    """The dim-0 rows [start, end) of `param`'s global tensor that this rank holds (FSDP2's
    Shard(0): torch.chunk over the mesh, the last ranks short or empty)."""
    (placement,) = param.placements
    if not placement.is_shard(0):
        raise ValueError(f"expected a dim-0 sharded DTensor, got placements {param.placements}")
    mesh = param.device_mesh
    n, parts = int(param.shape[0]), mesh.size()
    chunk = -(-n // parts)
    start = min(mesh.get_local_rank() * chunk, n)
    return start, start + int(param.to_local().shape[0])


def load_fsdp(
    model_dir: str | os.PathLike,
    groups: MoEProcessGroups,
    config: ExecutorConfig | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    mp_policy=None,
    report: LoadReport | None = None,
) -> PreTrainedModel:
    """Collective (the meshes): a converted, `fully_shard`ed model with its shards read from the
    Hugging Face checkpoint directory `model_dir` (see the module docstring)."""
    from lightning_mpipemoe.fsdp import shard_model

    model_dir, device = Path(model_dir), torch.device(device)
    report = report if report is not None else LoadReport()
    hf_config = AutoConfig.from_pretrained(model_dir)
    cls = _model_class(hf_config)
    with torch.device("meta"):
        model = cls._from_config(hf_config, dtype=dtype) if dtype is not None else cls._from_config(hf_config)
    convert_model(model, groups, config, track_stats=False)
    adapter = getattr(model, ADAPTER_ATTR)
    sharded = adapter.sharded_keys(model)
    shard_model(model, sharded, groups, device.type, mp_policy)
    model.to_empty(device=device)
    targets = model.state_dict(keep_vars=True)
    index = _checkpoint_index(model_dir)
    report.files = sorted({str(path) for path in index.values()})
    plan = _plan_sources(index, adapter.checkpoint_transforms(model), model, targets)
    loaded = set()
    with ExitStack() as stack, torch.no_grad():
        reader = _Reader(index, stack, report)
        for target, (converter, sources) in plan.items():
            for entries in sources.values():
                for _, key in entries:
                    size = reader.nbytes(key)
                    report.checkpoint_bytes += size
                    report.checkpoint_expert_bytes += size if target in sharded else 0
            param = targets[target]
            local = param.to_local() if isinstance(param, DTensor) else param
            if target in sharded:
                start = expert_offset(param, groups)
                rows = (start, start + local.shape[0])
                value = _read_expert_target(target, converter, sources, reader, sharded[target], rows, model)
            elif isinstance(param, DTensor):
                start, end = dense_rows(param)
                if converter is None:  # one checkpoint tensor: read this rank's rows only
                    value = reader.read(_single_source(target, sources), (start, end))
                else:
                    value = _read_full_target(target, converter, sources, reader, model)[start:end]
            else:
                value = _read_full_target(target, converter, sources, reader, model)
            _assign_loaded(target, param, local, value, "this rank's shard is")
            loaded.add(target)
    _finish_loading(model, set(targets) - loaded)
    setattr(model, SOURCE_DIR_ATTR, str(model_dir))
    return model
