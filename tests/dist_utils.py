"""Spawn-based gloo workers for distributed tests (one thread each).

Worker functions must be defined at module level in a test module (spawn pickles them by
name). Each worker gets `(rank, world_size, *args)` with the default gloo group initialised;
an exception in any worker fails the test with that worker's traceback.
"""

from __future__ import annotations

import datetime
import os
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, timeout_s: float, fn, args, errors) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s)
        )
        fn(rank, world_size, *args)
    except BaseException:  # reported to the parent, which fails the test
        errors.put((rank, traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout_s: float = 60.0) -> None:
    """Run `fn(rank, world_size, *args)` on `world_size` spawned gloo processes."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    try:
        mp.start_processes(
            _worker,
            args=(world_size, free_port(), timeout_s, fn, args, errors),
            nprocs=world_size,
            start_method="spawn",
        )
    except mp.ProcessRaisedException as exc:
        details = []
        while not errors.empty():
            rank, tb = errors.get()
            details.append(f"--- rank {rank} ---\n{tb}")
        raise AssertionError("distributed worker failed:\n" + "\n".join(details)) from exc
