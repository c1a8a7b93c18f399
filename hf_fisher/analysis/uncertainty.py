"""Confidence intervals for the Fisher mass of groups, attention heads and MLP channels.

Notation (as in :mod:`hf_fisher.analysis`): ``C_i`` is sample ``i``'s contribution
``g_i ⊙ g_i``, ``C_i,g = Σ_{j ∈ g} C_ij`` its value for group ``g`` of a parameter, and the
Fisher of the group is ``F_g = mean_i C_i,g`` over the ``n`` used samples. A *unit* is a group
``(param, g)``, an attention head ``(layer, head)`` or an MLP channel ``(layer, channel)``; its
value ``T`` is a weighted sum of group (or element) values, exactly as
:func:`~hf_fisher.analysis.head_importance` / :func:`~hf_fisher.analysis.channel_importance`
combine them:

- head ``h``: ``T_h = F(q slices) + F(o slices) + (F(k slices) + F(v slices)) · H_kv / H``;
- channel ``c``: ``T_c = Σ_roles F(role slice of c)`` (e.g. gate row + up row + down column).

Because every unit value is a weighted sum ``T = Σ_g w_g F_g`` with ``w_g ≥ 0``, it is also the
mean over samples of the per-sample unit value ``u_i = Σ_g w_g C_i,g``.

Methods (:func:`unit_intervals`):

- ``"t"``: from the Welford variances ``s_g² = Var_i(C_i,g)`` (unbiased). For a single group
  exactly :func:`hf_fisher.analysis.confidence_interval`:
  ``F_g ± t_{(1+level)/2, n−1} · s_g / sqrt(n)``. For a head or channel the per-sample values of
  its groups covary and the artifact has no covariances, so only a **conservative** interval is
  possible: ``sd(u_i) = sd(Σ_g w_g C_i,g) ≤ Σ_g w_g s_g`` (Minkowski / triangle inequality for
  standard deviations), hence ``T ± t_{(1+level)/2, n−1} · (Σ_g w_g s_g) / sqrt(n)``, reported
  as method ``"t-conservative"``; its half-width is never smaller than that of the t interval
  computed from the true ``sd(u_i)``. For a parameter-level Fisher ``s_g`` are per-element
  standard deviations (the same bound over elements). ``n`` is
  :func:`~hf_fisher.analysis.effective_count` (Kish's for an EMA); ``n < 2``: ``(−inf, inf)``.
- ``"bootstrap"``: from the kept per-sample contributions (``collect(..., reduction="group",
  keep_sample_contributions=True)``): ``scipy.stats.bootstrap((u,), np.mean,
  confidence_level=level, n_resamples=n_resamples, random_state=seed, method=bootstrap_method)``
  on the per-sample unit values ``u_i`` (float64), one resampling of the samples shared by all
  units (vectorised over units; the same result as one call per unit). A unit whose ``u_i`` are
  all equal gets the point interval ``[u, u]`` (the bootstrap distribution is degenerate);
  ``n < 2``: ``(−inf, inf)``. Reported as ``"bootstrap-<bootstrap_method>"``.
- ``"auto"``: ``"bootstrap"`` when the Fisher has sample contributions, else ``"t"``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from hf_fisher.analysis import views
from hf_fisher.collection import stats
from hf_fisher.errors import InvalidInputError

if TYPE_CHECKING:  # pragma: no cover
    from hf_fisher.artifacts.fisher import Fisher

__all__ = ["METHODS", "UNITS", "UnitInterval", "per_sample_unit_values", "unit_intervals"]

UNITS = ("groups", "heads", "channels")
METHODS = ("auto", "t", "bootstrap")
BOOTSTRAP_METHODS = ("BCa", "percentile", "basic")

# float64 elements of one vectorised bootstrap step: resamples [units, batch, n] (and BCa's
# jackknife, [units, batch, n - 1]); units are chunked so that a step takes >= _MIN_BATCH resamples
_BOOTSTRAP_BUDGET = 2**23
_MIN_BATCH = 64


@dataclass(frozen=True)
class UnitInterval:
    """One unit's value ``T`` and its two-sided interval ``[lower, upper]`` at ``level``.

    ``method``: ``"t"``, ``"t-conservative"`` or ``"bootstrap-<scipy method>"`` (module docstring)."""

    value: float
    lower: float
    upper: float
    method: str


def unit_intervals(
    fisher: Fisher,
    unit: str = "groups",
    *,
    level: float = 0.95,
    method: str = "auto",
    n_resamples: int = 2000,
    seed: int = 0,
    bootstrap_method: str = "BCa",
) -> dict[Hashable, UnitInterval]:
    """Confidence intervals for every unit of ``fisher`` (definitions in the module docstring).

    ``unit``: ``"groups"`` (keys ``(param, group index)``, a group Fisher), ``"heads"`` (keys
    ``(layer, head)``) or ``"channels"`` (keys ``(layer, channel)``), the latter two from the
    Fisher's layout. ``method``: ``"t"`` (Welford variances: exact Student-t for groups,
    conservative for heads/channels), ``"bootstrap"`` (kept per-sample contributions,
    ``scipy.stats.bootstrap`` with ``n_resamples``, ``random_state=seed`` and
    ``method=bootstrap_method``) or ``"auto"`` (bootstrap when the contributions are kept).
    Values are those of :func:`~hf_fisher.analysis.head_importance` /
    :func:`~hf_fisher.analysis.channel_importance` / ``fisher[param][g]``.

    Raises :class:`~hf_fisher.errors.InvalidInputError` (saying what to do) for a level outside
    (0, 1), an unknown unit or method, a Fisher with neither variances nor sample contributions
    (or without the one the method needs), heads/channels without a layout, and
    ``unit="groups"`` on a parameter-level Fisher.
    """
    _check_args(fisher, unit, level, method, n_resamples, bootstrap_method)
    if method == "auto":
        method = "bootstrap" if fisher.sample_contributions is not None else "t"
    values = _values(fisher, unit)
    if method == "t":
        return _t_intervals(fisher, unit, values, level)
    u = per_sample_unit_values(fisher, unit, keys=list(values))
    low, high = _bootstrap(u, level, n_resamples, seed, bootstrap_method)
    label = f"bootstrap-{bootstrap_method}"
    return {k: UnitInterval(values[k], float(low[r]), float(high[r]), label) for r, k in enumerate(values)}


def per_sample_unit_values(fisher: Fisher, unit: str = "groups", *, keys: list | None = None) -> np.ndarray:
    """``[num_units, n]`` float64: the per-sample unit values ``u_i = Σ_g w_g C_i,g`` from
    ``fisher.sample_contributions`` (rows in the order of ``keys``, default the order of
    :func:`unit_intervals`' result); their mean over samples is the unit's value."""
    if unit not in UNITS:
        raise InvalidInputError(f"unknown unit {unit!r}; choose one of {', '.join(map(repr, UNITS))}")
    if unit != "groups" and fisher.layout is None:
        raise InvalidInputError(f"unit={unit!r} needs the model layout; this Fisher has none (collect it with hf_fisher.collect)")
    samples = fisher.sample_contributions
    if samples is None:
        raise InvalidInputError(
            "this Fisher has no per-sample contributions; collect it with reduction='group' and "
            "keep_sample_contributions=True"
        )
    n = fisher.counts.samples
    dense = {name: t.detach().to("cpu", torch.float64) for name, t in samples.items()}
    if unit == "groups" and fisher.reduction == "group":  # u_i = C_i,g: the columns themselves
        if keys is None:
            keys = [(name, g) for name in fisher.names() for g in range(dense[name].shape[1])]
        try:
            return np.stack([dense[name][:, g].numpy() for name, g in keys]) if keys else np.zeros((0, n))
        except (KeyError, IndexError, TypeError, ValueError):
            raise InvalidInputError("keys for unit='groups' must be (param name, group index) pairs of this Fisher") from None
    weights = _unit_weights(fisher, unit)
    keys = list(weights) if keys is None else keys
    out = torch.zeros((len(keys), n), dtype=torch.float64)
    for r, k in enumerate(keys):
        for name, idx, w in weights[k]:
            part = dense[name][:, idx].sum(1)
            out[r] += part if w == 1.0 else part * w
    return out.numpy()


# ---------------------------------------------------------------------------- internals
def _check_args(fisher, unit, level, method, n_resamples, bootstrap_method) -> None:
    if unit not in UNITS:
        raise InvalidInputError(f"unknown unit {unit!r}; choose one of {', '.join(map(repr, UNITS))}")
    if method not in METHODS:
        raise InvalidInputError(f"unknown method {method!r}; choose one of {', '.join(map(repr, METHODS))}")
    if bootstrap_method not in BOOTSTRAP_METHODS:
        raise InvalidInputError(f"unknown bootstrap_method {bootstrap_method!r}; choose one of {', '.join(map(repr, BOOTSTRAP_METHODS))}")
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not (0.0 < float(level) < 1.0):
        raise InvalidInputError(f"level must be a confidence level in (0, 1), e.g. 0.95; got {level!r}")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 1:
        raise InvalidInputError(f"n_resamples must be a positive integer, got {n_resamples!r}")
    has_samples = fisher.sample_contributions is not None
    if method == "auto" and not has_samples and not fisher.has_variance:
        raise InvalidInputError(
            "this Fisher has neither variances nor per-sample contributions, so no interval can be given; "
            "collect it with hf_fisher.collect (Welford variances), with reduction='group' and "
            "keep_sample_contributions=True for bootstrap intervals"
        )
    if method == "t" and not fisher.has_variance:
        raise InvalidInputError(
            "method='t' needs the Welford variances, which this Fisher does not have (group views and some "
            "estimators carry none); collect it with hf_fisher.collect, or use method='bootstrap' with kept "
            "per-sample contributions"
        )
    if method == "bootstrap" and not has_samples:
        raise InvalidInputError(
            "method='bootstrap' needs the per-sample contributions; collect with reduction='group' and "
            "keep_sample_contributions=True, or use method='t' (Welford variances)"
        )
    if unit == "groups" and fisher.reduction != "group":
        raise InvalidInputError(
            "unit='groups' needs a group Fisher (reduction='group'): the per-element variances of a "
            "parameter-level Fisher do not give the variance of a group sum; collect with reduction='group'"
        )
    if unit != "groups" and fisher.layout is None:
        raise InvalidInputError(
            f"unit={unit!r} needs the model layout; this Fisher has none. Collect it with hf_fisher.collect "
            "(which records the layout), or use unit='groups'"
        )


def _values(fisher: Fisher, unit: str) -> dict[Hashable, float]:
    if unit == "heads":
        return views.head_importance(fisher)
    if unit == "channels":
        return views.channel_importance(fisher)
    out: dict[Hashable, float] = {}
    for name in fisher.names():
        for g, v in enumerate(fisher[name].detach().double().cpu().tolist()):
            out[(name, g)] = v
    return out


def _t_intervals(fisher: Fisher, unit: str, values: dict, level: float) -> dict[Hashable, UnitInterval]:
    if unit == "groups":
        out = {}
        for name in fisher.names():
            lo, hi = views.confidence_interval(fisher, name, level)
            for g, (a, b) in enumerate(zip(lo.tolist(), hi.tolist())):
                out[(name, g)] = UnitInterval(values[(name, g)], a, b, "t")
        return out
    # Σ_g w_g s_g by the same combination as the values, applied to a Fisher of standard deviations
    sd = {name: fisher.variances[name].detach().double().clamp_min(0).sqrt() for name in fisher.names()}
    sd_fisher = fisher._replace(mean=sd, variance=None)
    sd_sum = _values(sd_fisher, unit)
    n = views.effective_count(fisher)
    keys = list(values)
    mean = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    var = torch.tensor([sd_sum[k] for k in keys], dtype=torch.float64).square()
    lo, hi = stats.confidence_interval(mean, var, n, level)  # T ± t · sqrt((Σ w s)² / n)
    return {k: UnitInterval(values[k], float(lo[r]), float(hi[r]), "t-conservative") for r, k in enumerate(keys)}


def _unit_weights(fisher: Fisher, unit: str) -> dict[Hashable, list[tuple[str, torch.Tensor, float]]]:
    """``{head or channel: [(param, group indices, weight), ...]}``: ``u_i = Σ w · Σ_{g in indices} C_i,g``."""
    if fisher.reduction != "group":
        raise InvalidInputError("per-sample unit values need a group Fisher (reduction='group') with kept contributions")
    out: dict[Hashable, list] = {}
    layout = fisher.layout
    if unit == "heads":
        for att in layout.attention:
            share = att.num_kv_heads / att.num_heads
            for h in att.heads:
                terms = []
                for slices, w in ((h.q, 1.0), (h.o, 1.0), (h.k, share), (h.v, share)):
                    terms += [(s.param, views.slice_groups(fisher, s), w) for s in slices if s.param in fisher]
                out[(h.layer, h.head)] = terms
        return out
    for block in layout.mlp:
        n = block.num_channels
        per_role = [(role.param, views.channel_groups(fisher, role, n)) for role in block.roles if role.param in fisher]
        for c in range(n):
            out[(block.layer, c)] = [(name, gidx[c : c + 1], 1.0) for name, gidx in per_role]
    return out


def _bootstrap(u: np.ndarray, level: float, n_resamples: int, seed: int, method: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-row ``scipy.stats.bootstrap`` interval of the mean of ``u`` ``[units, n]`` (module docstring)."""
    from scipy.stats import bootstrap

    units, n = u.shape
    low = np.full(units, -math.inf)
    high = np.full(units, math.inf)
    if n < 2 or units == 0:
        return low, high
    constant = np.ptp(u, axis=1) == 0
    low[constant] = high[constant] = u[constant, 0]
    rows = np.flatnonzero(~constant)
    chunk = max(1, _BOOTSTRAP_BUDGET // (n * _MIN_BATCH))
    batch = max(1, _BOOTSTRAP_BUDGET // (min(chunk, len(rows) or 1) * n))
    for lo in range(0, len(rows), chunk):
        sel = rows[lo : lo + chunk]
        res = bootstrap(
            (u[sel],), np.mean, axis=-1, vectorized=True, confidence_level=float(level), n_resamples=n_resamples,
            batch=batch, random_state=seed, method=method,
        )
        low[sel] = res.confidence_interval.low
        high[sel] = res.confidence_interval.high
    return low, high
