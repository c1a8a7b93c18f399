"""Budgets and selection: which units a pruning run removes, given their scores.

``scope="layer"`` (:func:`select_layer`): every layer the same budget (attention first, then MLP
channels to the layer's parameter target); ``scope="global"`` (:func:`select_global`): all units
ranked together by :func:`global_keys` (score per parameter, or a score class's own key such as
FLAP's standardised score), cheapest first, until the removed parameters reach the target. Both
keep the floors of :func:`unit_floors`. See :mod:`hf_fisher.consumers.prune.core` for the budget rules.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from hf_fisher.consumers.prune.units import Unit

__all__ = ["global_keys", "round_half_up", "select_global", "select_layer", "unit_floors"]

def round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def unit_floors(units: Sequence[Unit], min_per_layer: int) -> dict[tuple, int]:
    """The fewest units each budget key (:attr:`Unit.budget`) keeps: ``min_per_layer`` of a
    layer's kv-heads, channels, or query heads of a multi-head layer; a GQA/MQA layer's query
    heads keep at least one per kv group and ``min_per_layer`` in the layer; vocabulary rows: 0."""
    groups: dict[int | None, int] = {}
    for b in {u.budget for u in units}:
        if b[0] == "head" and b[2] is not None:
            groups[b[1]] = groups.get(b[1], 0) + 1
    floors = {}
    for b in {u.budget for u in units}:
        if b[0] == "vocab":
            floors[b] = 0
        elif b[0] == "head" and b[2] is not None:
            floors[b] = max(1, math.ceil(min_per_layer / groups[b[1]]))
        else:
            floors[b] = min_per_layer
    return floors


def select_layer(units: Sequence[Unit], scores: torch.Tensor, sparsity: float, min_per_layer: int) -> tuple[list[int], bool]:
    """Per layer: attention first (query heads: ``round(sparsity · H/H_kv)`` per kv group under
    GQA/MQA, at least one kept, ``round(sparsity · H)`` per layer in multi-head attention; kv
    groups: ``round(sparsity · H_kv)``), then as many MLP channels as bring the layer's removed
    parameters nearest to ``sparsity`` × its unit parameters; vocabulary rows:
    ``round(sparsity · n)``. Never below :func:`unit_floors`. Returns ``(removed, whether a floor
    held back a removal the budget asked for)``."""
    buckets: dict[tuple, list[int]] = {}
    for k, u in enumerate(units):
        buckets.setdefault(u.budget, []).append(k)
    floors = unit_floors(units, min_per_layer)
    layer_params: dict = {}
    for u in units:
        layer_params[u.layer] = layer_params.get(u.layer, 0) + u.size
    removed: list[int] = []
    done: dict = {}
    blocked = False

    def lowest(members: list[int], r: int) -> list[int]:
        return sorted(members, key=lambda k: (float(scores[k]), k))[: max(0, r)]

    order = {"head": 0, "kv_head": 0, "vocab": 1, "channel": 2}
    for key in sorted(buckets, key=lambda b: (-1 if b[1] is None else b[1], order[b[0]], -1 if b[2] is None else b[2])):
        kind, layer, _g = key
        members = buckets[key]
        n = len(members)
        if kind == "channel":
            size = units[members[0]].size
            r = round_half_up((sparsity * layer_params[layer] - done.get(layer, 0)) / size) if size else 0
        else:
            r = round_half_up(sparsity * n)
        blocked |= r > n - floors[key]
        picked = lowest(members, min(r, n - floors[key]))
        removed += picked
        done[layer] = done.get(layer, 0) + sum(units[k].size for k in picked)
    return sorted(removed), blocked


def global_keys(units: Sequence[Unit], scores: torch.Tensor, key: str = "per_param") -> torch.Tensor:
    """The ranking key of ``scope="global"``: ``key="per_param"`` (the default of every
    :class:`~hf_fisher.consumers.prune.base.PruneScore`) is ``score_u / n_u`` (score per removed
    parameter); ``key="standardised"`` (FLAP) is ``(score_u − mean_B) / std_B`` within the unit's
    bucket ``B`` (:attr:`Unit.bucket`: same kind and layer; std 0 or one member: divided by 1)."""
    if key not in ("per_param", "standardised"):
        raise ValueError(f"global key {key!r}: 'per_param' or 'standardised'")
    if key == "per_param":
        sizes = torch.tensor([max(1, u.size) for u in units], dtype=torch.float64)
        return scores / sizes
    keys = scores.clone()
    buckets: dict[tuple, list[int]] = {}
    for k, u in enumerate(units):
        buckets.setdefault(u.bucket, []).append(k)
    for members in buckets.values():
        v = scores[members]
        sd = float(v.std()) if len(members) > 1 else 0.0
        keys[members] = (v - v.mean()) / (sd if sd > 0 else 1.0)
    return keys


def select_global(units: Sequence[Unit], keys: torch.Tensor, sparsity: float, min_per_layer: int) -> tuple[list[int], bool]:
    """The cheapest units by ``keys`` until the removed parameters are within half a unit of the
    target, never below :func:`unit_floors`. Returns ``(removed, whether a floor held back a unit the
    budget had room for)``."""
    total = sum(u.size for u in units)
    target = sparsity * total
    left: dict[tuple, int] = {}
    for u in units:
        left[u.budget] = left.get(u.budget, 0) + 1
    floors = unit_floors(units, min_per_layer)
    removed: list[int] = []
    held: list[int] = []
    done = 0
    for k in sorted(range(len(units)), key=lambda k: (float(keys[k]), k)):
        u = units[k]
        if left[u.budget] <= floors[u.budget]:
            held.append(k)
            continue
        if done + u.size > target + u.size / 2:
            continue
        removed.append(k)
        left[u.budget] -= 1
        done += u.size
    return sorted(removed), any(done + units[k].size <= target + units[k].size / 2 for k in held)
