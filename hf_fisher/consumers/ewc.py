"""Elastic weight consolidation and forgetting risk from a Fisher artifact.

- :class:`EWCPenalty`: ``λ Σ_k F_k (θ_k − θ*_k)²`` over the artifact's parameters (Kirkpatrick
  et al. 2017, without the conventional 1/2: ``lam`` absorbs it), added to a task-B loss so that
  the parameters task A's Fisher marks as important stay near their task-A values. Online mode
  (Schwarz et al. 2018): :meth:`EWCPenalty.consolidate` folds a new task's Fisher in,
  ``F ← γ F + F_new``, and moves the anchor ``θ*`` to the current parameters.
- :func:`forgetting_risk`: the Fisher-weighted damage ``Σ_k F_A,k (Δθ_k)²`` a change of the
  parameters does to task A (the second-order term of task A's loss increase around θ*), in
  total, per layer, and normalised by ``Σ_k F_A,k · mean_k (Δθ_k)²`` (1 when the change does
  not prefer important or unimportant parameters).

A group Fisher is used per element as its group's value spread evenly over the group's
elements (``Fisher.expand(name, spread=True)``): an approximation, stated; a param Fisher is
used as it is.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn

from ..errors import InvalidInputError, ModelMismatchError


def _elementwise(fisher, name: str) -> torch.Tensor:
    return fisher[name] if fisher.reduction == "param" else fisher.expand(name, spread=True)


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


class EWCPenalty(nn.Module):
    """``penalty(model) = lam * Σ_k F_k (θ_k − θ*_k)²`` (see the module docstring).

    Args:
        fisher: the Fisher of the task(s) to protect (param or group reduction).
        params_star: the anchor θ*: a model or a ``{name: tensor}`` mapping (default: taken from
            the model at the first call).
        lam: the penalty weight λ (>= 0).
        online_decay: γ in [0, 1] for online EWC (:meth:`consolidate`); None = offline.

    Usage in a custom loss: ``loss = task_loss + ewc(model)``.
    """

    def __init__(self, fisher, params_star: Any = None, lam: float = 1.0, online_decay: float | None = None):
        super().__init__()
        if not (lam >= 0):
            raise InvalidInputError(f"lam must be >= 0, got {lam}")
        if online_decay is not None and not (0.0 <= online_decay <= 1.0):
            raise InvalidInputError(f"online_decay must be in [0, 1], got {online_decay}")
        self.lam = float(lam)
        self.online_decay = online_decay
        self.names = list(fisher.names())
        self._fisher = {n: _elementwise(fisher, n).detach().float() for n in self.names}
        self._star: dict[str, torch.Tensor] | None = None
        if params_star is not None:
            self._star = self._anchor(params_star)

    def _anchor(self, source: Any) -> dict[str, torch.Tensor]:
        items = dict(source.named_parameters()) if isinstance(source, nn.Module) else dict(source)
        missing = [n for n in self.names if n not in items]
        if missing:
            raise ModelMismatchError(f"params_star lacks {', '.join(missing[:3])}")
        return {n: items[n].detach().clone().float() for n in self.names}

    def forward(self, model: nn.Module) -> torch.Tensor:
        params = dict(model.named_parameters())
        if self._star is None:
            self._star = self._anchor(model)
        total = None
        for n in self.names:
            p = params[n]
            f = self._fisher[n].to(p.device)
            d = p.float() - self._star[n].to(p.device)
            term = (f * d * d).sum()
            total = term if total is None else total + term
        if total is None:
            return torch.zeros(())
        return self.lam * total

    @torch.no_grad()
    def consolidate(self, fisher, model: nn.Module) -> None:
        """Online EWC: ``F ← γ F + F_new`` and ``θ* ← θ`` (the model after the new task)."""
        if self.online_decay is None:
            raise InvalidInputError("consolidate() is online EWC: create the penalty with online_decay=...")
        if sorted(fisher.names()) != sorted(self.names):
            raise ModelMismatchError("the new Fisher covers other parameters than the penalty's")
        for n in self.names:
            self._fisher[n] = self.online_decay * self._fisher[n] + _elementwise(fisher, n).detach().float()
        self._star = self._anchor(model)


def forgetting_risk(fisher_a, model_before: Any, model_after: Any) -> dict[str, Any]:
    """Fisher-weighted damage of the change ``Δθ = θ_after − θ_before`` to task A.

    Returns ``{"total": Σ F_A Δθ², "normalized": total / (Σ F_A · mean Δθ²), "per_layer":
    {layer: Σ over the layer's parameters}, "per_parameter": {name: value}}``.
    """
    before = model_before if isinstance(model_before, Mapping) else dict(model_before.named_parameters())
    after = model_after if isinstance(model_after, Mapping) else dict(model_after.named_parameters())
    if not isinstance(model_before, Mapping):
        _params_of(model_before, fisher_a)
    per_param: dict[str, float] = {}
    sq_sum, count, f_sum = 0.0, 0, 0.0
    for n in fisher_a.names():
        if n not in before or n not in after:
            raise ModelMismatchError(f"{n} is missing from one of the models")
        f = _elementwise(fisher_a, n).double()
        d = (after[n].detach().double().cpu() - before[n].detach().double().cpu())
        per_param[n] = float((f * d * d).sum())
        sq_sum += float((d * d).sum())
        count += d.numel()
        f_sum += float(f.sum())
    total = sum(per_param.values())
    mean_sq = sq_sum / max(1, count)
    per_layer: dict[Any, float] = {}
    for n, v in per_param.items():
        layer = fisher_a.layout.layer(n) if fisher_a.layout is not None else None
        per_layer[layer] = per_layer.get(layer, 0.0) + v
    normalized = total / (f_sum * mean_sq) if f_sum > 0 and mean_sq > 0 else 0.0
    return {"total": total, "normalized": normalized, "per_layer": per_layer, "per_parameter": per_param}


__all__ = ["EWCPenalty", "forgetting_risk"]
