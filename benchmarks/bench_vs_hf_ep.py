"""Our n = 1 path against Hugging Face's built-in expert parallelism, real gloo, no simulated link.

    OMP_NUM_THREADS=1 python benchmarks/bench_vs_hf_ep.py [--tokens 4096] [--repeats 5]

EP = 2. The same experts layer on both sides: Mixtral's `MixtralExperts` (gated SiLU,
`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`), M = 256, I = 512, 8 experts, top-2, T
tokens per rank, the same weights and the same routing. Hugging Face's side is its own plan
application (`apply_expert_parallelism` with `grouped_gemm` parameter sharding and
`ep_dispatch_experts` + `ep_implementation="all_to_all"`, i.e. `AllToAllEP`, what
`DistributedConfig(ep_size=2)` installs in training), under each of its CPU-capable experts
implementations ("eager" loop, "grouped_mm"); its fastest is the baseline. Ours:
`expert_parallel_forward` with the default config (n = 1, the plain path) and the pipelined
executor at n = 1. One step is forward + backward of the experts call (hidden states and
routing weights need gradients). Interleaved rounds; median, min, max of the slowest rank.
Writes benchmarks/results/vs_hf_ep.json.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from pipeline_common import LayerSpec, launch, machine_note, summarize, timed_round_robin, write_json

from lightning_mpipemoe import ExecutorConfig, ExpertWeights, build_process_groups, expert_parallel_forward
from lightning_mpipemoe.moe.executor import pipelined_expert_parallel_forward

HF_IMPLEMENTATIONS = ("eager", "grouped_mm")


def _hf_experts(spec: LayerSpec, implementation: str, full: dict, world: int):
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import MixtralConfig
    from transformers.distributed.expert_parallel import apply_expert_parallelism
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
    mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("ep", "tp"))
    plan = {
        "experts.gate_up_proj": "grouped_gemm",
        "experts.down_proj": "grouped_gemm",
        "experts": "ep_dispatch_experts",
    }
    apply_expert_parallelism(holder, mesh["ep"], mesh["tp"], plan, ep_implementation="all_to_all")
    return holder.experts


def _bench(rank: int, world: int, spec: LayerSpec, repeats: int) -> dict:
    groups = build_process_groups(world)
    gen = torch.Generator().manual_seed(0)
    full = {
        "w_in_EOH": torch.randn(spec.experts, 2 * spec.intermediate, spec.hidden, generator=gen) / spec.hidden**0.5,
        "w_out_EHI": torch.randn(spec.experts, spec.hidden, spec.intermediate, generator=gen) / spec.intermediate**0.5,
    }
    local = spec.experts // world
    ours = {k: v[rank * local : (rank + 1) * local].clone().requires_grad_() for k, v in full.items()}
    experts = ExpertWeights(ours["w_in_EOH"], ours["w_out_EHI"])
    batch = torch.Generator().manual_seed(1 + rank)
    hidden_TH = torch.randn(spec.tokens, spec.hidden, generator=batch).requires_grad_()
    logits_TE = torch.randn(spec.tokens, spec.experts, generator=batch)
    weights_TK, index_TK = logits_TE.softmax(-1).topk(spec.top_k, dim=-1)
    weights_TK = (weights_TK / weights_TK.sum(-1, keepdim=True)).requires_grad_()
    grad_TH = torch.cos(torch.arange(spec.tokens * spec.hidden, dtype=torch.float32)).view(spec.tokens, spec.hidden)
    hf = {name: _hf_experts(spec, name, full, world) for name in HF_IMPLEMENTATIONS}
    kw = dict(ep_group=groups.ep, combine_group=groups.ep_combine)

    def clear():
        for t in (hidden_TH, weights_TK, *ours.values(), *(p for m in hf.values() for p in m.parameters())):
            t.grad = None

    def step(run):
        def go():
            clear()
            out_TH = run()
            (out_TH * grad_TH).sum().backward()
            return out_TH

        return go

    runs = {
        "ours: expert_parallel_forward (default, n=1)": lambda: expert_parallel_forward(
            hidden_TH, index_TK, weights_TK, experts, **kw),
        "ours: pipelined executor, n=1": lambda: pipelined_expert_parallel_forward(
            hidden_TH, index_TK, weights_TK, experts, config=ExecutorConfig(1, "none"), **kw),
        **{f"HF AllToAllEP, experts={name}": (lambda module=module: module(hidden_TH, index_TK, weights_TK))
           for name, module in hf.items()},
    }
    # Same layer, same answer: compare outputs once.
    outputs = {name: step(run)().detach() for name, run in runs.items()}
    first = next(iter(outputs.values()))
    max_diff = max(float((out - first).abs().max()) for out in outputs.values())
    diff = torch.tensor([max_diff], dtype=torch.float64)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    times = timed_round_robin({name: step(run) for name, run in runs.items()}, repeats)
    return {"times": {name: summarize(t) for name, t in times.items()}, "max_output_difference": float(diff)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    spec = LayerSpec(tokens=args.tokens)
    result = launch(_bench, 2, spec, args.repeats)
    times = result["times"]
    hf_best_name = min((n for n in times if n.startswith("HF")), key=lambda n: times[n]["median_s"])
    hf_best = times[hf_best_name]["median_s"]
    print(f"experts fwd+bwd, EP=2 real gloo (no simulated link), Mixtral experts M={spec.hidden}, "
          f"I={spec.intermediate}, {spec.experts} experts, top-{spec.top_k}, T={spec.tokens} tokens/rank; "
          f"outputs agree to {result['max_output_difference']:.1e}")
    header = f"{'path':>46} | {'median [min, max] ms':>24} | {'/ HF best':>9}"
    print(header)
    print("-" * len(header))
    for name, t in times.items():
        t["ratio_vs_hf_best"] = t["median_s"] / hf_best
        print(f"{name:>46} | {t['median_s'] * 1e3:7.0f} [{t['min_s'] * 1e3:6.0f}, {t['max_s'] * 1e3:6.0f}] | "
              f"{t['ratio_vs_hf_best']:8.2f}x")
    ratio = times["ours: expert_parallel_forward (default, n=1)"]["median_s"] / hf_best
    print(f"\nours (default n=1) / HF best ({hf_best_name}): {ratio:.2f}x")
    path = write_json("vs_hf_ep.json", {"spec": spec.__dict__, **result, "hf_best": hf_best_name,
                                         "ratio_default_n1_vs_hf_best": ratio, "machine": machine_note()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
