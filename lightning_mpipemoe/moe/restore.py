"""The five restore strategies: how backward gets back the T_DI and T_M that reuse overwrote.

Backward of partition i needs its dispatched rows T_DI (for the GEMM1 weight gradient) and
its expert hidden T_M (for the activation and GEMM2 weight gradient). With buffer reuse both
are gone by then. DESIGN.md §1.4:

    strategy  T_DI           T_M          extra backward work
    none      kept           kept         -   (no reuse: n copies held)
    s1        offload        offload      two host->device copies
    s2        re-comm        offload      one all-to-all, one copy
    s3        offload        recompute    one copy, one GEMM1
    s4        re-comm        recompute    one all-to-all, one GEMM1

`Stash` is what the forward leaves for one call: the kept tensors (saved through autograd,
so that saved-tensor hooks see and count them) or the host store. Re-communication and
recomputation are scheduled by the pipeline itself (they are collectives and GEMMs that
must sit in the backward schedule); this module only says which.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightning_mpipemoe.config import RESTORE_STRATEGIES
from lightning_mpipemoe.moe.buffers import HostStore
from lightning_mpipemoe.moe.comm import Lanes

__all__ = ["RESTORE", "RestoreStrategy", "Stash", "restore_strategy"]


@dataclass(frozen=True)
class RestoreStrategy:
    """One row of the table. `work_*` are DESIGN.md's per-stream work units [GEMM, a2a, copy]
    for one micro-batch (copies in units of b*M elements, H = 4M), used by the cost model."""

    name: str
    dispatched: str  # T_DI: "keep" | "offload" | "recommunicate"
    hidden: str  # T_M: "keep" | "offload" | "recompute"
    work_forward: tuple[int, int, int]
    work_backward: tuple[int, int, int]

    @property
    def reuses_buffers(self) -> bool:
        return self.name != "none"

    @property
    def needs_input(self) -> bool:
        """Whether backward reads the layer input T_I (to re-communicate T_DI)."""
        return self.dispatched == "recommunicate"

    @property
    def offloads(self) -> tuple[str, ...]:
        kinds = []
        if self.dispatched == "offload":
            kinds.append("T_DI")
        if self.hidden == "offload":
            kinds.append("T_M")
        return tuple(kinds)


RESTORE: dict[str, RestoreStrategy] = {
    "none": RestoreStrategy("none", "keep", "keep", (2, 2, 0), (4, 2, 0)),
    "s1": RestoreStrategy("s1", "offload", "offload", (2, 2, 5), (4, 2, 5)),
    "s2": RestoreStrategy("s2", "recommunicate", "offload", (2, 2, 4), (4, 3, 4)),
    "s3": RestoreStrategy("s3", "offload", "recompute", (2, 2, 1), (5, 2, 1)),
    "s4": RestoreStrategy("s4", "recommunicate", "recompute", (2, 2, 0), (5, 3, 0)),
}
assert tuple(RESTORE) == RESTORE_STRATEGIES


def restore_strategy(name: str) -> RestoreStrategy:
    if name not in RESTORE:
        raise ValueError(f"restore={name!r} is not one of {RESTORE_STRATEGIES}")
    return RESTORE[name]


class Stash:
    """What the forward of one call leaves for its backward, partition by partition.

    `row_starts[i]` is the first row of partition i in the concatenation of all partitions'
    received rows (the host store's layout).
    """

    def __init__(
        self,
        strategy: RestoreStrategy,
        row_starts: list[int],
        hidden_size: int,
        hidden_width: int,
        dtype: torch.dtype,
        device: torch.device,
        lanes: Lanes,
    ) -> None:
        self.strategy = strategy
        self.row_starts = row_starts
        self.kept_DI: list[torch.Tensor | None] = [None] * (len(row_starts) - 1)
        self.kept_M: list[torch.Tensor | None] = [None] * (len(row_starts) - 1)
        self.host: HostStore | None = None
        if strategy.offloads:
            self.host = HostStore(device, lanes)
            total = row_starts[-1]
            if "T_DI" in strategy.offloads:
                self.host.allocate("T_DI", total, hidden_size, dtype)
            if "T_M" in strategy.offloads:
                self.host.allocate("T_M", total, hidden_width, dtype)

    # -- forward ---------------------------------------------------------------------------
    def save(self, i: int, dispatched_SH: torch.Tensor, hidden_SO: torch.Tensor) -> None:
        """Keep or offload partition i's T_DI and T_M, as the strategy says."""
        if self.strategy.dispatched == "keep":
            self.kept_DI[i] = dispatched_SH
        elif self.strategy.dispatched == "offload":
            self.host.offload("T_DI", self.row_starts[i], dispatched_SH)
        if self.strategy.hidden == "keep":
            self.kept_M[i] = hidden_SO
        elif self.strategy.hidden == "offload":
            self.host.offload("T_M", self.row_starts[i], hidden_SO)

    def finish_forward(self) -> list[torch.Tensor]:
        """End of forward: the tensors to hand to `ctx.save_for_backward` (kept ones)."""
        if self.host is not None:
            self.host.finish_offload()
        kept = [t for t in self.kept_DI + self.kept_M if t is not None]
        self.kept_DI = [None] * len(self.kept_DI)
        self.kept_M = [None] * len(self.kept_M)
        return kept

    @property
    def host_bytes(self) -> int:
        return 0 if self.host is None else self.host.host_bytes

    # -- backward --------------------------------------------------------------------------
    def attach_saved(self, saved: list[torch.Tensor]) -> None:
        """Give back the kept tensors that `finish_forward` handed to autograd."""
        n = len(self.kept_DI)
        it = iter(saved)
        if self.strategy.dispatched == "keep":
            self.kept_DI = [next(it) for _ in range(n)]
        if self.strategy.hidden == "keep":
            self.kept_M = [next(it) for _ in range(n)]

    def fetch(self, kind: str, i: int, lanes: Lanes):
        """Start bringing back partition i's offloaded `kind`; returns a handle with `wait()`."""
        start, end = self.row_starts[i], self.row_starts[i + 1]
        return self.host.fetch(kind, start, end - start, lanes)

    def take_kept(self, kind: str, i: int) -> torch.Tensor:
        """Partition i's kept tensor, released from the stash (backward needs it once)."""
        kept = self.kept_DI if kind == "T_DI" else self.kept_M
        tensor, kept[i] = kept[i], None
        return tensor

    def release(self) -> None:
        if self.host is not None:
            self.host.release()
        self.kept_DI = [None] * len(self.kept_DI)
        self.kept_M = [None] * len(self.kept_M)
