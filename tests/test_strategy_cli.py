"""`Trainer(strategy="mpipemoe")` from the command line: a plain script with `devices=2`
(Lightning's subprocess launcher starts the second process), and two torchrun launches
forming a two-node run on one machine (`--nnodes 2`, loopback rendezvous). Both train the
same global batches as one process and must give its losses and final weights (1e-5).

No port is picked for a child to bind (that races): the test process hosts the rendezvous
store on an OS-assigned port (`tests.dist_utils.agent_store`); the script's ranks, and the
two torchrun agents (c10d rendezvous on that store, as clients), connect to it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_mpipemoe.checkpointing import consolidate_checkpoint
from tests.commands import run_command
from tests.dist_utils import agent_store
from tests.strategy_models import CLIP, HPARAMS, STEPS, read_losses, reference_run

SCRIPT = Path(__file__).parent / "scripts" / "train_tiny_lm.py"
ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 180
TOL = 1e-5


@pytest.fixture(scope="module")
def reference():
    return reference_run(HPARAMS, clip=CLIP)


def _env(**extra: str) -> dict[str, str]:
    launcher_vars = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def _check_run(out: Path, reference: dict) -> None:
    losses = read_losses(out / "losses.jsonl")
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step, loss in losses.items():
        assert abs(loss - reference["losses"][step - 1]) <= TOL, (step, loss, reference["losses"][step - 1])
    final = consolidate_checkpoint(out / "final.ckpt")
    for key, value in reference["states"][-1].items():
        torch.testing.assert_close(final[key], value, atol=TOL, rtol=0, msg=lambda m: f"{key}: {m}")


def test_plain_script_with_two_devices(tmp_path, reference):
    cmd = [sys.executable, str(SCRIPT), "--devices", "2", "--out", str(tmp_path)]
    with agent_store() as rendezvous:
        proc = run_command(cmd, cwd=ROOT, env=_env(**rendezvous), timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    _check_run(tmp_path, reference)


def test_two_node_torchrun_on_one_machine(tmp_path, reference):
    procs = []
    with agent_store() as rendezvous:
        # c10d rendezvous on the test's store (both agents clients: is_host=false); the agent
        # that becomes node 0 hosts the workers' store on a port the OS assigns it.
        endpoint = f"{rendezvous['MASTER_ADDR']}:{rendezvous['MASTER_PORT']}"
        for node_rank in (0, 1):
            cmd = [
                sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "two-nodes",
                "--rdzv-conf", "is_host=false", "--local-addr", "127.0.0.1", "--max-restarts", "0",
                str(SCRIPT), "--devices", "2", "--num-nodes", "2", "--out", str(tmp_path),
            ]  # fmt: skip
            log = open(tmp_path / f"node{node_rank}.log", "w")
            procs.append((subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT), log))
        try:
            for proc, _ in procs:
                proc.wait(timeout=TIMEOUT_S)
        finally:
            for proc, log in procs:
                if proc.poll() is None:
                    proc.kill()
                log.close()
    logs = "\n".join((tmp_path / f"node{n}.log").read_text()[-3000:] for n in (0, 1))
    assert [proc.returncode for proc, _ in procs] == [0, 0], logs
    _check_run(tmp_path, reference)
    # EP = the devices of one node by default: each EP group lies within a node, DP spans the nodes.
    for rank in range(4):
        layout = json.loads((tmp_path / f"layout-rank{rank}.json").read_text())
        assert layout["node_rank"] == rank // 2
        assert layout["ep_ranks"] == [2 * (rank // 2), 2 * (rank // 2) + 1]
        assert layout["expert_dp_ranks"] == [rank % 2, rank % 2 + 2]
