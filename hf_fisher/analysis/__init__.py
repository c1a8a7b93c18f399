"""Analysis of Fisher artifacts: pure functions from a :class:`~hf_fisher.artifacts.fisher.Fisher` to numbers.

Modules (the artifact in, tables and numbers out; nothing is modified or written):

- :mod:`~hf_fisher.analysis.views`: group views, rankings, per-layer / head / channel / expert
  totals, comparisons, standard errors (``F_g = Σ_{j ∈ g} F_j``; the formulas are there). Its
  public names are re-exported here, so ``hf_fisher.analysis.head_importance(fisher)`` works;
- :mod:`~hf_fisher.analysis.importance`: the consumers "importance" and "compare" and
  :func:`~hf_fisher.analysis.importance.classify_units` (critical / compressible units);
- :mod:`~hf_fisher.analysis.uncertainty`: confidence intervals of unit totals (t and bootstrap);
- :mod:`~hf_fisher.analysis.summary`: the text summary shared by the model card and the report.

Layering: this package imports the artifact layer only for type checking and never imports
:mod:`hf_fisher.consumers` at module level (consumers build on analysis, not the reverse). The
submodules other than ``views`` are imported on first use (``hf_fisher.analysis.uncertainty``).
"""

from __future__ import annotations

import importlib
from typing import Any

from hf_fisher.analysis import views
from hf_fisher.analysis.views import (
    channel_groups,
    channel_importance,
    compare,
    confidence_interval,
    effective_count,
    expand,
    expert_channel_importance,
    expert_importance,
    group_coordinates,
    group_of,
    group_range,
    group_view,
    head_importance,
    layer_index,
    normalized,
    per_layer,
    resolve_groups,
    slice_groups,
    slice_value,
    stderr,
    top_k,
)

__all__ = [  # the public names of views, as hf_fisher/analysis.py had them
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

_SUBMODULES = ("views", "importance", "uncertainty", "summary")


def __getattr__(name: str) -> Any:
    """Submodules on first use; any other name (the private helpers included) from :mod:`views`,
    as when ``hf_fisher.analysis`` was a single module."""
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    try:
        return getattr(views, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))
