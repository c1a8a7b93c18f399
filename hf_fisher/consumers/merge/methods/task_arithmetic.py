"""Task arithmetic."""

from __future__ import annotations

from ..base import SCALING, MergeMethod, TensorInputs


class TaskArithmetic(MergeMethod):
    """``θ* = θ_base + s Σ_i λ_i τ_i`` with task vectors ``τ_i = θ_i − θ_base`` (Ilharco et al. 2023)."""

    name = "task_arithmetic"
    paper = "Ilharco et al. 2023, *Editing Models with Task Arithmetic* (arXiv:2212.04089)"
    formula = "θ* = θ_base + s Σ λ_i τ_i"
    needs_base = True
    task_vectors = True
    linear = True
    options = (SCALING,)
    tuned = ("scaling",)

    def merge(self, t: TensorInputs):
        from .. import math as mm

        return mm.task_arithmetic(t.base, t.thetas, t.weights, scaling=self.scaling)
