"""Built-in consumers "importance" (ranked tables of the most important units) and "compare"
(similarity of two tasks' Fishers). Thin wrappers over :mod:`hf_fisher.analysis`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

from hf_fisher import analysis
from hf_fisher.hookspecs import hookimpl

if TYPE_CHECKING:  # pragma: no cover
    from hf_fisher.fisher import Fisher

__all__ = ["importance", "compare_tasks", "hf_fisher_register_consumers"]


def _top_units(scores: dict[tuple[int, int], float], k: int, total: float, key: str) -> list[dict[str, Any]]:
    ranked = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    return [
        {"rank": r + 1, "layer": lay, key: unit, "value": v, "share": v / total if total > 0 else 0.0}
        for r, ((lay, unit), v) in enumerate(ranked)
    ]


def importance(fisher: "Fisher", *, k: int = 20, params: Iterable[str] | None = None) -> dict[str, Any]:
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
            "layer": analysis.layer_index(fisher, name),
            "value": value,
            "share": value / total if total > 0 else 0.0,
        }
        for r, (name, group, value) in enumerate(analysis.top_k(fisher, k, params=params))
    ]
    layers = [
        {"layer": layer, "value": v, "share": v / total if total > 0 else 0.0}
        for layer, v in analysis.per_layer(fisher).items()
    ]
    layout = fisher.layout
    heads = (
        _top_units(analysis.head_importance(fisher), k, total, "head")
        if layout is not None and layout.attention
        else []
    )
    channels = (
        _top_units(analysis.channel_importance(fisher), k, total, "channel")
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


def compare_tasks(a: "Fisher", b: "Fisher", *, k: int = 100) -> dict[str, Any]:
    """Similarity of two Fishers (cosine, Pearson, Spearman, top-k overlap); see
    :func:`hf_fisher.analysis.compare`."""
    return analysis.compare(a, b, k=k)


@hookimpl
def hf_fisher_register_consumers(register) -> None:
    register("importance", importance)
    register("compare", compare_tasks)
