"""Whole-model training steps against transformers' own expert parallelism, one launch per shape.

    OMP_NUM_THREADS=1 python benchmarks/bench_model_step.py [--shapes mixtral qwen3] [--tokens 2048]
                                                            [--repeats 7] [--out model_step.json]

A training step (forward, backward, dense-gradient all-reduce, AdamW step) of a small Hugging
Face MoE causal LM, EP = 2 on gloo (2 spawned processes, one thread each), at two shapes:

    mixtral   Mixtral-style: 2 layers, H 256, I 512, 8 experts, top-2
    qwen3     fine-grained Qwen3-MoE-style: 2 layers, H 256, I 128, 64 experts, top-8

Systems, all built from the same seed-0 weights in the SAME launch, their timed steps
interleaved round by round with the order rotating, so that every ratio comes from one run:

    hf_ep            transformers' EP plan (`apply_expert_parallelism`, AllToAllEP) on `grouped_mm`
    hf_ep_ckpt       the same with HF gradient checkpointing (non-reentrant)
    ours_default     `convert_model(..., ExecutorConfig())` (n and restore tuned online)
    ours_budget50    `ExecutorConfig(memory_budget=50% of hf_ep's experts bytes per layer call)`
    ours_budget25    the same at 25%
    ours_n1          `ExecutorConfig(num_partitions=1, restore="none")` (the plain path)
    ours_n4_s4       `ExecutorConfig(num_partitions=4, restore="s4")`
    ours_ckpt        `ExecutorConfig()` with HF gradient checkpointing

Every system runs the same step code: dense (non-expert) gradients are averaged over the two
ranks with one all-reduce, expert gradients need none (EP = world, no expert-data-parallel
replica); `AdamW(foreach=False)` everywhere (HF's DTensor expert shards reject foreach).

Per row: step time (slowest rank, median [min, max] over rounds) and the per-round ratio to
`hf_ep` of the same round (median [min, max]); then, from one extra step per system after the
timed rounds:
- saved: the bytes autograd saves during the whole model's forward (`SavedTensorMeter`, each
  storage once, parameters excluded: one meter for every system), plus what our executor
  offloaded to the host pool (on CPU host = device memory, so held + host is what it holds);
- experts: the same meter around each experts call alone, max over layers (what
  `memory_budget` bounds; the budget rows say whether they stay within it);
- peak: the step's peak RSS above the RSS before it, max over ranks, plus host-pool bytes in
  use (the pool is grow-only, so its pages are resident before the step). Allocator caching
  is taken out of the measure: before this pass glibc's mmap threshold is fixed at 64 KiB
  (so tensor memory goes back to the OS when freed) and `malloc_trim(0)` runs before each
  step; the kernel's high-water mark is reset (`/proc/self/clear_refs` 5) right before it.
The loss of every system's first step (same weights, same batch; mean over ranks) is printed
beside the rows: a fast row that computes something else cannot hide.

Auto systems are warmed up until a step in which no layer's tuner profiled (at most
`--max-tune-steps`); the rows report how many timed steps still profiled. Each of our layers gets a
`LayerTuner(max_rounds=--tuner-max-rounds)` (6; the library's default 24 rounds of profiling
calls would cost more warm-up steps than the timed rounds themselves on a loaded 2-core machine);
`ours_ckpt` starts from `ours_default`'s tuned state (`LayerTuner.load_state_dict`, as a resumed
run would), the same layers under the same config.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import asdict, dataclass

import lightning_mpipemoe  # noqa: F401  isort: skip  (before transformers)
import torch
import torch.distributed as dist
from pipeline_common import PeakRss, launch, machine_note, ratio_summaries, summarize, timed_once, write_json

from lightning_mpipemoe import ExecutorConfig, build_process_groups
from lightning_mpipemoe.hf_models.api import convert_model, sharded_expert_keys
from lightning_mpipemoe.hf_models.experts_interface import (
    BINDING_ATTR,
    is_hf_experts_module,
)
from lightning_mpipemoe.moe.buffers import host_pool
from lightning_mpipemoe.moe.memory import SavedTensorMeter, _plain_tensors
from lightning_mpipemoe.moe.tuner import LayerTuner

HF_EP = "hf_ep"
SYSTEMS = ("hf_ep", "hf_ep_ckpt", "ours_default", "ours_budget50", "ours_budget25", "ours_n1", "ours_n4_s4",
           "ours_ckpt")
BUDGET_FRACTIONS = {"ours_budget50": 0.5, "ours_budget25": 0.25}


@dataclass(frozen=True)
class ModelShape:
    family: str
    hidden: int
    intermediate: int
    experts: int
    top_k: int
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 512
    seq_len: int = 256


SHAPES = {
    "mixtral": ModelShape("mixtral", hidden=256, intermediate=512, experts=8, top_k=2),
    "qwen3": ModelShape("qwen3_moe", hidden=256, intermediate=128, experts=64, top_k=8),
}


def build_model(shape: ModelShape, experts_implementation: str):
    """A seed-0 model of `shape` (identical on every rank), fp32, train mode."""
    from transformers import (
        MixtralConfig,
        MixtralForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    common = dict(vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                  num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                  max_position_embeddings=shape.seq_len, num_experts_per_tok=shape.top_k,
                  tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if shape.family == "mixtral":
        config = MixtralConfig(**common, intermediate_size=shape.intermediate, num_local_experts=shape.experts,
                               router_jitter_noise=0.0)
        cls = MixtralForCausalLM
    elif shape.family == "qwen3_moe":
        config = Qwen3MoeConfig(**common, intermediate_size=4 * shape.hidden, moe_intermediate_size=shape.intermediate,
                                num_experts=shape.experts, norm_topk_prob=True, decoder_sparse_step=1,
                                mlp_only_layers=[], head_dim=shape.hidden // shape.heads)
        cls = Qwen3MoeForCausalLM
    else:
        raise ValueError(f"family {shape.family!r} is not one of 'mixtral', 'qwen3_moe'")
    config._experts_implementation = experts_implementation
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return cls(config).train()


def _apply_hf_ep(model, world: int):
    from torch.distributed.device_mesh import init_device_mesh
    from transformers.distributed.expert_parallel import apply_expert_parallelism

    mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("ep", "tp"))
    plan = {"experts.gate_up_proj": "grouped_gemm", "experts.down_proj": "grouped_gemm",
            "experts": "ep_dispatch_experts"}
    for layer in model.model.layers:
        apply_expert_parallelism(layer.mlp, mesh["ep"], mesh["tp"], plan, ep_implementation="all_to_all")
    return model


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


class System:
    """One model + optimizer and the step every system runs."""

    def __init__(self, name: str, model, expert_names: set[str], batch: dict):
        self.name, self.model, self.batch = name, model, batch
        named = list(model.named_parameters())
        self.dense = [p for n, p in named if n not in expert_names and not hasattr(p, "to_local")]
        self.params = [p for _, p in named]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, foreach=False)
        self.experts_modules = [m for m in model.modules() if is_hf_experts_module(m)]

    def bindings(self):
        return [b for b in (getattr(m, BINDING_ATTR, None) for m in self.experts_modules) if b is not None]

    def profile_calls(self) -> int:
        """Calls the layers' tuners have profiled so far (a step that adds none ran tuned
        decisions only; `tuner.tuning` alone also counts a session waiting idle for its key)."""
        count = torch.tensor([float(sum(b.tuner.profile_calls for b in self.bindings()))])
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        return int(count)

    def profiling_step(self) -> bool:
        """One step; whether any layer profiled in it."""
        before = self.profile_calls()
        self.step()
        return self.profile_calls() > before

    def forward(self) -> torch.Tensor:
        return self.model(input_ids=self.batch["input_ids"], labels=self.batch["labels"]).loss

    def finish(self, loss: torch.Tensor) -> None:
        loss.backward()
        grads = [p.grad for p in self.dense if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> float:
        loss = self.forward()
        self.finish(loss)
        return float(loss.detach())


def build_systems(shape: ModelShape, rank: int, world: int, tokens: int, hf_experts_bytes: int | None,
                  names=SYSTEMS, tuner_max_rounds: int = 6) -> dict[str, System]:
    if tokens % shape.seq_len:
        raise ValueError(f"--tokens {tokens} must be a multiple of the sequence length {shape.seq_len}")
    gen = torch.Generator().manual_seed(1 + rank)
    ids = torch.randint(3, shape.vocab, (tokens // shape.seq_len, shape.seq_len), generator=gen)
    batch = {"input_ids": ids, "labels": ids}
    groups = build_process_groups(world)
    systems = {}
    for name in names:
        if name.startswith("hf_ep"):
            model = _apply_hf_ep(build_model(shape, "grouped_mm"), world)
            expert_names: set[str] = set()
        else:
            if name in BUDGET_FRACTIONS:
                if hf_experts_bytes is None:
                    raise ValueError(f"{name} needs hf_ep's measured experts bytes")
                config = ExecutorConfig(memory_budget=int(BUDGET_FRACTIONS[name] * hf_experts_bytes))
            elif name == "ours_n1":
                config = ExecutorConfig(num_partitions=1, restore="none")
            elif name == "ours_n4_s4":
                config = ExecutorConfig(num_partitions=4, restore="s4")
            else:
                config = ExecutorConfig()
            model = convert_model(build_model(shape, "grouped_mm"), groups, config)
            expert_names = set(sharded_expert_keys(model))
            for module in model.modules():
                binding = getattr(module, BINDING_ATTR, None)
                if binding is not None:
                    binding.tuner = LayerTuner(max_rounds=tuner_max_rounds)
        if name.endswith("ckpt"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        systems[name] = System(name, model, expert_names, batch)
    return systems


class ScopedMeter(SavedTensorMeter):
    """The whole model's saved-tensor meter that also files what each experts call saves.

    One set of hooks for the whole forward (nested hooks would take tensors from each other:
    the innermost hooks pack); forward hooks on the experts modules open and close a scope.
    Storages saved both inside and outside an experts call count once in the total."""

    def __init__(self, system: System):
        super().__init__([_local(p) for p in system.params])
        self.per_call: list[int] = []
        self._scope: dict | None = None
        self._handles = []
        for module in system.experts_modules:
            self._handles.append(module.register_forward_pre_hook(lambda *_: self._open()))
            self._handles.append(module.register_forward_hook(lambda *_: self._close()))

    def _open(self) -> None:
        self._scope, self._host0 = {}, host_pool(False).in_use_bytes

    def _close(self) -> None:
        self.per_call.append(sum(self._scope.values()) + host_pool(False).in_use_bytes - self._host0)
        self._scope = None

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._scope is not None:
            for inner in _plain_tensors(tensor):
                storage = inner.untyped_storage()
                if storage.nbytes() and storage.data_ptr() not in self._exclude:
                    self._scope[storage.data_ptr()] = storage.nbytes()
        return super()._pack(tensor)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def measured_step(system: System, rss: PeakRss | None) -> dict:
    """One step with every meter on (see the module docstring); rank-local figures. Without
    `rss` (before the timed rounds, where the allocator must stay as it is) no peak: -1."""
    base = rss.begin() if rss is not None else None
    meter = ScopedMeter(system)
    host0 = host_pool(False).in_use_bytes
    with meter:
        loss = system.forward()
    host = host_pool(False).in_use_bytes - host0
    meter.remove()
    system.finish(loss)
    peak = rss.end(base) if rss is not None else -1 - host
    # Under gradient checkpointing the checkpoint's own hooks (innermost) take the blocks'
    # tensors: the experts calls save nothing the meter sees there (-1: not measured).
    per_layer = -1 if system.name.endswith("ckpt") else max(meter.per_call)
    return {"saved_bytes": meter.bytes_on("cpu") + host, "host_bytes": host, "experts_bytes_per_layer": per_layer,
            "peak_bytes": peak + host}


def _max_over_ranks(values: dict) -> dict:
    t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(zip(values, t.tolist()))


def _mean_over_ranks(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def _bench(rank: int, world: int, shape: ModelShape, tokens: int, repeats: int, max_tune_steps: int,
           names: tuple[str, ...], tuner_max_rounds: int, verbose: bool = False) -> dict:
    torch.set_num_threads(1)
    if verbose:  # the tuners' decisions (rank 0 logs them)
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        logging.getLogger("lightning_mpipemoe").setLevel(logging.INFO)
    # HF EP first: its experts bytes set the budget rows' budgets, its first step the reference loss.
    systems = build_systems(shape, rank, world, tokens, None, names=(HF_EP,))
    first_loss = {HF_EP: _mean_over_ranks(systems[HF_EP].step())}
    hf_mem = _max_over_ranks(measured_step(systems[HF_EP], None))
    hf_experts = int(hf_mem["experts_bytes_per_layer"])
    others = build_systems(shape, rank, world, tokens, hf_experts, names=tuple(n for n in names if n != HF_EP),
                           tuner_max_rounds=tuner_max_rounds)
    systems.update(others)
    for name, system in others.items():
        first_loss[name] = _mean_over_ranks(system.step())
    # Warm-up: every system twice; auto systems until their tuners stop profiling.
    tune_steps = {}
    for name, system in systems.items():
        if name == "ours_ckpt" and "ours_default" in systems:
            # Same layers, same config: start from the default row's tuned decisions (the
            # tuners' documented persistence, as a resumed run would) instead of profiling again.
            for mine, tuned in zip(system.bindings(), systems["ours_default"].bindings()):
                mine.tuner.load_state_dict(tuned.tuner.state_dict())
        system.step()
        steps = 0
        while steps < max_tune_steps and system.profiling_step():
            steps += 1
        tune_steps[name] = steps
    order = list(systems)
    times = {name: [] for name in order}
    profiled = {name: 0 for name in order}
    for r in range(repeats):
        for i in range(len(order)):
            name = order[(r + i) % len(order)]
            before = systems[name].profile_calls()
            times[name].append(timed_once(systems[name].step))
            profiled[name] += int(systems[name].profile_calls() > before)
    # Memory pass: allocator caching out of the way (see the module docstring).
    rss = PeakRss()
    memory = {name: _max_over_ranks(measured_step(system, rss)) for name, system in systems.items()}
    decisions = {}
    for name, system in systems.items():
        decisions[name] = [b.tuner.metrics() for b in system.bindings()]
    return {
        "shape": asdict(shape), "tokens_per_rank": tokens, "repeats": repeats,
        "hf_ep_experts_bytes_per_layer": hf_experts,
        "budgets": {n: int(f * hf_experts) for n, f in BUDGET_FRACTIONS.items() if n in systems},
        "tuner_max_rounds": tuner_max_rounds, "first_step_loss": first_loss, "tune_steps": tune_steps,
        "timed_steps_profiling": profiled,
        "times": {name: summarize(t) for name, t in times.items()}, "raw_times_s": times,
        "ratio_vs_hf_ep": ratio_summaries(times, HF_EP), "memory": memory,
        "tuner_metrics_rank0": decisions,
    }


def _mib(value: float) -> str:
    return "-" if value < 0 else f"{value / 2**20:.2f}"


def print_table(name: str, result: dict) -> None:
    shape = result["shape"]
    print(f"\n{name}: {shape['family']} {shape['layers']} layers, H {shape['hidden']}, I {shape['intermediate']}, "
          f"{shape['experts']} experts, top-{shape['top_k']}, EP 2 gloo, {result['tokens_per_rank']} tokens/rank, "
          f"{result['repeats']} interleaved rounds")
    header = (f"{'system':>14} | {'step ms: median [min, max]':>26} | {'/ hf_ep per round':>22} | "
              f"{'saved MiB':>9} | {'experts MiB':>11} | {'peak MiB':>8} | {'first loss':>10}")
    print(header)
    print("-" * len(header))
    hf_loss = result["first_step_loss"][HF_EP]
    for system, t in result["times"].items():
        r = result["ratio_vs_hf_ep"][system]
        m = result["memory"][system]
        note = ""
        if system in result["budgets"]:
            budget = result["budgets"][system]
            within = 0 <= m["experts_bytes_per_layer"] <= budget
            note = f"  budget {budget / 2**20:.1f} MiB: {'within' if within else 'OVER'}"
        if result["timed_steps_profiling"][system]:
            note += f"  ({result['timed_steps_profiling'][system]} timed steps profiling)"
        print(f"{system:>14} | {t['median_s'] * 1e3:9.0f} [{t['min_s'] * 1e3:6.0f}, {t['max_s'] * 1e3:6.0f}] | "
              f"{r['median_s']:6.2f}x [{r['min_s']:5.2f}, {r['max_s']:5.2f}] | {m['saved_bytes'] / 2**20:9.1f} | "
              f"{_mib(m['experts_bytes_per_layer']):>11} | {m['peak_bytes'] / 2**20:8.1f} | "
              f"{result['first_step_loss'][system]:10.6f}{note}")
    spread = max(abs(v - hf_loss) for v in result["first_step_loss"].values())
    print(f"first-step losses agree to {spread:.1e}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per rank (a multiple of 256)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--max-tune-steps", type=int, default=60,
                        help="warm-up steps at most while an auto system's tuners profile")
    parser.add_argument("--tuner-max-rounds", type=int, default=6,
                        help="LayerTuner(max_rounds=...) of our systems (the library default is 24)")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    parser.add_argument("--verbose", action="store_true", help="log the tuners' decisions")
    parser.add_argument("--out", default="model_step.json", help="file name under benchmarks/results/")
    args = parser.parse_args(argv)
    if HF_EP not in args.systems:
        raise SystemExit(f"--systems must include {HF_EP!r} (every ratio is against it)")
    load_before = os.getloadavg()
    results = {}
    for name in args.shapes:
        start = time.perf_counter()
        results[name] = launch(_bench, 2, SHAPES[name], args.tokens, args.repeats, args.max_tune_steps,
                               tuple(args.systems), args.tuner_max_rounds, args.verbose)
        results[name]["launch_wall_s"] = time.perf_counter() - start
        print_table(name, results[name])
    payload = {"results": results, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
               "machine": machine_note()}
    path = write_json(args.out, payload)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
