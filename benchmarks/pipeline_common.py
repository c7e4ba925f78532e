"""Shared pieces of the pipeline benchmarks: a spawn launcher, the benchmark layer, timing.

The layer is one rank's MoE layer: a linear router (softmax, top-k, renormalised) and the
expert-parallel executor. The router is part of it so that the layer input is held for
backward as in a real model (its gate GEMM keeps it), which is what DESIGN.md's memory
model counts as T_I.

Shape legend: T tokens, H model dim, I expert hidden, E experts, K top-k.
"""

from __future__ import annotations

import ctypes
import datetime
import gc
import json
import os
import socket
import statistics
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_mpipemoe import ExpertWeights

RESULTS = Path(__file__).resolve().parent / "results"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(minutes=10))
        result = fn(rank, world, *args)
        if rank == 0:
            queue.put(("ok", result))
    except BaseException:
        queue.put(("error", f"rank {rank}:\n{traceback.format_exc()}"))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(fn, world: int, *args):
    """Run `fn(rank, world, *args)` on `world` spawned gloo processes; returns rank 0's result."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(world, _free_port(), fn, args, queue), nprocs=world, start_method="spawn")
    status, payload = queue.get()
    if status != "ok":
        raise RuntimeError(payload)
    return payload


@dataclass(frozen=True)
class LayerSpec:
    tokens: int = 4096
    hidden: int = 256
    intermediate: int = 512
    experts: int = 8
    top_k: int = 2
    gated: bool = True


def build_layer(spec: LayerSpec, rank: int, world: int, seed: int = 0):
    """Parameters of one rank (router gate, local experts) and its input batch."""
    gen = torch.Generator().manual_seed(seed)
    local = spec.experts // world
    width = 2 * spec.intermediate if spec.gated else spec.intermediate
    gate_HE = torch.randn(spec.hidden, spec.experts, generator=gen) * 0.02
    w_in_EOH = torch.randn(spec.experts, width, spec.hidden, generator=gen) / spec.hidden**0.5
    w_out_EHI = torch.randn(spec.experts, spec.hidden, spec.intermediate, generator=gen) / spec.intermediate**0.5
    params = {
        "gate_HE": gate_HE,
        "w_in_EOH": w_in_EOH[rank * local : (rank + 1) * local].clone(),
        "w_out_EHI": w_out_EHI[rank * local : (rank + 1) * local].clone(),
    }
    params = {k: v.requires_grad_() for k, v in params.items()}
    batch_gen = torch.Generator().manual_seed(seed + 1 + rank)
    hidden_TH = torch.randn(spec.tokens, spec.hidden, generator=batch_gen)
    return params, hidden_TH


def route(hidden_TH: torch.Tensor, gate_HE: torch.Tensor, top_k: int):
    probs_TE = (hidden_TH @ gate_HE).softmax(dim=-1)
    weights_TK, index_TK = probs_TE.topk(top_k, dim=-1)
    return index_TK, weights_TK / weights_TK.sum(dim=-1, keepdim=True)


def experts_of(params: dict, spec: LayerSpec) -> ExpertWeights:
    return ExpertWeights(params["w_in_EOH"], params["w_out_EHI"], gated=spec.gated)


def summarize(times: list[float]) -> dict:
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "runs": len(times),
    }


def max_over_ranks(value: float) -> float:
    """The largest `value` of all ranks (itself in a single process)."""
    t = torch.tensor([float(value)], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def timed_once(step) -> float:
    """Wall time of `step()` on every rank together: a barrier before, and the slowest
    rank's time (all-reduce max), so that every rank reports the same figure."""
    if dist.is_initialized():
        dist.barrier()
    start = time.perf_counter()
    step()
    return max_over_ranks(time.perf_counter() - start)


def mixtral_weights(spec: LayerSpec) -> dict:
    """All experts' weights in HF's fused layout (gated), seed 0: identical on every rank."""
    gen = torch.Generator().manual_seed(0)
    return {
        "w_in_EOH": torch.randn(spec.experts, 2 * spec.intermediate, spec.hidden, generator=gen) / spec.hidden**0.5,
        "w_out_EHI": torch.randn(spec.experts, spec.hidden, spec.intermediate, generator=gen) / spec.intermediate**0.5,
    }


def routed_batch(spec: LayerSpec, rank: int) -> tuple:
    """This rank's tokens, random top-k routing (renormalised) and a fixed output gradient:
    (hidden_TH, index_TK, weights_TK, grad_TH), hidden and weights requiring grad."""
    batch = torch.Generator().manual_seed(1 + rank)
    hidden_TH = torch.randn(spec.tokens, spec.hidden, generator=batch).requires_grad_()
    logits_TE = torch.randn(spec.tokens, spec.experts, generator=batch)
    weights_TK, index_TK = logits_TE.softmax(-1).topk(spec.top_k, dim=-1)
    weights_TK = (weights_TK / weights_TK.sum(-1, keepdim=True)).requires_grad_()
    grad_TH = torch.cos(torch.arange(spec.tokens * spec.hidden, dtype=torch.float32)).view(spec.tokens, spec.hidden)
    return hidden_TH, index_TK, weights_TK, grad_TH


def hf_mixtral_experts(spec: LayerSpec, implementation: str, full: dict, world: int, expert_parallel: bool = True):
    """transformers' `MixtralExperts` holding `full`, with `implementation` as its experts
    function; with `expert_parallel`, sharded by HF's own `apply_expert_parallelism`
    (AllToAllEP, what `DistributedConfig(ep_size=...)` installs)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    config = MixtralConfig(
        hidden_size=spec.hidden, intermediate_size=spec.intermediate, num_local_experts=spec.experts,
        num_experts_per_tok=spec.top_k, hidden_act="silu",
    )
    config._experts_implementation = implementation
    holder = torch.nn.Module()
    holder.experts = MixtralExperts(config)
    with torch.no_grad():
        holder.experts.gate_up_proj.copy_(full["w_in_EOH"])
        holder.experts.down_proj.copy_(full["w_out_EHI"])
    if expert_parallel:
        from torch.distributed.device_mesh import init_device_mesh
        from transformers.distributed.expert_parallel import apply_expert_parallelism

        mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("ep", "tp"))
        plan = {"experts.gate_up_proj": "grouped_gemm", "experts.down_proj": "grouped_gemm",
                "experts": "ep_dispatch_experts"}
        apply_expert_parallelism(holder, mesh["ep"], mesh["tp"], plan, ep_implementation="all_to_all")
    return holder.experts


def timed_round_robin(steps: dict, repeats: int, warmup: int = 1) -> dict:
    """Times of every step in `steps`, `repeats` rounds of one run each, interleaved (the order
    rotating from round to round), so that a shared machine's changing load and whatever the
    previous configuration left in the caches fall on every configuration alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {key: [] for key in steps}
    keys = list(steps)
    for round_index in range(repeats):
        shift = round_index % len(keys)
        for key in keys[shift:] + keys[:shift]:
            times[key].append(timed_once(steps[key]))
    return times


def ratio_summaries(times: dict, reference: str) -> dict:
    """Per-round ratios of every entry of `times` (lists of one time per round, as
    `timed_round_robin` returns them) to `reference`'s time of the same round, summarised
    (median, min, max over rounds): a paired ratio that a load change between rounds
    moves for both sides alike."""
    return {name: summarize([t / r for t, r in zip(series, times[reference])]) for name, series in times.items()}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakRss:
    """The peak resident memory of one call above the RSS before it, with the allocator's
    caching out of the way: glibc's mmap and trim thresholds are fixed at 64 KiB (so tensor
    memory goes back to the OS when freed; set once, at construction: make it after the
    timed rounds), `malloc_trim(0)` runs before each call and the kernel's high-water mark
    is reset (`/proc/self/clear_refs` 5) right before it. Linux + glibc only."""

    def __init__(self) -> None:
        self.libc = ctypes.CDLL("libc.so.6")
        self.libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
        self.libc.mallopt(-1, 64 * 1024)  # M_TRIM_THRESHOLD

    def begin(self) -> int:
        gc.collect()
        self.libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        return _rss_kib("VmRSS")

    @staticmethod
    def end(base_kib: int) -> int:
        """Bytes of the peak RSS since `begin()` above the RSS `begin()` returned."""
        return (_rss_kib("VmHWM") - base_kib) * 1024


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return path


def machine_note() -> dict:
    return {
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
