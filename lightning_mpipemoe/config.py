"""The one documented configuration of the MoE executor."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["RESTORE_STRATEGIES", "ExecutorConfig", "SimulatedLink"]

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


@dataclass(frozen=True)
class ExecutorConfig:
    """How one MoE layer call is executed.

    Args:
        num_partitions: `n`, the number of micro-partitions the tokens of a call are split
            into and pipelined (dispatch of i+1 and combine of i-1 overlap the experts of i).
        restore: one of `RESTORE_STRATEGIES`; anything but `none` shares the T_DI / T_M /
            T_DO buffers between partitions and rebuilds them for backward.
        link: an optional `SimulatedLink` that every all-to-all also crosses (tests and
            benchmarks of the schedule on machines without a real slow link).
    """

    num_partitions: int = 1
    restore: str = "none"
    link: SimulatedLink | None = None

    def __post_init__(self) -> None:
        n = self.num_partitions
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"num_partitions must be a positive int, got {n!r}")
        if self.restore not in RESTORE_STRATEGIES:
            raise ValueError(f"restore={self.restore!r} is not one of {RESTORE_STRATEGIES}")
        if self.link is not None and not isinstance(self.link, SimulatedLink):
            raise TypeError(f"link must be a SimulatedLink or None, got {type(self.link).__name__}")

    @property
    def pipelined(self) -> bool:
        """Whether the call takes the pipelined executor rather than the plain reference path."""
        return self.num_partitions > 1 or self.restore != "none"
