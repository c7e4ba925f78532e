"""The granularity ranges of one MoE layer: the token-count axis cut into ranges, each one n.

DESIGN.md §1.2: the best n never decreases as the load grows (pipelining pays more the
more there is to overlap, and per-partition overheads weigh less), so profiled points
(key, n) imply ranges: consecutive points with the same n cover everything between them,
and between points of different n the best n lies between theirs. That is what makes the
table small (one range per n) and what bounds the candidates a miss has to profile (the
tuner also tries one candidate beyond each bound, so that a point measured wrong by noise
gets repaired by its neighbours' sessions instead of constraining them). Past the outermost
point, within a factor `REACH` of it, that point's n is the bound too: the best n moves by
at most one candidate over such a stretch, so a load that drifts up during training
profiles two or three candidates per new range, not all of them.

Keys are row counts (see `load_key.agree_load`); a point also answers keys within a factor
`1 + tolerance` of it, so the drift of routing between steps does not re-profile.
"""

from __future__ import annotations

import bisect
import math

__all__ = ["RangeTable"]


class RangeTable:
    """Profiled points (key, n) of one layer and the ranges they imply, n monotone in the key.

    A point covers keys within a factor `1 + tolerance` of it; consecutive points with the
    same n merge into one range (by monotonicity every key between them has that n); the
    first range extends to 0 if its n is the smallest candidate, the last to infinity if it
    is the largest. Between two points of different n the best n lies between theirs, which
    bounds the candidates a miss there profiles (`bounds`).
    """

    #: How far past the outermost point the best n moves by at most one candidate (candidates
    #: double; DESIGN.md §1.2's published ranges step once per ~2.75x of tokens: n = 2 below 8k,
    #: 4 to 22k, 8 above).
    REACH = 2.0

    def __init__(self, candidates: tuple[int, ...], tolerance: float) -> None:
        self.candidates = tuple(sorted(candidates))
        self.tolerance = tolerance
        self._keys: list[int] = []
        self._ns: list[int] = []
        self._cache: dict[int, int | None] = {}
        self.hits = self.lookups = 0

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def points(self) -> list[tuple[int, int]]:
        return list(zip(self._keys, self._ns))

    def lookup(self, key: int) -> int | None:
        """n for `key`, or None on a miss. Exact-count cache first, then the ranges."""
        self.lookups += 1
        if key in self._cache:
            self.hits += 1
            return self._cache[key]
        n = self._search(key)
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[key] = n
        return n

    def _search(self, key: int) -> int | None:
        i = bisect.bisect_left(self._keys, key)
        if i < len(self._keys) and self._keys[i] == key:
            return self._ns[i]
        left = i - 1 if i > 0 else None
        right = i if i < len(self._keys) else None
        if left is not None and right is not None and self._ns[left] == self._ns[right]:
            return self._ns[left]
        near = []
        grow = 1.0 + self.tolerance
        if left is not None and key <= self._keys[left] * grow:
            near.append((math.log(key / self._keys[left]), 0, self._ns[left]))
        if right is not None and key * grow >= self._keys[right]:
            near.append((math.log(self._keys[right] / max(key, 1)), 1, self._ns[right]))
        if near:
            return min(near)[2]
        if left is None and right is not None and self._ns[right] == self.candidates[0]:
            return self._ns[right]
        if right is None and left is not None and self._ns[left] == self.candidates[-1]:
            return self._ns[left]
        return None

    def bounds(self, key: int) -> tuple[int, int]:
        """Smallest and largest n that monotonicity allows at `key` (given the points).

        Beyond the outermost point but within a factor `REACH` of its key, the bound on that
        side is the point's own n (the tuner then profiles one candidate beyond it): a
        drifting load that leaves the last range profiles its neighbours, not every
        candidate up to the largest."""
        i = bisect.bisect_left(self._keys, key)
        if i > 0:
            low = self._ns[i - 1]
        elif self._keys and key * self.REACH >= self._keys[0]:
            low = self._ns[0]
        else:
            low = self.candidates[0]
        if i < len(self._keys):
            high = self._ns[i]
        elif self._keys and key <= self._keys[-1] * self.REACH:
            high = self._ns[-1]
        else:
            high = self.candidates[-1]
        return low, max(low, high)

    def nearest(self, key: int) -> int | None:
        """n of the nearest point (log distance; ties to the smaller key), None if empty."""
        if not self._keys:
            return None
        return min(zip(self._keys, self._ns), key=lambda p: (abs(math.log(max(key, 1) / p[0])), p[0]))[1]

    def insert(self, key: int, n: int) -> int:
        """Add the point (key, n) (replacing one at the same key) and keep n monotone by
        repairing the others: the newest measurement says the best n is at most n below `key`
        and at least n above it, so points that contradict it take n. (A tuner profiles at most
        one candidate beyond its neighbours' n, so one repair moves a point by one candidate.)"""
        if key <= 0:
            raise ValueError(f"range keys are positive row counts, got {key}")
        i = bisect.bisect_left(self._keys, key)
        if i < len(self._keys) and self._keys[i] == key:
            del self._keys[i], self._ns[i]
        self._keys.insert(i, key)
        self._ns.insert(i, n)
        self._ns[:i] = [min(m, n) for m in self._ns[:i]]
        self._ns[i + 1 :] = [max(m, n) for m in self._ns[i + 1 :]]
        self._cache.clear()
        return n

    def ranges(self) -> list[tuple[float, float, int]]:
        """The key axis as `(low, high, n)` ranges: sorted, disjoint, n non-decreasing; gaps
        between them are misses (profiled when a training call lands there)."""
        runs: list[list] = []
        for key, n in zip(self._keys, self._ns):
            if runs and runs[-1][2] == n:
                runs[-1][1] = key
            else:
                runs.append([key, key, n])
        grow = 1.0 + self.tolerance
        out = []
        for j, (first, last, n) in enumerate(runs):
            low = 0.0 if (j == 0 and n == self.candidates[0]) else first / grow
            high = math.inf if (j == len(runs) - 1 and n == self.candidates[-1]) else last * grow
            if out and low < out[-1][1]:  # tolerance zones of different n meet halfway (log scale)
                middle = math.sqrt(runs[j - 1][1] * first)
                out[-1] = (out[-1][0], middle, out[-1][2])
                low = middle
            out.append((low, high, n))
        return out

    def state(self) -> list[list[int]]:
        return [[k, n] for k, n in zip(self._keys, self._ns)]

    def load(self, points: list) -> None:
        self._keys, self._ns = [], []
        self._cache.clear()
        for key, n in sorted((int(k), int(n)) for k, n in points):
            self.insert(key, n)
