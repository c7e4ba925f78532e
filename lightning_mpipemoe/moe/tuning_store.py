"""Persistence of tuned decisions: a JSON file next to a checkpoint, and the fingerprint that
says when a saved decision still applies.

A resumed run should not pay for profiling again, but a decision is only as good as the
conditions it was measured under: the layer's shapes and dtype, the expert-parallel and
world sizes, the hardware (device model, or the simulated link standing in for it) and
the tuner's own settings (candidates, budget). All of them go into a fingerprint stored
with the state; a state whose fingerprint differs from the running layer's is dropped and
the layer re-tunes (`LayerTuner` logs which field changed).

The same per-layer state dicts travel inside Lightning checkpoints (the strategy's
`executor_state_dict()` hook); `save_tuning` / `load_tuning` are for runs without the
strategy, or to carry tuning between checkpoints of different runs.
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch

from lightning_mpipemoe.config import ExecutorConfig

__all__ = ["FORMAT_VERSION", "fingerprint", "fingerprint_diff", "hardware_name", "load_tuning", "save_tuning",
           "tuning_path"]

#: Version of the state layout; a state of another version is dropped (re-tuned), not misread.
FORMAT_VERSION = 1
_FILE_NAME = "mpipemoe_tuning.json"


class _Tunable(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_name(device: torch.device) -> str:
    """What the timings were measured on: the GPU model, or the CPU model and core count."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"{device.type}: {_cpu_model()} x{os.cpu_count()}"


def _json_number(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


def fingerprint(
    *,
    hidden: int,
    intermediate: int,
    gated: bool,
    local_experts: int,
    top_k: int,
    dtype: torch.dtype,
    ep_size: int,
    world_size: int,
    device: torch.device,
    config: ExecutorConfig,
) -> dict[str, Any]:
    """Everything a tuned decision depends on, as a JSON-ready dict (compared field by field)."""
    link = None
    if config.link is not None:
        link = {"latency_s": config.link.latency_s,
                "bandwidth_bytes_per_s": _json_number(config.link.bandwidth_bytes_per_s)}
    return {
        "hidden": hidden,
        "intermediate": intermediate,
        "gated": gated,
        "local_experts": local_experts,
        "top_k": top_k,
        "dtype": str(dtype).removeprefix("torch."),
        "ep_size": ep_size,
        "world_size": world_size,
        "hardware": hardware_name(device),
        "link": link,
        "num_partitions": config.num_partitions,
        "restore": config.restore,
        "candidates": list(config.candidate_set),
        "memory_budget": config.memory_budget,
    }


def fingerprint_diff(saved: Mapping[str, Any] | None, current: Mapping[str, Any]) -> str:
    """'' when they match, else which fields changed (for the re-tune log line)."""
    if saved is None:
        return "no fingerprint saved"
    changed = [f"{key} {saved.get(key)!r} -> {current.get(key)!r}"
               for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]
    return "; ".join(changed)


def tuning_path(checkpoint_path: str | os.PathLike) -> Path:
    """Where the tuning JSON of a checkpoint lives: inside a checkpoint directory, or beside a
    checkpoint file (`<file>.mpipemoe_tuning.json`)."""
    path = Path(checkpoint_path)
    if path.is_dir():
        return path / _FILE_NAME
    return path.with_name(f"{path.name}.{_FILE_NAME}")


def save_tuning(path: str | os.PathLike, tuners: Mapping[str, _Tunable]) -> Path:
    """Write every layer's tuner state to `path` (JSON, written to a temporary file then
    renamed, so a crash never leaves half a file). Tuner states are identical on every rank
    (every decision is agreed), so one rank writes."""
    path = Path(path)
    payload = {"format": FORMAT_VERSION, "layers": {name: tuner.state_dict() for name, tuner in tuners.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def load_tuning(path: str | os.PathLike, tuners: Mapping[str, _Tunable]) -> list[str]:
    """Give each tuner its saved state (checked against the running layer at its first call);
    returns the layers that had one. A missing file loads nothing; a malformed one is an error."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not a tuning file ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION or not isinstance(
        payload.get("layers"), dict
    ):
        raise ValueError(f"{path}: not a version-{FORMAT_VERSION} tuning file (keys {sorted(payload)[:5]})")
    loaded = []
    for name, tuner in tuners.items():
        state = payload["layers"].get(name)
        if state:
            tuner.load_state_dict(state)
            loaded.append(name)
    return loaded
