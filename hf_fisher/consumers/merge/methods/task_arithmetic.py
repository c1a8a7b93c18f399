"""Task arithmetic."""

from __future__ import annotations

from ..base import CONVENTION, NORMALIZE, SCALING, MergeMethod, TensorInputs
from .convention import ConventionOptions


class TaskArithmetic(ConventionOptions, MergeMethod):
    """``θ* = θ_base + s Σ_i λ_i τ_i`` with task vectors ``τ_i = θ_i − θ_base`` (Ilharco et al. 2023).

    ``normalize=True`` (mergekit's option, default off) divides the sum by ``Σ_i λ_i``. Both
    conventions give the same numbers up to rounding; ``"mergekit"`` (default) accumulates in
    mergekit's order (:func:`~hf_fisher.consumers.merge.math.generalized_task_arithmetic`), bit for bit."""

    name = "task_arithmetic"
    paper = "Ilharco et al. 2023, *Editing Models with Task Arithmetic* (arXiv:2212.04089)"
    formula = "θ* = θ_base + s Σ λ_i τ_i"
    needs_base = True
    task_vectors = True
    linear = True
    options = (SCALING, CONVENTION, NORMALIZE)
    tuned = ("scaling",)

    mergekit_only = ("normalize",)

    def merge(self, t: TensorInputs):
        from .. import math as mm

        if self.convention == "hf_fisher":
            return mm.task_arithmetic(t.base, t.thetas, t.weights, scaling=self.scaling)
        return mm.generalized_task_arithmetic(t.base, t.thetas, t.weights, sparsification=None, consensus=None,
                                              scaling=self.scaling, normalize=bool(self.normalize))
