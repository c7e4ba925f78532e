"""The one documented configuration of the MoE executor."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

__all__ = ["AUTO", "DEFAULT_CANDIDATES", "RESTORE_STRATEGIES", "ExecutorConfig", "SimulatedLink", "budget_bytes",
           "executor_overrides", "for_placement"]

#: How backward gets back what buffer reuse overwrote (DESIGN.md §1.4): `none` keeps a copy
#: per partition (no reuse); s1 offloads T_DI and T_M; s2 re-communicates T_DI and offloads
#: T_M; s3 offloads T_DI and recomputes T_M; s4 re-communicates T_DI and recomputes T_M.
RESTORE_STRATEGIES = ("none", "s1", "s2", "s3", "s4")


@dataclass(frozen=True)
class SimulatedLink:
    """A slow link that every all-to-all of the executor also has to cross.

    On a 2-core machine gloo's own transfers spend the cores that expert compute needs, so
    overlap of communication with compute cannot show there. A simulated link makes each
    all-to-all finish no earlier than `latency_s + bytes / bandwidth_bytes_per_s` after it
    got the wire, by sleeping in `wait()`: a wait that holds no core, so compute issued in the
    meantime runs on. The wire model (one wire per rank, shared by dispatch and combine) is
    documented in `lightning_mpipemoe.moe.comm`.

    Args:
        latency_s: fixed cost of each all-to-all, in seconds (>= 0).
        bandwidth_bytes_per_s: bytes per second that one rank's wire carries (> 0, may be
            `math.inf` for a latency-only link).
    """

    latency_s: float = 0.0
    bandwidth_bytes_per_s: float = math.inf

    def __post_init__(self) -> None:
        for name in ("latency_s", "bandwidth_bytes_per_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise ValueError(f"SimulatedLink.{name} must be a number, got {value!r}")
        if self.latency_s < 0 or math.isinf(self.latency_s):
            raise ValueError(f"SimulatedLink.latency_s must be a finite number >= 0, got {self.latency_s!r}")
        if self.bandwidth_bytes_per_s <= 0:
            raise ValueError(
                f"SimulatedLink.bandwidth_bytes_per_s must be > 0 (math.inf for a latency-only link), "
                f"got {self.bandwidth_bytes_per_s!r}"
            )

    def transfer_seconds(self, num_bytes: int) -> float:
        """Time the wire is busy with `num_bytes` (latency excluded)."""
        return num_bytes / self.bandwidth_bytes_per_s


#: `num_partitions` / `restore` value that hands the choice to the layer's tuner.
AUTO = "auto"

#: The default bounded candidate set of the granularity tuner (DESIGN.md §1.2).
DEFAULT_CANDIDATES = (1, 2, 4, 8)


@dataclass(frozen=True)
class ExecutorConfig:
    """How one MoE layer call is executed.

    Args:
        num_partitions: `n`, the number of micro-partitions the tokens of a call are split
            into and pipelined (dispatch of i+1 and combine of i-1 overlap the experts of i),
            or "auto" (the default): the layer's `LayerTuner` picks n per token count from
            `candidates` by profiling real training calls (`lightning_mpipemoe.moe.tuner`).
        restore: one of `RESTORE_STRATEGIES`; anything but `none` shares the T_DI / T_M /
            T_DO buffers between partitions and rebuilds them for backward. "auto" (the
            default) takes `none` unless `memory_budget` excludes it, and otherwise the
            strategy the calibrated cost model of DESIGN.md §1.5 finds cheapest within the
            budget (`lightning_mpipemoe.moe.cost_model`).
        link: an optional `SimulatedLink` that every all-to-all also crosses (tests and
            benchmarks of the schedule on machines without a real slow link).
        memory_budget: what one MoE layer call may hold on the device for its backward
            (DESIGN.md §1.3's analytic model; on CPU what offload moves to the host counts
            too): an int number of bytes, or a float in (0, 1], a fraction of the device's
            memory (of physical RAM on CPU). Held bytes add up over the layers until the
            backward reaches them; a call's temporaries are freed when it returns (one
            layer's at a time) and are not part of it (`recipes.plan` reports them). Only
            the "auto" choices obey it; None (default) is no limit.
        candidates: the bounded set of n the tuner may pick (distinct positive ints); None
            (default): `DEFAULT_CANDIDATES`, narrowed to n = 1 for a layer the Lightning
            strategy runs where partitions cannot overlap anything (`for_placement`).

    An explicit `num_partitions=1, restore="none"` is the plain reference path, exactly as
    before; explicit values are never changed by a tuner. Without a tuner (a caller that
    passes none to `expert_parallel_forward`), "auto" means the untuned default: the
    smallest candidate and `none`.
    """

    num_partitions: int | str = AUTO
    restore: str = AUTO
    link: SimulatedLink | None = None
    memory_budget: int | float | None = None
    candidates: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        n = self.num_partitions
        if n != AUTO and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"num_partitions must be a positive int or 'auto', got {n!r}")
        if self.restore != AUTO and self.restore not in RESTORE_STRATEGIES:
            raise ValueError(f"restore={self.restore!r} is not 'auto' or one of {RESTORE_STRATEGIES}")
        if self.link is not None and not isinstance(self.link, SimulatedLink):
            raise TypeError(f"link must be a SimulatedLink or None, got {type(self.link).__name__}")
        _check_budget(self.memory_budget)
        candidates = self.candidates
        if candidates is None:
            return
        if isinstance(candidates, list):
            candidates = tuple(candidates)
            object.__setattr__(self, "candidates", candidates)
        if (
            not isinstance(candidates, tuple)
            or not candidates
            or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in candidates)
            or len(set(candidates)) != len(candidates)
        ):
            raise ValueError(f"candidates must be a non-empty tuple of distinct positive ints, got {self.candidates!r}")
        if len(candidates) > 16:
            raise ValueError(f"candidates holds {len(candidates)} values; the tuner profiles each, keep it to <= 16")
        object.__setattr__(self, "candidates", tuple(sorted(candidates)))

    @property
    def pipelined(self) -> bool:
        """Whether the call takes (for "auto": may take) the pipelined executor rather than the
        plain reference path."""
        return self.num_partitions != 1 or self.restore != "none"

    @property
    def candidate_set(self) -> tuple[int, ...]:
        """The n the tuner may pick (sorted): `candidates`, or the default set."""
        return self.candidates if self.candidates is not None else DEFAULT_CANDIDATES

    @property
    def tunes_partitions(self) -> bool:
        return self.num_partitions == AUTO

    @property
    def tunes_restore(self) -> bool:
        return self.restore == AUTO

    @property
    def is_auto(self) -> bool:
        """Whether a tuner chooses anything for this config."""
        return self.tunes_partitions or self.tunes_restore

    def resolved(self, num_partitions: int | None = None, restore: str | None = None) -> "ExecutorConfig":
        """A copy with "auto" replaced: by the given choices, else by the untuned default
        (smallest candidate, `none`)."""
        n = self.num_partitions if not self.tunes_partitions else (num_partitions or self.candidate_set[0])
        r = self.restore if not self.tunes_restore else (restore or "none")
        return replace(self, num_partitions=n, restore=r)


def _check_budget(budget) -> None:
    if budget is None:
        return
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise TypeError(f"memory_budget must be bytes (int), a fraction in (0, 1] (float) or None, got {budget!r}")
    if isinstance(budget, float) and (math.isnan(budget) or math.isinf(budget)):
        raise ValueError(f"memory_budget must be finite, got {budget!r}")
    if budget <= 0:
        raise ValueError(f"memory_budget must be > 0 (bytes, or a fraction in (0, 1] of device memory), got {budget!r}")
    if isinstance(budget, float) and budget > 1 and not budget.is_integer():
        raise ValueError(
            f"memory_budget={budget!r}: a float must be a fraction in (0, 1] of device memory or a whole number of "
            "bytes (e.g. 8e9)"
        )


def budget_bytes(budget: int | float | None, device_memory_bytes: int) -> int | None:
    """`memory_budget` in bytes: ints (and whole floats above 1) are bytes, floats in (0, 1] a
    fraction of `device_memory_bytes`."""
    _check_budget(budget)
    if budget is None:
        return None
    if isinstance(budget, float) and budget <= 1:
        return int(budget * device_memory_bytes)
    return int(budget)


def for_placement(config: ExecutorConfig, ep_size: int, device_type: str | None = None) -> ExecutorConfig:
    """`config` for a layer whose expert-parallel group has `ep_size` ranks on `device_type`.

    Micro-partitions pay off only where their all-to-alls overlap expert compute. One rank has
    no all-to-all; on CPU, gloo moves the bytes with the cores that compute (the overlap the
    cost model measures there is 0: the costs add, `cost_model`), unless a simulated link
    stands for a wire the CPU does not drive. There more partitions only add per-partition
    work, and what a call holds for its backward (what `memory_budget` bounds) does not shrink
    with n under reuse: "auto" n with the default candidates takes n = 1, and the tuner
    profiles nothing (the restore strategy is still chosen for a budget). A candidate set the
    config names is kept (e.g. to study the tuner there)."""
    no_overlap = ep_size == 1 or (device_type == "cpu" and config.link is None)
    if no_overlap and config.tunes_partitions and config.candidates is None:
        return replace(config, candidates=(DEFAULT_CANDIDATES[0],))
    return config


def executor_overrides(
    granularity: int | str | None = None,
    restore: str | None = None,
    simulated_link: SimulatedLink | Mapping[str, float] | None = None,
    memory_budget: int | float | None = None,
) -> dict[str, Any]:
    """The Lightning strategy's executor arguments as `ExecutorConfig` field overrides.

    The one place that maps them: `granularity` -> `num_partitions` (n), `restore` ->
    `restore`, `simulated_link` -> `link`, `memory_budget` -> `memory_budget`. None leaves
    the field as the layer has it. Checked now, with the argument's name in the message,
    rather than at the first forward.
    """
    overrides: dict[str, Any] = {}
    if granularity is not None:
        fixed = isinstance(granularity, int) and not isinstance(granularity, bool) and granularity >= 1
        if granularity != AUTO and not fixed:
            raise ValueError(f"granularity must be 'auto' or an int >= 1, got {granularity!r}")
        overrides["num_partitions"] = granularity
    if restore is not None:
        if restore != AUTO and restore not in RESTORE_STRATEGIES:
            raise ValueError(f"restore must be 'auto' or one of {RESTORE_STRATEGIES}, got {restore!r}")
        overrides["restore"] = restore
    if simulated_link is not None:
        if isinstance(simulated_link, Mapping):
            simulated_link = SimulatedLink(**simulated_link)
        if not isinstance(simulated_link, SimulatedLink):
            raise TypeError(f"simulated_link must be a SimulatedLink (or a dict of its fields), got {simulated_link!r}")
        overrides["link"] = simulated_link
    if memory_budget is not None:
        overrides["memory_budget"] = memory_budget
    ExecutorConfig(**overrides)  # the config's own checks (the budget's range among them)
    return overrides
