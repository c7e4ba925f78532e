"""Routers for the standalone MoE layer, and the auxiliary losses (Hugging Face's own).

Shape legend: T tokens, E experts, K top-k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func as _hf_topk_balance_loss
from transformers.models.switch_transformers.modeling_switch_transformers import router_z_loss_func as _hf_z_loss

__all__ = ["ROUTER_SCORINGS", "RouterOutput", "SwitchRouter", "TopKRouter", "load_balancing_loss", "router_z_loss"]

#: "softmax_topk": softmax over all experts, then top-k (Mixtral, Qwen); "topk_softmax":
#: top-k of the logits, then softmax over the k (the weights always sum to one).
ROUTER_SCORINGS = ("softmax_topk", "topk_softmax")


@dataclass(frozen=True)
class RouterOutput:
    logits_TE: torch.Tensor
    top_k_index_TK: torch.Tensor
    top_k_weights_TK: torch.Tensor
    capacity: int | None = None
    capacity_group_size: int | None = None


def _jitter(hidden_TH: torch.Tensor, jitter: float, training: bool) -> torch.Tensor:
    if not training or jitter <= 0:
        return hidden_TH
    return hidden_TH * torch.empty_like(hidden_TH).uniform_(1.0 - jitter, 1.0 + jitter)


class TopKRouter(nn.Module):
    """Token-choice top-k routing.

    Args:
        scoring: one of `ROUTER_SCORINGS`.
        normalize: renormalise the top-k softmax weights to sum to one (Mixtral does;
            Qwen2-MoE by default does not). Ignored for "topk_softmax".
        jitter: multiplicative input noise in training (as Mixtral's `router_jitter_noise`).
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        *,
        scoring: str = "softmax_topk",
        normalize: bool = True,
        jitter: float = 0.0,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in 1..num_experts={num_experts}")
        if scoring not in ROUTER_SCORINGS:
            raise ValueError(f"scoring={scoring!r} is not one of {ROUTER_SCORINGS}")
        self.top_k, self.num_experts = top_k, num_experts
        self.scoring, self.normalize, self.jitter = scoring, normalize, jitter
        self.gate = nn.Linear(hidden_size, num_experts, bias=bias)

    def forward(self, hidden_TH: torch.Tensor) -> RouterOutput:
        logits_TE = self.gate(_jitter(hidden_TH, self.jitter, self.training))
        if self.scoring == "topk_softmax":
            top_logits_TK, index_TK = torch.topk(logits_TE, self.top_k, dim=-1)
            weights_TK = F.softmax(top_logits_TK.float(), dim=-1)
        else:
            probs_TE = F.softmax(logits_TE.float(), dim=-1)
            weights_TK, index_TK = torch.topk(probs_TE, self.top_k, dim=-1)
            if self.normalize:
                weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        return RouterOutput(logits_TE, index_TK, weights_TK)


class SwitchRouter(nn.Module):
    """Switch Transformers top-1 routing with an expert capacity per sequence.

    The capacity is `expert_capacity` when given, else `ceil(capacity_factor * seq_len / E)`;
    tokens past it (in sequence order) are dropped and contribute zero.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        *,
        capacity_factor: float | None = 1.25,
        expert_capacity: int | None = None,
        jitter: float = 0.0,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if expert_capacity is None and (capacity_factor is None or capacity_factor <= 0):
            raise ValueError(
                f"SwitchRouter needs expert_capacity (int) or capacity_factor > 0; got {expert_capacity!r}, {capacity_factor!r}"
            )
        self.num_experts, self.jitter = num_experts, jitter
        self.capacity_factor, self.expert_capacity = capacity_factor, expert_capacity
        self.classifier = nn.Linear(hidden_size, num_experts, bias=bias)

    def forward(self, hidden_TH: torch.Tensor, sequence_length: int | None = None) -> RouterOutput:
        sequence_length = sequence_length or hidden_TH.shape[0]
        logits_TE = self.classifier(_jitter(hidden_TH.float(), self.jitter, self.training))
        probs_TE = F.softmax(logits_TE, dim=-1)
        weights_T1, index_T1 = probs_TE.max(dim=-1, keepdim=True)
        capacity = self.expert_capacity
        if capacity is None:
            capacity = math.ceil(self.capacity_factor * sequence_length / self.num_experts)
        return RouterOutput(logits_TE, index_T1, weights_T1, capacity=capacity, capacity_group_size=sequence_length)


def load_balancing_loss(logits_TE: torch.Tensor | tuple[torch.Tensor, ...], num_experts: int, top_k: int) -> torch.Tensor:
    """Switch/Mixtral auxiliary load-balancing loss (Hugging Face's `load_balancing_loss_func`)."""
    logits = logits_TE if isinstance(logits_TE, tuple) else (logits_TE,)
    return _hf_topk_balance_loss(logits, num_experts=num_experts, top_k=top_k)


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss (Hugging Face's `router_z_loss_func`)."""
    return _hf_z_loss(logits_TE.unsqueeze(0) if logits_TE.dim() == 2 else logits_TE)
