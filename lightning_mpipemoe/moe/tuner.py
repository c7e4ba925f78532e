"""Adaptive granularity (DESIGN.md §1.2) and the joint choice of n and restore strategy, per layer.

One `LayerTuner` per MoE layer (owned by the layer or its Hugging Face binding, passed to
`expert_parallel_forward`) turns `num_partitions="auto"` / `restore="auto"` into a concrete
(n, restore) for every call. Everything it decides is agreed over the expert-parallel
group: n changes the collectives of the call, so two ranks that decided differently would
deadlock in the next all-to-all.

Lookup key: the rows of the busiest rank of the EP group, agreed by a small all-reduce
(`load_key.py` says why that key, and how the exchange stays off the critical path).

Lookup: an exact-count cache, then the range table (`RangeTable`): the key axis is cut into
ranges each mapped to one n, monotone in the key. A miss in a training call starts a
profiling session; the candidates are the configured ones between the n of the neighbouring
ranges (monotonicity bounds them), and one beyond each side (so that a neighbour decided
wrong by noise gets repaired rather than fencing the truth out), each paired with the
restore strategy the cost model picks for it under the memory budget
(`cost_model.choose_strategy`); pairs that fit no strategy are dropped, which is where the
budget and n are chosen jointly. Strategies the
model ranks within `MODEL_MARGIN` of its pick are profiled beside it (a calibration of a few
short measurements cannot separate them); the one measured fastest at the winning n is kept
for that point and its neighbourhood while the model still cannot tell them apart there.

A session runs the candidates round-robin on real training calls (the result is the real
result), timing forward and backward of the layer:
forward by the wall clock around the executor, backward from the arrival of the output's
gradient (a tensor hook) to the departure of the input's (an identity autograd Function on
the input). After each round every rank all-reduces (max) that round's per-row times (the
slowest rank's time is the call's), so every decision below reads identical data on every
rank; ties go to the smaller n. Decisions are built for a shared, noisy machine:
candidates are compared round by round (paired: one round's calls ran under the same load),
each round normalised by its geometric mean and the median taken over rounds, so a load
change that slows a whole round cancels and one slow call is outvoted. From `min_rounds`
on, each candidate is compared with the leader by its paired log-ratios (median, and a
standard error from their median absolute deviation: `profiling.paired_gap`). One
significantly slower (by two standard errors) than the leader by more than `prune_margin`
is dropped (from the second round already if slower by `GROSS_MARGIN`): step time is
convex in n, `max(A, C) + min(A, C) / n + n * overhead`, so it does not come back. The
session ends once no other candidate can be faster than the leader by more than `settle`
(two standard errors, the pair's own or the pooled noise of all candidates,
`_Session.pair_se`, whichever is larger), at the latest after `max_rounds`. Noise sets the
length: a quiet machine decides in `min_rounds`, a loaded one measures near-equals longer,
which costs little since only near-equals remain. The winner's n becomes a new point of the
range table (inserted, merged with neighbours of the same n). Calls whose key falls
outside the session's bucket (`tolerance`) look up as usual.

No profiling outside training calls: under no_grad / inference the tuner only looks up
(misses take the nearest known n, else the smallest candidate) and takes restore `none`
(nothing is saved for backward, so the budget has nothing to bound). A forward re-run
inside backward (gradient checkpointing's recomputation; the autograd engine is running a
graph task then) repeats the decision of the forward it re-runs, recognised on each rank by
a digest of its routing (identical in the recomputation), so recomputed tensors have the
same shapes; whether every rank found it rides along with the recomputation's own load
(then agreed synchronously), and if any did not, all fall back to a lookup. (That agreement
and the digest cost a recomputation two host syncs beyond its count copy; a steady forward
has none beyond that copy: its digest and load ride in it, see `load_key`.)

The sessions' code is in `tuner_sessions.py` (a mixin of `LayerTuner`).

Persistence: `state_dict()` / `load_state_dict()` (JSON-ready, see `tuning_store`) carry the
range table and the calibration with a fingerprint of shapes, sizes and hardware; at its
next call the layer adopts a loaded state only if every rank's fingerprint matches and
every rank loaded the same state (one all-reduce), else it re-tunes and logs why.
"""

from __future__ import annotations

import json
import logging
import math
import os
import zlib
from collections import OrderedDict
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from lightning_mpipemoe.config import RESTORE_STRATEGIES, ExecutorConfig, budget_bytes
from lightning_mpipemoe.moe.cost_model import (
    Calibration,
    StrategyChoice,
    all_reduce,
    calibrate,
    choose_strategy,
    needs_calibration,
)
from lightning_mpipemoe.moe.dispatch import HostRider, group_size
from lightning_mpipemoe.moe.experts import ExpertWeights
from lightning_mpipemoe.moe.load_key import LoadExchange, agree_load, kept_counts, load_of, load_packet, routing_digest
from lightning_mpipemoe.moe.memory import LayerShape
from lightning_mpipemoe.moe.profiling import ProfileSample, _Session
from lightning_mpipemoe.moe.ranges import RangeTable
from lightning_mpipemoe.moe.tuner_sessions import SessionMethods
from lightning_mpipemoe.moe.tuning_store import FORMAT_VERSION, fingerprint, fingerprint_diff

__all__ = ["LayerTuner", "ProfileSample", "RangeTable", "TunedCall", "TunerOwner", "agree_load", "kept_counts",
           "load_of", "load_packet"]

logger = logging.getLogger("lightning_mpipemoe.tuner")
_NO_BUDGET = 2**62


def _in_backward() -> bool:
    """Whether this forward runs inside a backward pass (checkpointing's recomputation): the
    autograd engine has a graph task then (both reentrant and non-reentrant checkpointing)."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current is not None and current() != -1


def _rank_zero() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


@dataclass
class TunedCall:
    """What the executor runs for one call: a concrete config, and a sample when profiling."""

    config: ExecutorConfig
    sample: ProfileSample | None = None
    #: Values the tuner needs on the host, for the executor to hand to `plan_dispatch` (they
    #: ride to the host in the call's one copy of counts instead of a sync of their own).
    riders: tuple[HostRider, ...] = ()


class LayerTuner(SessionMethods):
    """The tuner of one MoE layer: granularity ranges, profiling sessions, strategy choice.

    A session that no training call joins for `STALL_CALLS` calls (its token count stopped
    coming) is closed on what its agreed rounds show, so that another key can be profiled.
    Outside sessions a call's load is agreed every `EXCHANGE_EVERY` calls (see the module).

    Args:
        min_rounds / max_rounds: profiling rounds per session (each runs every live candidate
            once); past `min_rounds` a session ends once the leader is settled.
        tolerance: relative key distance within which a profiled point answers a lookup and a
            call joins a running session (times are per row, so a joining call measures the
            same thing). 25%: a small call's busiest-rank rows move that much from step to step
            as routing learns, while the best n moves by one candidate over ~2.75x (DESIGN.md
            §1.2's published ranges).
        prune_margin: from round `min_rounds`, drop a candidate significantly slower than the
            leader by more than this (see the module docstring).
        settle: the session ends when no other candidate can be faster than the leader by more
            than this (with two standard errors' confidence).
        warmup: unmeasured rounds at the start of a session. None by default: the first call of
            each n at a new shape pays first touches of its buffer sizes, but that is one
            round of `min_rounds`, which the medians outvote.
        name: the layer's name, for log lines.
    """

    # A session's key that has not come for this many calls has drifted away (routing moves
    # during training); while a session is open every call exchanges its load, so waiting long costs.
    STALL_CALLS = 16
    EXCHANGE_EVERY = 8
    GROSS_MARGIN = 0.25
    # Strategies the cost model ranks within this of its pick are too close for the model (its
    # calibration is a few short measurements): a session measures them too.
    MODEL_MARGIN = 0.05

    def __init__(self, *, min_rounds: int = 4, max_rounds: int = 24, tolerance: float = 0.25,
                 prune_margin: float = 0.05, settle: float = 0.04, warmup: int = 0, name: str = ""):
        if not 1 <= min_rounds <= max_rounds or tolerance < 0 or prune_margin < 0 or settle < 0 or warmup < 0:
            raise ValueError(
                f"need 1 <= min_rounds <= max_rounds and tolerance, prune_margin, settle, warmup >= 0; got "
                f"{min_rounds}, {max_rounds}, {tolerance}, {prune_margin}, {settle}, {warmup}"
            )
        self.min_rounds, self.max_rounds, self.tolerance = min_rounds, max_rounds, tolerance
        self.prune_margin, self.settle, self.warmup, self.name = prune_margin, settle, warmup, name
        self._signature = None
        self._pending: dict | None = None
        self._lag_key: int | None = None  # the latest agreed load
        self._inflight: LoadExchange | None = None  # the latest exchanged load, on its way
        # Routing digests of forwards on their way to the host: (shape, rider, n, restore).
        self._digests_in_flight: list[tuple[tuple, HostRider, int, str]] = []
        self._calls = 0
        self._reset(None)

    def _reset(self, config: ExecutorConfig | None) -> None:
        self._config = config
        self._fingerprint: dict | None = None
        if config is None:
            candidates = (1,)
        else:
            candidates = config.candidate_set if config.tunes_partitions else (config.num_partitions,)
        self._table = RangeTable(candidates, self.tolerance)
        self._calibration: Calibration | None = None
        self._budget: int | None = None
        self._session: _Session | None = None
        self._choices: dict[tuple[int, int], StrategyChoice] = {}
        self._forwards: OrderedDict[tuple, tuple[int, str]] = OrderedDict()  # routing digest -> decision
        self._profiles: dict[int, dict[str, float]] = {}  # key -> candidate label -> seconds per call
        self._measured: dict[int, tuple[int, str]] = {}  # key -> (n, restore) a session measured fastest
        self._last: tuple[int, str, int] | None = None  # (n, restore, key) of the latest call
        self._logged_restore: str | None = None
        self._warned_over: set[tuple[int, str]] = set()  # fallbacks (n, restore) warned of
        self.profile_calls = 0

    # -- the executor's entry ----------------------------------------------------------------
    def begin(
        self,
        config: ExecutorConfig,
        *,
        top_k_index_TK: torch.Tensor,
        experts: ExpertWeights,
        dtype: torch.dtype,
        device: torch.device,
        ep_group: ProcessGroup | None,
        capacity: int | None = None,
        capacity_group_size: int | None = None,
    ) -> TunedCall:
        """Decide (n, restore) for this call; collective over `ep_group` unless the config's
        choice does not depend on the call (then nothing is exchanged)."""
        if self._static(config):
            resolved = config.resolved()
            self._last = (resolved.num_partitions, resolved.restore, 0)
            return TunedCall(resolved)
        ep_size = group_size(ep_group)
        self._setup(config, experts, top_k_index_TK.shape[1], dtype, device, ep_group, ep_size)
        num_experts = experts.num_local_experts * ep_size
        self._shape_args = (top_k_index_TK.shape[1], experts, dtype, ep_size, device, ep_group)

        def packet() -> torch.Tensor:
            return load_packet(top_k_index_TK, num_experts, ep_group, capacity, capacity_group_size)

        shape, digest_1 = routing_digest(top_k_index_TK)
        self._calls += 1
        self._settle_digests()
        if self._inflight is not None:  # an earlier call's load: long arrived (its plan carried it)
            self._complete(self._inflight)
            self._inflight = None
        if _in_backward():
            return self._recompute(config, packet(), (shape, int(digest_1)), ep_group, num_experts)
        mode = "train" if torch.is_grad_enabled() else "infer"
        # The key this call decides by is the latest agreed load. A call's own load is agreed in
        # the background (no wait; it keys the calls after it, and reaches the host in this
        # call's one copy of counts) on every call while a session runs, else on every
        # EXCHANGE_EVERY-th: the exchange costs a collective's latency, and a steady run's load
        # changes slowly; an evaluation call's load (other batches, other lengths) would key the
        # training calls after it, so only training calls exchange (evaluation ones look up by
        # the training key, agreed all the same). It is agreed now (wait, a sync) at the first
        # call. On one rank without capacity the key is the call's own slot count, host
        # metadata: nothing to exchange; on one rank with capacity the kept count is read now (a
        # sync per call, not yet removed).
        riders: list[HostRider] = []
        if ep_size == 1 and capacity is None:
            self._lag_key = top_k_index_TK.numel()
            exchange = None
        elif self._lag_key is None or ep_size == 1:
            self._lag_key = LoadExchange(packet(), ep_group, num_experts, wait=True).key()
            exchange = None
        elif mode == "train" and (self._session is not None or self._calls % self.EXCHANGE_EVERY == 0):
            exchange = self._inflight = LoadExchange(packet(), ep_group, num_experts, wait=False)
            riders.append(exchange.rider())
        else:
            exchange = None
        key = self._lag_key
        if mode == "train":
            self._advance_session(ep_group)
        n, restore, sample = self._decide(key, mode, device)
        if sample is not None:
            if exchange is not None:
                exchange.sample = sample
            else:  # its own load is the one just agreed
                sample.key = max(key, 1)
        digest_rider = HostRider(digest_1)
        riders.append(digest_rider)
        self._digests_in_flight.append((shape, digest_rider, n, restore))
        self._last = (n, restore, key)
        return TunedCall(config.resolved(n, restore), sample, tuple(riders))

    def _settle_digests(self) -> None:
        """Remember the decisions of forwards whose routing digest reached the host (a forward
        whose plan never ran has nothing to recompute)."""
        for shape, rider, n, restore in self._digests_in_flight:
            if rider.host is not None:
                digest = (shape, rider.host[0])
                self._forwards[digest] = (n, restore)
                self._forwards.move_to_end(digest)
        self._digests_in_flight.clear()
        while len(self._forwards) > 64:
            self._forwards.popitem(last=False)

    def _recompute(self, config, packet, digest, ep_group, num_experts) -> TunedCall:
        """A forward re-run inside backward: the decision of the forward it repeats (found by
        its routing on every rank: agreed along with this call's load), else a lookup."""
        found = self._forwards.get(digest)
        exchange = LoadExchange(packet, ep_group, num_experts, wait=True, extra=(int(found is not None),))
        self._lag_key = key = exchange.key()
        if found is not None and exchange.extra()[0] == group_size(ep_group):
            n, restore = found  # every rank found its forward, whose decision was agreed
        else:
            n, restore, _ = self._decide(key, "recompute", torch.device("cpu"))
        self._last = (n, restore, key)
        return TunedCall(config.resolved(n, restore), None)

    def _complete(self, exchange: LoadExchange) -> None:
        """A call's own load is known: it keys the next decisions, and its sample."""
        self._lag_key = exchange.key()
        if exchange.sample is not None:
            exchange.sample.key = max(self._lag_key, 1)

    @staticmethod
    def _static(config: ExecutorConfig) -> bool:
        n_fixed = not config.tunes_partitions or len(config.candidate_set) == 1
        return n_fixed and (not config.tunes_restore or config.memory_budget is None)

    def _setup(self, config, experts, top_k, dtype, device, ep_group, ep_size) -> None:
        gated = experts.gated
        signature = (config, experts.hidden_size, experts.intermediate_size, gated, experts.num_local_experts,
                     top_k, dtype, ep_size, device.type)
        if signature == self._signature and self._pending is None:
            return
        world = dist.get_world_size() if dist.is_initialized() else 1
        current = fingerprint(hidden=experts.hidden_size, intermediate=experts.intermediate_size, gated=gated,
                              local_experts=experts.num_local_experts, top_k=top_k, dtype=dtype, ep_size=ep_size,
                              world_size=world, device=device, config=config)
        if self._fingerprint is not None and self._fingerprint != current:
            self._log(f"re-tuning: {fingerprint_diff(self._fingerprint, current)}")
        if self._fingerprint != current:
            self._reset(config)
        self._signature, self._fingerprint, self._config = signature, current, config
        # One agreement: the budget in bytes (the smallest device's), and whether every rank
        # loaded the same state with a matching fingerprint.
        pending, self._pending = self._pending, None
        reason = "" if pending is None else fingerprint_diff(pending.get("fingerprint"), current)
        digest = zlib.crc32(json.dumps(pending, sort_keys=True).encode()) if pending is not None else 0
        budget = budget_bytes(config.memory_budget, _device_memory(device))
        packet = torch.tensor([int(pending is not None and not reason), digest, -digest,
                               _NO_BUDGET if budget is None else budget], dtype=torch.int64)
        match, low, neg_high, agreed_budget = all_reduce(packet, ep_group, dist.ReduceOp.MIN, device=device,
                                                               site="tuner.setup").tolist()
        self._budget = None if agreed_budget == _NO_BUDGET else agreed_budget
        if pending is None:
            return
        if match and low == -neg_high:
            self._table.load(pending.get("points", []))
            cal = pending.get("calibration")
            self._calibration = Calibration.from_dict(cal) if cal else None
            self._profiles = {int(k): {str(label): float(t) for label, t in v.items()}
                              for k, v in pending.get("profiles", {}).items()}
            self._measured = {int(k): (int(n), str(restore)) for k, (n, restore) in pending.get("measured", {}).items()}
            self._log(f"loaded {len(self._table)} tuned points; no re-tuning needed")
        else:
            self._log(f"re-tuning, the saved decisions do not apply: {reason or 'ranks loaded different states'}")

    # -- decisions ---------------------------------------------------------------------------
    def _decide(self, key: int, mode: str, device: torch.device) -> tuple[int, str, ProfileSample | None]:
        config, table = self._config, self._table
        if key <= 0:
            return config.resolved().num_partitions, config.resolved().restore, None
        if mode == "infer":
            n = table.lookup(key) or table.nearest(key) or table.candidates[0]
            return n, (config.restore if not config.tunes_restore else "none"), None
        session = self._session
        if mode == "train" and session is None and table.lookup(key) is None:
            session = self._start_session(key)
        if mode == "train" and session is not None:
            if session.queue and self._joins(session, key):
                session.idle = 0
                if session.warmup > 0:  # unmeasured: allocations and first touches of each n
                    session.warmup -= 1
                    warm = session.candidates[session.order[session.warmup % len(session.order)]]
                    return warm.n, warm.restore, None
                index = session.queue.pop(0)
                candidate = session.candidates[index]
                sample = ProfileSample(key, index, device)
                session.local[index] = sample
                self.profile_calls += 1
                return candidate.n, candidate.restore, sample
            session.idle += 1
            if session.idle > self.STALL_CALLS:  # its key no longer comes: decide on what was agreed
                self._log(f"{session.key} rows: no call joined the session for {session.idle} calls; closing it")
                if session.history:
                    self._finish_session(session)
                else:
                    self._session = None
        n = table.lookup(key) or table.nearest(key) or table.candidates[0]
        n, choice = self._feasible(n, key)
        if mode == "train":
            self._log_strategy(choice)
        return n, choice.restore, None

    def _shape(self, key: int) -> LayerShape:
        top_k, experts, dtype, ep_size, device, _ = self._shape_args
        return LayerShape(tokens=-(-key // top_k), top_k=top_k, hidden=experts.hidden_size,
                          intermediate=experts.intermediate_size, gated=experts.gated, ep_size=ep_size,
                          dtype_bytes=torch.empty((), dtype=dtype).element_size(),
                          host_is_device=device.type == "cpu")

    def _strategy(self, n: int, key: int) -> StrategyChoice:
        """The restore strategy at (n, key): the cost model's pick (`_modelled`), unless a
        session measured another one faster at this n near `key` and the model cannot tell
        the two apart here (within `MODEL_MARGIN`) and it fits the budget."""
        choice = self._modelled(n, key)
        near = [(abs(math.log(key / k)), restore) for k, (m, restore) in self._measured.items() if m == n]
        if not near or choice.over_budget:
            return choice
        _, restore = min(near)
        if restore != choice.restore and restore in self._close_to_pick(choice):
            return replace(choice, restore=restore, measured=True)
        return choice

    def _close_to_pick(self, choice: StrategyChoice) -> list[str]:
        """The feasible strategies the model ranks within `MODEL_MARGIN` of its pick (the pick first)."""
        predicted = choice.predicted_s
        if choice.restore not in predicted:
            return [choice.restore]
        limit = predicted[choice.restore] * (1 + self.MODEL_MARGIN)
        close = [s for s in choice.feasible if s != choice.restore and predicted.get(s, math.inf) <= limit]
        return [choice.restore, *close]

    def _modelled(self, n: int, key: int) -> StrategyChoice:
        """`choose_strategy` at (n, key) with this layer's budget (cached)."""
        cached = self._choices.get((n, key))
        if cached is not None:
            return cached
        config = self._config
        allowed = RESTORE_STRATEGIES if config.tunes_restore else (config.restore,)
        shape = self._shape(key)
        if self._calibration is None and needs_calibration(shape, n, self._budget, allowed):
            self._calibrate(key)
        choice = choose_strategy(shape, n, self._budget, self._calibration, allowed)
        if len(self._choices) > 4096:
            self._choices.clear()
        self._choices[(n, key)] = choice
        return choice

    def _calibrate(self, key: int) -> None:
        top_k, experts, dtype, _, device, ep_group = self._shape_args
        width = 2 * experts.intermediate_size if experts.gated else experts.intermediate_size
        rows = min(max(key // 2, 256), 8192)
        self._calibration = calibrate(hidden=experts.hidden_size, width=width, rows=rows, dtype=dtype, device=device,
                                      ep_group=ep_group, link=self._config.link,
                                      local_experts=experts.num_local_experts)
        self._log(f"calibrated at {rows} rows: {self._calibration.summary()}")

    def _feasible(self, n: int, key: int) -> tuple[int, StrategyChoice]:
        """The smallest candidate >= n with a strategy that fits the budget (footprints shrink
        as n grows); if none fits, the pair with the smallest footprint (warned once)."""
        candidates = [c for c in self._table.candidates if c >= n] or [n]
        for c in candidates:
            choice = self._strategy(c, key)
            if not choice.over_budget:
                return c, choice
        choices = [self._strategy(c, key) for c in self._table.candidates]
        best = min(choices, key=lambda ch: (ch.footprints[ch.restore], ch.num_partitions))
        # Once per fallback (n, strategy), not per key: a drifting load brings a new key every
        # few steps, and the advice (a larger budget, more ranks) is the same for all of them.
        fallback = (best.num_partitions, best.restore)
        if fallback not in self._warned_over and _rank_zero():
            self._warned_over.add(fallback)
            logger.warning("moe tuner%s: %s", self._label(), best.explain(self._calibration))
        return best.num_partitions, best

    # -- reporting ---------------------------------------------------------------------------
    def _label(self) -> str:
        return f" [{self.name}]" if self.name else ""

    def _log(self, message: str) -> None:
        if _rank_zero():
            logger.info("moe tuner%s: %s", self._label(), message)

    def _log_strategy(self, choice: StrategyChoice) -> None:
        if self._config.tunes_restore and choice.restore != self._logged_restore:
            self._logged_restore = choice.restore
            self._log(choice.explain(self._calibration))

    @property
    def tuning(self) -> bool:
        return self._session is not None

    @property
    def table(self) -> RangeTable:
        return self._table

    @property
    def calibration(self) -> Calibration | None:
        return self._calibration

    @property
    def budget_bytes(self) -> int | None:
        return self._budget

    def decision(self, key: int) -> int | None:
        """The n the ranges give `key` (None on a miss), without counting a lookup."""
        return self._table._search(key)

    def metrics(self) -> dict[str, float]:
        """Chosen n and strategy of the latest call, tuning state and the per-candidate times
        (ms per call) of the latest profiled key; the same on every rank."""
        out: dict[str, float] = {"tuning": float(self.tuning), "profiled_keys": float(len(self._table)),
                                 "profile_calls": float(self.profile_calls)}
        if self._last is not None:
            n, restore, key = self._last
            out.update(num_partitions=float(n), restore=float(RESTORE_STRATEGIES.index(restore)), key_rows=float(key))
        if self._table.lookups:
            out["cache_hit_rate"] = self._table.hits / self._table.lookups
        if self._budget is not None:
            out["memory_budget_mib"] = self._budget / 2**20
        if self._profiles:
            latest = max(self._profiles) if self._last is None else min(
                self._profiles, key=lambda k: abs(math.log(max(self._last[2], 1) / k)))
            for label, seconds in sorted(self._profiles[latest].items()):
                out[f"candidate_ms/{label}"] = seconds * 1e3
        return out

    def state_dict(self) -> dict:
        """JSON-ready: fingerprint, range points, calibration, per-candidate times."""
        if self._pending is not None:
            return json.loads(json.dumps(self._pending))  # loaded, not yet applied: pass it on unchanged
        return {
            "format": FORMAT_VERSION,
            "fingerprint": self._fingerprint,
            "points": self._table.state(),
            "calibration": self._calibration.to_dict() if self._calibration else None,
            "profiles": {str(k): {label: t for label, t in v.items() if math.isfinite(t)}
                         for k, v in self._profiles.items()},
            "measured": {str(k): [n, restore] for k, (n, restore) in self._measured.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Take a saved state; it is checked against the running layer (and agreed over the EP
        group) at the next call, and dropped (re-tune) if anything changed."""
        if not state:
            return
        if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION or not isinstance(
            state.get("points"), list
        ):
            raise ValueError(f"not a version-{FORMAT_VERSION} LayerTuner state: {str(state)[:200]}")
        self._pending = json.loads(json.dumps(state))  # a private, JSON-clean copy


def _device_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class TunerOwner:
    """Mixin for what owns a layer's `tuner` (the `MoELayer`, a Hugging Face binding): the hooks
    the Lightning strategy reads (`lightning_mpipemoe.discovery`) — the tuner's decisions go into
    checkpoints, its choices into the logged metrics."""

    tuner: LayerTuner

    def executor_state_dict(self) -> dict:
        return self.tuner.state_dict()

    def load_executor_state_dict(self, state: dict) -> None:
        self.tuner.load_state_dict(state)

    def executor_metrics(self) -> dict[str, float]:
        return self.tuner.metrics()
