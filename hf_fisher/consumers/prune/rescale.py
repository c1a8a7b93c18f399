"""Least-squares rescaling after structured pruning (Kwon et al. 2022, "A Fast Post-Training
Pruning Framework for Transformers"), folded into the weights.

Per layer, in order, and per output projection (attention O, then MLP down): let ``x`` be the
projection's inputs on the calibration tokens, computed by the model as it is at that point (the
layers below already pruned and rescaled, this projection's units still intact), and
``y_u = W_{:,J_u} x_{J_u}`` unit ``u``'s share of the output. The scales of the kept units ``K``
minimise the reconstruction error of the unpruned output::

    s* = argmin_s  Σ_tokens ‖ Σ_{u∈K} s_u y_u − Σ_u y_u ‖²

whose normal equations need only the input Gram ``G = Σ x xᵀ`` and ``M = G ⊙ (WᵀW)`` (input
features × input features, ``W`` as ``[out, in]``): ``A = Pᵀ_K M P_K``, ``b = Pᵀ_K M 1`` with
``P`` the feature-to-unit indicator. ``s*`` comes from :func:`torch.linalg.lstsq` (float64) and
multiplies the kept units' columns of ``W`` (the model then needs no extra parameter).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn as nn

from hf_fisher.consumers.prune.units import Unit, input_axis, owner

__all__ = ["fold_scales", "least_squares_scales", "output_gram"]

logger = logging.getLogger(__name__)


def output_gram(model: nn.Module, weight: str, batches: Sequence[Mapping], *, progress: bool = False) -> torch.Tensor:
    """``G = Σ_t x_t x_tᵀ`` of the inputs of ``weight``'s module over the calibration tokens; the
    forward of each batch stops at that module."""
    from hf_fisher.collection.activations import StopForward, token_inputs

    acc: dict[str, torch.Tensor] = {}

    def add(name: str, xs: torch.Tensor) -> None:
        g = acc.get(name)
        if g is None:
            g = acc[name] = torch.zeros((xs.shape[1], xs.shape[1]), dtype=torch.float64, device=xs.device)
        g.addmm_(xs.T, xs)
        raise StopForward

    token_inputs(model, batches, {weight: owner(model, weight)[0]}, add, progress=progress, desc="rescale Gram")
    return acc[weight].cpu()


def _feature_matrix(model: nn.Module, weight: str) -> torch.Tensor:
    """``WᵀW`` over input features (``[in, in]``) of a Linear (``[out, in]``) or Conv1D (``[in, out]``) weight."""
    w = dict(model.named_parameters())[weight].detach().to("cpu", torch.float64)
    return w.T @ w if input_axis(model, weight) == 1 else w @ w.T


def least_squares_scales(model: nn.Module, weight: str, units: Sequence[Unit], kept: Sequence[int], gram: torch.Tensor) -> torch.Tensor:
    """Scales ``s*`` of the kept units ``[units[k] for k in kept]`` (module docstring)."""
    n_in = gram.shape[0]
    P = torch.zeros(n_in, len(units), dtype=torch.float64)
    for k, u in enumerate(units):
        for s in u.out:
            if s.param == weight:
                P[s.start : s.stop, k] = 1.0
    M = gram * _feature_matrix(model, weight)
    PK = P[:, list(kept)]
    A = PK.T @ M @ PK
    b = PK.T @ M.sum(1)
    s = torch.linalg.lstsq(A, b.unsqueeze(1), driver="gelsd").solution.squeeze(1)
    if not bool(torch.isfinite(s).all()):
        logger.warning("rescale of %s: least squares gave non-finite scales; keeping scale 1", weight)
        return torch.ones(len(kept), dtype=torch.float64)
    return s


def fold_scales(model: nn.Module, weight: str, units: Sequence[Unit], scales: torch.Tensor, touch: Callable[[str], None]) -> None:
    """Multiply each unit's columns (input features) of ``weight`` by its scale, in place
    (``touch(weight)`` first, so the caller can keep the original)."""
    p = dict(model.named_parameters())[weight]
    touch(weight)
    axis = input_axis(model, weight)
    with torch.no_grad():
        for u, s in zip(units, scales.tolist()):
            for sl in u.out:
                if sl.param == weight:
                    idx = (slice(None),) * axis + (slice(sl.start, sl.stop),)
                    p[idx] *= s
