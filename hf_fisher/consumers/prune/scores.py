"""The built-in pruning criteria, one :class:`~hf_fisher.consumers.prune.base.PruneScore` class each.

Notation (as in :mod:`hf_fisher.consumers.prune.statistics`, which computes the statistics): a
unit ``u`` has parameter slices ``S_u`` (:mod:`hf_fisher.consumers.prune.units`) and
output-projection input columns ``J_u``; ``w`` its weights, ``F`` the diagonal Fisher, ``g =
∂L/∂w`` the calibration gradient (``L`` = mean loss over the calibration batches), ``x_j`` the
output projection's input feature ``j`` over the calibration tokens (unpruned model). All sums in
float64. Registered by :mod:`hf_fisher.consumers.prune.registry`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from hf_fisher.consumers.prune import statistics as S
from hf_fisher.consumers.prune.base import PruneScore
from hf_fisher.consumers.prune.units import input_axis
from hf_fisher.errors import InvalidInputError

__all__ = [
    "BUILTIN_SCORES",
    "FLAPScore",
    "FisherScore",
    "KFACScore",
    "MagnitudeScore",
    "MaskFisherScore",
    "OBDScore",
    "RandomScore",
    "Taylor1Score",
    "Taylor2Score",
    "WandaSPScore",
]


def _weights(model: nn.Module, names: Sequence[str]) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {n: params[n].detach().double().cpu() for n in names}


def _fisher_covers(fisher: Any, names: Sequence[str]) -> None:
    missing = [n for n in names if n not in fisher]
    if missing:
        raise InvalidInputError(f"the Fisher does not cover {', '.join(missing[:3])}; collect it with those weights trainable")


class FisherScore(PruneScore):
    """``Σ_{S_u} F`` — the Fisher of exactly what removing ``u`` removes (the default without
    calibration data); a group Fisher works (its groups' values over the slices). Per weight: ``F``.
    Standard error: ``Σ_{S_u} stderr(F)`` (conservative)."""

    name = "fisher"
    needs_fisher = True
    unstructured = True
    confidence = True
    curvature = True

    def score_units(self, model, units, inputs):
        return S._fisher_sums(inputs.fisher, units)

    def score_weights(self, model, names, inputs):
        _fisher_covers(inputs.fisher, names)
        return {n: inputs.fisher[n].double().cpu() for n in names}

    def stderr(self, model, units, fisher):
        return S.slice_stderr(fisher, units)


class OBDScore(PruneScore):
    """``½ Σ_{S_u} F w²``: the loss increase of zeroing ``u`` under the diagonal quadratic model
    (Optimal Brain Damage with the Fisher as the Hessian). Per weight: ``½ F w²``. Standard
    error: ``½ Σ_{S_u} stderr(F) w²``."""

    name = "obd"
    needs_fisher = True
    fisher_reduction = "param"
    unstructured = True
    confidence = True
    curvature = True

    def score_units(self, model, units, inputs):
        w = _weights(model, S._unit_params(units))
        return S._fisher_sums(inputs.fisher, units, lambda n, F: 0.5 * F.double() * w[n] ** 2)

    def score_weights(self, model, names, inputs):
        _fisher_covers(inputs.fisher, names)
        w = _weights(model, names)
        return {n: 0.5 * inputs.fisher[n].double().cpu() * w[n] ** 2 for n in names}

    def stderr(self, model, units, fisher):
        from hf_fisher import analysis

        w = _weights(model, S._unit_params(units))
        return S._slice_sums(units, {n: analysis.stderr(fisher, n) * 0.5 * w[n] ** 2 for n in w})


class KFACScore(PruneScore):
    """Structured Optimal Brain Surgeon under the KFAC quadratic ``G ⊗ A`` of each output
    projection (:func:`hf_fisher.consumers.prune.obs.obs_select`): per stage (a layer's attention,
    then its MLP), units are removed greedily by the least increase of
    ``½ Δwᵀ (G ⊗ A) Δw`` with the kept units' output scales re-optimised after every removal,
    ``A`` the exact Gram of the projection's inputs on the calibration batches (model pruned so
    far), ``G`` the KFAC output factor, ``δy`` the difference to the unpruned model's output of
    the layer; a fraction ``update`` (``prune(obs_update=)``) of the update is folded into the kept
    units' scales, ``1 + γ (s − 1)``; with ``target == "layer"`` (``prune(obs_target="layer")``)
    ``δy`` is the difference to the layer's own output on the current inputs instead. The default
    with calibration data and ``scope="layer"``."""

    name = "kfac"
    needs_data = True
    needs_labels = True
    output_projection = True
    curvature = True
    layer_by_layer = True
    #: the fraction ``γ`` of the OBS update folded in (``prune`` sets it from ``obs_update=``)
    update = 1.0
    #: what the update reconstructs (``prune`` sets it from ``obs_target=``): ``"layer"`` the layer's own
    #: output on the current inputs (``C = A``, no residual term, ``s₀ = 1``), ``"unpruned"`` the unpruned model's
    target = "unpruned"

    def score_units(self, model, units, inputs):
        raise InvalidInputError("score 'kfac' selects units greedily layer by layer; prune() runs it (it has no per-unit score)")

    def prepare(self, model, units, inputs):
        """The KFAC layer (its output factor ``G``) of every output projection the units write
        through, on the unpruned model."""
        import re

        from hf_fisher.api import collect
        from hf_fisher.collection.gradients import only_trainable

        names = S._unit_params(units, out=True)
        with only_trainable(model, names):
            kf = collect(model, inputs.batches, estimator="kfac", progress=False, task="calibration",
                         params="^(" + "|".join(re.escape(n) for n in names) + ")$")
        self._layers = {L.weight: L for L in kf.layers.values()}

    def prune_stage(self, model, stage, inputs):
        from hf_fisher.consumers.prune.obs import obs_select
        from hf_fisher.consumers.prune.rescale import fold_scales, output_grams, residual_term

        units = list(stage.units)
        if not units[0].out:
            return [], None
        name = units[0].out[0].param
        if self.target == "layer":
            gram, cross, gap = output_grams(model, name, inputs.batches)
            cross = None
        else:
            gram, cross, gap = output_grams(model, name, inputs.batches, stage.teacher, stage.residual)
        layer = self._layers[name]
        weight = dict(model.named_parameters())[name]
        gone, scales, _ = obs_select(weight, input_axis(model, name), name, units, stage.quota, lambda u: u.budget, gram,
                                     layer.G, layer.g_diagonal, cross=cross,
                                     gap=None if gap is None else residual_term(model, name, gap, layer.G),
                                     update=self.update)
        kept = [i for i in range(len(units)) if i not in set(gone)]
        fold_scales(model, name, [units[i] for i in kept], scales, stage.touch)
        return gone, {"weight": name, "kept": len(kept), "removed": len(gone),
                      "scale_min": float(scales.min()) if len(kept) else 1.0,
                      "scale_max": float(scales.max()) if len(kept) else 1.0}


class MaskFisherScore(PruneScore):
    """Kwon et al. 2022: ``mean_i (∂L_i/∂m_u)²`` for a multiplicative mask ``m_u`` on the unit's
    output, ``∂L_i/∂m_u = Σ_{j∈J_u} ⟨W_{:,j}, g_{i,:,j}⟩`` (exact per-sample gradients from the
    batched engine, per-sample mean loss)."""

    name = "mask_fisher"
    needs_data = True
    needs_labels = True
    output_projection = True
    curvature = True

    def score_units(self, model, units, inputs):
        return S.mask_fisher(model, units, inputs.batches, progress=inputs.progress)


class MagnitudeScore(PruneScore):
    """``‖w_{S_u}‖₂``; per weight ``|w|``."""

    name = "magnitude"
    unstructured = True

    def score_units(self, model, units, inputs):
        params = dict(model.named_parameters())
        return S._slice_sums(units, {n: params[n].detach().double() ** 2 for n in S._unit_params(units)}).sqrt()

    def score_weights(self, model, names, inputs):
        return {n: w.abs() for n, w in _weights(model, names).items()}


class RandomScore(PruneScore):
    """Uniform in [0, 1), from ``torch.Generator().manual_seed(seed)``."""

    name = "random"
    unstructured = True

    def score_units(self, model, units, inputs):
        return torch.rand(len(units), generator=torch.Generator().manual_seed(int(inputs.seed)), dtype=torch.float64)

    def score_weights(self, model, names, inputs):
        params = dict(model.named_parameters())
        gen = torch.Generator().manual_seed(int(inputs.seed))
        return {n: torch.rand(params[n].shape, generator=gen, dtype=torch.float64) for n in names}


class _ActivationScore(PruneScore):
    needs_data = True
    needs_activations = True
    output_projection = True

    def per_weight(self, model: nn.Module, name: str, w: torch.Tensor, stats: S.ActivationStats) -> torch.Tensor:
        raise NotImplementedError

    def score_units(self, model, units, inputs):
        names = S._unit_params(units, out=True)
        stats = inputs.stats or S.activation_stats(model, names, inputs.batches, progress=inputs.progress)
        w = _weights(model, names)
        return S._slice_sums(units, {n: self.per_weight(model, n, w[n], stats) for n in names}, out=True)


class WandaSPScore(_ActivationScore):
    """Wanda-sp (An et al. 2024): ``Σ_{j∈J_u} ‖x_j‖₂ Σ_i |W_ij|``."""

    name = "wanda_sp"

    def per_weight(self, model, name, w, stats):
        return w.abs() * S._broadcast_in(model, name, stats.norm(name), w.shape)


class FLAPScore(_ActivationScore):
    """FLAP's fluctuation metric (An et al. 2024): ``Σ_{j∈J_u} Var(x_j) ‖W_{:,j}‖²`` (sample
    variance over the calibration tokens), ranked globally by its z-score within each kind and
    layer; ``prune`` adds FLAP's bias compensation ``b += Σ_{removed j} W_{:,j} E[x_j]`` instead
    of the rescale unless chosen otherwise."""

    name = "flap"
    global_key = "standardised"
    rescale_default = False
    compensate_default = True

    def per_weight(self, model, name, w, stats):
        return w * w * S._broadcast_in(model, name, stats.var(name), w.shape)


class Taylor1Score(PruneScore):
    """LLM-Pruner first order (Ma et al. 2023, element-wise): ``Σ_{S_u} |w g|``; per weight ``|w g|``."""

    name = "taylor1"
    needs_data = True
    needs_labels = True
    unstructured = True
    curvature = True
    second_order = False

    def _elementwise(self, model, names, inputs) -> dict[str, torch.Tensor]:
        params = dict(model.named_parameters())
        grads = S.calibration_gradient(model, names, inputs.batches)
        F = S.calibration_fisher(model, names, inputs.batches, progress=inputs.progress) if self.second_order else None
        return {n: S._taylor(params[n], grads[n], None if F is None else F[n]) for n in names}

    def score_units(self, model, units, inputs):
        return S._slice_sums(units, self._elementwise(model, S._unit_params(units), inputs))

    def score_weights(self, model, names, inputs):
        return self._elementwise(model, names, inputs)


class Taylor2Score(Taylor1Score):
    """LLM-Pruner second order (its "param_mix" Element²): ``Σ_{S_u} |−w g + ½ w² F|`` with ``F``
    the exact per-sample diagonal Fisher of the calibration batches (LLM-Pruner's ``acc_grad``,
    which it gets with one backward per sample; here from the batched engine)."""

    name = "taylor2"
    second_order = True


#: the built-in scores, in the order ``hf-fisher plugins`` and error messages list them
BUILTIN_SCORES: tuple[type[PruneScore], ...] = (
    FisherScore, KFACScore, MaskFisherScore, OBDScore, MagnitudeScore, RandomScore, WandaSPScore, FLAPScore,
    Taylor1Score, Taylor2Score,
)

