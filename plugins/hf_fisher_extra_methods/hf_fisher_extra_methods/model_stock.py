"""Model Stock (Jang et al. 2024) as an hf_fisher merge method: the plugin module of the
``hf_fisher`` entry point ``extra_methods``."""

from __future__ import annotations

import logging

from hf_fisher.consumers.merge.base import CONVENTION, MergeMethod, Option, TensorInputs
from hf_fisher.errors import InvalidInputError
from hf_fisher.hookspecs import hookimpl

__all__ = ["ModelStock", "hf_fisher_register_merge_methods"]

logger = logging.getLogger(__name__)


FILTER_WISE = Option("filter_wise", False, kind="bool", help="model_stock: one t per row (mergekit's filter_wise)")


class ModelStock(MergeMethod):
    """Model Stock (Jang et al. 2024), per tensor, with task vectors ``τ_i = θ_i − θ_base``.

    ``convention="mergekit"`` (default; mergekit 0.1.5's ``model_stock`` operation by operation, in
    the inputs' dtype): ``cos θ = mean_{i<j} τ_i·τ_j / max(|τ_i| |τ_j|, 1e−6)`` (each clamped to
    ``[−1, 1]``; per row with ``filter_wise``), ``t = N cos θ / (1 + (N − 1) cos θ)`` (``t = 0`` where the
    denominator is below ``1e−6``), ``θ* = t · mean_i θ_i + (1 − t) · θ_base``; the weights are not used
    (mergekit's model_stock has none: unequal weights are refused).

    ``convention="hf_fisher"``:

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
    options = (CONVENTION, FILTER_WISE)

    def check_weights(self, weights) -> None:
        super().check_weights(weights)
        if self.convention == "mergekit" and len(set(weights)) > 1:
            raise InvalidInputError(f"model_stock with convention='mergekit' uses no weights (mergekit's has none), got "
                                    f"{list(weights)}; use convention='hf_fisher' for the weighted average")

    def merge(self, t: TensorInputs):
        import torch

        if self.convention == "mergekit":
            return _mergekit_model_stock(t.base, list(t.thetas), self.filter_wise)

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


def _mergekit_model_stock(base, thetas, filter_wise: bool):
    import torch

    from hf_fisher.consumers.merge.math import compute_dtype

    dt = compute_dtype(base, *thetas)
    w0, ws = base.to(dt), [w.to(dt) for w in thetas]
    shape = w0.shape
    if filter_wise:
        if w0.dim() == 1:
            w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w0 for w in ws]
    cosines = [((a * b).sum(dim=-1) / (torch.norm(a, dim=-1) * torch.norm(b, dim=-1)).clamp(min=1e-6)).clamp(-1, 1)
               for i, a in enumerate(offsets) for b in offsets[i + 1:]]
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    den = 1 + (n - 1) * cos
    singular = den.abs() < 1e-6
    frac = torch.where(singular, torch.zeros_like(cos), (n * cos) / torch.where(singular, torch.ones_like(den), den))
    return (frac * (sum(ws) / n) + (1 - frac) * w0).reshape(shape)


@hookimpl
def hf_fisher_register_merge_methods(register) -> None:
    register(ModelStock.name, ModelStock)
