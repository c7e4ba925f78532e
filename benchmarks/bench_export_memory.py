"""Peak host memory (RSS) of each rank while exporting a live EP model to a Hugging Face directory.

    OMP_NUM_THREADS=1 python benchmarks/bench_export_memory.py [--ep 4] [--layers 4] [--hidden 512]
        [--intermediate 2048] [--experts 8] [--compare-gather]

A Mixtral-style model whose experts are `ep` times one rank's share (EP = 4: 4x), built on
the meta device and materialised shard by shard (no rank ever holds the whole model), is
exported by `hf_models.export_pretrained` from `ep` gloo processes. Each rank reports its RSS
before the export and its peak during it (Linux VmHWM, reset just before the export through
/proc/self/clear_refs), beside its own shard (its experts, plus the dense weights on rank 0,
which writes them) and the largest tensor. The claim checked: the peak stays under
RSS before the export (which already holds the shard) + the largest tensor + a fixed 64 MiB,
i.e. under one shard plus one tensor plus the process's fixed overhead. `--compare-gather`
also measures the old way (every expert gathered onto rank 0, `gather_full_state_dict`).
Prints the table and writes it to benchmarks/results/export_memory.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from pipeline_common import launch, machine_note, write_json

FIXED_OVERHEAD = 64 * 2**20
FIELDS = ("rss_no_model", "rss_before", "peak", "own_shard", "largest_tensor", "bound", "gather_peak")
MIB = 2**20


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def _model(args, groups):
    from transformers import MixtralConfig, MixtralForCausalLM

    from lightning_mpipemoe import ExecutorConfig
    from lightning_mpipemoe.hf_models.api import convert_model

    config = MixtralConfig(
        vocab_size=1024, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
        num_local_experts=args.experts, num_experts_per_tok=2, max_position_embeddings=128,
    )  # fmt: skip
    with torch.device("meta"):
        model = MixtralForCausalLM(config)
    convert_model(model, groups, ExecutorConfig(), track_stats=False)  # shards the meta experts
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(groups.ep_rank)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.02, generator=gen)
    return model


def _run(rank: int, world: int, args) -> dict:
    import torch.distributed as dist

    from lightning_mpipemoe import build_process_groups, collectives
    from lightning_mpipemoe.hf_models.api import export_pretrained, gather_full_state_dict, sharded_expert_keys

    groups = build_process_groups(args.ep)
    from transformers import MixtralForCausalLM  # noqa: F401  (imported before the baseline is read)

    rss_no_model = _rss_kib("VmRSS") * 1024
    model = _model(args, groups)
    sharded = sharded_expert_keys(model)
    state = model.state_dict()
    expert_bytes = sum(state[k].numel() * state[k].element_size() for k in sharded)
    dense_bytes = sum(v.numel() * v.element_size() for k, v in state.items() if k not in sharded)
    own_shard = expert_bytes + (dense_bytes if rank == 0 else 0)
    largest = max(v.numel() * v.element_size() for v in state.values())
    del state
    out = Path(args.out) / "export"
    dist.barrier()
    rss_before = _rss_kib("VmRSS") * 1024
    _reset_peak()
    export_pretrained(model, out, groups)
    peak = _rss_kib("VmHWM") * 1024
    gather_peak = 0
    if args.compare_gather:
        dist.barrier()
        base = _rss_kib("VmRSS") * 1024
        _reset_peak()
        full = gather_full_state_dict(model, groups)
        gather_peak = _rss_kib("VmHWM") * 1024 - base + rss_before
        del full
    row = torch.zeros(world, len(FIELDS), dtype=torch.float64)
    bound = rss_before + largest + FIXED_OVERHEAD
    values = [rss_no_model, rss_before, peak, own_shard, largest, bound, gather_peak]
    row[rank] = torch.tensor(values, dtype=torch.float64)
    collectives.all_reduce(row, site="bench.export_memory")
    if rank == 0:
        from transformers import MixtralForCausalLM

        index_keys = len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"])
        plain = MixtralForCausalLM.from_pretrained(out)  # loads with plain transformers
        total_experts = sum(p.numel() * p.element_size() for n, p in plain.named_parameters() if ".experts." in n)
        return {"rows": row.tolist(), "index_keys": index_keys, "total_expert_bytes": total_experts,
                "expert_bytes_per_rank": expert_bytes}  # fmt: skip
    return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ep", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--compare-gather", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        args.out = tmp
        result = launch(_run, args.ep, args)
    rows = result["rows"]
    print(f"experts total {result['total_expert_bytes'] / MIB:.1f} MiB = "
          f"{result['total_expert_bytes'] / result['expert_bytes_per_rank']:.1f} x one rank's share "
          f"({result['expert_bytes_per_rank'] / MIB:.1f} MiB); {result['index_keys']} tensors in the index")  # fmt: skip
    header = "rank  RSS no model  RSS before  own shard  peak  peak-before  largest  bound  within"
    if args.compare_gather:
        header += "  gather-to-rank-0 peak"
    print(header + "   (MiB; bound = RSS before + largest + 64)")
    table = []
    for rank, values in enumerate(rows):
        no_model, before, peak, shard, largest, bound, gather_peak = values
        ok = peak <= bound
        line = (f"{rank:4d}  {no_model / MIB:12.1f}  {before / MIB:10.1f}  {shard / MIB:9.1f}  {peak / MIB:5.1f}  "
                f"{(peak - before) / MIB:11.1f}  {largest / MIB:7.1f}  {bound / MIB:5.1f}  {'yes' if ok else 'NO':>6}")
        if args.compare_gather:
            line += f"  {gather_peak / MIB:21.1f}"
        print(line)
        table.append({"rank": rank, **dict(zip(FIELDS, values)), "within_bound": ok})
    payload = {"args": {k: v for k, v in vars(args).items() if k != "out"}, "ranks": table, "machine": machine_note()}
    path = write_json("export_memory.json", {**payload, **result})
    print(f"wrote {path}")
    if not all(row["within_bound"] for row in table):
        raise SystemExit("a rank's peak RSS exceeded its shard + the largest tensor + 64 MiB")


if __name__ == "__main__":
    main()
