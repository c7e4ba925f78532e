"""Offload memory: one grow-only host pool per process reused by every layer and call, and
device buffers fenced (not `record_stream`ed) while an offload copy reads them.

CPU runs the same code as CUDA (events are None); the CUDA bound is a gpu-marked test.
"""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

from lightning_mpipemoe import ExecutorConfig, ExpertWeights, build_process_groups, collectives
from lightning_mpipemoe.moe.buffers import COPY_FENCES, BufferPool, HostStore, host_pool
from lightning_mpipemoe.moe.comm import Lanes
from lightning_mpipemoe.moe.executor import pipelined_expert_parallel_forward, reference_expert_parallel_forward
from lightning_mpipemoe.moe.memory import LayerShape, PipelineRecord, analytic_memory, measure_call
from tests.dist_utils import run_distributed
from tests.moe_reference import assert_rel_close, random_expert_weights

H, I, E, K = 12, 10, 4, 2


def _two_layer_step(num_tokens: int, config: ExecutorConfig, forward=pipelined_expert_parallel_forward, seed=0):
    """Two MoE layer calls in one graph (both stores live until backward), forward + backward;
    returns the output and every gradient."""
    gen = torch.Generator().manual_seed(seed)
    hidden_TH = torch.randn(num_tokens, H, generator=gen).requires_grad_()
    params = [
        {k: v.clone().requires_grad_() for k, v in random_expert_weights(E, H, I, True, True, seed=layer).items()}
        for layer in range(2)
    ]
    index_TK = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(num_tokens)])
    weights_TK = torch.rand(num_tokens, K, generator=gen) + 0.1
    kw = {"config": config} if forward is pipelined_expert_parallel_forward else {}
    x = hidden_TH
    for layer in range(2):
        x = forward(x, index_TK, weights_TK, ExpertWeights(**params[layer], activation=F.silu), **kw)
        if forward is pipelined_expert_parallel_forward:
            assert len(COPY_FENCES) == 0, "an offloaded buffer was freed without waiting for its copy"
    x.pow(2).sum().backward()
    return [x.detach(), hidden_TH.grad, *[p.grad for layer in params for p in layer.values()]]


@pytest.mark.parametrize("restore", ["s1", "s2", "s3"])
def test_host_pool_is_reused_across_calls_and_layers(restore):
    pool = host_pool(pinned=False)
    config = ExecutorConfig(num_partitions=3, restore=restore)
    expected = _two_layer_step(37, config, forward=reference_expert_parallel_forward)
    snapshots = []
    for step in range(3):
        actual = _two_layer_step(37, config)
        for a, e in zip(actual, expected):
            assert_rel_close(a, e, 1e-6, f"{restore} step {step}", floor=1e-6)
        assert pool.in_use_bytes == 0, "backward gave every block back"
        snapshots.append((pool.reserved_bytes, sorted(c.data.data_ptr() for c in pool.chunks)))
    offloads = 2 if restore == "s1" else 1
    assert len(snapshots[0][1]) >= 2 * offloads  # two layers' stores were live at once
    # No growth after the first step: the same blocks (storage pointers), the same bytes.
    assert snapshots[1] == snapshots[0] and snapshots[2] == snapshots[0], snapshots
    # A slightly different token count fits in the same blocks.
    _two_layer_step(35, config)
    assert (pool.reserved_bytes, sorted(c.data.data_ptr() for c in pool.chunks)) == snapshots[0]


def test_a_store_collected_without_backward_returns_its_blocks():
    pool = host_pool(pinned=False)
    lanes = Lanes(torch.device("cpu"))
    store = HostStore(torch.device("cpu"), lanes)
    store.allocate("T_M", 100, 8, torch.float32)
    in_use = pool.in_use_bytes
    assert in_use >= 100 * 8 * 4 and store.host_bytes == 100 * 8 * 4
    del store
    gc.collect()
    assert pool.in_use_bytes == in_use - _block_bytes(pool, 100 * 8 * 4)


def _block_bytes(pool, nbytes: int) -> int:
    """The size of the block the pool hands out for `nbytes` (a multiple of its granule)."""
    return -(-nbytes // pool.GRANULE) * pool.GRANULE


def test_buffer_pool_settles_the_fence_of_an_offloaded_slot():
    lanes = Lanes(torch.device("cpu"))
    store = HostStore(torch.device("cpu"), lanes)
    store.allocate("T_DI", 4, 3, torch.float32)
    pool = BufferPool()
    rows = pool.put("T_DI", torch.arange(12.0).view(4, 3))
    store.offload("T_DI", 0, rows)
    assert len(COPY_FENCES) == 1
    pool.drop("T_DI")
    assert len(COPY_FENCES) == 0
    store.finish_offload()
    assert torch.equal(store.fetch("T_DI", 1, 2, lanes).wait(), torch.arange(3.0, 9.0).view(2, 3))
    store.release()


# --- CUDA (off by default: pytest --gpu) -------------------------------------------------


def _cuda_bound_worker(rank: int, world: int) -> None:
    torch.cuda.set_device(0)
    groups = build_process_groups(world)
    for group in (groups.ep, groups.ep_combine):
        collectives.declare_group_device(group, "cpu", "cuda")  # gloo with CUDA tensors on one GPU
    device = torch.device("cuda", 0)
    tokens, experts_total, top_k, hidden, inter = 2048, 8, 2, 1024, 512
    shape = LayerShape(tokens=tokens, top_k=top_k, hidden=hidden, intermediate=inter, ep_size=world)
    gen = torch.Generator().manual_seed(rank)
    local = experts_total // world
    for restore in ("s1", "s2", "s3"):
        for n in (2, 8):
            hidden_TH = torch.randn(tokens, hidden, generator=gen).to(device).requires_grad_()
            index_TK = torch.stack([(torch.arange(tokens) * top_k + k + rank) % experts_total for k in range(top_k)], 1)
            params = {
                "w_in_EOH": (torch.randn(local, 2 * inter, hidden, generator=gen) * 0.02).to(device).requires_grad_(),
                "w_out_EHI": (torch.randn(local, hidden, inter, generator=gen) * 0.02).to(device).requires_grad_(),
            }
            weights_TK = torch.full((tokens, top_k), 0.5, device=device)
            record = PipelineRecord()

            def forward():
                return pipelined_expert_parallel_forward(
                    hidden_TH, index_TK.to(device), weights_TK, ExpertWeights(**params),
                    config=ExecutorConfig(n, restore), record=record,
                    ep_group=groups.ep, combine_group=groups.ep_combine,
                )  # fmt: skip

            measured = measure_call(forward, lambda out: out.sum().backward(), parameters=list(params.values()),
                                    record=record, device=device)  # fmt: skip
            analytic = analytic_memory(shape, n, restore)
            # What the allocator saw during forward: the held tensors plus the schedule's buffers
            # (the analytic figures), 15% for kernels' own workspace and rounding.
            bound = 1.15 * (analytic.device_held_bytes + analytic.forward_peak_temp_bytes)
            assert measured.cuda_forward_peak_bytes <= bound, (restore, n, measured, analytic)
            bound = 1.15 * (analytic.device_held_bytes + analytic.backward_peak_temp_bytes)
            assert measured.cuda_backward_peak_bytes <= bound, (restore, n, measured, analytic)
            assert len(COPY_FENCES) == 0


@pytest.mark.gpu
def test_cuda_offload_peak_is_within_the_analytic_bound():
    """max_memory_allocated during s1-s3 forward and backward stays within held + peak
    temporary bytes of the analytic model, at n = 2 and n = 8 (record_stream would let the
    allocator keep one buffer per partition in flight, growing with n)."""
    run_distributed(_cuda_bound_worker, 2, timeout_s=300)
