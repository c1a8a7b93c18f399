"""Mask overlap between two tasks: how much of what matters to task A also matters to task B.

A *mask* is ``{name: torch.BoolTensor}``: ``True`` marks a kept / important position (the
convention of ``PruneResult.masks``). For masks ``A`` and ``B`` over the same positions:

- ``shared = |A ∩ B|``, ``only_a = |A \\ B|``, ``only_b = |B \\ A|``, ``union = |A ∪ B|``;
- Jaccard overlap ``J = |A ∩ B| / |A ∪ B|``, with ``J = 1.0`` when the union is empty (two empty
  masks are identical).

``J`` is reported overall, per layer and per parameter, with a band and what it suggests for
combining the two tasks (:func:`band`, :data:`RECOMMENDATIONS`):

- ``"high"``: ``J > 0.7``; ``"medium"``: ``0.4 <= J <= 0.7``; ``"low"``: ``J < 0.4``.

:func:`task_overlap` builds the masks from two Fishers (each task's top ``keep`` fraction by
Fisher value) and compares them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from hf_fisher.errors import InvalidInputError
from hf_fisher.hookspecs import hookimpl
from hf_fisher.layout import ModelLayout, layer_of

if TYPE_CHECKING:  # pragma: no cover
    from hf_fisher.artifacts.fisher import Fisher

__all__ = [
    "HIGH",
    "LOW",
    "RECOMMENDATIONS",
    "OverlapCounts",
    "OverlapResult",
    "band",
    "hf_fisher_register_consumers",
    "mask_overlap",
    "task_overlap",
]

HIGH = 0.7
"""``J > HIGH`` is the "high" band."""
LOW = 0.4
"""``J < LOW`` is the "low" band; ``LOW <= J <= HIGH`` is "medium"."""

RECOMMENDATIONS: dict[str, str] = {
    "high": (
        "The tasks rely on largely the same parameters, so merging them would make them interfere. "
        "Prefer task-specific adapters or gradient surgery (e.g. projecting out conflicting gradients) "
        "to plain weight merging."
    ),
    "medium": (
        "The tasks share part of their important parameters. Merge with Fisher-weighted averaging, "
        "or use task arithmetic with per-task weights tuned on validation data."
    ),
    "low": (
        "The tasks rely on mostly different parameters, so they interfere little. Task arithmetic "
        "or plain weight averaging should be safe."
    ),
}

UNITS = ("params", "heads", "channels")


def band(jaccard: float) -> str:
    """``"high"`` if ``J > 0.7``, ``"low"`` if ``J < 0.4``, else ``"medium"`` (0.4 and 0.7 included)."""
    if jaccard > HIGH:
        return "high"
    if jaccard < LOW:
        return "low"
    return "medium"


def count_of(fraction: float, n: int) -> int:
    """``ceil(fraction · n)``, where a product within ``1e-9`` (relative) of an integer counts as that
    integer, so that ``0.1 · 30`` is 3 and not 4 (``0.1 * 30 == 3.0000000000000004`` in floats)."""
    x = fraction * n
    r = round(x)
    return int(r) if abs(x - r) <= 1e-9 * max(1.0, x) else math.ceil(x)


@dataclass(frozen=True)
class OverlapCounts:
    """Positions in both masks (``shared``), only in A (``only_a``), only in B (``only_b``)."""

    shared: int
    only_a: int
    only_b: int

    @property
    def union(self) -> int:
        return self.shared + self.only_a + self.only_b

    @property
    def jaccard(self) -> float:
        """``shared / union``; 1.0 when the union is empty."""
        return 1.0 if self.union == 0 else self.shared / self.union

    def __add__(self, other: OverlapCounts) -> OverlapCounts:
        return OverlapCounts(self.shared + other.shared, self.only_a + other.only_a, self.only_b + other.only_b)

    def to_dict(self) -> dict[str, Any]:
        return {
            "jaccard": self.jaccard,
            "shared": self.shared,
            "only_a": self.only_a,
            "only_b": self.only_b,
            "union": self.union,
            "size_a": self.shared + self.only_a,
            "size_b": self.shared + self.only_b,
        }


@dataclass
class OverlapResult:
    """Overlap of two masks: totals, per layer (``None`` = outside the layer stack), per parameter.

    ``jaccard``/``band``/``recommendation`` describe the totals. ``unit``: what a position is
    ("params": a parameter element; "heads"/"channels": one unit, see :func:`task_overlap`);
    ``keep``: the fraction :func:`task_overlap` kept (``None`` for :func:`mask_overlap`).
    ``masks_a``/``masks_b``: the compared masks (not copied).
    """

    total: OverlapCounts
    per_layer: dict[int | None, OverlapCounts]
    per_param: dict[str, OverlapCounts]
    masks_a: dict[str, torch.Tensor] = field(repr=False)
    masks_b: dict[str, torch.Tensor] = field(repr=False)
    unit: str = "params"
    keep: float | None = None

    @property
    def jaccard(self) -> float:
        return self.total.jaccard

    @property
    def band(self) -> str:
        return band(self.jaccard)

    @property
    def recommendation(self) -> str:
        return RECOMMENDATIONS[self.band]

    @property
    def shared(self) -> int:
        return self.total.shared

    @property
    def only_a(self) -> int:
        return self.total.only_a

    @property
    def only_b(self) -> int:
        return self.total.only_b

    def shared_masks(self) -> dict[str, torch.Tensor]:
        """``{name: A ∩ B}``: positions important to both tasks (potential conflicts)."""
        return {n: a & self.masks_b[n].to(a.device) for n, a in self.masks_a.items()}

    def unique_masks(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``({name: A \\ B}, {name: B \\ A})``. With :meth:`shared_masks` they partition ``A ∪ B``."""
        only_a, only_b = {}, {}
        for n, a in self.masks_a.items():
            b = self.masks_b[n].to(a.device)
            only_a[n], only_b[n] = a & ~b, b & ~a
        return only_a, only_b

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (no masks); ``per_layer`` is a list of rows with a ``layer`` key."""
        return {
            "unit": self.unit,
            "keep": self.keep,
            **self.total.to_dict(),
            "band": self.band,
            "recommendation": self.recommendation,
            "thresholds": {"high": f"J > {HIGH}", "medium": f"{LOW} <= J <= {HIGH}", "low": f"J < {LOW}"},
            "per_layer": [
                {"layer": layer, **c.to_dict(), "band": band(c.jaccard)} for layer, c in self.per_layer.items()
            ],
            "per_param": {n: c.to_dict() for n, c in self.per_param.items()},
        }


def _check_masks(masks_a: Mapping[str, Any], masks_b: Mapping[str, Any]) -> None:
    for label, m in (("masks_a", masks_a), ("masks_b", masks_b)):
        if not isinstance(m, Mapping):
            raise InvalidInputError(f"{label} must be a dict {{param name: torch.BoolTensor}}, got {type(m).__name__}")
    if set(masks_a) != set(masks_b):
        only_a = sorted(set(masks_a) - set(masks_b))
        only_b = sorted(set(masks_b) - set(masks_a))
        raise InvalidInputError(
            f"the two masks cover different parameters: only in masks_a {only_a[:5]}, only in masks_b "
            f"{only_b[:5]}; compare masks of the same model over the same parameters"
        )
    for name in sorted(masks_a):
        a, b = masks_a[name], masks_b[name]
        for label, t in (("masks_a", a), ("masks_b", b)):
            if not isinstance(t, torch.Tensor) or t.dtype != torch.bool:
                got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
                raise InvalidInputError(
                    f"{label}[{name!r}] must be a torch.bool tensor (True = kept), got {got}; "
                    "convert it with `mask != 0` or `mask.bool()`"
                )
        if a.shape != b.shape:
            raise InvalidInputError(
                f"masks for {name!r} have different shapes: {tuple(a.shape)} in masks_a, {tuple(b.shape)} in "
                "masks_b; both must have the parameter's shape"
            )


def mask_overlap(
    masks_a: Mapping[str, torch.Tensor],
    masks_b: Mapping[str, torch.Tensor],
    *,
    layout: ModelLayout | None = None,
) -> OverlapResult:
    """Jaccard overlap ``|A ∩ B| / |A ∪ B|`` of two masks, overall, per layer and per parameter.

    ``masks_a``/``masks_b``: ``{name: BoolTensor}`` with the same names and, name by name, the
    same shapes (True = kept / important). A parameter's layer is ``layout.layer(name)`` when a
    layout is given, else parsed from the name (:func:`hf_fisher.layout.layer_of`); ``None``
    collects parameters outside the layer stack. An empty union gives ``J = 1.0``. Bad input (other
    names, other shapes, non-bool tensors) raises :class:`InvalidInputError` before anything is
    computed.
    """
    _check_masks(masks_a, masks_b)
    per_param: dict[str, OverlapCounts] = {}
    per_layer: dict[int | None, OverlapCounts] = {}
    total = OverlapCounts(0, 0, 0)
    for name in sorted(masks_a):
        a = masks_a[name]
        b = masks_b[name].to(a.device)
        c = OverlapCounts(
            int(torch.count_nonzero(a & b)), int(torch.count_nonzero(a & ~b)), int(torch.count_nonzero(b & ~a))
        )
        per_param[name] = c
        layer = layout.layer(name) if layout is not None else layer_of(name)
        per_layer[layer] = per_layer.get(layer, OverlapCounts(0, 0, 0)) + c
        total = total + c
    ordered = {k: per_layer[k] for k in sorted(k for k in per_layer if k is not None)}
    if None in per_layer:
        ordered[None] = per_layer[None]
    return OverlapResult(total, ordered, per_param, dict(masks_a), dict(masks_b))


# ---------------------------------------------------------------------------- from Fishers
def _top_mask(values: torch.Tensor, keep: float) -> torch.Tensor:
    """Bool ``[N]``: the ``count_of(keep, N)`` largest values (ties: the earlier position wins)."""
    n = values.numel()
    k = count_of(keep, n)
    order = torch.sort(values, descending=True, stable=True).indices[:k]
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order] = True
    return mask


def _param_masks(fisher_a: Fisher, fisher_b: Fisher, keep: float) -> tuple[dict, dict]:
    if fisher_a.reduction != fisher_b.reduction:
        raise InvalidInputError(
            f"the Fishers have different reductions ({fisher_a.reduction!r} vs {fisher_b.reduction!r}); "
            "collect both with the same reduction"
        )
    if set(fisher_a.names()) != set(fisher_b.names()):
        diff = sorted(set(fisher_a.names()) ^ set(fisher_b.names()))
        raise InvalidInputError(
            f"the Fishers cover different parameters (e.g. {diff[:5]}); use two Fishers of the same model"
        )
    for name in fisher_a.names():
        if fisher_a.param_shapes[name] != fisher_b.param_shapes[name] or fisher_a[name].shape != fisher_b[name].shape:
            raise InvalidInputError(
                f"{name!r} has shape {tuple(fisher_a[name].shape)} in fisher_a and {tuple(fisher_b[name].shape)} "
                "in fisher_b; use two Fishers of the same model"
            )
        if fisher_a.reduction == "group" and fisher_a.groups.get(name) != fisher_b.groups.get(name):
            raise InvalidInputError(f"{name!r} is split into different groups in the two Fishers")
    out = []
    for f in (fisher_a, fisher_b):
        names = f.names()
        flat = _top_mask(torch.cat([f[n].detach().double().cpu().reshape(-1) for n in names]), keep)
        masks, start = {}, 0
        for n in names:
            t = f[n]
            masks[n] = flat[start : start + t.numel()].reshape(t.shape)
            start += t.numel()
        out.append(masks)
    return out[0], out[1]


def _unit_masks(fisher_a: Fisher, fisher_b: Fisher, keep: float, unit: str) -> tuple[dict, dict]:
    kind = "head" if unit == "heads" else "channel"
    scores = []
    for label, f in (("fisher_a", fisher_a), ("fisher_b", fisher_b)):
        try:
            scores.append(f.head_importance() if unit == "heads" else f.channel_importance())
        except InvalidInputError as e:
            raise InvalidInputError(f"{label}: cannot rank {unit}: {e}") from None
    if set(scores[0]) != set(scores[1]):
        raise InvalidInputError(
            f"the Fishers describe different {unit} ({len(scores[0])} vs {len(scores[1])} (layer, {kind}) "
            "units); use two Fishers of the same model"
        )
    keys = sorted(scores[0])
    sizes: dict[int, int] = {}
    for layer, u in keys:
        sizes[layer] = max(sizes.get(layer, 0), u + 1)
    out = []
    for s in scores:
        flat = _top_mask(torch.tensor([s[k] for k in keys], dtype=torch.float64), keep)
        masks = {f"layers.{layer}.{unit}": torch.zeros(n, dtype=torch.bool) for layer, n in sizes.items()}
        for (layer, u), kept in zip(keys, flat.tolist()):
            masks[f"layers.{layer}.{unit}"][u] = kept
        out.append(masks)
    return out[0], out[1]


def task_overlap(fisher_a: Fisher, fisher_b: Fisher, *, keep: float = 0.2, unit: str = "params") -> OverlapResult:
    """Overlap of the important sets of two tasks: each Fisher's top ``keep`` fraction.

    Each task keeps the ``k = ceil(keep · N)`` largest of its ``N`` values (see :func:`count_of`;
    ties: the earlier position in the order below wins), then :func:`mask_overlap` compares them:

    - ``unit="params"``: the values are the Fisher tensors, ranked **globally** over every
      parameter (sorted names, C order). Masks have the parameter's shape for
      ``reduction="param"``, ``[num_groups]`` for ``reduction="group"`` (a position is a group).
      The Fishers must cover the same names with the same shapes, reduction and groups.
    - ``unit="heads"`` / ``"channels"``: the values are :meth:`Fisher.head_importance` /
      :meth:`Fisher.channel_importance`, ranked globally over all layers. Masks are over units,
      one key per layer: ``"layers.{l}.heads"`` a bool ``[num_heads]`` (``"layers.{l}.channels"``
      a bool ``[num_channels]``), ``True`` = the unit is among the kept ones; per-layer results
      follow from the key. Both Fishers need a layout describing the same units.

    ``keep`` is in ``(0, 1]``. Errors are :class:`InvalidInputError`.
    """
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not math.isfinite(keep) or not 0 < keep <= 1:
        raise InvalidInputError(f"keep must be a fraction in (0, 1], got {keep!r}")
    if unit not in UNITS:
        raise InvalidInputError(f"unit must be one of {list(UNITS)}, got {unit!r}")
    if unit == "params":
        masks_a, masks_b = _param_masks(fisher_a, fisher_b, keep)
        result = mask_overlap(masks_a, masks_b, layout=fisher_a.layout)
    else:
        masks_a, masks_b = _unit_masks(fisher_a, fisher_b, keep, unit)
        result = mask_overlap(masks_a, masks_b)
    result.unit, result.keep = unit, float(keep)
    return result


@hookimpl
def hf_fisher_register_consumers(register) -> None:
    register("mask_overlap", mask_overlap)
    register("task_overlap", task_overlap)
