"""What transformers' output capturing needs, rebuilt in a process the model was pickled into.

transformers records router logits (and hidden states, attentions) with forward hooks that it
installs lazily, on the first forward that asks for them, from `_CAN_RECORD_REGISTRY`: a
module-level registry filled when a model is constructed (`PreTrainedModel.post_init`). A
model built in one process and unpickled in another (Lightning's spawn launchers, e.g.
`strategy="mpipemoe_spawn"` with the model loaded in the main process) arrives without its
registry entry: no hook is installed, `output_router_logits=True` yields no router logits and
the MoE aux loss comes back as the integer 0 (Mixtral's loss then fails on `aux_loss.to`).
`restore_output_capturing` registers each transformers model's class again, as `post_init`
would have; the hooks themselves are then installed by transformers as usual.

A model that already ran a forward pass carries those hooks, which are local functions and
cannot be pickled at all; `drop_output_capturing_hooks` removes them (and the mark that they
are installed), so transformers installs them again at the next forward, in whichever process.
"""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel
from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY

__all__ = ["drop_output_capturing_hooks", "restore_output_capturing"]


def restore_output_capturing(model: nn.Module) -> int:
    """Register every transformers model in `model` (itself included) with transformers'
    output-capturing registry where its class is missing; returns how many were added."""
    added = 0
    for module in model.modules():
        if not isinstance(module, PreTrainedModel):
            continue
        can_record = getattr(module, "_can_record_outputs", None)
        if can_record and not _CAN_RECORD_REGISTRY.get(module):
            _CAN_RECORD_REGISTRY[module] = can_record
            # A forward without the entry installed no hook but marked the model as hooked.
            vars(module).pop("_output_capturing_hooks_installed", None)
            added += 1
    return added


def drop_output_capturing_hooks(model: nn.Module) -> int:
    """Remove transformers' output-capturing forward hooks from `model` and unmark the models
    that had them installed (they are installed again on the next forward); returns how many
    hooks were removed. Other forward hooks stay."""
    removed = 0
    for module in model.modules():
        hooks = module._forward_hooks
        for key in [k for k, hook in hooks.items() if getattr(hook, "__module__", None) == _HOOKS_MODULE]:
            del hooks[key]
            removed += 1
        vars(module).pop("_output_capturing_hooks_installed", None)
    return removed


_HOOKS_MODULE = "transformers.utils.output_capturing"
