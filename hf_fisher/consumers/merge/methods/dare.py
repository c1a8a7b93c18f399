"""DARE: drop and rescale task vectors."""

from __future__ import annotations

from ..base import DARE_THEN, DENSITY, DROP_P, SCALING, SEED, MergeMethod, TensorInputs


class Dare(MergeMethod):
    """DARE (Yu et al. 2024): ``τ̂_i = m_i ⊙ τ_i / (1 − p)`` with ``m_i ~ Bernoulli(1 − p)`` per
    entry (drop each entry of ``τ_i`` with probability ``p = drop_p``, rescale the kept ones), then
    combine the ``τ̂_i`` by task arithmetic or TIES (``dare_then``).
    The drop masks are seeded per tensor and model (``seed``, the tensor name, the model index),
    so a merge is reproducible and independent of the order tensors are read in."""

    name = "dare"
    paper = "Yu et al. 2024, *Language Models are Super Mario* (DARE, arXiv:2311.03099)"
    formula = "τ̂_i = m_i ⊙ τ_i / (1 − p), m_i ~ Bernoulli(1 − p); then task arithmetic or TIES"
    needs_base = True
    task_vectors = True
    options = (SCALING, DENSITY, DROP_P, SEED, DARE_THEN)
    tuned = ("scaling",)

    def parameters(self):
        out = self.values()
        if self.dare_then != "ties":
            del out["density"]
        return out

    def merge(self, t: TensorInputs):
        from .. import math as mm

        gens = [mm.tensor_generator(self.seed, t.name, i) for i in range(len(t.thetas))]
        return mm.dare(t.base, t.thetas, t.weights, p=self.drop_p, generators=gens, then=self.dare_then,
                       density=self.density, scaling=self.scaling)
