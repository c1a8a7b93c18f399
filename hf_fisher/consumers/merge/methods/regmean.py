"""RegMean, alone or with Fisher merging for the tensors it does not cover."""

from __future__ import annotations

from ..base import (
    ALPHA,
    FISHER_FLOOR,
    NO_FISHER_RULE,
    NORMALIZE_FISHERS,
    MergeMethod,
    TensorInputs,
)
from .fisher import Fisher

_LORA = ("needs the input Grams of every merged-in model; merge the merged-in models "
         "(peft_model.merge_and_unload()) with merge_with_fisher instead, or use method='fisher' / 'average'")


def _regmean(t: TensorInputs, alpha: float):
    from ..regmean import regmean_tensor

    return regmean_tensor(list(t.thetas), list(t.gram[0]), alpha=alpha, kind=t.gram[1], name=t.name,
                          coefficients=list(t.weights))


class RegMean(MergeMethod):
    """RegMean (Jin et al. 2023): every Linear/Conv1D weight ``W* = (Σ_i λ_i G̃_i)⁻¹ Σ_i λ_i G̃_i W_i``
    with each model's input Gram matrix ``G_i = Σ x xᵀ`` over its ``data`` (off-diagonal scaled by
    ``alpha``: ``G̃ = α G + (1 − α) diag(G)``); every other tensor the λ-weighted average. Equal
    weights λ_i (the default) give the paper's ``(Σ_i G̃_i)⁻¹ Σ_i G̃_i W_i``; ``validation=`` tunes
    λ and ``alpha``."""

    name = "regmean"
    paper = "Jin et al. 2023, *Dataless Knowledge Fusion by Merging Weights of Language Models* (RegMean, arXiv:2212.09849)"
    formula = "W* = (Σ λ_i G̃_i)⁻¹ Σ λ_i G̃_i W_i, G̃ = α G + (1 − α) diag(G)"
    needs_data = True
    lora_refusal = _LORA
    options = (ALPHA,)
    tuned = ("alpha",)

    def merge(self, t: TensorInputs):
        from .. import math as mm

        if t.gram is not None:
            return _regmean(t, self.alpha)
        return mm.weighted_average(t.thetas, t.weights)


class FisherRegMean(Fisher):
    """RegMean for the Linear/Conv1D weights (``W* = (Σ_i λ_i G̃_i)⁻¹ Σ_i λ_i G̃_i W_i``), Fisher
    merging (``θ* = Σ_i λ_i F̃_i θ_i / Σ_i λ_i F̃_i``) for every other tensor; ``validation=``
    tunes λ, ``alpha`` and ``fisher_floor``."""

    name = "fisher_regmean"
    paper = "Jin et al. 2023 (RegMean) for Linear weights + Matena & Raffel 2022 (Fisher merging) elsewhere"
    formula = "RegMean for Linear weights, Fisher merging elsewhere"
    needs_data = True
    lora_refusal = _LORA
    options = (FISHER_FLOOR, NORMALIZE_FISHERS, NO_FISHER_RULE, ALPHA)
    tuned = ("fisher_floor", "alpha")

    def merge(self, t: TensorInputs):
        if t.gram is not None:
            return _regmean(t, self.alpha)
        return super().merge(t)
