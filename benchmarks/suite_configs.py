"""The configurations of the side-by-side suite (`suite.py`): one `Run` per process launch.

Groups (the `group` field, which `report.py` tables and plots read):

    main     T = 4096 per rank, EP = 2, top-2, no simulated link: every system, n = 1..8,
             adaptive without and with a memory budget (half of HF built-in EP's held bytes)
    link     the same layer over the simulated link (ours only: HF's AllToAllEP has no seam)
    ep4      EP = 4 (4 processes on the 2 cores: oversubscribed, compare rows with each other)
    tokens   EP = 2 over T per rank, for the speed-up-vs-tokens plot
"""

from __future__ import annotations

from dataclasses import dataclass

#: Simulated link of the `link` group: 4 all-to-alls of a T = 4096, EP = 2, top-2 step move
#: 16.8 MB per rank; at 56 MB/s the wire takes ~0.3 s, about the step's compute on this
#: machine (the bench_pipeline_speed.py calibration, wire ~ compute), fixed so that every
#: launch sees the same link.
LINK_BANDWIDTH = 5.6e7

#: The budget row's marker: the driver replaces it with half of HF EP's measured held bytes.
HALF_OF_HF = "half_of_hf_ep"


@dataclass(frozen=True)
class Run:
    group: str
    system: str
    ep: int = 2
    tokens: int = 4096
    top_k: int = 2
    link: bool = False
    budget: str | None = None  # None or HALF_OF_HF

    @property
    def key(self) -> str:
        parts = [self.group, self.system, f"ep{self.ep}", f"t{self.tokens}", f"k{self.top_k}"]
        if self.link:
            parts.append("link")
        if self.budget:
            parts.append("budget")
        return "-".join(parts)


def runs(quick: bool = False) -> list[Run]:
    """Every launch of the suite, HF EP rows first within each (EP, T) so that budget rows
    can read HF's held bytes. `quick`: a smoke run of a few small launches."""
    if quick:
        t = 512
        return [
            Run("main", "hf_ep_grouped_mm", tokens=t),
            Run("main", "ours_n2", tokens=t),
            Run("main", "ours_auto", tokens=t, budget=HALF_OF_HF),
            Run("link", "ours_n2", tokens=t, link=True),
        ]
    out = [Run("main", s) for s in ("hf_ep_grouped_mm", "hf_ep_eager", "hf_single_grouped_mm", "hf_single_eager",
                                   "ours_n1", "ours_n2", "ours_n4", "ours_n8", "ours_n4_s4", "ours_auto")]
    out.append(Run("main", "ours_auto", budget=HALF_OF_HF))
    out += [Run("link", s, link=True) for s in ("ours_n1", "ours_n2", "ours_n4", "ours_n8", "ours_auto")]
    out += [Run("ep4", s, ep=4, tokens=2048) for s in ("hf_ep_grouped_mm", "hf_ep_eager", "ours_n1", "ours_n4",
                                                      "ours_auto")]
    for tokens in (1024, 2048):
        out += [Run("tokens", s, tokens=tokens) for s in ("hf_ep_grouped_mm", "ours_n1", "ours_n4", "ours_auto")]
    # No recheck pass, no EP = 4 link rows and no T = 8192 sweep point any more: the whole-model
    # section (bench_model_step.py, every system interleaved in one launch) took their share of
    # the 20-minute budget, and it is the paired measurement the recheck pass approximated.
    return out
