"""Built-in consumers "importance" (ranked tables of the most important units) and "compare"
(similarity of two tasks' Fishers), and :func:`classify_units` (critical / compressible /
ordinary heads and MLP channels). Thin wrappers over :mod:`hf_fisher.analysis.views`
registered through ``hf_fisher_register_consumers`` (built-in plugin ``hf_fisher.analysis.importance``)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hf_fisher.analysis import views
from hf_fisher.errors import InvalidInputError
from hf_fisher.hookspecs import hookimpl

if TYPE_CHECKING:  # pragma: no cover
    from hf_fisher.artifacts.fisher import Fisher

__all__ = ["UnitLabels", "classify_units", "compare_tasks", "hf_fisher_register_consumers", "importance"]


def _top_units(scores: dict[tuple[int, int], float], k: int, total: float, key: str) -> list[dict[str, Any]]:
    ranked = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    return [
        {"rank": r + 1, "layer": lay, key: unit, "value": v, "share": v / total if total > 0 else 0.0}
        for r, ((lay, unit), v) in enumerate(ranked)
    ]


def importance(fisher: Fisher, *, k: int = 20, params: Iterable[str] | None = None) -> dict[str, Any]:
    """Table data of what matters most for the Fisher's task.

    Returns ``{"task", "total", "groups", "per_layer", "heads", "channels"}``:

    - ``groups``: the ``k`` largest group values ``F_g`` (:func:`hf_fisher.analysis.top_k`), as rows
      ``{rank, param, group, layer, value, share}`` with ``share = F_g / Σ F``;
    - ``per_layer``: ``{layer, value, share}`` for every layer (``None`` = outside the layer stack);
    - ``heads`` / ``channels``: the ``k`` largest attention heads / MLP channels by total
      (:func:`hf_fisher.analysis.head_importance`, :func:`~hf_fisher.analysis.channel_importance`),
      or ``[]`` when the Fisher has no layout describing them.
    """
    total = fisher.total()
    groups = [
        {
            "rank": r + 1,
            "param": name,
            "group": group,
            "layer": views.layer_index(fisher, name),
            "value": value,
            "share": value / total if total > 0 else 0.0,
        }
        for r, (name, group, value) in enumerate(views.top_k(fisher, k, params=params))
    ]
    layers = [
        {"layer": layer, "value": v, "share": v / total if total > 0 else 0.0}
        for layer, v in views.per_layer(fisher).items()
    ]
    layout = fisher.layout
    heads = (
        _top_units(views.head_importance(fisher), k, total, "head")
        if layout is not None and layout.attention
        else []
    )
    channels = (
        _top_units(views.channel_importance(fisher), k, total, "channel")
        if layout is not None and layout.mlp
        else []
    )
    return {
        "task": fisher.metadata.task,
        "total": total,
        "groups": groups,
        "per_layer": layers,
        "heads": heads,
        "channels": channels,
    }


def compare_tasks(a: Fisher, b: Fisher, *, k: int = 100) -> dict[str, Any]:
    """Similarity of two Fishers (cosine, Pearson, Spearman, top-k overlap); see
    :func:`hf_fisher.analysis.compare`."""
    return views.compare(a, b, k=k)


@hookimpl
def hf_fisher_register_consumers(register) -> None:
    register("importance", importance)
    register("compare", compare_tasks)


# ---------------------------------------------------------------------------- unit labels
UNIT_KINDS = ("heads", "channels")
LABELS = ("critical", "compressible", "ordinary")


@dataclass
class UnitLabels:
    """Result of :func:`classify_units`.

    ``labels[(layer, index)]`` is "critical", "compressible" or "ordinary"; ``values`` the unit
    totals that were classified; ``thresholds`` the rule and numbers used (see
    :func:`classify_units`): ``rule``, ``critical_factor``, ``critical_share``,
    ``compressible_share``, ``total``, ``mean``, ``critical_above`` (a unit is critical when its
    value is > this; for the share rule the largest value left out of the critical set) and
    ``compressible_mass`` (the mass of the compressible set, <= ``compressible_share · total``).
    """

    unit: str
    labels: dict[tuple[int, int], str]
    values: dict[tuple[int, int], float]
    thresholds: dict[str, Any] = field(default_factory=dict)

    def of(self, label: str) -> list[tuple[int, int]]:
        """Units with ``label``: "compressible" smallest value first, the others largest first
        (ties: by (layer, index))."""
        if label not in LABELS:
            raise InvalidInputError(f"label must be one of {LABELS}, got {label!r}")
        sign = 1.0 if label == "compressible" else -1.0
        keys = [u for u, lab in self.labels.items() if lab == label]
        return sorted(keys, key=lambda u: (sign * self.values[u], u))

    def counts(self) -> dict[str, int]:
        return {lab: sum(1 for v in self.labels.values() if v == lab) for lab in LABELS}


def _check_share(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 < float(value) < 1.0):
        raise InvalidInputError(f"{name} must be a number strictly between 0 and 1 (a share of the mass), got {value!r}")
    return float(value)


def classify_units(
    fisher: Fisher,
    *,
    unit: str = "heads",
    critical_factor: float = 2.0,
    critical_share: float | None = None,
    compressible_share: float = 0.05,
) -> UnitLabels:
    """Label every attention head or MLP channel "critical", "compressible" or "ordinary".

    Units and values: ``unit="heads"``: ``T_h`` of :func:`hf_fisher.analysis.head_importance`
    (key ``(layer, head)``); ``unit="channels"``: ``T_c`` of
    :func:`~hf_fisher.analysis.channel_importance` (key ``(layer, channel)``). With ``N`` units,
    total ``S = Σ_u T_u`` and mean ``m = S / N``:

    - **critical** (rule "factor", the default): ``T_u > critical_factor · m`` (default 2.0:
      more than twice the mean unit of its kind). Rule "share" (when ``critical_share`` is given,
      ``critical_factor`` is then ignored): the smallest set of largest units whose mass reaches
      ``critical_share · S`` (ranked by value, ties by key).
    - **compressible**: the longest run of smallest units (ranked ascending, ties by key) whose
      mass is at most ``compressible_share · S`` (default 0.05: together they carry <= 5 % of the
      mass of their kind). A critical unit is never compressible. When ``S = 0`` every unit is
      compressible and none critical.
    - **ordinary**: the rest.

    Raises :class:`~hf_fisher.errors.InvalidInputError` for an unknown ``unit``, shares outside
    (0, 1), a ``critical_factor`` that is not a positive number, or a Fisher without a layout
    describing the units.
    """
    if unit not in UNIT_KINDS:
        raise InvalidInputError(f"unit must be one of {UNIT_KINDS}, got {unit!r}")
    compressible_share = _check_share("compressible_share", compressible_share)
    if critical_share is not None:
        critical_share = _check_share("critical_share", critical_share)
    elif isinstance(critical_factor, bool) or not isinstance(critical_factor, (int, float)) or not (
        0.0 < float(critical_factor) < float("inf")
    ):
        raise InvalidInputError(f"critical_factor must be a positive finite number, got {critical_factor!r}")
    layout = getattr(fisher, "layout", None)
    if layout is None:
        raise InvalidInputError(
            "classify_units needs the model layout and this Fisher has none; collect it with hf_fisher.collect "
            "(which records the layout) or pass layout=hf_fisher.plugins.model_layout(model) to Fisher(...)"
        )
    if (unit == "heads" and not layout.attention) or (unit == "channels" and not layout.mlp):
        raise InvalidInputError(
            f"the layout ({layout.adapter!r}) describes no {'attention heads' if unit == 'heads' else 'MLP channels'}; "
            f"classify the other unit kind or use a Fisher of a model with {unit}"
        )
    values = views.head_importance(fisher) if unit == "heads" else views.channel_importance(fisher)
    total = float(sum(values.values()))
    mean = total / len(values) if values else 0.0
    labels = dict.fromkeys(values, "ordinary")
    critical_above = None
    if total > 0:
        if critical_share is None:
            critical_above = float(critical_factor) * mean
            for u, v in values.items():
                if v > critical_above:
                    labels[u] = "critical"
        else:
            acc = 0.0
            ranked = sorted(values, key=lambda u: (-values[u], u))
            for u in ranked:
                if acc >= critical_share * total:
                    critical_above = values[u]
                    break
                labels[u] = "critical"
                acc += values[u]
    mass = 0.0
    for u in sorted(values, key=lambda u: (values[u], u)):
        if labels[u] == "critical" or mass + values[u] > compressible_share * total:
            break
        labels[u] = "compressible"
        mass += values[u]
    thresholds = {
        "rule": "factor" if critical_share is None else "share",
        "critical_factor": None if critical_share is not None else float(critical_factor),
        "critical_share": critical_share,
        "compressible_share": compressible_share,
        "total": total,
        "mean": mean,
        "critical_above": critical_above,
        "compressible_mass": mass,
    }
    return UnitLabels(unit, labels, values, thresholds)
