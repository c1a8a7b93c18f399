"""Text summary of a Fisher artifact, shared by its model card and the report consumer.

Notation as in :mod:`hf_fisher.analysis.views`: ``F`` the Fisher values, ``Σ F`` the trace (the
sum of all stored values, :meth:`~hf_fisher.artifacts.fisher.Fisher.total`), ``N`` the number of model
parameters the artifact covers (``Σ_p numel(p)`` over its parameter shapes), so the per-parameter
mean is ``Σ F / N``; a head's total is ``T_h`` of :func:`~hf_fisher.analysis.views.head_importance`
and a unit's share of the trace ``100 · T / Σ F`` percent. Critical / compressible units follow the
default thresholds of :func:`~hf_fisher.analysis.importance.classify_units`.

:func:`summary_markdown` is the "Summary" section of the artifact's model card
(:mod:`hf_fisher.artifacts.cards`); the formatting helpers here (:func:`fmt`, :func:`pct`,
:func:`unit_label`, :func:`rule_text`, :func:`listing`) also write the report's ``summary.txt``
(:mod:`hf_fisher.consumers.report`), so both say the same thing the same way.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from hf_fisher.analysis.importance import UnitLabels, classify_units

if TYPE_CHECKING:  # pragma: no cover
    from hf_fisher.artifacts.fisher import Fisher

__all__ = ["fmt", "has_heads", "has_mlp", "listing", "num_params", "pct", "rule_text", "summary_markdown", "unit_label"]


def num_params(fisher: Fisher) -> int:
    """``N = Σ_p numel(p)`` over the parameters the artifact covers."""
    return sum(math.prod(shape) for shape in fisher.param_shapes.values())


def has_heads(fisher: Fisher) -> bool:
    """Whether the layout describes heads and the Fisher holds at least one of their parameters."""
    layout = fisher.layout
    return layout is not None and any(s.param in fisher for h in layout.heads() for s in h.q + h.k + h.v + h.o)


def has_mlp(fisher: Fisher) -> bool:
    """Whether the layout describes MLP channels and the Fisher holds at least one of their parameters."""
    layout = fisher.layout
    return layout is not None and any(r.param in fisher for b in layout.mlp for r in b.roles)


def fmt(x: float) -> str:
    """A Fisher value as written in summaries: 4 decimals in scientific notation."""
    return f"{x:.4e}"


def pct(v: float, total: float) -> str:
    """``v`` as a share of ``total`` in percent (``"n/a"`` for a total <= 0)."""
    return f"{100.0 * v / total:.2f} %" if total > 0 else "n/a"


def unit_label(kind: str, u: tuple[int, int]) -> str:
    """``L{layer} H{head}`` (``kind="heads"``) or ``L{layer} C{channel}``."""
    return f"L{u[0]} {'H' if kind == 'heads' else 'C'}{u[1]}"


def rule_text(lab: UnitLabels) -> tuple[str, str]:
    """Readable critical / compressible rules of a :class:`UnitLabels` with their numbers."""
    th = lab.thresholds
    kind = "head" if lab.unit == "heads" else "channel"
    if th["rule"] == "factor":
        crit = (f"value > {th['critical_factor']:g} x mean {kind} value {fmt(th['mean'])}"
                f" = {fmt(th['critical_above'] or 0.0)}")
    else:
        crit = f"largest {kind}s holding {100 * th['critical_share']:g} % of the {kind} mass"
    comp = f"smallest {kind}s together holding at most {100 * th['compressible_share']:g} % of the {kind} mass"
    return crit, comp


def listing(lab: UnitLabels, label: str, k: int) -> str:
    """``"n of N: L0 H1 (value), ..."``: the first ``k`` units with ``label`` (``UnitLabels.of`` order)."""
    units = lab.of(label)
    if not units:
        return "none"
    shown = ", ".join(f"{unit_label(lab.unit, u)} ({fmt(lab.values[u])})" for u in units[:k])
    more = f", ... and {len(units) - k} more" if len(units) > k else ""
    return f"{len(units)} of {len(lab.values)}: {shown}{more}"


def summary_markdown(fisher: Fisher, k: int = 10) -> str:
    """Short Markdown summary of a Fisher with attention heads (used in the artifact's model card):
    curvature scale (trace ``Σ F`` and per-parameter mean ``Σ F / N``), the top ``k`` heads by
    head total (:func:`hf_fisher.analysis.head_importance`) with their share of the trace, and
    the counts of critical / compressible heads and MLP channels with the default thresholds of
    :func:`~hf_fisher.analysis.importance.classify_units`. :class:`InvalidInputError` when the
    Fisher has no layout with attention heads."""
    heads = classify_units(fisher, unit="heads")
    total = fisher.total()
    n = num_params(fisher)
    top = sorted(heads.values.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    top_md = "; ".join(f"layer {u[0]} head {u[1]} = {fmt(v)} ({pct(v, total)})" for u, v in top)
    lines = [
        f"- **Curvature scale**: trace (sum of all Fisher values) {fmt(total)} over {n} parameters, "
        f"per-parameter mean {fmt(total / max(1, n))}.",
        f"- **Top {len(top)} heads** by head total (share of the trace): {top_md}.",
    ]
    kinds = [heads]
    if has_mlp(fisher):
        kinds.append(classify_units(fisher, unit="channels"))
    for lab in kinds:
        crit, comp = rule_text(lab)
        counts = lab.counts()
        name = "heads" if lab.unit == "heads" else "MLP channels"
        lines.append(f"- **Critical {name}**: {counts['critical']} of {len(lab.values)} ({crit}).")
        lines.append(f"- **Compressible {name}**: {counts['compressible']} of {len(lab.values)} ({comp}).")
    return "\n".join(lines).replace(" x ", " × ")
