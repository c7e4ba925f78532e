"""The profiling sessions of a `LayerTuner` (tuner.py's module docstring says how they decide).

A mixin of `LayerTuner`: the session's candidates at a missed key (bounded by the range table,
each with the cost model's restore strategy), each round's agreement across the EP group, the
pruning and settling rule, and the point a finished session inserts. It reads and writes the
tuner's own state (`_table`, `_session`, `_profiles`, `_measured`) and calls its strategy
methods (`_modelled`, `_close_to_pick`, `_feasible`, `_strategy`).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from lightning_mpipemoe.moe.cost_model import all_reduce
from lightning_mpipemoe.moe.profiling import _Candidate, _Session, paired_gap

__all__ = ["SessionMethods"]


class SessionMethods:
    """`LayerTuner`'s profiling sessions (see tuner.py)."""

    def _joins(self, session: _Session, key: int) -> bool:
        return abs(math.log(key / session.key)) <= math.log1p(self.tolerance)

    def _start_session(self, key: int) -> _Session | None:
        # The candidates monotonicity allows, and one beyond each side: a neighbour measured
        # wrong by noise must not fence the truth out (RangeTable.insert repairs it).
        low, high = self._table.bounds(key)
        candidates = list(self._table.candidates)
        first = max(0, candidates.index(low) - 1) if low in candidates else 0
        last = min(len(candidates) - 1, candidates.index(high) + 1) if high in candidates else len(candidates) - 1
        # Each n with the model's strategy, and with those the model cannot tell from it.
        choices = [self._modelled(n, key) for n in candidates[first : last + 1]]
        fits = [_Candidate(ch.num_partitions, s)
                for ch in choices if not ch.over_budget for s in self._close_to_pick(ch)]
        if len(fits) <= 1:  # nothing to compare: the range needs no profiling
            n = fits[0].n if fits else self._feasible(low, key)[0]
            self._table.insert(key, n)
            return None
        self._session = _Session(key, fits)
        self._session.start_round()
        self._session.warmup = self.warmup * len(fits)
        return self._session

    def _advance_session(self, ep_group: ProcessGroup | None) -> None:
        """At a training call: once every live candidate ran this round, agree on the round's
        times (all-reduce max: the slowest rank's is the call's), prune, and finish when the
        leader is settled (or after `max_rounds`)."""
        session = self._session
        if session is None or session.queue:
            return
        values = []
        for index in session.order:
            sample = session.local.get(index)
            values.extend(sample.per_row() if sample is not None else (math.inf, math.inf))
        agreed = all_reduce(torch.tensor(values, dtype=torch.float64), ep_group, dist.ReduceOp.MAX,
                            device=self._shape_args[4], site="tuner.session_round").tolist()
        session.history.append({index: (agreed[2 * j], agreed[2 * j + 1]) for j, index in enumerate(session.order)})
        rounds = len(session.history)
        # Sequential decision on paired log-ratios against the leader: a candidate significantly
        # (2 standard errors) slower by more than prune_margin goes (before min_rounds only a
        # gross loser, by GROSS_MARGIN); the session ends when no other candidate can be more
        # than `settle` faster than the leader (2 standard errors, its own or the pooled noise,
        # whichever is larger), or at max_rounds.
        z = 2.0
        leader, *others = session.ranking()
        margin = self.prune_margin if rounds >= self.min_rounds else self.GROSS_MARGIN
        open_questions = 0
        pooled_se = session.pair_se()
        for other in others:
            gap, se = paired_gap(session.ratios(leader, other))
            if rounds >= 2 and gap - z * se > math.log1p(margin):
                session.candidates[other].live = False
            elif z * max(se, pooled_se) - gap > math.log1p(self.settle):
                open_questions += 1  # it might still be more than `settle` faster than the leader
        live = sum(c.live for c in session.candidates)
        if live == 1 or rounds >= self.max_rounds or (rounds >= self.min_rounds and open_questions == 0):
            self._finish_session(session)
            return
        session.start_round()

    def _finish_session(self, session: _Session) -> None:
        best = session.candidates[session.ranking()[0]]
        n = self._table.insert(session.key, best.n)
        if best.n == n and sum(c.n == n for c in session.candidates) > 1:
            self._measured[session.key] = (n, best.restore)  # strategies were measured at n: keep the fastest
        seconds = [session.median_seconds(i) for i in range(len(session.candidates))]
        self._profiles[session.key] = {self._label_of(c, session): t for c, t in zip(session.candidates, seconds)}
        self._session = None
        timings = ", ".join(
            f"n={c.n}/{c.restore} {t * 1e3:.1f}{'*' if c is best and c.n == n else ('' if c.live else ' (pruned)')}"
            for c, t in zip(session.candidates, seconds))
        self._log(f"{session.key} rows -> n={n}; median ms per call: {timings} ({len(session.history)} rounds)")
        self._log_strategy(self._strategy(n, session.key))

    def _label_of(self, candidate: _Candidate, session: _Session) -> str:
        """`n4`, or `n4_s1` for a strategy measured beside the model's pick at n=4."""
        if candidate.restore == self._modelled(candidate.n, session.key).restore:
            return f"n{candidate.n}"
        return f"n{candidate.n}_{candidate.restore}"
