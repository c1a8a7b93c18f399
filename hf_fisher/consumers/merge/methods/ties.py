"""TIES merging."""

from __future__ import annotations

from ..base import DENSITY, SCALING, MergeMethod, TensorInputs


class Ties(MergeMethod):
    """TIES (Yadav et al. 2023): trim each ``λ_i τ_i`` to its top-``density`` magnitudes, elect
    each entry's sign ``sign(Σ_i trimmed_i)``, take the mean of the entries that agree with it
    (disjoint mean), ``θ* = θ_base + s · mean``."""

    name = "ties"
    paper = "Yadav et al. 2023, *TIES-Merging: Resolving Interference When Merging Models* (arXiv:2306.01708)"
    formula = "θ* = θ_base + s · disjoint_mean(elect(trim(λ_i τ_i, density)))"
    needs_base = True
    task_vectors = True
    options = (SCALING, DENSITY)
    tuned = ("scaling",)

    def merge(self, t: TensorInputs):
        from .. import math as mm

        return mm.ties(t.base, t.thetas, t.weights, density=self.density, scaling=self.scaling)
