"""GPT-OSS (`GptOssForCausalLM`, gpt-oss-20b/120b) on the MoE executor.

GPT-OSS's experts module (`GptOssExperts`, decorated with `@use_experts_implementation(
is_concatenated=False, is_transposed=True, has_bias=True)`) differs from Mixtral's in four
ways, each taken by the shared machinery rather than by a copy of it:

- transposed weights, `gate_up_proj [E, H, 2I]` and `down_proj [E, I, H]`: the executor reads
  transposed views (`experts_interface.expert_weights_of`), no copies;
- interleaved gate/up columns (gate 0, up 0, gate 1, ...) and
- the clamped SwiGLU, `(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)` with
  `g = clamp(gate, max=limit)`: both are the module's own `_apply_gate`, which the executor
  calls as its `gate_fn` on the pre-activation `[S, 2I]` (in forward, and again when backward
  recomputes it), so transformers' definition is the one that runs;
- biases on both projections, `[E, 2I]` and `[E, H]`: the executor's per-expert biases.

Dim 0 is the expert in all four tensors, so sharding, checkpoints, consolidation and export
are the Mixtral-style adapter's. The router (`GptOssTopKRouter`, softmax over the top-k
logits) and the auxiliary loss stay transformers'.

Not covered: the MXFP4-quantized expert blocks of the released checkpoints
(`*_blocks` / `*_scales`); dequantize them first (transformers' `Mxfp4Config(dequantize=True)`).
"""

from __future__ import annotations

from torch import nn
from transformers.integrations.moe import _default_apply_gate

from lightning_mpipemoe.config import ExecutorConfig
from lightning_mpipemoe.groups import MoEProcessGroups

from .experts_interface import UnsupportedExpertsLayout
from .mixtral_style import MixtralStyleAdapter, find_experts_modules

__all__ = ["GptOssAdapter"]


class GptOssAdapter(MixtralStyleAdapter):
    """The Mixtral-style adapter, checking first that each experts module has the layout this
    module describes (a later transformers that changes it is refused, not misread)."""

    name = "gpt_oss"

    def convert(
        self, model: nn.Module, groups: MoEProcessGroups, config: ExecutorConfig, track_stats: bool = True
    ) -> nn.Module:
        for name, module in find_experts_modules(model):
            layout = (module.is_transposed, module.is_concatenated, module.has_bias, module.has_gate)
            custom_gate = type(module)._apply_gate is not _default_apply_gate
            if layout != (True, False, True, True) or not custom_gate:
                raise UnsupportedExpertsLayout(
                    f"GPT-OSS experts module {name!r} has (is_transposed, is_concatenated, has_bias, has_gate) = "
                    f"{layout} and {'its own' if custom_gate else 'the default'} _apply_gate; the gpt_oss adapter "
                    "expects (True, False, True, True) with GPT-OSS's clamped SwiGLU _apply_gate"
                )
        return super().convert(model, groups, config, track_stats)
