"""The layer-level launches of the side-by-side suite (`suite.py`): one `Launch` per process launch
of `bench_layer.py`, every system of a launch interleaved round by round in it.

Groups (the `group` field, which `report.py` tables and plots read):

    main     T = 4096 per rank, EP = 2, top-2, no simulated link: HF's EP (grouped_mm, eager),
             HF without EP, ours at n = 1, 2, 4, 8, n = 4 / s4, the default (tuner) without and
             with a memory budget (half of HF EP's held bytes, measured first in the launch)
    link     the same layer over the simulated link (ours only: HF's AllToAllEP has no seam)
    ep4      EP = 4 (4 processes on the 2 cores: oversubscribed, compare rows with each other)
    tokens   EP = 2 at other T per rank, for the speed-up-vs-tokens plot (T = 4096: main)

Every ratio a table or plot shows (a system against hf_ep_grouped_mm at one (EP, T, top-k)
point) is taken between steps of the same launch and the same round.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Simulated link of the `link` group: 4 all-to-alls of a T = 4096, EP = 2, top-2 step move
#: 16.8 MB per rank; at 56 MB/s the wire takes ~0.3 s, about the step's compute on this
#: machine (the bench_pipeline_speed.py calibration, wire ~ compute), fixed so that every
#: launch sees the same link.
LINK_BANDWIDTH = 5.6e7

#: The systems every point of the token sweep compares with HF's EP (T = 4096 is in main).
SWEEP_SYSTEMS = ("hf_ep_grouped_mm", "ours_n1", "ours_n4", "ours_n4_s4", "ours_auto", "ours_auto_budget50")


@dataclass(frozen=True)
class Launch:
    group: str
    systems: tuple[str, ...]
    ep: int = 2
    tokens: int = 4096
    top_k: int = 2
    link: bool = False
    rounds: int | None = None  # None: the suite's --rounds

    @property
    def key(self) -> str:
        return "-".join([self.group, f"ep{self.ep}", f"t{self.tokens}", f"k{self.top_k}"]
                        + (["link"] if self.link else []))


def launches(quick: bool = False) -> list[Launch]:
    """Every layer-level launch of the suite. `quick`: one small launch (a smoke run)."""
    if quick:
        return [Launch("main", ("hf_ep_grouped_mm", "ours_n2", "ours_auto_budget50"), tokens=512)]
    return [
        Launch("main", ("hf_ep_grouped_mm", "hf_ep_eager", "hf_single_grouped_mm", "ours_n1", "ours_n2", "ours_n4",
                        "ours_n8", "ours_n4_s4", "ours_auto", "ours_auto_budget50")),
        Launch("link", ("ours_n1", "ours_n2", "ours_n4", "ours_n8", "ours_auto"), link=True),
        Launch("ep4", ("hf_ep_grouped_mm", "hf_ep_eager", "ours_n1", "ours_n4", "ours_auto"), ep=4, tokens=2048),
        *(Launch("tokens", SWEEP_SYSTEMS, tokens=t) for t in (1024, 2048)),
    ]
