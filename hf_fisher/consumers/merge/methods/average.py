"""Weighted parameter averaging."""

from __future__ import annotations

from ..base import CONVENTION, NORMALIZE, MergeMethod, TensorInputs


class Average(MergeMethod):
    """``θ* = Σ λ_i θ_i / Σ λ_i`` (model soups; mergekit's ``linear``). Both conventions give the
    same numbers up to rounding; ``"mergekit"`` (default) accumulates in mergekit's order, bit for bit."""

    name = "average"
    paper = "weighted parameter averaging (Wortsman et al. 2022, *Model soups*, arXiv:2203.05482)"
    formula = "θ* = Σ λ_i θ_i / Σ λ_i"
    linear = True
    options = (CONVENTION,)

    def merge(self, t: TensorInputs):
        from .. import math as mm

        if self.convention == "hf_fisher":
            return mm.weighted_average(t.thetas, t.weights)
        return mm.linear(t.thetas, t.weights, normalize=True)


class Linear(MergeMethod):
    """mergekit's ``linear``: ``θ* = Σ_i λ_i θ_i / Σ_i λ_i`` (``normalize``, default on) or
    ``Σ_i λ_i θ_i`` (:func:`~hf_fisher.consumers.merge.math.linear`). The weights may have any sign."""

    name = "linear"
    paper = "weighted parameter averaging (Wortsman et al. 2022, *Model soups*, arXiv:2203.05482); mergekit's linear"
    formula = "θ* = Σ λ_i θ_i / Σ λ_i (normalize) or Σ λ_i θ_i"
    linear = True
    task_vectors = True  # weights of any sign, default 1 each (mergekit requires them)
    options = (NORMALIZE,)

    def merge(self, t: TensorInputs):
        from .. import math as mm

        return mm.linear(t.thetas, t.weights, normalize=True if self.normalize is None else self.normalize)
