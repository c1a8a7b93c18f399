"""Fisher-weighted averaging (of models or of task vectors)."""

from __future__ import annotations

from ..base import (
    FISHER_FLOOR,
    NO_FISHER_RULE,
    NORMALIZE_FISHERS,
    FisherInputMethod,
    TensorInputs,
)

_BROADCAST = {"fisher_broadcast": "group Fishers spread over their slices: F_g / |g| per element"}


class Fisher(FisherInputMethod):
    """Fisher merging (Matena & Raffel 2022), per element:
    ``θ* = Σ_i λ_i F̃_i θ_i / Σ_i λ_i F̃_i``, ``F̃_i = max(F_i, fisher_floor)`` (where every Fisher
    vanishes the floor makes it the λ-weighted average). Group Fishers are spread over their
    slices (``F_g / |g|`` per element); ``normalize_fishers`` divides each Fisher by its global mean."""

    name = "fisher"
    paper = "Matena & Raffel 2022, *Merging Models with Fisher-Weighted Averaging* (arXiv:2111.09832)"
    formula = "θ* = Σ λ_i F̃_i θ_i / Σ λ_i F̃_i, F̃_i = max(F_i, floor)"
    fishers = "diagonal"
    options = (FISHER_FLOOR, NORMALIZE_FISHERS, NO_FISHER_RULE)
    tuned = ("fisher_floor",)

    def recipe_notes(self):
        return dict(_BROADCAST)

    def merge(self, t: TensorInputs):
        from .. import math as mm

        if t.fishers is None:
            return self.merge_uncovered(t)
        return mm.fisher_weighted(t.thetas, t.fishers, t.weights, floor=self.fisher_floor)


class FisherTaskVector(Fisher):
    """Fisher merging of task vectors: ``θ* = θ_base + Σ_i λ_i F̃_i τ_i / Σ_i λ_i F̃_i``,
    ``τ_i = θ_i − θ_base``, ``F̃_i = max(F_i, fisher_floor)``. In LoRA delta-W space (base 0)
    it is the Fisher merge of the deltas."""

    name = "fisher_task_vector"
    paper = "Matena & Raffel 2022 (Fisher-weighted averaging) applied to task vectors (Ilharco et al. 2023)"
    formula = "θ* = θ_base + Σ λ_i F̃_i τ_i / Σ λ_i F̃_i"
    needs_base = True

    def merge(self, t: TensorInputs):
        from .. import math as mm

        if t.fishers is None:
            return self.merge_uncovered(t)
        return mm.fisher_task_vector(t.base, t.thetas, t.fishers, t.weights, floor=self.fisher_floor)
