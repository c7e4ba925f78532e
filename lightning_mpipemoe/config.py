"""The one documented configuration of the MoE executor."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RESTORE_STRATEGIES", "ExecutorConfig"]

#: How backward gets back what buffer reuse overwrote (DESIGN.md §1.4): `none` keeps a copy
#: per partition (no reuse); s1 offloads T_DI and T_M; s2 re-communicates T_DI and offloads
#: T_M; s3 offloads T_DI and recomputes T_M; s4 re-communicates T_DI and recomputes T_M.
RESTORE_STRATEGIES = ("none", "s1", "s2", "s3", "s4")


@dataclass(frozen=True)
class ExecutorConfig:
    """How one MoE layer call is executed.

    Args:
        num_partitions: `n`, the number of micro-partitions the tokens of a call are split
            into (pipelined when the executor supports it).
        restore: one of `RESTORE_STRATEGIES`.
    """

    num_partitions: int = 1
    restore: str = "none"

    def __post_init__(self) -> None:
        n = self.num_partitions
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"num_partitions must be a positive int, got {n!r}")
        if self.restore not in RESTORE_STRATEGIES:
            raise ValueError(f"restore={self.restore!r} is not one of {RESTORE_STRATEGIES}")
