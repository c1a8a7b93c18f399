"""DARE: drop and rescale task vectors."""

from __future__ import annotations

from ..base import CONVENTION, DARE_THEN, DENSITY, DROP_P, NORMALIZE, RESCALE, SCALING, SEED, MergeMethod, TensorInputs
from .convention import ConventionOptions


class Dare(ConventionOptions, MergeMethod):
    """DARE (Yu et al. 2024): drop each entry of ``τ_i`` with probability ``p = drop_p``, rescale the
    kept ones, then combine by task arithmetic or TIES (``dare_then``, TIES with ``density``).

    ``convention="mergekit"`` (default; mergekit's ``dare_linear`` / ``dare_ties`` with
    ``density = 1 − p``): ``m_i ~ Bernoulli(1 − p)`` drawn as mergekit draws it, the kept entries
    rescaled so that ``‖m_i ⊙ τ_i‖₁ = ‖τ_i‖₁`` (``rescale``, default on), then mergekit's task arithmetic
    (``normalize`` default off) or TIES (trim ``max(1, int(d·n))``, ``normalize`` default on).
    ``convention="hf_fisher"``: ``τ̂_i = m_i ⊙ τ_i / (1 − p)``, then the ``"hf_fisher"`` task arithmetic or TIES.

    The masks are seeded per tensor (``seed``, the tensor name; ``"hf_fisher"``: and the model index), so
    a merge is reproducible and independent of the order tensors are read in."""

    name = "dare"
    paper = "Yu et al. 2024, *Language Models are Super Mario* (DARE, arXiv:2311.03099)"
    formula = "τ̂_i = m_i ⊙ τ_i · ‖τ_i‖₁/‖m_i ⊙ τ_i‖₁ (mergekit) or / (1 − p), m_i ~ Bernoulli(1 − p); then task arithmetic or TIES"
    needs_base = True
    task_vectors = True
    options = (SCALING, DENSITY, DROP_P, SEED, DARE_THEN, CONVENTION, NORMALIZE, RESCALE)
    tuned = ("scaling",)

    mergekit_only = ("normalize", "rescale")

    def parameters(self):
        out = super().parameters()
        if self.dare_then != "ties":
            del out["density"]
        return out

    def merge(self, t: TensorInputs):
        import torch

        from .. import math as mm

        if self.convention == "hf_fisher":
            gens = [mm.tensor_generator(self.seed, t.name, i) for i in range(len(t.thetas))]
            return mm.dare(t.base, t.thetas, t.weights, p=self.drop_p, generators=gens, then=self.dare_then,
                           density=self.density, scaling=self.scaling)
        g = mm.tensor_generator(self.seed, t.name, 0)
        rescale = True if self.rescale is None else self.rescale
        if self.dare_then == "task_arithmetic":
            return mm.generalized_task_arithmetic(
                t.base, t.thetas, t.weights, sparsification="random", consensus=None, generator=g, rescale=rescale,
                densities=[1 - self.drop_p] * len(t.thetas), scaling=self.scaling, normalize=bool(self.normalize))
        dt = mm.compute_dtype(t.base, *t.thetas)
        taus = mm.task_vector_streams(t.base, t.thetas, dt)  # block by block (the trim: math.TopK)
        dropped = [mm.RandomSparsified(tau, t.base.shape, 1 - self.drop_p, rescale, g, dt) for tau in taus]
        w = torch.tensor([float(x) for x in t.weights], dtype=dt)
        # TIES on the dropped task vectors themselves, around a zero base, then added to the base
        return mm.generalized_streams(
            t.base, dropped, w, t.model_values("density", self.density), consensus="sum", scaling=self.scaling,
            normalize=True if self.normalize is None else self.normalize, dt=dt, zero_base=True)
