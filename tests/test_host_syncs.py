"""Host synchronisations of one MoE layer call: at most one device-to-host transfer in the
forward (the copy of the exchanged `[P, R, L]` counts that `all_to_all_single` needs as host
split sizes), none in the backward, whatever E and n.

The layer runs on CPU here, where a sync costs nothing, so the test counts what would be one
on a GPU: every host conversion of a tensor (`item`, `tolist`, `numpy`, `int()`, `float()`,
`bool()`, `__index__`) and every copy to the host (`.cpu()`, `.to("cpu")`), seen by a
`TorchFunctionMode`. The model of "host" and "device" on one CPU:

- a tensor made by a copy to the host (`.cpu()` or `.to` with the string "cpu"), and any
  tensor computed from one, is a host tensor: converting it is free (no sync);
- `.to(device)` with a `torch.device` object is a move to the compute device: its output is
  a device tensor again;
- a tensor made from Python values without a `device=` (`torch.arange(n)`) lives on the host
  (as it would on a GPU run);
- everything else is a device tensor, whose conversions are syncs.

What runs inside the kernel backend (`CpuBackend`, which on CPU reads its offsets with
`tolist`; the CUDA backend has its own contract) is not counted: the backend is wrapped so
that counting pauses inside it. The GPU twin of this test is `benchmarks/gpu_check.sh`'s
sync-debug step (`torch.cuda.set_sync_debug_mode("error")`).
"""

from __future__ import annotations

import contextlib
import weakref
from collections import Counter

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from lightning_mpipemoe import ExecutorConfig, ExpertWeights, build_process_groups
from lightning_mpipemoe.kernels import api as kernels
from lightning_mpipemoe.moe.executor import expert_parallel_forward
from lightning_mpipemoe.moe.tuner import LayerTuner
from tests.dist_utils import run_distributed

E, K, H, I, T = 64, 8, 16, 8, 96
#: The target: one copy of the exchanged counts per forward, nothing in backward.
MAX_FORWARD, MAX_BACKWARD = 1, 0

_CONVERSIONS = {"item", "tolist", "numpy", "__int__", "__float__", "__bool__", "__index__"}


def _is_host_target(args, kwargs) -> bool:
    """Whether a `.to(...)` call names the host with the string "cpu" (a copy to the host)."""
    targets = [kwargs.get("device")] + [a for a in args[1:] if isinstance(a, str)]
    return any(isinstance(t, str) and torch.device(t).type == "cpu" for t in targets)


def _moves_to_device(args, kwargs) -> bool:
    targets = [kwargs.get("device")] + list(args[1:])
    return any(isinstance(t, torch.device) for t in targets)


class HostSyncCounter(TorchFunctionMode):
    """Counts device-to-host syncs by kind, with the innermost caller outside torch."""

    def __init__(self) -> None:
        super().__init__()
        self.paused = 0
        self.syncs: Counter = Counter()
        self._host: dict[int, weakref.ref] = {}  # id -> tensor (tensors compare elementwise)

    def _is_host(self, value) -> bool:
        ref = self._host.get(id(value)) if isinstance(value, torch.Tensor) else None
        return ref is not None and ref() is value

    def _mark(self, out) -> None:
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor):
                self._host[id(value)] = weakref.ref(value)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if self.paused:
            return func(*args, **kwargs)
        first = args[0] if args else None
        tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if name in _CONVERSIONS and isinstance(first, torch.Tensor):
            if not self._is_host(first):
                self.syncs[(name, _caller())] += 1
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        if name == "cpu" or (name == "to" and _is_host_target(args, kwargs)):
            if not self._is_host(first):
                self.syncs[(name, _caller())] += 1
            if out is first:  # on one CPU the copy returns its input; on a GPU it is a new tensor
                out = out.clone()
            self._mark(out)
        elif name == "to" and _moves_to_device(args, kwargs):
            if out is first and self._is_host(first):  # on one CPU `.to` returns its input
                out = out.clone()  # host -> device: a device tensor (as on a GPU: a new one)
        elif any(self._is_host(t) for t in tensors):
            self._mark(out)
        elif not tensors and kwargs.get("device") is None:
            self._mark(out)  # made without a device: on a GPU run it would live on the host
        return out

    @contextlib.contextmanager
    def pause(self):
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1

    @property
    def total(self) -> int:
        return sum(self.syncs.values())


def _caller() -> str:
    import traceback

    for frame in reversed(traceback.extract_stack()[:-2]):
        if "lightning_mpipemoe" in frame.filename:
            return f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} {frame.name}"
    return "?"


class _Uncounted:
    """The CPU kernel backend with counting paused inside each op."""

    def __init__(self, inner, counter: HostSyncCounter) -> None:
        self._inner, self._counter = inner, counter

    def __getattr__(self, name):
        method = getattr(self._inner, name)

        def run(*args, **kwargs):
            with self._counter.pause():
                return method(*args, **kwargs)

        return run


def _layer_inputs(seed: int):
    gen = torch.Generator().manual_seed(seed)
    hidden_TH = torch.randn(T, H, generator=gen).requires_grad_()
    index_TK = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    weights_TK = torch.rand(T, K, generator=gen).softmax(-1).requires_grad_()
    params = {
        "w_in_EOH": (torch.randn(E, 2 * I, H, generator=gen) * 0.1).requires_grad_(),
        "w_out_EHI": (torch.randn(E, H, I, generator=gen) * 0.1).requires_grad_(),
    }
    return hidden_TH, index_TK, weights_TK, ExpertWeights(**params)


def count_call(config: ExecutorConfig, tuner: LayerTuner | None, seed: int = 0, groups=None,
               ) -> tuple[HostSyncCounter, HostSyncCounter]:
    """(forward, backward) counters of one forward + backward of the layer's executor (this
    rank's share of the experts on an EP group)."""
    hidden_TH, index_TK, weights_TK, experts = _layer_inputs(seed)
    kw = {}
    if groups is not None:
        local = E // groups.ep_size
        mine = slice(groups.ep_rank * local, (groups.ep_rank + 1) * local)
        experts = ExpertWeights(experts.w_in_EOH.detach()[mine].clone().requires_grad_(),
                                experts.w_out_EHI.detach()[mine].clone().requires_grad_())
        kw = dict(ep_group=groups.ep, combine_group=groups.ep_combine)
    forward, backward = HostSyncCounter(), HostSyncCounter()
    backend = kernels.backend_for(torch.device("cpu"))
    with kernels.use_backend("cpu", _Uncounted(backend, forward)), forward:
        out_TH = expert_parallel_forward(hidden_TH, index_TK, weights_TK, experts, config=config, tuner=tuner, **kw)
    loss = (out_TH * torch.cos(torch.arange(out_TH.numel(), dtype=out_TH.dtype)).view_as(out_TH)).sum()
    with kernels.use_backend("cpu", _Uncounted(backend, backward)), backward:
        loss.backward()
    return forward, backward


def _report(what: str, forward: HostSyncCounter, backward: HostSyncCounter) -> str:
    lines = [f"{what}: forward {forward.total}, backward {backward.total}"]
    for label, counter in (("fwd", forward), ("bwd", backward)):
        for (kind, where), count in sorted(counter.syncs.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {label} {count} x {kind} at {where}")
    return "\n".join(lines)


@pytest.mark.parametrize("n, restore", [(1, "none"), (4, "none"), (4, "s1"), (4, "s4")])  # reuse needs n > 1
def test_fixed_config_syncs_at_most_once_in_forward(n, restore):
    forward, backward = count_call(ExecutorConfig(num_partitions=n, restore=restore), None)
    report = _report(f"E={E} top-{K} n={n} {restore}", forward, backward)
    print(report)
    assert forward.total <= MAX_FORWARD and backward.total <= MAX_BACKWARD, report


def _steady_tuner() -> LayerTuner:
    """A tuner that exchanges the load on every call (the worst case of its hot path); the
    tests give its range table the n to answer after the first call."""
    tuner = LayerTuner()
    tuner.EXCHANGE_EVERY = 1
    return tuner


@pytest.mark.parametrize("n", [1, 4])
def test_tuned_call_syncs_at_most_once_in_forward(n):
    config = ExecutorConfig(num_partitions="auto", restore="auto", candidates=(1, 4), memory_budget=2**40)
    tuner = _steady_tuner()
    count_call(config, tuner, seed=1)  # first call: agrees the set-up and waits for its own load
    tuner._session = None  # the table decides below; profiling sessions time with syncs on purpose
    key = tuner._lag_key
    tuner.table.insert(key, n)
    if n == 1:
        tuner.table.insert(10 * key, 1)
    for call in range(3):  # steady calls; the load of each is exchanged (EXCHANGE_EVERY = 1)
        forward, backward = count_call(config, tuner, seed=2 + call)
        report = _report(f"tuned E={E} top-{K} n={n} call {call}", forward, backward)
        print(report)
        assert not tuner.tuning, "the table answers every key: no profiling session"
        assert tuner._last[0] == n, tuner._last
        assert forward.total <= MAX_FORWARD and backward.total <= MAX_BACKWARD, report


def _two_rank_worker(rank: int, world: int) -> None:
    groups = build_process_groups(world)
    for config in (ExecutorConfig(1, "none"), ExecutorConfig(4, "s2"), ExecutorConfig(4, "s3")):
        forward, backward = count_call(config, None, seed=rank, groups=groups)
        report = _report(f"rank {rank} EP=2 {config.num_partitions}/{config.restore}", forward, backward)
        assert forward.total <= MAX_FORWARD and backward.total <= MAX_BACKWARD, report
    config = ExecutorConfig(num_partitions="auto", restore="none", candidates=(1, 4))
    tuner = _steady_tuner()
    count_call(config, tuner, seed=10 + rank, groups=groups)  # first call: set-up and its own load, agreed now
    tuner._session = None
    tuner.table.insert(max(tuner._lag_key, 1), 4)
    for call in range(2):  # each call's load is exchanged in the background and rides the count copy
        forward, backward = count_call(config, tuner, seed=20 + call, groups=groups)
        report = _report(f"rank {rank} EP=2 tuned call {call}", forward, backward)
        assert tuner._last[0] == 4 and not tuner.tuning
        assert forward.total <= MAX_FORWARD and backward.total <= MAX_BACKWARD, report


def test_two_ranks_sync_at_most_once_in_forward():
    """On an EP group: the count exchange, the all-to-alls and the tuner's load exchange add none."""
    run_distributed(_two_rank_worker, 2, timeout_s=120)


def test_the_counter_sees_every_kind_of_sync():
    """The counting itself: each conversion of a device tensor counts, host tensors' do not."""
    counter = HostSyncCounter()
    x = torch.arange(6)
    with counter:
        x.sum().item(), x.tolist(), int(x[0]), float(x[1]), bool(x[2]), [0, 1, 2][x[1]]
        host = x.to("cpu", non_blocking=True)
        host.tolist(), int(host.sum())  # free: host tensors
        x.cpu()
        host.to(torch.device("cpu")).tolist()  # moved back to the device: counts
        torch.arange(3).tolist()  # made on the host: free
        torch.arange(3, device=x.device).tolist()  # made on the device: counts
        torch.stack([x[0], x[1]]).tolist()  # computed from device tensors: counts
    kinds = Counter(kind for kind, _ in counter.syncs.elements())
    assert kinds == Counter(item=1, tolist=4, __int__=1, __float__=1, __bool__=1, __index__=1, to=1, cpu=1), kinds


# --- CUDA: the same calls under torch's sync debug mode (pytest --gpu; run by gpu_check.sh) ---


def _cuda_layer_inputs(seed: int, device: torch.device):
    hidden_TH, index_TK, weights_TK, experts = _layer_inputs(seed)
    moved = {k: v.detach().to(device).requires_grad_() for k, v in
             (("w_in_EOH", experts.w_in_EOH), ("w_out_EHI", experts.w_out_EHI))}
    return (hidden_TH.detach().to(device).requires_grad_(), index_TK.to(device),
            weights_TK.detach().to(device).requires_grad_(), ExpertWeights(**moved))


@pytest.mark.gpu
def test_one_sync_per_forward_under_cuda_sync_debug_mode(monkeypatch):
    """Every synchronising CUDA call raises (`set_sync_debug_mode("error")`) except the one
    documented copy of the exchanged counts (`dispatch._to_host`), allowed and counted here:
    exactly one per forward, none in backward, at n = 1 and 4, with and without reuse, tuned."""
    from lightning_mpipemoe.moe import dispatch

    device = torch.device("cuda")
    copies: list[int] = []
    real_to_host = dispatch._to_host

    def allowed_copy(values_X):
        copies.append(values_X.numel())
        torch.cuda.set_sync_debug_mode("default")
        try:
            return real_to_host(values_X)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    monkeypatch.setattr(dispatch, "_to_host", allowed_copy)

    def step(config, tuner, seed):
        hidden_TH, index_TK, weights_TK, experts = _cuda_layer_inputs(seed, device)
        out_TH = expert_parallel_forward(hidden_TH, index_TK, weights_TK, experts, config=config, tuner=tuner)
        forward = len(copies)
        out_TH.square().sum().backward()
        return forward, len(copies) - forward

    auto = ExecutorConfig(num_partitions="auto", restore="auto", candidates=(1, 4), memory_budget=2**40)
    cases = [(ExecutorConfig(1, "none"), None), (ExecutorConfig(4, "none"), None), (ExecutorConfig(4, "s1"), None),
             (ExecutorConfig(4, "s4"), None), (auto, _steady_tuner())]
    for config, tuner in cases:
        step(config, tuner, seed=0)  # warm-up: Triton compiles, grouped-GEMM choice (timed), first tuner call
        if tuner is not None:
            tuner._session = None
            tuner.table.insert(max(tuner._lag_key, 1), 4)
        torch.cuda.synchronize()
        copies.clear()
        torch.cuda.set_sync_debug_mode("error")
        try:
            forward, backward = step(config, tuner, seed=1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert (forward, backward) == (1, 0), f"{config}: {forward} copies in forward, {backward} in backward"
