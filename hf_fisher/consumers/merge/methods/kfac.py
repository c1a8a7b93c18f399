"""Fisher merging with Kronecker-factored Fishers."""

from __future__ import annotations

from ..base import (
    KFAC_DAMPING,
    KFAC_DAMPING_MODE,
    NO_FISHER_RULE,
    FisherInputMethod,
    TensorInputs,
)


class KFAC(FisherInputMethod):
    """Fisher-weighted merging with each model's Kronecker-factored Fisher ``F_i ≈ G_i ⊗ A_i`` per
    layer (KFAC artifacts, ``hf_fisher.collect(..., estimator="kfac")``): per block solve
    ``Σ_i λ_i F_i vec(M − M_i) = 0`` by conjugate gradients, ``F_i = (G_i + √c·ḡ I) ⊗ (A_i + √c·ā I)``
    (``kfac_damping_mode="factor"``: each factor damped relative to its λ-weighted mean diagonal) or ``G_i ⊗ A_i + δ I`` (``"exact"``), ``δ = kfac_damping ×``
    the mean Fisher diagonal (:mod:`hf_fisher.consumers.merge.kfac`). Tensors no KFAC block covers
    follow ``no_fisher_rule``."""

    name = "kfac"
    paper = "Matena & Raffel 2022 (Fisher-weighted averaging) with Kronecker-factored Fishers (Martens & Grosse 2015, KFAC)"
    formula = "Σ λ_i (G_i ⊗ A_i + δ) vec(M − M_i) = 0 per block"
    fishers = "kfac"
    lora_refusal = "merges full models; for LoRA adapters use method='fisher' (delta-W space)"
    options = (KFAC_DAMPING, KFAC_DAMPING_MODE, NO_FISHER_RULE)
    tuned = ("kfac_damping",)

    def recipe_notes(self):
        return {"kfac": ("per block: sum_i lambda_i F_i vec(M - M_i) = 0, F_i = (G_i + sqrt(c) mean(diag G) I) x (A_i + sqrt(c) mean(diag A) I) "
                         "(factor, c = kfac_damping) or G_i x A_i + delta I (exact); delta = kfac_damping x mean Fisher diagonal")}

    def layer_merge(self, fishers, sources, labels, hub_options):
        from ..kfac import KFACMerge, load_kfac

        kfacs = [load_kfac(f, hub_options=dict(hub_options)) for f in fishers]
        return KFACMerge(kfacs, [{k: tuple(i.shape) for k, i in src.infos().items()} for src in sources], labels)

    def merge_layer(self, layers, name, read, weights):
        return layers.merged(name, read, weights, self.kfac_damping, self.kfac_damping_mode)

    def merge(self, t: TensorInputs):  # tensors no KFAC block covers
        return self.merge_uncovered(t)
