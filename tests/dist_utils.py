"""Spawn-based gloo workers for distributed tests (one thread each), and rendezvous that
cannot race.

Worker functions must be defined at module level in a test module (spawn pickles them by
name). Each worker gets `(rank, world_size, *args)` with the default gloo group initialised;
an exception in any worker fails the test with that worker's traceback.

Ports. Picking a "free" port (bind to 0, read it, close) and handing it to a child races:
anything on the machine may take the port before the child binds it (EADDRINUSE was seen
once). So no test picks a port for a child to bind:

- `run_distributed` rendezvous through a `file://` init method (a `FileStore` in a fresh
  temporary directory): no port at all.
- Launches that need `MASTER_ADDR`/`MASTER_PORT` (Lightning's subprocess launcher, torchrun,
  a one-process Lightning run inside pytest: `in_process_world`) get them from
  `agent_store()`: the test process itself hosts a `TCPStore` bound to port 0 (the OS
  assigns a port that is bound from then on, so nothing can take it) and reads the port
  back; every rank connects to it as a client (`TORCHELASTIC_USE_AGENT_STORE=True`, torch's
  own switch for "the launcher hosts the store", which torchrun's agent uses), so no child
  ever binds a port.
- `mpipemoe_spawn` trainers need nothing: the strategy's spawn launcher hosts such a store
  itself for each launch (`spawn_launcher.hosted_rendezvous`).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import tempfile
import traceback
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world_size: int, init_method: str, timeout_s: float, fn, args, errors) -> None:
    os.environ.update(OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=init_method,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        fn(rank, world_size, *args)
        # Every rank finishes its collectives before any rank tears the group down: a rank
        # that destroys its gloo context while a peer still talks to it can leave that peer
        # blocked in `destroy_process_group` (seen under torch 2.7). The barrier is bounded
        # by the group's timeout.
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # reported to the parent, which fails the test
        # No teardown here: peers may be waiting in a collective that this rank will never
        # join, and a destroy could wait on them. The process exits; the parent stops the rest.
        errors.put((rank, traceback.format_exc()))
        raise


def run_distributed(fn, world_size: int, *args, timeout_s: float = 60.0) -> None:
    """Run `fn(rank, world_size, *args)` on `world_size` spawned gloo processes."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    rendezvous = tempfile.mkdtemp(prefix="mpipemoe-rdzv-")
    try:
        mp.start_processes(
            _worker,
            args=(world_size, f"file://{rendezvous}/store", timeout_s, fn, args, errors),
            nprocs=world_size,
            start_method="spawn",
        )
    except mp.ProcessRaisedException as exc:
        details = []
        while not errors.empty():
            rank, tb = errors.get()
            details.append(f"--- rank {rank} ---\n{tb}")
        raise AssertionError("distributed worker failed:\n" + "\n".join(details)) from exc
    finally:
        shutil.rmtree(rendezvous, ignore_errors=True)


@contextlib.contextmanager
def agent_store(timeout_s: float = 300.0) -> Iterator[dict[str, str]]:
    """A rendezvous store hosted by this process on an OS-assigned port, for launched children.

    Yields the environment variables the children need: `MASTER_ADDR`, `MASTER_PORT` (the
    store's port, bound for as long as the context is open) and
    `TORCHELASTIC_USE_AGENT_STORE=True` (every rank connects as a client; rank 0 does not
    try to bind the port). One store serves one process group: use one context per launch.
    """
    store = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=timeout_s)
    )
    try:
        yield {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port), "TORCHELASTIC_USE_AGENT_STORE": "True"}
    finally:
        del store


@contextlib.contextmanager
def in_process_world() -> Iterator[None]:
    """A one-process Lightning run inside pytest: its rendezvous through `agent_store()` (no port
    picked and bound again by the run), then the environment and the default group restored."""
    saved = dict(os.environ)
    try:
        with agent_store() as rendezvous:
            os.environ.update(rendezvous)
            yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)
