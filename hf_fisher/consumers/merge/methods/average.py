"""Weighted parameter averaging."""

from __future__ import annotations

from ..base import MergeMethod, TensorInputs


class Average(MergeMethod):
    """``θ* = Σ_i λ_i θ_i / Σ_i λ_i`` (model soups; mergekit's ``linear``)."""

    name = "average"
    paper = "weighted parameter averaging (Wortsman et al. 2022, *Model soups*, arXiv:2203.05482)"
    formula = "θ* = Σ λ_i θ_i / Σ λ_i"
    linear = True

    def merge(self, t: TensorInputs):
        from .. import math as mm

        return mm.weighted_average(t.thetas, t.weights)
