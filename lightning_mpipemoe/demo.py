"""Demo: one MoE layer, expert-parallel and pipelined over 2 CPU processes, checked against one process.

Run: `python -m lightning_mpipemoe.demo [--world-size 2] [--tokens 512] [--partitions 1]`
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_mpipemoe import RESTORE_STRATEGIES, ExecutorConfig, MoELayer, build_process_groups


def _build_layer(args: argparse.Namespace, config: ExecutorConfig) -> MoELayer:
    torch.manual_seed(0)
    return MoELayer(
        args.hidden,
        args.intermediate,
        args.experts,
        args.top_k,
        config=config,
    )


def _tokens(args: argparse.Namespace) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(args.world_size * args.tokens, args.hidden, generator=gen)


def _worker(rank: int, args: argparse.Namespace, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=60)
    dist.init_process_group("gloo", rank=rank, world_size=args.world_size, timeout=timeout)
    try:
        groups = build_process_groups(args.world_size, timeout=timeout)
        layer = _build_layer(args, ExecutorConfig(num_partitions=args.partitions, restore=args.restore))
        layer.shard_experts(groups)
        hidden_TH = _tokens(args)[rank * args.tokens : (rank + 1) * args.tokens]
        out_TH, _ = layer(hidden_TH)
        # Each rank's share of the single-process loss: sum over ranks == the global mean.
        (out_TH.square().sum() / (args.world_size * args.tokens * args.hidden)).backward()
        # numpy pickles by value: torch tensors would travel as shared memory of an exited process
        queue.put((rank, out_TH.detach().numpy(), layer.gate_up_proj.grad.numpy(), layer.down_proj.grad.numpy()))
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=512, help="tokens per rank")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--intermediate", type=int, default=128)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--partitions", type=int, default=4, help="micro-partitions n of the pipeline")
    parser.add_argument("--restore", default="s4", choices=RESTORE_STRATEGIES, help="restore strategy of reused buffers")
    args = parser.parse_args(argv)
    if args.experts % args.world_size:
        parser.error(f"--experts {args.experts} must be divisible by --world-size {args.world_size}")

    # The reference: one process, every expert, the plain (unpipelined, no reuse) path.
    reference = _build_layer(args, ExecutorConfig(num_partitions=1, restore="none"))
    ref_out_TH, _ = reference(_tokens(args))
    ref_out_TH.square().mean().backward()

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    workers = mp.start_processes(
        _worker, args=(args, port, queue), nprocs=args.world_size, start_method="spawn", join=False
    )
    results = sorted(queue.get() for _ in range(args.world_size))  # read before join: puts block on a full pipe
    while not workers.join():
        pass
    out_TH, grad_in, grad_out = (torch.cat([torch.from_numpy(r[i]) for r in results]) for i in (1, 2, 3))

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max() / b.abs().max())

    errors = {
        "output": rel(out_TH, ref_out_TH.detach()),
        "grad gate_up_proj": rel(grad_in, reference.gate_up_proj.grad),
        "grad down_proj": rel(grad_out, reference.down_proj.grad),
    }
    print(
        f"MoE layer: {args.experts} experts, top-{args.top_k}, H={args.hidden}, I={args.intermediate}, "
        f"{args.tokens} tokens/rank, EP={args.world_size} (gloo), n={args.partitions}, restore={args.restore}"
    )
    for name, err in errors.items():
        print(f"  {name:<18} max relative difference vs 1 process: {err:.2e}")
    ok = max(errors.values()) < 1e-5
    print("AGREE" if ok else "DISAGREE", "(tolerance 1e-5)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
