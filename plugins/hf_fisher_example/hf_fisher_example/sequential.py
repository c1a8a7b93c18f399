"""A ``tryfirst`` layout adapter for ``torch.nn.Sequential`` stacks of ``nn.Linear`` layers.

For consecutive linear layers ``L_i`` (weight ``[h, in]``) and ``L_j`` (weight ``[out, h]``),
separated only by parameter-free modules (activations, dropout), hidden unit ``c`` is row ``c``
of ``L_i.weight``, entry ``c`` of ``L_i.bias`` and column ``c`` of ``L_j.weight``: one
``ChannelBlock`` per hidden layer, with ``layer`` = the position of ``L_i`` in the stack.
Groups are the generic ones (one per output unit of every linear layer).
"""

from __future__ import annotations

import itertools
from typing import Any

from torch import nn

from hf_fisher.architectures.builder import LayoutBuilder
from hf_fisher.hookspecs import hookimpl

ADAPTER = "example_sequential_mlp"


def _linear_chain(model: nn.Module) -> list[tuple[int, nn.Linear]] | None:
    """``(position, layer)`` of the Linear layers, or None when the stack is not a plain MLP."""
    if not isinstance(model, nn.Sequential):
        return None
    chain = []
    for pos, module in enumerate(model):
        if isinstance(module, nn.Linear):
            chain.append((pos, module))
        elif any(True for _ in module.parameters()):
            return None  # some other layer with parameters: not ours
    return chain if len(chain) >= 2 else None


@hookimpl(tryfirst=True)
def hf_fisher_model_layout(model: Any):
    chain = _linear_chain(model)
    if chain is None:
        return None
    b = LayoutBuilder(model, adapter=ADAPTER)
    for (pos, producer), (_, consumer) in itertools.pairwise(chain):
        hidden = producer.out_features
        b.add_mlp(pos, hidden, [(producer.weight, 0), (producer.bias, 0), (consumer.weight, 1)])
    return b.build(num_layers=len(chain))
