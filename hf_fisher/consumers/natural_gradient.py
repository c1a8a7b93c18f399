"""Natural-gradient scaling of a gradient or a task vector by a Fisher (built-in consumer).

For a diagonal :class:`~hf_fisher.Fisher` F and a vector v (a gradient, or a task vector
τ = θ_finetuned − θ_base), elementwise::

    scale_by_fisher(v, F)[p] = v[p] / (F[p] + δ)^power          (δ = damping)

``power=1`` is the diagonal natural gradient F^{-1} v, ``power=0.5`` the whitening
F^{-1/2} v of the seeds' "natural-gradient space" conflict scores (g / sqrt(F + ε)),
``power=-1`` the Fisher-weighted vector F v. A group-level Fisher (``reduction="group"``) is
first expanded to parameter shape with every element getting its group's *mean*
``F_g / |g|`` (``group_expand="mean"``, :meth:`ParamGroups.expand` with ``spread=True``) or its
group's total ``F_g`` (``group_expand="sum"``).

An object with an ``inverse_vp`` method (a KFAC artifact, ``hf_fisher.estimators.kfac``) is
asked for the product itself: ``fisher.inverse_vp(vector, damping=damping[, power=power])``
(``power`` is passed only when the method accepts it; otherwise only ``power=1`` is possible).

Computation is in float64; the result has each input tensor's dtype and device.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import InvalidInputError, ModelMismatchError, UnsupportedError
from ..hookspecs import hookimpl

__all__ = ["natural_gradient", "scale_by_fisher"]

_SOURCES = ("grad", "param")


def _as_vector(vector: Any, source: str | None) -> dict[str, torch.Tensor]:
    if isinstance(vector, Mapping):
        if source is not None:
            raise InvalidInputError("source= applies to a model-like vector (named_parameters()); a dict is used as it is")
        out = {}
        for name, t in vector.items():
            if not isinstance(name, str):
                raise InvalidInputError(f"vector keys must be parameter names (str), got {type(name).__name__}")
            if not isinstance(t, torch.Tensor):
                raise InvalidInputError(f"vector[{name!r}] must be a torch.Tensor, got {type(t).__name__}")
            if not t.dtype.is_floating_point:
                raise InvalidInputError(f"vector[{name!r}] must be floating point, got {t.dtype}")
            out[name] = t
        return out
    if hasattr(vector, "named_parameters"):
        if source not in _SOURCES:
            raise InvalidInputError(
                f"a model-like vector needs source='grad' (scale the gradients in .grad) or source='param' (scale "
                f"the parameter values, e.g. a task vector stored as a model); got source={source!r}"
            )
        out = {}
        for name, p in vector.named_parameters():
            if not p.requires_grad:
                continue
            if source == "grad":
                if p.grad is None:
                    continue
                out[name] = p.grad.detach()
            else:
                out[name] = p.detach()
        if not out:
            what = "no trainable parameter has a .grad (run backward first)" if source == "grad" else "no trainable parameter"
            raise InvalidInputError(f"the model-like vector has {what}")
        return out
    raise InvalidInputError(
        f"vector must be a dict {{parameter name: tensor}} or a model-like object with named_parameters(), "
        f"got {type(vector).__name__}"
    )


def scale_by_fisher(
    vector: Any,
    fisher: Any,
    *,
    damping: float = 1e-8,
    power: float = 1.0,
    group_expand: str = "mean",
    source: str | None = None,
    **inverse_vp_options: Any,
) -> dict[str, torch.Tensor]:
    """``v / (F + damping)^power`` per parameter (module docstring), or ``fisher.inverse_vp``.

    Args:
        vector: ``{param name: tensor}`` (a gradient or a task vector), or a model-like object
            whose trainable parameters' ``.grad`` (``source="grad"``) or values
            (``source="param"``) are scaled.
        fisher: a diagonal :class:`~hf_fisher.Fisher` (param or group level) covering every
            name of ``vector``, or an object with ``inverse_vp`` (KFAC).
        damping: δ >= 0 added to F before the power (must make every F + δ > 0 when
            power > 0).
        power: exponent (1: natural gradient; 0.5: whitening; any finite real).
        group_expand: "mean" (F_g / |g| per element) or "sum" (F_g) for group-level Fishers.
        source: see ``vector``.
        **inverse_vp_options: passed on to ``fisher.inverse_vp`` (e.g. KFAC's ``damping_mode``);
            refused for a diagonal Fisher.

    Returns ``{param name: scaled tensor}`` with the names, shapes, dtypes and devices of
    ``vector``. Raises :class:`~hf_fisher.errors.ModelMismatchError` for names the Fisher does
    not cover or shapes that differ, :class:`~hf_fisher.errors.InvalidInputError` for bad
    arguments.
    """
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not math.isfinite(damping) or damping < 0:
        raise InvalidInputError(f"damping must be a finite number >= 0, got {damping!r}")
    if isinstance(power, bool) or not isinstance(power, (int, float)) or not math.isfinite(power):
        raise InvalidInputError(f"power must be a finite number, got {power!r}")
    if group_expand not in ("mean", "sum"):
        raise InvalidInputError(f"group_expand must be 'mean' or 'sum', got {group_expand!r}")
    v = _as_vector(vector, source)
    if not v:
        raise InvalidInputError("vector is empty: pass at least one parameter")
    if hasattr(fisher, "inverse_vp") and callable(fisher.inverse_vp):
        return _delegate(fisher, v, damping=float(damping), power=float(power), options=inverse_vp_options)
    if inverse_vp_options:
        raise InvalidInputError(
            f"option(s) {sorted(inverse_vp_options)} apply to a Fisher with inverse_vp (KFAC); this is a diagonal Fisher"
        )
    means = getattr(fisher, "means", None)
    shapes = getattr(fisher, "param_shapes", None)
    if not isinstance(means, Mapping) or not isinstance(shapes, Mapping):
        raise InvalidInputError(
            f"fisher must be an hf_fisher.Fisher (diagonal) or an object with inverse_vp (KFAC), got {type(fisher).__name__}"
        )
    missing = sorted(n for n in v if n not in means)
    if missing:
        raise ModelMismatchError(
            f"the Fisher does not cover {len(missing)} parameter(s) of the vector, e.g. {missing[:3]}; collect the "
            f"Fisher for them, or pass only the parameters it covers ({len(means)} of them, e.g. {sorted(means)[:2]})"
        )
    wrong = [(n, tuple(t.shape), tuple(shapes[n])) for n, t in v.items() if tuple(t.shape) != tuple(shapes[n])]
    if wrong:
        n, got, want = wrong[0]
        raise ModelMismatchError(
            f"vector[{n!r}] has shape {got} but the Fisher's parameter has shape {want}"
            + (f" ({len(wrong) - 1} more mismatches)" if len(wrong) > 1 else "")
            + "; is the Fisher for another model?"
        )
    out = {}
    for name, t in v.items():
        f = _expanded(fisher, name, group_expand).to(device=t.device, dtype=torch.float64)
        d = f + float(damping)
        if power > 0 and not bool((d > 0).all()):
            raise InvalidInputError(
                f"Fisher + damping of {name!r} has {int((d <= 0).sum())} non-positive value(s) (zero Fisher with "
                f"damping={damping}): F^(-{power}) is undefined there; pass damping > 0"
            )
        if not bool(torch.isfinite(d).all()):
            raise InvalidInputError(f"the Fisher of {name!r} is not finite")
        out[name] = (t.detach().to(torch.float64) * d.pow(-float(power))).to(t.dtype)
    return out


def _expanded(fisher, name: str, group_expand: str) -> torch.Tensor:
    if getattr(fisher, "reduction", "param") == "param":
        return fisher.means[name]
    groups = getattr(fisher, "groups", {}).get(name)
    if groups is None:
        raise InvalidInputError(f"group-level Fisher without groups for {name!r}; cannot expand it to the parameter's shape")
    return groups.expand(fisher.means[name].to(torch.float64), fisher.param_shapes[name], spread=(group_expand == "mean"))


def _delegate(fisher, v: dict[str, torch.Tensor], *, damping: float, power: float, options: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    fn = fisher.inverse_vp
    try:
        sig = inspect.signature(fn)
        accepts = set(sig.parameters)
        var_kw = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    except (TypeError, ValueError):
        accepts, var_kw = set(), True
    kwargs: dict[str, Any] = dict(options)
    if "damping" in accepts or var_kw:
        kwargs["damping"] = damping
    if "power" in accepts or var_kw:
        kwargs["power"] = power
    elif power != 1.0:
        raise UnsupportedError(
            f"{type(fisher).__name__}.inverse_vp takes no power: only power=1 (the inverse) is available, got power={power}"
        )
    out = fn(v, **kwargs)
    if not isinstance(out, Mapping):
        raise InvalidInputError(f"{type(fisher).__name__}.inverse_vp returned {type(out).__name__}, not a dict of tensors")
    # the vector's dtypes and devices, as for a diagonal Fisher (KFAC computes in float64)
    return {n: (t.to(device=v[n].device, dtype=v[n].dtype) if n in v else t) for n, t in out.items()}


def natural_gradient(fisher: Any, vector: Any, **options: Any) -> dict[str, torch.Tensor]:
    """The consumer form (a Fisher first, as the registry's consumers take it):
    ``scale_by_fisher(vector, fisher, **options)``."""
    return scale_by_fisher(vector, fisher, **options)


@hookimpl
def hf_fisher_register_consumers(register) -> None:
    register("natural_gradient", natural_gradient)
