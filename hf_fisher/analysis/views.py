"""Pure functions over :class:`hf_fisher.artifacts.fisher.Fisher` artifacts: views, rankings, summaries.

Notation: ``F_j`` is the Fisher value of element ``j`` of a parameter (``F = mean_i C_i``,
``C_i = g_i ⊙ g_i``); a group ``g`` of a parameter has ``F_g = Σ_{j ∈ g} F_j`` (reduction "sum",
mass preserving). Nothing here modifies its input; functions that transform a Fisher return a
new one. :class:`~hf_fisher.artifacts.fisher.Fisher` has thin methods that call these.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from hf_fisher.collection import stats
from hf_fisher.errors import InvalidInputError, UnsupportedError
from hf_fisher.layout import ModelLayout, ParamGroups, Slice, layer_of

if TYPE_CHECKING:  # pragma: no cover
    from hf_fisher.artifacts.fisher import Fisher

__all__ = [
    "channel_groups",
    "channel_importance",
    "compare",
    "confidence_interval",
    "effective_count",
    "expand",
    "expert_channel_importance",
    "expert_importance",
    "group_coordinates",
    "group_of",
    "group_range",
    "group_view",
    "head_importance",
    "layer_index",
    "normalized",
    "per_layer",
    "resolve_groups",
    "slice_groups",
    "slice_value",
    "stderr",
    "top_k",
]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- groups
def resolve_groups(
    fisher: Fisher, groups: Mapping[str, ParamGroups] | ModelLayout | None = None
) -> dict[str, ParamGroups]:
    """The partition to use: ``groups`` (a dict or a layout's ``groups``), else the Fisher's own
    ``groups``, else its layout's. Raises :class:`InvalidInputError` if a parameter has none."""
    if isinstance(groups, ModelLayout):
        chosen: Mapping[str, ParamGroups] = groups.groups
    elif groups is not None:
        chosen = groups
    elif fisher.groups:
        chosen = fisher.groups
    elif fisher.layout is not None:
        chosen = fisher.layout.groups
    else:
        chosen = {}
    missing = [n for n in fisher.names() if n not in chosen]
    if missing:
        raise InvalidInputError(
            f"no group partition for {len(missing)} parameter(s) (e.g. {missing[:5]}); pass groups=... "
            "or a ModelLayout (hf_fisher.plugins.model_layout(model)) covering every parameter"
        )
    return {n: chosen[n] for n in fisher.names()}


def group_view(fisher: Fisher, groups: Mapping[str, ParamGroups] | ModelLayout | None = None) -> Fisher:
    """The group Fisher of a parameter-level Fisher: ``F_g = Σ_{j ∈ g} F_j`` for every group.

    Mass preserving: ``Σ_g F_g = Σ_j F_j`` per parameter (sums are taken in float64, then
    stored in the source dtype). The variance of a group value, ``Var_i(Σ_{j∈g} C_ij)``, needs
    the covariances between elements, which a diagonal artifact does not have: the view has
    **no variances** (collect with ``reduction="group"`` to get them). A Fisher that is already
    group-level is returned unchanged.
    """
    if fisher.reduction == "group":
        return fisher
    chosen = resolve_groups(fisher, groups)
    mean = {}
    for name in fisher.names():
        t = fisher[name]
        mean[name] = chosen[name].reduce(t.double()).to(t.dtype)
    meta = replace(
        fisher.metadata,
        reduction="group",
        extra={**fisher.metadata.extra, "derived_from": "param", "variance": "unavailable in a group view"},
    )
    from hf_fisher.artifacts.fisher import Fisher

    return Fisher(
        mean,
        None,
        reduction="group",
        groups=chosen,
        param_shapes=fisher.param_shapes,
        counts=fisher.counts,
        metadata=meta,
        layout=fisher.layout,
    )


def expand(fisher: Fisher, name: str, spread: bool = False) -> torch.Tensor:
    """Parameter-shaped values of ``name``.

    Group-level: every element gets its group's value ``F_g`` (``spread=False``) or
    ``F_g / |g|`` (``spread=True``, so the expanded tensor sums to ``Σ_g F_g``); see
    :meth:`ParamGroups.expand`. Parameter-level: ``fisher[name]`` as is.
    """
    if fisher.reduction == "param":
        return fisher[name]
    return fisher.groups[name].expand(fisher[name], fisher.param_shapes[name], spread=spread)


def group_of(groups: ParamGroups, index: int) -> int:
    """The group id containing position ``index`` of the group index (the index along
    ``groups.axis``; for multi-axis groups the flat C-order index over ``groups.axes``)."""
    if index < 0:
        raise IndexError(f"index {index} is negative")
    offset = 0
    gid = 0
    for run in groups.runs:
        span = run.count * run.size
        if index < offset + span:
            return gid + (index - offset) // run.size
        offset += span
        gid += run.count
    raise IndexError(f"index {index} is beyond the axis of size {offset}")


def group_coordinates(groups: ParamGroups, shape, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest and largest index along ``axis`` (one of ``groups.axes``) of the elements of each
    group of a parameter of ``shape``: two int64 tensors ``[num_groups]``. A group lies at one
    index along ``axis`` (e.g. one expert) exactly when the two agree."""
    if axis not in groups.axes:
        raise UnsupportedError(f"axis {axis} is not one of the group axes {groups.axes}")
    shape = tuple(int(n) for n in shape) or (1,)
    sizes = [shape[a] for a in groups.axes]
    j = groups.axes.index(axis)
    stride = math.prod(sizes[j + 1 :])
    coord = (torch.arange(groups.axis_size) // stride) % sizes[j]
    idx = groups.index()
    lo = torch.full((groups.num_groups,), shape[axis], dtype=torch.long).scatter_reduce(0, idx, coord, "amin")
    hi = torch.full((groups.num_groups,), -1, dtype=torch.long).scatter_reduce(0, idx, coord, "amax")
    return lo, hi


def group_range(groups: ParamGroups, group: int) -> tuple[int, int]:
    """Positions ``[start, stop)`` of the group index (see :func:`group_of`) covered by group id ``group``."""
    offset = 0
    gid = 0
    for run in groups.runs:
        if group < gid + run.count:
            start = offset + (group - gid) * run.size
            return start, start + run.size
        offset += run.count * run.size
        gid += run.count
    raise IndexError(f"group {group} does not exist ({gid} groups)")


# ---------------------------------------------------------------------------- rankings
def _flat_groups(fisher: Fisher, params: Iterable[str] | None) -> tuple[Fisher, list[str]]:
    gv = group_view(fisher)
    names = gv.names() if params is None else list(params)
    unknown = [n for n in names if n not in gv]
    if unknown:
        raise InvalidInputError(f"unknown parameter name(s) {unknown[:5]}; see fisher.names()")
    return gv, names


def top_k(fisher: Fisher, k: int = 10, *, params: Iterable[str] | None = None) -> list[tuple[str, str, float]]:
    """The ``k`` largest group values ``F_g`` across all parameters (or only ``params``).

    Returns ``[(param name, group name, value), ...]`` in descending order; ties keep the order
    of (sorted parameter name, group index). A parameter-level Fisher is first reduced with
    :func:`group_view`.
    """
    if k < 0:
        raise InvalidInputError(f"k must be >= 0, got {k}")
    gv, names = _flat_groups(fisher, params)
    if not names or k == 0:
        return []
    vals = torch.cat([gv[n].detach().double().cpu().reshape(-1) for n in names])
    owners = torch.cat([torch.full((gv[n].numel(),), i, dtype=torch.long) for i, n in enumerate(names)])
    starts = torch.cumsum(torch.tensor([0] + [gv[n].numel() for n in names[:-1]]), 0)
    order = torch.sort(vals, descending=True, stable=True).indices[:k]
    out = []
    for idx in order.tolist():
        i = int(owners[idx])
        name = names[i]
        g = idx - int(starts[i])
        out.append((name, gv.groups[name].names[g], float(vals[idx])))
    return out


def layer_index(fisher: Fisher, name: str) -> int | None:
    """Layer of a parameter: from the Fisher's layout when present, else parsed from the name."""
    if fisher.layout is not None:
        return fisher.layout.layer(name)
    return layer_of(name)


def _sorted_layers(d: dict[int | None, Any]) -> dict[int | None, Any]:
    keys = sorted(k for k in d if k is not None)
    out = {k: d[k] for k in keys}
    if None in d:
        out[None] = d[None]
    return out


def per_layer(fisher: Fisher) -> dict[int | None, float]:
    """Fisher mass per layer: ``{layer: Σ_{params p in layer} Σ_j F_pj}``; ``None`` collects
    parameters outside the layer stack (embeddings, final norm, heads). Ordered by layer."""
    totals: dict[int | None, float] = {}
    for name in fisher.names():
        layer = layer_index(fisher, name)
        totals[layer] = totals.get(layer, 0.0) + float(fisher[name].double().sum())
    return _sorted_layers(totals)


def normalized(fisher: Fisher, scope: str = "global") -> Fisher:
    """Fisher divided by a total, so values become shares.

    - ``scope="global"``: ``F / Σ_all F`` (everything sums to 1);
    - ``scope="layer"``: ``F / Σ_{layer(p)} F`` (each layer sums to 1; parameters outside the
      layer stack are normalised among themselves).

    Variances are scaled by the square of the same factor (the total is treated as a constant,
    ignoring its own sampling noise). A scope whose total is 0 stays 0 (a warning is logged).
    Computed in float64, stored in the source dtype.
    """
    if scope not in ("global", "layer"):
        raise InvalidInputError(f"scope must be 'global' or 'layer', got {scope!r}")
    if scope == "global":
        total = fisher.total()
        totals = dict.fromkeys(fisher.names(), total)
    else:
        layer_totals = per_layer(fisher)
        totals = {name: layer_totals[layer_index(fisher, name)] for name in fisher.names()}
    zero = sorted({t for t in totals.values() if t == 0.0})
    if zero:
        logger.warning("normalized(scope=%r): some scopes have zero Fisher mass; their values stay 0", scope)

    def factor(name: str) -> float:
        t = totals[name]
        return 0.0 if t == 0.0 else 1.0 / t

    mean = {n: (fisher[n].double() * factor(n)).to(fisher[n].dtype) for n in fisher.names()}
    variance = None
    if fisher.variances:
        variance = {n: (v.double() * factor(n) ** 2).to(v.dtype) for n, v in fisher.variances.items()}
    meta = replace(fisher.metadata, extra={**fisher.metadata.extra, "normalized": scope})
    return fisher._replace(mean=mean, variance=variance, metadata=meta)


# ---------------------------------------------------------------------------- units
def slice_value(fisher: Fisher, s: Slice) -> float:
    """``Σ F`` over a :class:`Slice` of a parameter.

    Parameter-level: the exact sum of the slice's elements. Group-level: the sum of the groups
    that make up the slice; the slice must lie along the groups' axis and start/stop on group
    boundaries (:class:`UnsupportedError` otherwise — use a parameter-level Fisher).
    """
    t = fisher[s.param]
    if fisher.reduction == "param":
        return float(t[s.index()].double().sum())
    return float(t.detach().double().cpu()[slice_groups(fisher, s)].sum())


def slice_groups(fisher: Fisher, s: Slice) -> torch.Tensor:
    """The groups of a group Fisher that make up a :class:`Slice`, as increasing group indices
    (int64): ``slice_value(fisher, s) = Σ_{g in slice_groups(fisher, s)} F_g``. The slice must lie
    along the groups' axis and start/stop on group boundaries (:class:`UnsupportedError` otherwise)."""
    pg = fisher.groups[s.param]
    if pg.extra_axes:  # multi-axis groups: the groups whose elements all lie in [start, stop) along s.axis
        if s.axis not in pg.axes:
            raise UnsupportedError(
                f"{s.param}: its groups run along axes {pg.axes}, but a slice along axis {s.axis} was asked for; "
                "a group Fisher cannot be split that way — use a parameter-level Fisher"
            )
        lo, hi = group_coordinates(pg, fisher.param_shapes[s.param], s.axis)
        inside = (lo >= s.start) & (hi < s.stop)
        partial = ~inside & (hi >= s.start) & (lo < s.stop)
        if bool(partial.any()):
            raise UnsupportedError(
                f"{s.param}: slice [{s.start}, {s.stop}) along axis {s.axis} cuts through groups; "
                "use a parameter-level Fisher"
            )
        return inside.nonzero().flatten()
    if s.axis != pg.axis:
        raise UnsupportedError(
            f"{s.param}: its groups run along axis {pg.axis}, but a slice along axis {s.axis} was asked for; "
            "a group Fisher cannot be split that way — use a parameter-level Fisher"
        )
    g0, g1 = group_of(pg, s.start), group_of(pg, s.stop - 1)
    if group_range(pg, g0)[0] != s.start or group_range(pg, g1)[1] != s.stop:
        raise UnsupportedError(
            f"{s.param}: slice [{s.start}, {s.stop}) does not start and end on group boundaries; "
            "use a parameter-level Fisher"
        )
    return torch.arange(g0, g1 + 1)


def _require_layout(fisher: Fisher, what: str) -> ModelLayout:
    if fisher.layout is None:
        raise InvalidInputError(
            f"{what} needs the model layout; this Fisher has none. Collect it with hf_fisher.collect "
            "(which records the layout) or build one with hf_fisher.plugins.model_layout(model)"
        )
    return fisher.layout


def _sum_slices(fisher: Fisher, slices: Iterable[Slice], used: list[int]) -> float:
    total = 0.0
    for s in slices:
        if s.param in fisher:
            total += slice_value(fisher, s)
            used[0] += 1
    return total


def head_importance(fisher: Fisher) -> dict[tuple[int, int], float]:
    """Total Fisher of each attention head, ``{(layer, head): value}``.

    ``T_h = F(q slices of h) + F(o slices of h) + (F(k slices) + F(v slices) of kv(h)) · H_kv / H``:
    a kv-head's K/V mass is split evenly among the ``H / H_kv`` query heads sharing it
    (GQA/MQA), so the heads of a layer sum to the Fisher mass of its q, k, v, o slices.
    Parameters that are not in the Fisher (e.g. frozen) contribute nothing.
    """
    layout = _require_layout(fisher, "head_importance")
    if not layout.attention:
        raise InvalidInputError(f"layout {layout.adapter!r} describes no attention heads")
    used = [0]
    out: dict[tuple[int, int], float] = {}
    for att in layout.attention:
        share = att.num_kv_heads / att.num_heads
        for h in att.heads:
            q = _sum_slices(fisher, h.q, used)
            o = _sum_slices(fisher, h.o, used)
            kv = _sum_slices(fisher, h.k, used) + _sum_slices(fisher, h.v, used)
            out[(h.layer, h.head)] = q + o + kv * share
    if used[0] == 0:
        raise InvalidInputError("the Fisher covers none of the attention parameters of its layout")
    return out


def channel_importance(fisher: Fisher) -> dict[tuple[int, int], float]:
    """Total Fisher of each MLP channel, ``{(layer, channel): value}``.

    ``T_c = Σ_roles F(role slice of c)`` — e.g. gate row + up row + down column. Parameters not in
    the Fisher contribute nothing. A group Fisher must have one group per channel index on each
    role's axis (:class:`UnsupportedError` otherwise).
    """
    layout = _require_layout(fisher, "channel_importance")
    if not layout.mlp:
        raise InvalidInputError(f"layout {layout.adapter!r} describes no MLP channels")
    out: dict[tuple[int, int], float] = {}
    used = 0
    for block in layout.mlp:
        n = block.num_channels
        totals = torch.zeros(n, dtype=torch.float64)
        for role in block.roles:
            if role.param not in fisher:
                continue
            used += 1
            t = fisher[role.param].detach().double().cpu()
            if fisher.reduction == "param":
                other = [d for d in range(t.dim()) if d != role.axis]
                per_index = t.sum(dim=other) if other else t
                totals += per_index[role.offset : role.offset + n]
            else:
                totals += t[channel_groups(fisher, role, n)]
        for c in range(n):
            out[(block.layer, c)] = float(totals[c])
    if used == 0:
        raise InvalidInputError("the Fisher covers none of the MLP parameters of its layout")
    return out


def channel_groups(fisher: Fisher, role, num_channels: int) -> torch.Tensor:
    """Group index (int64, ``[num_channels]``) holding channel ``c`` of an MLP ``role`` in a group
    Fisher; :class:`UnsupportedError` unless each such group is exactly one channel index."""
    pg = fisher.groups[role.param]
    gidx = pg.index()[role.offset : role.offset + num_channels]
    if pg.extra_axes or pg.axis != role.axis or bool((pg.sizes()[gidx] != 1).any()):
        raise UnsupportedError(
            f"{role.param}: its groups do not hold one MLP channel each along axis {role.axis}; "
            "use a parameter-level Fisher"
        )
    return gidx


def _per_expert(fisher: Fisher, name: str, expert_axis: int, num_experts: int) -> torch.Tensor:
    """``[E]``: the Fisher mass of each expert's slice (index ``e`` along ``expert_axis``) of ``name``."""
    t = fisher[name].detach().double().cpu()
    if fisher.reduction == "param":
        other = [d for d in range(t.dim()) if d != expert_axis]
        return t.sum(dim=other) if other else t
    pg = fisher.groups[name]
    if expert_axis not in pg.axes:
        raise UnsupportedError(
            f"{name}: its groups run along axes {pg.axes}, not along the expert axis {expert_axis}; "
            "use a parameter-level Fisher"
        )
    lo, hi = group_coordinates(pg, fisher.param_shapes[name], expert_axis)
    if bool((lo != hi).any()):
        raise UnsupportedError(f"{name}: some of its groups span several experts; use a parameter-level Fisher")
    return torch.zeros(num_experts, dtype=torch.float64).index_add_(0, lo, t)


def expert_importance(fisher: Fisher, *, include_router: bool = False) -> dict[tuple[int, int], float]:
    """Total Fisher of each routed expert, ``{(layer, expert): value}``.

    ``T_e = Σ over the expert's own weights of F``: its whole slice ``[e]`` of every expert
    parameter of the layer's :class:`~hf_fisher.layout.ExpertBlock` — for the HF fused layout
    the gate and up rows ``gate_up_proj[e]`` plus the down columns ``down_proj[e]`` (plus the
    experts' biases, when the model has them). The router is **not** included unless
    ``include_router=True``, which adds the expert's router row ``gate.weight[e]`` (the router
    rows are also the groups ``expert{e}`` of the router parameter). A Qwen2-MoE shared expert is
    not a routed expert (it is in :func:`channel_importance`). Parameters not in the Fisher
    contribute nothing. Works from a parameter-level Fisher and from a group Fisher whose groups
    each lie within one expert (as the MoE adapter's do; :class:`UnsupportedError` otherwise).
    """
    layout = _require_layout(fisher, "expert_importance")
    if not layout.experts:
        raise InvalidInputError(f"layout {layout.adapter!r} describes no mixture-of-experts layers")
    out: dict[tuple[int, int], float] = {}
    used = 0
    for block in layout.experts:
        totals = torch.zeros(block.num_experts, dtype=torch.float64)
        parts = [(p, block.expert_axis(p)) for p in block.params()]
        if include_router and block.router is not None:
            parts.append((block.router, block.router_axis))
        for name, axis in parts:
            if name not in fisher:
                continue
            used += 1
            totals += _per_expert(fisher, name, axis, block.num_experts)
        for e in range(block.num_experts):
            out[(block.layer, e)] = float(totals[e])
    if used == 0:
        raise InvalidInputError("the Fisher covers none of the expert parameters of its layout")
    return out


def expert_channel_importance(fisher: Fisher) -> dict[tuple[int, int, int], float]:
    """Total Fisher of each channel of each routed expert, ``{(layer, expert, channel): value}``.

    ``T_ec = Σ_roles F(role slice of channel c of expert e)`` — for the HF fused layout gate row
    ``gate_up_proj[e, c]`` + up row ``gate_up_proj[e, I + c]`` + down column ``down_proj[e, :, c]``
    (+ the gate/up bias entries, when present). Weights without a channel index (a down bias) and
    the router are not included, so an expert's channels add up to its
    :func:`expert_importance` minus those. A group Fisher must hold at most one (expert, channel)
    per group (:class:`UnsupportedError` otherwise).
    """
    layout = _require_layout(fisher, "expert_channel_importance")
    if not layout.experts:
        raise InvalidInputError(f"layout {layout.adapter!r} describes no mixture-of-experts layers")
    out: dict[tuple[int, int, int], float] = {}
    used = 0
    for block in layout.experts:
        E, n = block.num_experts, block.num_channels
        totals = torch.zeros(E, n, dtype=torch.float64)
        for role in block.roles:
            if role.channel_axis is None or role.param not in fisher:
                continue
            used += 1
            t = fisher[role.param].detach().double().cpu()
            ea, ca = role.expert_axis, role.channel_axis
            if fisher.reduction == "param":
                other = [d for d in range(t.dim()) if d not in (ea, ca)]
                kept = t.sum(dim=other) if other else t
                if ca < ea:
                    kept = kept.t()
                totals += kept[:, role.offset : role.offset + n]
                continue
            pg = fisher.groups[role.param]
            if ea not in pg.axes or ca not in pg.axes:
                raise UnsupportedError(
                    f"{role.param}: its groups run along axes {pg.axes}, not along (expert, channel) axes "
                    f"({ea}, {ca}); use a parameter-level Fisher"
                )
            shape = fisher.param_shapes[role.param]
            e_lo, e_hi = group_coordinates(pg, shape, ea)
            c_lo, c_hi = group_coordinates(pg, shape, ca)
            touches = (c_hi >= role.offset) & (c_lo < role.offset + n)
            if bool((touches & ((e_lo != e_hi) | (c_lo != c_hi))).any()):
                raise UnsupportedError(
                    f"{role.param}: some of its groups hold several expert channels; use a parameter-level Fisher"
                )
            sel = touches.nonzero().flatten()
            totals.view(-1).index_add_(0, e_lo[sel] * n + (c_lo[sel] - role.offset), t[sel])
        for e in range(E):
            for c in range(n):
                out[(block.layer, e, c)] = float(totals[e, c])
    if used == 0:
        raise InvalidInputError("the Fisher covers none of the expert parameters of its layout")
    return out


# ---------------------------------------------------------------------------- comparison
def _topk_set(v: torch.Tensor, k: int) -> set[int]:
    return set(torch.sort(v, descending=True, stable=True).indices[:k].tolist())


def compare(a: Fisher, b: Fisher, k: int = 100) -> dict[str, Any]:
    """How similar two Fishers (e.g. of two tasks) are, over their common parameter names.

    With ``x``, ``y`` the concatenated (flattened) values of the common parameters, in sorted name
    order (group values when either Fisher is group-level: the other is reduced with
    :func:`group_view`):

    - ``cosine = x·y / (|x| |y|)``; ``pearson`` = cosine of the centred vectors;
    - ``spearman``: Pearson correlation of the ranks (``scipy.stats.spearmanr``);
    - ``topk_overlap = |top_k(x) ∩ top_k(y)| / k`` with ``k = min(k, len(x))``.

    Undefined correlations (a constant or all-zero vector) are NaN. Returns a dict with those
    keys plus ``k``, ``num_elements``, ``num_params``, ``unit`` ("element" or "group"),
    ``only_in_a``/``only_in_b`` (names present in one Fisher only) and ``task_a``/``task_b``.
    """
    from scipy.stats import spearmanr

    if a.reduction != b.reduction:
        a, b = group_view(a), group_view(b)
    common = sorted(set(a.names()) & set(b.names()))
    if not common:
        raise InvalidInputError(
            "the two Fishers have no parameter name in common; were they collected on the same model?"
        )
    for n in common:
        if a[n].shape != b[n].shape:
            raise InvalidInputError(
                f"{n}: shapes differ ({tuple(a[n].shape)} vs {tuple(b[n].shape)}); the Fishers use "
                "different models or group partitions"
            )
    x = torch.cat([a[n].detach().double().cpu().reshape(-1) for n in common])
    y = torch.cat([b[n].detach().double().cpu().reshape(-1) for n in common])
    nx, ny = float(x.norm()), float(y.norm())
    cosine = float(x @ y) / (nx * ny) if nx > 0 and ny > 0 else math.nan
    xc, yc = x - x.mean(), y - y.mean()
    nxc, nyc = float(xc.norm()), float(yc.norm())
    pearson = float(xc @ yc) / (nxc * nyc) if nxc > 0 and nyc > 0 else math.nan
    if x.numel() > 1 and nxc > 0 and nyc > 0:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            spearman = float(spearmanr(x.numpy(), y.numpy()).statistic)
    else:
        spearman = math.nan
    k_eff = min(int(k), x.numel())
    overlap = len(_topk_set(x, k_eff) & _topk_set(y, k_eff)) / k_eff if k_eff > 0 else math.nan
    return {
        "cosine": cosine,
        "pearson": pearson,
        "spearman": spearman,
        "topk_overlap": overlap,
        "k": k_eff,
        "num_elements": int(x.numel()),
        "num_params": len(common),
        "unit": "group" if a.reduction == "group" else "element",
        "only_in_a": sorted(set(a.names()) - set(b.names())),
        "only_in_b": sorted(set(b.names()) - set(a.names())),
        "task_a": a.metadata.task,
        "task_b": b.metadata.task,
    }


# ---------------------------------------------------------------------------- uncertainty
def effective_count(fisher: Fisher) -> float:
    """Number of samples behind the mean: ``n``, or for an EMA (decay ``d``) Kish's
    ``n_eff = (1 − dⁿ)² (1 + d) / ((1 − d)(1 − d²ⁿ))``."""
    n = fisher.counts.samples
    d = fisher.metadata.ema_decay
    if d is None or n == 0:
        return float(n)
    if d == 0.0:
        return 1.0
    return (1 - d**n) ** 2 * (1 + d) / ((1 - d) * (1 - d ** (2 * n)))


def _variance_of(fisher: Fisher, name: str) -> torch.Tensor:
    if name not in fisher:
        raise KeyError(f"{name!r} is not in this Fisher")
    if name not in fisher.variances:
        raise InvalidInputError(
            f"this Fisher has no variance for {name!r} (group views and some estimators do not carry "
            "one); collect with the reduction you need to get variances"
        )
    return fisher.variances[name]


def stderr(fisher: Fisher, name: str) -> torch.Tensor:
    """Standard error of ``F`` for ``name``: ``sqrt(Var_i(C_i) / n)`` (``n`` = :func:`effective_count`)."""
    var = _variance_of(fisher, name).double()
    n = effective_count(fisher)
    if n <= 0:
        return torch.zeros_like(var)
    return torch.sqrt(var.clamp_min(0) / n)


def confidence_interval(fisher: Fisher, name: str, level: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Student-t interval ``F ± t_{(1+level)/2, n−1} · stderr`` (see :func:`hf_fisher.collection.stats.confidence_interval`)."""
    var = _variance_of(fisher, name).double()
    return stats.confidence_interval(fisher[name].double(), var, effective_count(fisher), level)
