"""TIES merging."""

from __future__ import annotations

from ..base import CONVENTION, DENSITY, INT8_MASK, NORMALIZE, SCALING, MergeMethod, TensorInputs
from .convention import ConventionOptions


class Ties(ConventionOptions, MergeMethod):
    """TIES (Yadav et al. 2023): trim each task vector ``τ_i`` to its top-``density`` magnitudes, elect
    each entry's sign from the summed weighted trimmed vectors, merge the agreeing entries,
    ``θ* = θ_base + s · merged``.

    ``convention="mergekit"`` (default; mergekit 0.1.5's numbers,
    :func:`~hf_fisher.consumers.merge.math.generalized_task_arithmetic`): keep ``max(1, int(d·n))``
    entries; ``γ = +1`` where ``Σ_i λ_i τ̂_i ≥ 0`` else ``−1``; ``merged = Σ_i m_i λ_i τ̂_i / Σ_i m_i λ_i``
    (``normalize``, default on; off: the sum), ``m_i = [sign(λ_i τ̂_i) = γ]``.
    ``convention="hf_fisher"`` (:func:`~hf_fisher.consumers.merge.math.ties`): keep ``round(d·n)``
    entries of ``λ_i τ_i``; ``γ = sign(Σ_i λ_i τ̂_i)`` (0: no entry agrees); ``merged`` is the mean
    (by count) of the agreeing ``λ_i τ̂_i``. At density 1 and weights 1 both agree except where the sum is 0.
    A recipe's per-model ``density`` is honoured under ``"mergekit"``.

    Both trim block by block without sorting (:class:`~hf_fisher.consumers.merge.math.TopK`: the k-th
    largest magnitude by radix selection; scratch O(block) besides the output). Entries tied at the
    k-th magnitude are kept first by position; mergekit keeps those its unstable ``argsort`` puts
    first (an order torch does not specify), so the two can differ there and only there."""

    name = "ties"
    paper = "Yadav et al. 2023, *TIES-Merging: Resolving Interference When Merging Models* (arXiv:2306.01708)"
    formula = "θ* = θ_base + s · disjoint_mean(elect(trim(λ_i τ_i, density)))"
    needs_base = True
    task_vectors = True
    options = (SCALING, DENSITY, CONVENTION, NORMALIZE, INT8_MASK)
    tuned = ("scaling",)

    mergekit_only = ("normalize",)
    mergekit_hidden = ("int8_mask",)

    def merge(self, t: TensorInputs):
        from .. import math as mm

        if self.convention == "hf_fisher":
            return mm.ties(t.base, t.thetas, t.weights, density=self.density, scaling=self.scaling)
        return mm.generalized_task_arithmetic(
            t.base, t.thetas, t.weights, sparsification="magnitude", consensus="sum",
            densities=t.model_values("density", self.density), scaling=self.scaling,
            normalize=True if self.normalize is None else self.normalize)
