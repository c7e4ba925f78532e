"""Choosing the restore strategy: calibrated throughputs, DESIGN.md §1.5's cost model, a budget.

The published code leaves the strategy to a person (an environment variable). Here the
tuner picks it: `none` whenever the memory budget allows it (it does the least work on
every stream, so nothing beats it), otherwise the strategy the cost model finds cheapest
among those whose analytic footprint (`memory.analytic_memory`) fits the budget.

Cost model. Per micro-batch of r = R / n rows (R dispatched rows on the busiest rank, model
dim M, expert hidden I, O = 2I gated or I, s bytes per element, P ranks) a pass puts work on
three streams, from the shapes rather than DESIGN's H = 4M units (the tests check that they
reduce to DESIGN's table for top-1 plain experts with I = 4M):

    compute  GEMM flops  forward 2r(MO + IM); backward twice that, + 2rMO if T_M is recomputed
    comm     all-to-alls forward 2, backward 2 (+1 if T_DI is re-communicated), each r*M*s*(P-1)/P
             wire bytes plus a latency
    copy     bytes       T_DI (r*M*s) and / or T_M (r*O*s) when offloaded, each pass

    T1 = flops / W_comp,  T2 = count * latency + bytes / W_comm,  T3 = bytes / W_mem
    per micro-batch  tau = max(T1, T2, T3) + (1 - w_comm) min(T1, T2) + (1 - w_copy) min(T1, T3)
    per pass         T1 + T2 + T3 + (n - 1) tau        (one micro-batch fills / drains the pipe)

DESIGN's `max(q1 / W_comp, q2 α / μ, q3 β / η)` assumes the streams overlap and are only slowed
down (μ, η) when they run together. The overlap efficiencies w here generalise that to
hardware where a stream does not overlap compute at all: gloo spends the CPU's cores and a
CPU copy runs in the compute thread (w = 0, the costs add), while CUDA streams overlap
(w near 1, below 1 by the slow-down). Both w are measured, as are W_comp, W_comm (with its
latency) and W_mem, by `calibrate`: short measurements at the layer's shapes, repeated in
interleaved rounds (the best of each), the slowest rank's time of each (all-reduce max) so
that every rank derives the same numbers and takes the same decision.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from lightning_mpipemoe import collectives
from lightning_mpipemoe.kernels import api as kernels
from lightning_mpipemoe.config import RESTORE_STRATEGIES, SimulatedLink
from lightning_mpipemoe.moe.comm import Lanes, LinkClock, start_all_to_all, wire_bytes
from lightning_mpipemoe.moe.dispatch import group_size
from lightning_mpipemoe.moe.memory import LayerShape, analytic_memory
from lightning_mpipemoe.moe.restore import RESTORE

__all__ = [
    "Calibration",
    "PassWork",
    "StrategyChoice",
    "all_reduce",
    "calibrate",
    "choose_strategy",
    "footprint_bytes",
    "predict_seconds",
    "strategy_work",
]


@dataclass(frozen=True)
class Calibration:
    """Measured throughputs of this hardware at one layer's shapes (identical on every rank)."""

    flops_per_s: float
    comm_bytes_per_s: float
    comm_latency_s: float
    copy_bytes_per_s: float
    comm_overlap: float
    copy_overlap: float

    def to_dict(self) -> dict:
        return {k: (v if math.isfinite(v) else str(v)) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, state: dict) -> "Calibration":
        return cls(**{k: float(v) for k, v in state.items()})

    def summary(self) -> str:
        comm = "no comm" if math.isinf(self.comm_bytes_per_s) else (
            f"a2a {self.comm_bytes_per_s / 1e6:.0f} MB/s + {self.comm_latency_s * 1e3:.2f} ms")
        return (f"{self.flops_per_s / 1e9:.0f} GFLOP/s, {comm}, copy {self.copy_bytes_per_s / 1e9:.1f} GB/s, "
                f"overlap comm {self.comm_overlap:.2f} copy {self.copy_overlap:.2f}")


@dataclass(frozen=True)
class PassWork:
    """Work of one micro-batch in one pass, per stream."""

    flops: float
    a2a_count: int
    a2a_bytes: float
    copy_bytes: float


def strategy_work(shape: LayerShape, restore: str, num_partitions: int) -> tuple[PassWork, PassWork]:
    """(forward, backward) work of one micro-batch under `restore` (see the module docstring)."""
    strategy = RESTORE[restore]
    r = shape.rows / num_partitions
    M, I, O, s = shape.hidden, shape.intermediate, shape.width, shape.dtype_bytes
    gemm1, gemm2 = 2.0 * r * M * O, 2.0 * r * I * M
    P = shape.ep_size
    wire = r * M * s * (P - 1) / P
    a2a = 2 if P > 1 else 0
    copies = (r * M * s if "T_DI" in strategy.offloads else 0.0) + (r * O * s if "T_M" in strategy.offloads else 0.0)
    recompute = gemm1 if strategy.hidden == "recompute" else 0.0
    recomm = 1 if (strategy.dispatched == "recommunicate" and P > 1) else 0
    forward = PassWork(gemm1 + gemm2, a2a, a2a * wire, copies)
    backward = PassWork(2 * (gemm1 + gemm2) + recompute, a2a + recomm, (a2a + recomm) * wire, copies)
    return forward, backward


def _pass_seconds(cal: Calibration, work: PassWork, n: int) -> float:
    t1 = work.flops / cal.flops_per_s
    t2 = work.a2a_count * cal.comm_latency_s + work.a2a_bytes / cal.comm_bytes_per_s
    t3 = work.copy_bytes / cal.copy_bytes_per_s
    tau = max(t1, t2, t3) + (1 - cal.comm_overlap) * min(t1, t2) + (1 - cal.copy_overlap) * min(t1, t3)
    return t1 + t2 + t3 + (n - 1) * tau


def predict_seconds(cal: Calibration, shape: LayerShape, num_partitions: int, restore: str) -> float:
    """Predicted forward + backward time of one layer call (DESIGN.md §1.5, generalised)."""
    forward, backward = strategy_work(shape, restore, num_partitions)
    return _pass_seconds(cal, forward, num_partitions) + _pass_seconds(cal, backward, num_partitions)


def footprint_bytes(shape: LayerShape, num_partitions: int, restore: str) -> int:
    """Device bytes one call holds for its backward under the analytic model: what
    `memory_budget` bounds.

    Held bytes stay until the backward reaches the layer, so over a model they add up layer by
    layer; a call's peak temporaries (`analytic_memory`'s, the pipeline's buffers) are freed
    when it returns, one layer's at a time, and are not budgeted per layer (`recipes.plan`
    counts the largest of them once). n = 1 without reuse runs the plain autograd path
    (`analytic_memory(..., "reference")`, which also keeps the activation outputs). On a CPU
    device (`shape.host_is_device`) offloading moves nothing out of the memory the budget
    bounds, so the host bytes count as held: a budget is met there by recomputation and
    re-communication.
    """
    kind = "reference" if (num_partitions == 1 and restore == "none") else restore
    memory = analytic_memory(shape, num_partitions, kind)
    return memory.device_held_bytes + (memory.host_held_bytes if shape.host_is_device else 0)


@dataclass(frozen=True)
class StrategyChoice:
    """The strategy for one (n, rows) and why: footprints, predictions, the budget."""

    restore: str
    num_partitions: int
    rows: int
    budget_bytes: int | None
    footprints: dict
    predicted_s: dict  # empty when no prediction was needed
    over_budget: bool  # nothing fits: the smallest footprint was taken
    measured: bool = False  # a profiling session measured `restore` faster than the model's near-equal pick

    @property
    def feasible(self) -> list[str]:
        return [s for s, b in self.footprints.items() if self.budget_bytes is None or b <= self.budget_bytes]

    def explain(self, calibration: Calibration | None = None) -> str:
        """One line: the choice, what the budget excluded, the model's ranking, the calibration."""
        mib = 2.0**20
        line = f"restore={self.restore} at n={self.num_partitions}, {self.rows} rows"
        if self.budget_bytes is None:
            return line + ": no memory budget, `none` does the least work"
        excluded = [s for s in self.footprints if s not in self.feasible]
        line += f": budget {self.budget_bytes / mib:.1f} MiB"
        if self.over_budget:
            line += (f" fits no strategy; took the smallest footprint ({self.footprints[self.restore] / mib:.1f} MiB)")
        elif excluded:
            line += " excludes " + ", ".join(f"{s} ({self.footprints[s] / mib:.1f} MiB)" for s in excluded)
        else:
            line += " excludes nothing"
        if self.predicted_s:
            ranked = sorted(self.predicted_s.items(), key=lambda kv: (kv[1], RESTORE_STRATEGIES.index(kv[0])))
            line += "; predicted fwd+bwd " + " < ".join(f"{s} {t * 1e3:.1f} ms" for s, t in ranked)
        if self.measured:
            line += (f"; the model cannot separate {self.restore} from its pick within its error, "
                     f"measured {self.restore} faster")
        if calibration is not None:
            line += f"; calibrated {calibration.summary()}"
        return line


def needs_calibration(shape: LayerShape, num_partitions: int, budget: int | None, allowed=RESTORE_STRATEGIES) -> bool:
    """Whether choosing among `allowed` needs the cost model (`none` excluded, >1 fits)."""
    if budget is None or "none" not in allowed:
        return "none" not in allowed and len(allowed) > 1
    fits = [s for s in allowed if footprint_bytes(shape, num_partitions, s) <= budget]
    return "none" not in fits and len(fits) > 1


def choose_strategy(
    shape: LayerShape,
    num_partitions: int,
    budget: int | None,
    calibration: Calibration | None,
    allowed: tuple[str, ...] = RESTORE_STRATEGIES,
) -> StrategyChoice:
    """The cheapest strategy of `allowed` that fits `budget` at n = `num_partitions`.

    `none` wins whenever it fits (least work on every stream). Otherwise the cost model
    ranks what fits (ties: table order); with nothing fitting, the smallest footprint.
    `calibration` may be None only when `needs_calibration` says so.
    """
    footprints = {s: footprint_bytes(shape, num_partitions, s) for s in allowed}
    fits = [s for s in allowed if budget is None or footprints[s] <= budget]
    predicted: dict[str, float] = {}
    if not fits:
        chosen = min(allowed, key=lambda s: (footprints[s], RESTORE_STRATEGIES.index(s)))
    elif "none" in fits or len(fits) == 1:
        chosen = "none" if "none" in fits else fits[0]
    else:
        if calibration is None:
            raise ValueError("choosing among several reuse strategies needs a Calibration")
        predicted = {s: predict_seconds(calibration, shape, num_partitions, s) for s in fits}
        chosen = min(fits, key=lambda s: (predicted[s], RESTORE_STRATEGIES.index(s)))
    return StrategyChoice(chosen, num_partitions, shape.rows, budget, footprints, predicted, over_budget=not fits)


# -- calibration ---------------------------------------------------------------------------------


def all_reduce(tensor: torch.Tensor, group: ProcessGroup | None, op=dist.ReduceOp.SUM, *,
               device: torch.device | None = None, site: str = "tuner.agree") -> torch.Tensor:
    """All-reduce a small host tensor over `group` on `device` (the layer's: the device its
    EP group serves), returned on the host; identity on one rank. For set-up, calibration and
    the rounds of a profiling session (which synchronise anyway), not the layer's hot path."""
    if group_size(group) == 1:
        return tensor
    on_device = tensor.to(device) if device is not None else tensor
    collectives.all_reduce(on_device, op, group=group, site=site)
    return on_device.to("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_seconds(steps: dict, device: torch.device, repeats: int, group: ProcessGroup | None) -> dict:
    """Time every step of `steps` (name -> (fn, collective)) in `repeats` interleaved rounds,
    after one warm-up round; each step's best (smallest) time.

    Interleaving puts a shared machine's changing load on all steps alike; the minimum
    estimates what the hardware does, since interference only ever adds time (a burst that
    slows the GEMMs but not the copies would otherwise skew the ratios the model ranks by).
    """
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(repeats + 1):
        for name, (fn, collective) in steps.items():
            if collective and group_size(group) > 1:
                collectives.barrier(group=group, site="tuner.calibrate")  # time the collective, not the skew
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


def calibrate(
    *,
    hidden: int,
    width: int,
    rows: int,
    dtype: torch.dtype,
    device: torch.device,
    ep_group: ProcessGroup | None,
    link: SimulatedLink | None,
    local_experts: int = 1,
    repeats: int = 7,
) -> Calibration:
    """Measure W_comp, W_comm (+ latency), W_mem and the two overlaps at one micro-batch of
    `rows` rows (collective over `ep_group`: every rank calls it at the same point).

    The GEMM is GEMM1's, grouped over `local_experts` equal segments as the layer runs it
    (`[rows, hidden] x [L, width, hidden]`); the all-to-all moves
    `rows` rows evenly, and rows / 8 to separate latency from bandwidth; the copy goes to
    host memory and back into fresh buffers, as the host store does (pinned on CUDA, on the
    copy lane). The overlaps time GEMMs with an
    all-to-all / copies in flight, repeated so that both sides take about as long (the
    overlap of a side much shorter than the other drowns in noise). Each time is the best of
    `repeats` interleaved rounds (`_best_seconds`), then the slowest rank's (all-reduce max,
    in two phases so that the repetition counts agree too): the result is identical on
    every rank.
    """
    ep_size = group_size(ep_group)
    rows = max(ep_size * 8, rows - rows % max(ep_size * 8, 1))
    gen = torch.Generator().manual_seed(0)
    x_SM = torch.randn(rows, hidden, generator=gen).to(device=device, dtype=dtype)
    w_LOM = torch.randn(local_experts, width, hidden, generator=gen).to(device=device, dtype=dtype)
    ends_L = torch.tensor([(e + 1) * rows // local_experts for e in range(local_experts)], device=device)
    y_SO = kernels.grouped_mm(x_SM, w_LOM, ends_L)
    cuda = device.type == "cuda"
    host_SO = torch.empty(y_SO.shape, dtype=dtype, pin_memory=cuda)
    lanes = Lanes(device)

    def gemm():  # as the layer runs it: grouped over this rank's experts
        kernels.grouped_mm(x_SM, w_LOM, ends_L)

    def to_host():  # into a fresh host buffer, as the host store allocates one per call
        torch.empty(y_SO.shape, dtype=dtype, pin_memory=cuda).copy_(y_SO, non_blocking=cuda)

    def to_device():  # into a fresh device buffer, as a fetch does
        torch.empty_like(y_SO).copy_(host_SO, non_blocking=cuda)

    def a2a(num_rows: int):
        splits = [num_rows // ep_size] * ep_size
        clock = LinkClock(link) if link is not None else None
        return start_all_to_all(x_SM[: sum(splits)], splits, splits, ep_group, lanes=lanes, clock=clock)

    src_SO = y_SO

    def gemms(k: int):
        for _ in range(k):
            gemm()

    def copies(k: int):
        with lanes.on("copy"):
            for _ in range(k):
                host_SO.copy_(src_SO, non_blocking=cuda)
        lanes.join("copy")

    def agree(times: dict) -> dict:
        names = sorted(times)
        agreed = all_reduce(torch.tensor([times[k] for k in names], dtype=torch.float64), ep_group, dist.ReduceOp.MAX,
                            device=device, site="tuner.calibrate")
        return dict(zip(names, agreed.tolist()))

    # Phase 1: each stream alone.
    small = max(ep_size, rows // 8)
    steps = {"gemm": (gemm, False), "to_host": (to_host, False), "to_device": (to_device, False)}
    if ep_size > 1:
        steps["a2a_small"] = (lambda: a2a(small).wait(), True)
        steps["a2a_large"] = (lambda: a2a(rows).wait(), True)
    t = agree(_best_seconds(steps, device, repeats, ep_group))

    # Phase 2: overlaps, with repetitions (from the agreed times, so the same on every rank)
    # that make both sides about equally long: the overlap of a short side is lost in noise.
    def balance(other: float, mine: float) -> int:
        return int(min(64, max(1, round(other / max(mine, 1e-9)))))

    copy_alone = (t["to_host"] + t["to_device"]) / 2
    k_gemm, k_copy = balance(copy_alone, t["gemm"]), balance(t["gemm"], copy_alone)

    def gemm_with_copies():
        with lanes.on("copy"):
            for _ in range(k_copy):
                host_SO.copy_(src_SO, non_blocking=cuda)
        gemms(k_gemm)
        lanes.join("copy")

    steps = {
        "copy_gemms": (lambda: gemms(k_gemm), False),
        "copy_copies": (lambda: copies(k_copy), False),
        "copy_together": (gemm_with_copies, False),
    }
    if ep_size > 1:
        k_comm = balance(t["a2a_large"], t["gemm"])

        def gemm_with_a2a():
            handle = a2a(rows)
            gemms(k_comm)
            handle.wait()

        steps["comm_gemms"] = (lambda: gemms(k_comm), False)
        steps["comm_together"] = (gemm_with_a2a, True)
    t.update(agree(_best_seconds(steps, device, repeats, ep_group)))

    elem = torch.empty((), dtype=dtype).element_size()
    flops = 2.0 * rows * hidden * width / t["gemm"]
    copy_bytes = y_SO.numel() * elem
    copy_rate = 2 * copy_bytes / (t["to_host"] + t["to_device"])
    copy_overlap = _overlap(t["copy_gemms"], t["copy_copies"], t["copy_together"])
    if ep_size == 1:
        return Calibration(flops, math.inf, 0.0, copy_rate, 1.0, copy_overlap)
    row_bytes = hidden * elem
    bytes_small = wire_bytes([small // ep_size] * ep_size, [small // ep_size] * ep_size, row_bytes, ep_group)
    bytes_large = wire_bytes([rows // ep_size] * ep_size, [rows // ep_size] * ep_size, row_bytes, ep_group)
    slope = (t["a2a_large"] - t["a2a_small"]) / max(bytes_large - bytes_small, 1)
    if slope <= 0:  # noise swamped the size difference: all of it is bandwidth
        comm_rate, latency = bytes_large / t["a2a_large"], 0.0
    else:
        comm_rate = 1.0 / slope
        latency = max(0.0, t["a2a_small"] - bytes_small * slope)
    comm_overlap = _overlap(t["comm_gemms"], t["a2a_large"], t["comm_together"])
    return Calibration(flops, comm_rate, latency, copy_rate, comm_overlap, copy_overlap)


def _overlap(alone_a: float, alone_b: float, together: float) -> float:
    """w in [0, 1] with together = max(a, b) + (1 - w) min(a, b)."""
    shorter = min(alone_a, alone_b)
    if shorter <= 0:
        return 1.0
    return min(1.0, max(0.0, (alone_a + alone_b - together) / shorter))
