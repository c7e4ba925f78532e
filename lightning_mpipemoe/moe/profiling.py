"""Measuring candidates on real training calls: the timing of one call, and a session's rounds.

A profiled call is a real training call (its result is the result): the executor wraps it
so that forward is timed by the wall clock around the executor and backward from the
arrival of the output's gradient (a tensor hook: it survives in-place updates of the
output by the caller) to the departure of the input's (an identity autograd Function on the
input, else on the first expert weight): the layer's own backward, whatever runs around it.
CUDA is synchronised around those points, on profiled calls only.

A session runs its candidates round-robin, one call each per round; `_Session` keeps the
rounds (after the agreement across ranks) and ranks the candidates: each round's times are
divided by that round's geometric mean and the median is taken over rounds, so a load
change that slows a whole round cancels and one slow call is outvoted. Comparisons of two
candidates are paired (round by round, same load).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field, replace

import torch

from lightning_mpipemoe.moe.experts import ExpertWeights

__all__ = ["ProfileSample", "paired_gap"]

_SE_FLOOR = 0.005  # standard error never below 0.5%: a few equal ratios are not proof


def paired_gap(ratios: list[float]) -> tuple[float, float]:
    """(median log-ratio, its standard error) of paired ratios other / leader.

    Robust: the median, and the spread from the median absolute deviation (a burst is an
    outlier, not a variance); standard error 1.25 * sigma / sqrt(rounds), floored.
    """
    logs = [math.log(r) for r in ratios if r > 0 and math.isfinite(r)]
    if not logs:
        return 0.0, math.inf
    middle = statistics.median(logs)
    if len(logs) < 2:
        return middle, math.inf
    sigma = 1.4826 * statistics.median(abs(x - middle) for x in logs)
    return middle, max(1.2533 * sigma / math.sqrt(len(logs)), _SE_FLOOR)


class ProfileSample:
    """Forward and backward wall time of one profiled call (synchronising CUDA around them)."""

    def __init__(self, key: int, candidate: int, device: torch.device) -> None:
        self.key, self.candidate, self._cuda = key, candidate, device.type == "cuda"
        self._t0 = self.forward_s = self._bwd_start = self._bwd_end = None

    def _now(self) -> float:
        if self._cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def wrap_inputs(self, hidden_TH: torch.Tensor, experts: ExpertWeights) -> tuple[torch.Tensor, ExpertWeights]:
        """Put the backward-end marker on the input (else on w_in): its backward runs once the
        layer's backward has produced that gradient."""
        if hidden_TH.requires_grad:
            return _BackwardEnd.apply(hidden_TH, self), experts
        if experts.w_in_EOH.requires_grad:
            return hidden_TH, replace(experts, w_in_EOH=_BackwardEnd.apply(experts.w_in_EOH, self))
        return hidden_TH, experts

    def start(self) -> None:
        self._t0 = self._now()

    def forward_done(self, out_TH: torch.Tensor) -> None:
        self.forward_s = self._now() - self._t0
        if out_TH.requires_grad:
            out_TH.register_hook(self._grad_out_arrived)

    def _grad_out_arrived(self, grad):
        if self._bwd_start is None:
            self._bwd_start = self._now()

    def grad_in_left(self) -> None:
        self._bwd_end = self._now()

    def per_row(self) -> tuple[float, float]:
        """(forward + backward, forward) seconds per key row; inf where missing."""
        fwd = self.forward_s if self.forward_s is not None else math.inf
        if self._bwd_start is None or self._bwd_end is None:
            return math.inf, fwd / self.key
        return (fwd + self._bwd_end - self._bwd_start) / self.key, fwd / self.key


class _BackwardEnd(torch.autograd.Function):
    """Identity whose backward timestamps the end of the layer's backward."""

    @staticmethod
    def forward(ctx, tensor, sample):
        ctx.sample = sample
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        ctx.sample.grad_in_left()
        return grad, None


@dataclass
class _Candidate:
    n: int
    restore: str
    live: bool = True


@dataclass
class _Session:
    """One profiling session: candidates run round-robin; `history` holds each round's agreed
    (fwd+bwd, fwd) seconds per row by candidate index."""

    key: int
    candidates: list[_Candidate]
    warmup: int = 0  # unmeasured calls still to run (whole rounds, in `order`)
    idle: int = 0  # training calls since one last joined
    history: list[dict] = field(default_factory=list)
    order: list[int] = field(default_factory=list)  # this round's candidates, in call order
    queue: list[int] = field(default_factory=list)  # ... not yet called
    local: dict = field(default_factory=dict)  # candidate index -> this rank's ProfileSample

    def start_round(self) -> None:
        self.order = [i for i, c in enumerate(self.candidates) if c.live]
        self.queue = list(self.order)
        self.local = {}

    @property
    def live(self) -> list[int]:
        return [i for i, c in enumerate(self.candidates) if c.live]

    def _rounds(self, members: list[int]) -> tuple[list[dict], int]:
        """Rounds where every one of `members` has a finite fwd+bwd time (field 0), else
        finite forward times (field 1: no backward was seen)."""
        for column in (0, 1):
            rounds = [h for h in self.history if all(i in h and math.isfinite(h[i][column]) for i in members)]
            if rounds:
                return rounds, column
        return [], 0

    def scores(self, members: list[int]) -> dict[int, float]:
        """Per-round normalised medians: each round's times divided by that round's geometric
        mean over `members`, then the median over rounds. A load change that slows a whole
        round cancels; one slow call moves one round's value, which the median ignores."""
        rounds, column = self._rounds(members)
        if not rounds:
            return {i: math.inf for i in members}
        normalised = {i: [] for i in members}
        for h in rounds:
            mean_log = statistics.fmean(math.log(max(h[i][column], 1e-30)) for i in members)
            for i in members:
                normalised[i].append(h[i][column] / math.exp(mean_log))
        return {i: statistics.median(v) for i, v in normalised.items()}

    def pair_se(self) -> float:
        """Standard error of a paired log-ratio from the noise of all live candidates pooled:
        steadier than one pair's own spread when rounds are few (4 samples can look quiet by
        chance). sigma from the median absolute deviation of every round-normalised log time
        from its candidate's median; a pair's difference has twice the variance."""
        members = self.live
        rounds, column = self._rounds(members)
        if len(rounds) < 2 or len(members) < 2:
            return math.inf
        deviations = []
        for i in members:
            logs = []
            for h in rounds:
                mean_log = statistics.fmean(math.log(max(h[j][column], 1e-30)) for j in members)
                logs.append(math.log(max(h[i][column], 1e-30)) - mean_log)
            middle = statistics.median(logs)
            deviations.extend(abs(x - middle) for x in logs)
        sigma = 1.4826 * statistics.median(deviations)
        return 1.2533 * sigma * math.sqrt(2.0 / len(rounds))

    def ratios(self, leader: int, other: int) -> list[float]:
        """other's time / leader's, round by round (paired: same round, same load)."""
        rounds, column = self._rounds([leader, other])
        return [h[other][column] / h[leader][column] for h in rounds]

    def ranking(self) -> list[int]:
        scores = self.scores(self.live)
        return sorted(self.live, key=lambda i: (scores[i], self.candidates[i].n))

    def median_seconds(self, index: int) -> float:
        """Median seconds per call of one candidate (for logs and metrics)."""
        for column in (0, 1):
            values = [h[index][column] for h in self.history if index in h and math.isfinite(h[index][column])]
            if values:
                return statistics.median(values) * self.key
        return math.inf
