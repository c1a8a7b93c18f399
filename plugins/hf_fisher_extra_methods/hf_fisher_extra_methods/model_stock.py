"""Model Stock (Jang et al. 2024) as an hf_fisher merge method: the plugin module of the
``hf_fisher`` entry point ``extra_methods``."""

from __future__ import annotations

import logging

from hf_fisher.consumers.merge.base import MergeMethod, TensorInputs
from hf_fisher.errors import InvalidInputError
from hf_fisher.hookspecs import hookimpl

__all__ = ["ModelStock", "hf_fisher_register_merge_methods"]

logger = logging.getLogger(__name__)


class ModelStock(MergeMethod):
    """Model Stock (Jang et al. 2024), per tensor, with task vectors ``τ_i = θ_i − θ_base``:

    ``cos θ = mean_{i<j} τ_i·τ_j / (|τ_i| |τ_j|)``, clamped to ``[0, 1]``;
    ``t = N cos θ / (1 + (N − 1) cos θ)``;
    ``θ* = t · θ̄ + (1 − t) · θ_base`` with ``θ̄ = Σ_i λ_i θ_i / Σ_i λ_i`` (uniform by default).

    ``t`` interpolates between the average of the fine-tuned models (``cos θ = 1``: they agree)
    and the base (``cos θ = 0``: their task vectors are orthogonal, the average's distance from the
    base is noise). Pairs with a zero task vector have no angle and are left out of the mean; a
    tensor where no pair has one (at most one model moved it) gets ``t = 1``, the average. A
    negative mean cosine is clamped to 0 (``θ* = θ_base``) and logged. The cosines are computed in
    float64.
    """

    name = "model_stock"
    paper = "Jang et al. 2024, *Model Stock: All we need is just a few fine-tuned models* (arXiv:2403.19522)"
    formula = "θ* = t θ̄ + (1 − t) θ_base, t = N cos θ / (1 + (N − 1) cos θ)"
    needs_base = True
    lora_refusal = "needs the base weights themselves (the angle between task vectors); merge the merged-in models instead"

    def merge(self, t: TensorInputs):
        import torch

        n = len(t.thetas)
        if n < 2:  # pragma: no cover - merge_with_fisher needs two models
            raise InvalidInputError("model_stock needs at least two fine-tuned models")
        base = t.base.to(torch.float64).flatten()
        taus = [th.to(torch.float64).flatten() - base for th in t.thetas]
        norms = [float(tau.norm()) for tau in taus]
        cosines = [float(taus[i] @ taus[j]) / (norms[i] * norms[j])
                   for i in range(n) for j in range(i + 1, n) if norms[i] > 0 and norms[j] > 0]
        if not cosines:
            frac = 1.0
        else:
            cos = sum(cosines) / len(cosines)
            if cos < 0:
                logger.warning("model_stock: tensor %r has a negative mean cosine %.3g between task vectors; "
                               "clamped to 0 (the base value)", t.name, cos)
            cos = min(max(cos, 0.0), 1.0)
            frac = n * cos / (1 + (n - 1) * cos)
        total = float(sum(t.weights))
        avg = sum(float(w) * th.to(torch.float64) for w, th in zip(t.weights, t.thetas)) / total
        return frac * avg + (1 - frac) * t.base.to(torch.float64)


@hookimpl
def hf_fisher_register_merge_methods(register) -> None:
    register(ModelStock.name, ModelStock)
