"""Elastic weight consolidation and forgetting risk from a Fisher artifact.

- :class:`EWCPenalty`: ``λ Σ_k F_k (θ_k − θ*_k)²`` over the artifact's parameters (Kirkpatrick
  et al. 2017, without the conventional 1/2: ``lam`` absorbs it), added to a task-B loss so that
  the parameters task A's Fisher marks as important stay near their task-A values. Online mode
  (Schwarz et al. 2018): :meth:`EWCPenalty.consolidate` folds a new task's Fisher in,
  ``F ← γ F + F_new``, and moves the anchor ``θ*`` to the current parameters.
- :func:`forgetting_risk`: the Fisher-weighted damage ``Σ_k F_A,k (Δθ_k)²`` a change of the
  parameters does to task A (the second-order term of task A's loss increase around θ*), in
  total, per layer, and normalised by ``Σ_k F_A,k · mean_k (Δθ_k)²`` (1 when the change does
  not prefer important or unimportant parameters). :meth:`EWCPenalty.risk` is the same quantity
  for the penalty's own ``F`` and ``θ*`` (``penalty = λ · risk["total"]``), computed on the
  parameters' device; the Trainer integration logs it.

A group Fisher is used per element as its group's value spread evenly over the group's
elements (``Fisher.expand(name, spread=True)``): an approximation, stated; a param Fisher is
used as it is.

Precision: the penalty is computed in the parameters' dtype promoted to at least float32
(a bfloat16 / float16 model gets a float32 penalty, a float64 model a float64 one), on the
parameters' device; the anchor θ* is kept in that dtype too.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import InvalidInputError, ModelMismatchError


def _elementwise(fisher, name: str) -> torch.Tensor:
    return fisher[name] if fisher.reduction == "param" else fisher.expand(name, spread=True)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The parameter's dtype, at least float32."""
    return torch.promote_types(dtype, torch.float32) if dtype.is_floating_point else torch.float32


def _params_of(model: nn.Module, fisher) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    missing = [n for n in fisher.names() if n not in params]
    if missing:
        raise ModelMismatchError(
            f"the Fisher artifact has parameters the model lacks ({', '.join(missing[:3])}); use the "
            "model the Fisher was collected on (same architecture and parameter names)"
        )
    for n in fisher.names():
        if tuple(params[n].shape) != tuple(fisher.param_shapes[n]):
            raise ModelMismatchError(f"{n}: the model's shape {tuple(params[n].shape)} differs from the artifact's {tuple(fisher.param_shapes[n])}")
    return {n: params[n] for n in fisher.names()}


def _risk(layout, terms: Iterable[tuple[str, torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    """``{"total", "normalized", "per_layer", "per_parameter"}`` from ``(name, F, Δθ)`` triples
    (same shapes): ``total = Σ F Δθ²``, ``normalized = total / (Σ F · mean Δθ²)`` (0 when
    ``Δθ = 0`` or ``F = 0``), ``per_layer[layer] = Σ`` over the layer's parameters."""
    per_param: dict[str, float] = {}
    sq_sum, count, f_sum = 0.0, 0, 0.0
    for n, f, d in terms:
        per_param[n] = float((f * d * d).sum())
        sq_sum += float((d * d).sum())
        count += d.numel()
        f_sum += float(f.sum())
    total = sum(per_param.values())
    mean_sq = sq_sum / max(1, count)
    per_layer: dict[Any, float] = {}
    for n, v in per_param.items():
        layer = layout.layer(n) if layout is not None else None
        per_layer[layer] = per_layer.get(layer, 0.0) + v
    normalized = total / (f_sum * mean_sq) if f_sum > 0 and mean_sq > 0 else 0.0
    return {"total": total, "normalized": normalized, "per_layer": per_layer, "per_parameter": per_param}


class EWCPenalty(nn.Module):
    """``penalty(model) = lam * Σ_k F_k (θ_k − θ*_k)²`` (see the module docstring).

    The gradient is ``d penalty / dθ_k = 2 λ F_k (θ_k − θ*_k)`` on the Fisher's parameters and
    nothing on the others (a PEFT model's frozen base weights, parameters the Fisher does not
    cover).

    Args:
        fisher: the Fisher of the task(s) to protect (param or group reduction).
        params_star: the anchor θ*: a model or a ``{name: tensor}`` mapping (default: taken from
            the model at the first call).
        lam: the penalty weight λ (>= 0).
        online_decay: γ in [0, 1] for online EWC (:meth:`consolidate`); None = offline.

    Usage in a custom loss: ``loss = task_loss + ewc(model)``; inside a ``transformers.Trainer``:
    :class:`hf_fisher.integrations.ewc_trainer.EWCTrainer`.
    """

    def __init__(self, fisher, params_star: Any = None, lam: float = 1.0, online_decay: float | None = None):
        super().__init__()
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (math.isfinite(lam) and lam >= 0):
            raise InvalidInputError(f"lam must be >= 0 and finite (a number), got {lam!r}")
        if online_decay is not None and not (0.0 <= online_decay <= 1.0):
            raise InvalidInputError(f"online_decay must be in [0, 1], got {online_decay}")
        fisher.check_values()  # a NaN / Inf / negative Fisher would turn every parameter NaN or reward drifting
        self.lam = float(lam)
        self.online_decay = online_decay
        self.names = list(fisher.names())
        self.artifact = fisher  # the (latest) artifact: its layout, metadata and validate()
        self._fisher = {n: _elementwise(fisher, n).detach().float() for n in self.names}
        self._star: dict[str, torch.Tensor] | None = None
        if params_star is not None:
            self._star = self._anchor(params_star)

    @property
    def params_star(self) -> dict[str, torch.Tensor] | None:
        """The anchor θ* (``{name: tensor}``), None until set."""
        return self._star

    def set_anchor(self, source: Any) -> None:
        """``θ* ← source`` (a model or a ``{name: tensor}`` mapping; copied)."""
        self._star = self._anchor(source)

    def _anchor(self, source: Any) -> dict[str, torch.Tensor]:
        items = dict(source.named_parameters()) if isinstance(source, nn.Module) else dict(source)
        missing = [n for n in self.names if n not in items]
        if missing:
            raise ModelMismatchError(
                f"params_star lacks {len(missing)} of the Fisher's parameters ({', '.join(missing[:3])}); pass the "
                "model (or state dict) the Fisher was collected on, with the same parameter names"
            )
        for n in self.names:
            if tuple(items[n].shape) != tuple(self._fisher[n].shape):
                raise ModelMismatchError(
                    f"params_star[{n!r}] has shape {tuple(items[n].shape)}, the Fisher's parameter has "
                    f"{tuple(self._fisher[n].shape)}; pass the anchor of the model the Fisher was collected on"
                )
        return {n: items[n].detach().clone().to(_compute_dtype(items[n].dtype)) for n in self.names}

    def validate(self, model: nn.Module) -> None:
        """Check, before any work, that the penalty applies to ``model``: the artifact's
        :meth:`hf_fisher.Fisher.validate` (architecture, names, shapes; PEFT prefixes included)
        and the anchor's shapes. Raises :class:`~hf_fisher.errors.ModelMismatchError`."""
        self.artifact.validate(model)
        if self._star is not None:
            params = dict(model.named_parameters())
            for n in self.names:
                if tuple(self._star[n].shape) != tuple(params[n].shape):
                    raise ModelMismatchError(
                        f"the anchor θ* of {n} has shape {tuple(self._star[n].shape)}, the model's parameter "
                        f"{tuple(params[n].shape)}; anchor the penalty on this model's parameters"
                    )

    def _pairs(self, model: nn.Module):
        """``(name, parameter, F, θ*)`` with F and θ* on the parameter's device in the compute
        dtype (moved once and kept there)."""
        params = dict(model.named_parameters())
        missing = [n for n in self.names if n not in params]
        if missing:
            raise ModelMismatchError(
                f"{len(missing)} of the EWC Fisher's parameters are not parameters of the model ({', '.join(missing[:3])}); "
                "use the model the Fisher was collected on (for a PEFT model, collect the Fisher on the PEFT model: "
                "its names start with 'base_model.model.')"
            )
        if self._star is None:
            self._star = self._anchor(model)
        for n in self.names:
            p = params[n]
            dtype = _compute_dtype(p.dtype)
            f, star = self._fisher[n], self._star[n]
            if f.device != p.device or f.dtype != dtype:
                f = self._fisher[n] = f.to(device=p.device, dtype=dtype)
            if star.device != p.device or star.dtype != dtype:
                star = self._star[n] = star.to(device=p.device, dtype=dtype)
            yield n, p, f, star

    def forward(self, model: nn.Module) -> torch.Tensor:
        """``λ Σ_k F_k (θ_k − θ*_k)²``, differentiable in θ (a 0-dim tensor on the parameters' device)."""
        total = None
        for _, p, f, star in self._pairs(model):
            d = p.to(f.dtype) - star
            term = (f * d * d).sum()
            total = term if total is None else total + term
        if total is None:
            return torch.zeros(())
        return self.lam * total

    @torch.no_grad()
    def risk(self, model: nn.Module) -> dict[str, Any]:
        """:func:`forgetting_risk` of the change ``θ − θ*`` under the penalty's own Fisher
        (after :meth:`consolidate`, the consolidated one): ``{"total": Σ F (θ − θ*)²,
        "normalized", "per_layer", "per_parameter"}``; ``penalty(model) = lam * total``. Computed
        on the parameters' device (per-parameter sums in the compute dtype, added in float64)."""
        terms = ((n, f, p.detach().to(f.dtype) - star) for n, p, f, star in self._pairs(model))
        return _risk(self.artifact.layout, terms)

    @torch.no_grad()
    def consolidate(self, fisher, model: nn.Module) -> None:
        """Online EWC: ``F ← γ F + F_new`` and ``θ* ← θ`` (the model after the new task)."""
        if self.online_decay is None:
            raise InvalidInputError("consolidate() is online EWC: create the penalty with online_decay=...")
        if sorted(fisher.names()) != sorted(self.names):
            raise ModelMismatchError("the new Fisher covers other parameters than the penalty's")
        fisher.check_values()
        for n in self.names:
            old = self._fisher[n]
            self._fisher[n] = self.online_decay * old + _elementwise(fisher, n).detach().to(device=old.device, dtype=old.dtype)
        self.artifact = fisher
        self._star = self._anchor(model)


def forgetting_risk(fisher_a, model_before: Any, model_after: Any) -> dict[str, Any]:
    """Fisher-weighted damage of the change ``Δθ = θ_after − θ_before`` to task A.

    Returns ``{"total": Σ F_A Δθ², "normalized": total / (Σ F_A · mean Δθ²), "per_layer":
    {layer: Σ over the layer's parameters}, "per_parameter": {name: value}}`` (float64, on CPU).
    """
    before = model_before if isinstance(model_before, Mapping) else dict(model_before.named_parameters())
    after = model_after if isinstance(model_after, Mapping) else dict(model_after.named_parameters())
    if not isinstance(model_before, Mapping):
        _params_of(model_before, fisher_a)
    for n in fisher_a.names():
        if n not in before or n not in after:
            raise ModelMismatchError(f"{n} is missing from one of the models")

    def terms():
        for n in fisher_a.names():
            f = _elementwise(fisher_a, n).double()
            d = after[n].detach().double().cpu() - before[n].detach().double().cpu()
            yield n, f, d

    return _risk(fisher_a.layout, terms())


__all__ = ["EWCPenalty", "forgetting_risk"]
