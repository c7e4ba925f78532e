"""Will this fine-tuning run fit? Per-rank memory of the configured run, before any launch.

    python -m lightning_mpipemoe.recipes.plan model=qwen3_30b_a3b trainer=gpu trainer.devices=8 \
        strategy.expert_parallel_size=8 plan.device_memory=80GB plan.tokens_per_rank=4096

Same Hydra config as `recipes.finetune` (plus the `plan` block of conf/plan.yaml). The model
is built from its config on the meta device (`model.path`'s config.json, or the published
config in the model template's `hf_config`), nothing is loaded, and the plan prints, per
rank, parameters, gradients, optimizer state, activations, the MoE layers' held bytes per
restore strategy and the largest transient, for `ddp` and `fsdp` side by side, with a
verdict and, when nothing fits, what would (more GPUs, LoRA). Exit status 1 when the
configured setting does not fit, 2 on a configuration error.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from lightning_mpipemoe.recipes.finetune import CONFIG_DIR

__all__ = ["PlanError", "main", "plan_from_config", "render"]

PROG = "mpipemoe-plan"


class PlanError(ValueError):
    """A configuration the planner cannot plan; the message is the one line to print."""


def _hf_config(cfg: DictConfig):
    from transformers import AutoConfig

    path = cfg.model.get("path") if not OmegaConf.is_missing(cfg.model, "path") else None
    if path and (Path(str(path)).expanduser() / "config.json").is_file():
        return AutoConfig.from_pretrained(str(Path(str(path)).expanduser()))
    spec = cfg.model.get("hf_config")
    if spec is None:
        where = f"model.path={path} has no config.json" if path else "model.path is not set"
        raise PlanError(f"{where} and model={cfg.model.get('name', '?')} has no hf_config to plan from")
    spec = OmegaConf.to_container(spec, resolve=True)
    model_type = spec.pop("model_type", None)
    if not model_type:
        raise PlanError(f"model.hf_config of model={cfg.model.get('name', '?')} needs a model_type")
    return AutoConfig.for_model(model_type, **spec)


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PlanError(f"{name}={value!r} must be a positive integer for the plan")
    return value


def plan_from_config(cfg: DictConfig):
    """(counts, {sharding: RankPlan}, chosen sharding, suggestions) of a composed config."""
    from lightning_mpipemoe.memory_plan import (
        RESTORES,
        count_model,
        meta_model,
        parse_bytes,
        plan_rank,
        smallest_world_that_fits,
    )

    plan = cfg.get("plan") or {}
    world = _positive_int(cfg.trainer.devices, "trainer.devices") * _positive_int(cfg.trainer.get("num_nodes", 1),
                                                                                 "trainer.num_nodes")
    ep = _positive_int(cfg.strategy.get("expert_parallel_size") or 1, "strategy.expert_parallel_size")
    tokens = plan.get("tokens_per_rank") or cfg.data.batch_size * cfg.data.seq_len
    tokens = _positive_int(tokens, "plan.tokens_per_rank")
    memory = plan.get("device_memory")
    if memory is None and str(cfg.trainer.get("accelerator")) in ("gpu", "cuda"):
        import torch

        if torch.cuda.is_available():
            memory = torch.cuda.get_device_properties(0).total_memory
    device_memory = parse_bytes(memory) if memory is not None else None
    restore = cfg.strategy.get("restore")
    restore = restore if restore in RESTORES else "s4"
    n = plan.get("num_partitions", 4)
    n = _positive_int(cfg.strategy.get("granularity") if isinstance(cfg.strategy.get("granularity"), int) else n,
                      "plan.num_partitions")
    module = cfg.model.get("module") or {}
    kwargs = dict(
        tokens_per_rank=tokens,
        precision=str(cfg.trainer.get("precision", "32-true")),
        gradient_checkpointing=bool(module.get("gradient_checkpointing", False)),
        restore=restore,
        num_partitions=n,
        device_memory=device_memory,
        overhead_bytes=parse_bytes(plan.get("overhead", "1.5GiB")),
        fragmentation=float(plan.get("fragmentation", 0.05)),
    )
    counts = count_model(meta_model(_hf_config(cfg)))
    try:
        plans = {s: plan_rank(counts, sharding=s, world_size=world, ep_size=ep, **kwargs) for s in ("ddp", "fsdp")}
    except ValueError as exc:
        raise PlanError(str(exc)) from None
    chosen = str(cfg.strategy.get("sharding") or "ddp")
    suggestions = []
    if device_memory is not None and not plans[chosen].fits:
        if chosen == "ddp" and plans["fsdp"].fits:
            suggestions.append(f"fsdp (dense and expert state sharded) fits: {plans['fsdp'].total / 1e9:.1f} GB per rank")
        more = smallest_world_that_fits(counts, ep_size=ep, **kwargs)
        if more and more > world:
            suggestions.append(f"fsdp fits on {more} devices ({more // ep} x EP {ep})")
        lora = plan_rank(counts, sharding="fsdp", world_size=world, ep_size=ep, lora=True, **kwargs)
        if lora.fits:
            suggestions.append(f"LoRA on a frozen bf16 base fits here: {lora.total / 1e9:.1f} GB per rank")
    return counts, plans, chosen, suggestions


def render(counts, plans: dict, chosen: str, suggestions: list[str]) -> str:
    """The plan as text: one table, ddp and fsdp columns, GB = 10^9 bytes."""
    first = next(iter(plans.values()))
    lines = [
        f"== {PROG} ==",
        f"model       {counts.total_params / 1e9:.2f}B parameters: dense {counts.dense_params / 1e9:.2f}B, "
        f"experts {counts.expert_params / 1e9:.2f}B ({counts.num_experts} experts, top-{counts.top_k}, "
        f"{counts.moe_layers} MoE layers)",
        f"run         {first.world_size} ranks, EP {first.ep_size} x expert-dp {first.world_size // first.ep_size}, "
        f"restore {first.restore}",
        "",
        f"  {'per rank (GB)':<44}" + "".join(f"{name:>10}" for name in plans),
    ]
    labels = list(dict.fromkeys(k for p in plans.values() for k in p.rows))
    for label in labels:
        lines.append(f"  {label:<44}" + "".join(
            f"{p.rows[label] / 1e9:>10.2f}" if label in p.rows else f"{'-':>10}" for p in plans.values()))
    lines.append(f"  {'total':<44}" + "".join(f"{p.total / 1e9:>10.2f}" for p in plans.values()))
    if first.device_memory is not None:
        lines.append(f"  {'device memory':<44}" + "".join(f"{p.device_memory / 1e9:>10.2f}" for p in plans.values()))
        lines.append(f"  {'fits':<44}" + "".join(f"{('yes' if p.fits else 'no'):>10}" for p in plans.values()))
    lines.append("")
    lines.append("  MoE activations, all layers (device held / offloaded to host, GB):")
    lines.append("    " + "  ".join(f"{r} {d / 1e9:.2f}/{h / 1e9:.2f}" for r, (d, h) in first.moe_by_restore.items()))
    verdict = plans[chosen].fits
    lines.append("")
    if verdict is None:
        lines.append(f"verdict     {chosen}: no device memory given (plan.device_memory=80GB)")
    else:
        lines.append(f"verdict     {chosen}: {'fits' if verdict else 'does not fit'}")
    for suggestion in suggestions:
        lines.append(f"            {suggestion}")
    if verdict is False and not suggestions:
        lines.append("            nothing tried fits: more devices, a larger EP size, or fewer tokens per rank")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="plan")
def main(cfg: DictConfig) -> None:
    """Entry point of `python -m lightning_mpipemoe.recipes.plan` (and `mpipemoe-plan`)."""
    import lightning_mpipemoe  # noqa: F401  (registers the adapters' experts implementation)

    try:
        counts, plans, chosen, suggestions = plan_from_config(cfg)
    except (PlanError, ValueError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(render(counts, plans, chosen, suggestions))
    if cfg.plan.get("json"):
        Path(str(cfg.plan.json)).write_text(json.dumps(
            {s: {"rows": p.rows, "total": p.total, "fits": p.fits} for s, p in plans.items()}, indent=2))
    if plans[chosen].fits is False:
        sys.exit(1)


if __name__ == "__main__":
    main()
