"""A standalone MoE feed-forward layer (router + experts on the executor) for custom models."""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from lightning_mpipemoe.config import ExecutorConfig
from lightning_mpipemoe.groups import MoEProcessGroups, check_parallel_sizes
from lightning_mpipemoe.moe.executor import RoutingStats, expert_parallel_forward
from lightning_mpipemoe.moe.experts import ExpertWeights
from lightning_mpipemoe.moe.router import RouterOutput, SwitchRouter, TopKRouter
from lightning_mpipemoe.moe.tuner import LayerTuner, TunerOwner

__all__ = ["MoELayer"]


class MoELayer(TunerOwner, nn.Module):
    """Mixture-of-Experts FFN whose experts run expert-parallel (and pipelined) on the executor.

    Expert weights use Hugging Face's fused layout: `gate_up_proj [E, 2I, H]` for gated experts
    (`gated=True`, SwiGLU with `activation="silu"`), `gate_up_proj [E, I, H]` for plain
    two-layer experts (Switch-style), and `down_proj [E, H, I]`. After `shard_experts(groups)`
    the layer holds only its rank's `E / ep_size` experts.

    `forward(hidden [..., H])` returns `(out [..., H], router_logits [T, E])`; feed the logits
    to `load_balancing_loss` / `router_z_loss`.

    Args:
        router: a `TopKRouter`/`SwitchRouter` instance, or "topk" / "switch" to build one
            with `router_kwargs`.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int = 2,
        *,
        router: str | nn.Module = "topk",
        router_kwargs: dict | None = None,
        gated: bool = True,
        activation: str = "silu",
        bias: bool = False,
        init_std: float = 0.02,
        config: ExecutorConfig | None = None,
    ) -> None:
        super().__init__()
        if isinstance(router, str):
            kwargs = dict(router_kwargs or {})
            if router == "topk":
                router = TopKRouter(hidden_size, num_experts, top_k, **kwargs)
            elif router == "switch":
                if top_k != 1:
                    raise ValueError(f"the switch router is top-1; got top_k={top_k}")
                router = SwitchRouter(hidden_size, num_experts, **kwargs)
            else:
                raise ValueError(f"router={router!r}; valid: 'topk', 'switch' or an nn.Module")
        if activation not in ACT2FN:
            raise ValueError(f"activation={activation!r} is not a known activation; e.g. 'silu', 'gelu', 'relu'")
        self.router = router
        self.num_experts, self.top_k = num_experts, top_k
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.gated, self.activation_name = gated, activation
        self.act_fn = ACT2FN[activation]
        self.config = config or ExecutorConfig()
        self.groups = MoEProcessGroups.local()
        self.stats = RoutingStats()
        self.tuner = LayerTuner()  # turns "auto" n / restore into this layer's choice per call
        width = 2 * intermediate_size if gated else intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, width, hidden_size).normal_(0.0, init_std))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size).normal_(0.0, init_std))
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(num_experts, width)) if bias else None
        self.down_proj_bias = nn.Parameter(torch.zeros(num_experts, hidden_size)) if bias else None

    @property
    def num_local_experts(self) -> int:
        return self.gate_up_proj.shape[0]

    def expert_parameters(self) -> list[nn.Parameter]:
        """The sharded (expert-parallel) parameters; everything else is replicated."""
        return [p for p in (self.gate_up_proj, self.down_proj, self.gate_up_proj_bias, self.down_proj_bias) if p is not None]

    def shard_experts(self, groups: MoEProcessGroups) -> None:
        """Keep only this rank's experts (`ep_rank * L .. + L`); the others are freed."""
        if self.num_local_experts != self.num_experts:
            raise RuntimeError(f"experts are already sharded ({self.num_local_experts} of {self.num_experts} held)")
        check_parallel_sizes(groups.world_size, groups.ep_size, self.num_experts)
        local = self.num_experts // groups.ep_size
        start = groups.ep_rank * local
        for name in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"):
            param = getattr(self, name)
            if param is not None:
                shard = nn.Parameter(param.detach()[start : start + local].clone(), requires_grad=param.requires_grad)
                setattr(self, name, shard)
        self.groups = groups

    def expert_weights(self) -> ExpertWeights:
        return ExpertWeights(
            self.gate_up_proj,
            self.down_proj,
            self.gate_up_proj_bias,
            self.down_proj_bias,
            gated=self.gated,
            activation=self.act_fn,
        )

    def route(self, hidden_TH: torch.Tensor, sequence_length: int) -> RouterOutput:
        if isinstance(self.router, SwitchRouter):
            return self.router(hidden_TH, sequence_length=sequence_length)
        return self.router(hidden_TH)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden has last dim {hidden.shape[-1]}, expected hidden_size={self.hidden_size}")
        hidden_TH = hidden.reshape(-1, self.hidden_size)
        sequence_length = hidden.shape[-2] if hidden.dim() >= 3 else hidden_TH.shape[0]
        routed = self.route(hidden_TH, sequence_length)
        out_TH = expert_parallel_forward(
            hidden_TH,
            routed.top_k_index_TK,
            routed.top_k_weights_TK,
            self.expert_weights(),
            ep_group=self.groups.ep,
            combine_group=self.groups.ep_combine,
            config=self.config,
            capacity=routed.capacity,
            capacity_group_size=routed.capacity_group_size,
            stats=self.stats,
            tuner=self.tuner,
        )
        return out_TH.view_as(hidden), routed.logits_TE
