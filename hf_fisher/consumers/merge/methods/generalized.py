"""mergekit's family of sparsified task-arithmetic merges: ``dare_ties``, ``dare_linear``,
``breadcrumbs``, ``breadcrumbs_ties``, ``della``, ``della_linear``, with mergekit 0.1.5's names,
options, defaults and numbers (:func:`~hf_fisher.consumers.merge.math.generalized_task_arithmetic`)."""

from __future__ import annotations

from typing import ClassVar

from ..base import EPSILON, GAMMA, INT8_MASK, MK_DENSITY, NORMALIZE, RESCALE, SCALING, SEED, MergeMethod, TensorInputs


class GeneralizedTaskArithmetic(MergeMethod):
    """``δ_i = λ_i · sparsify(τ_i, d_i)``; with sign consensus ``θ* = θ_base + s Σ_i m_i δ_i / Σ_i m_i λ_i``
    (``m_i = [sign δ_i = γ]``, ``γ = +1`` where ``Σ_i δ_i ≥ 0``), without ``θ_base + s Σ_i δ_i / Σ_i λ_i``;
    the division only with ``normalize``. ``density`` ``d_i`` (and ``gamma``, ``epsilon``) may be given per
    model in a recipe. Random masks come from one generator per tensor, seeded by ``seed`` and the
    tensor name, drawn model after model as mergekit draws them from torch's global generator (whose
    state in a mergekit run depends on its execution order: the only difference from mergekit)."""

    needs_base = True
    task_vectors = True
    tuned = ("scaling",)
    sparsification: ClassVar[str] = ""
    consensus: ClassVar[str | None] = None
    default_normalize: ClassVar[bool] = False
    default_rescale: ClassVar[bool] = False

    def merge(self, t: TensorInputs):
        from .. import math as mm

        kw = {}
        if GAMMA in self.options:
            kw["gammas"] = t.model_values("gamma", self.gamma)
        if EPSILON in self.options:
            kw["epsilons"] = t.model_values("epsilon", self.epsilon)
        random = self.sparsification in ("random", "della_magprune")
        return mm.generalized_task_arithmetic(
            t.base, t.thetas, t.weights, sparsification=self.sparsification, consensus=self.consensus,
            densities=t.model_values("density", self.density), scaling=self.scaling,
            normalize=self.default_normalize if self.normalize is None else self.normalize,
            rescale=self.default_rescale if self.rescale is None else self.rescale,
            generator=mm.tensor_generator(self.seed, t.name, 0) if random else None, **kw)


_BASE = (SCALING, MK_DENSITY, NORMALIZE, RESCALE, INT8_MASK)


class DareTies(GeneralizedTaskArithmetic):
    """DARE + TIES sign consensus (mergekit's ``dare_ties``): ``m ~ Bernoulli(density)``, the kept
    entries rescaled to ``τ``'s L1 norm (``rescale`` default on), sign election, ``normalize`` default off."""

    name = "dare_ties"
    paper = "Yu et al. 2024, *Language Models are Super Mario* (DARE, arXiv:2311.03099), with TIES' sign election"
    formula = "θ* = θ_base + s Σ m_i λ_i DARE(τ_i, d_i)"
    options = (*_BASE, SEED)
    sparsification = "random"
    consensus = "sum"
    default_rescale = True


class DareLinear(GeneralizedTaskArithmetic):
    """DARE + task arithmetic (mergekit's ``dare_linear``): ``m ~ Bernoulli(density)``, rescaled to the L1
    norm (``rescale`` default on), summed (``normalize`` default off)."""

    name = "dare_linear"
    paper = "Yu et al. 2024, *Language Models are Super Mario* (DARE, arXiv:2311.03099)"
    formula = "θ* = θ_base + s Σ λ_i DARE(τ_i, d_i)"
    options = (*_BASE, SEED)
    sparsification = "random"
    default_rescale = True


class Breadcrumbs(GeneralizedTaskArithmetic):
    """Model Breadcrumbs (mergekit's ``breadcrumbs``): drop the ``gamma`` fraction of largest and the
    smallest magnitudes, keeping ``int(density · n)``; task arithmetic (``normalize`` default off)."""

    name = "breadcrumbs"
    paper = "Davari & Belilovsky 2024, *Model Breadcrumbs* (arXiv:2312.06795)"
    formula = "θ* = θ_base + s Σ λ_i crumbs(τ_i, d_i, γ_i)"
    options = (*_BASE, GAMMA)
    sparsification = "magnitude_outliers"


class BreadcrumbsTies(Breadcrumbs):
    """Model Breadcrumbs with TIES' sign election (mergekit's ``breadcrumbs_ties``)."""

    name = "breadcrumbs_ties"
    formula = "θ* = θ_base + s Σ m_i λ_i crumbs(τ_i, d_i, γ_i)"
    consensus = "sum"


class Della(GeneralizedTaskArithmetic):
    """DELLA (mergekit's ``della``): per row, keep entry ``j`` with probability
    ``density − ε + 2ε · rank_j`` (magnitude rank scaled to [0, 1]), rescale to the L1 norm (default on),
    TIES' sign election, ``normalize`` default on."""

    name = "della"
    paper = "Deep et al. 2024, *DELLA-Merging* (arXiv:2406.11617)"
    formula = "θ* = θ_base + s Σ m_i λ_i magprune(τ_i, d_i, ε_i) / Σ m_i λ_i"
    options = (*_BASE, EPSILON, SEED)
    sparsification = "della_magprune"
    consensus = "sum"
    default_normalize = True
    default_rescale = True


class DellaLinear(Della):
    """DELLA without sign election (mergekit's ``della_linear``; ``normalize`` default off)."""

    name = "della_linear"
    formula = "θ* = θ_base + s Σ λ_i magprune(τ_i, d_i, ε_i)"
    consensus = None
    default_normalize = False


GENERALIZED = (DareTies, DareLinear, Breadcrumbs, BreadcrumbsTies, Della, DellaLinear)
