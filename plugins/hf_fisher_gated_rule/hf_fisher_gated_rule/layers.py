"""``GatedLinear``: a linear map whose output channels are scaled by a learned sigmoid gate."""

from __future__ import annotations

import math

import torch
from torch import nn


class GatedLinear(nn.Module):
    """``y = (x @ weight.T) * sigmoid(gate)``; ``weight`` ``[out, in]``, ``gate`` ``[out]``.

    A module type the hf_fisher core does not know: without the rule of this plugin the engine
    would give it the generic ``torch.func`` rule.
    """

    def __init__(self, in_features: int, out_features: int, *, device=None, dtype=None) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.gate = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        with torch.no_grad():
            self.gate.normal_(0.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.weight.T) * torch.sigmoid(self.gate)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"
