"""Plain-text tables of a Fisher artifact: :func:`format_table` and :func:`format_report`, the text
``hf-fisher show`` and the demo print (top heads, top MLP channels, per-layer totals).

Imports nothing heavy (no torch) until :func:`format_report` reads an artifact's views.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from hf_fisher.errors import InvalidInputError, UnsupportedError

__all__ = ["channel_parts", "format_report", "format_table", "head_parts"]


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, title: str | None = None) -> str:
    """A plain-text table: left-aligned text columns, right-aligned numeric columns."""
    cells = [[_cell(v) for v in row] for row in rows]
    numeric = [
        all(isinstance(row[c], (int, float)) or row[c] is None for row in rows) if rows else False
        for c in range(len(headers))
    ]
    widths = [max([len(h)] + [len(r[c]) for r in cells]) for c, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    out = [title] if title else []
    out.append(line(headers))
    out.append("  ".join("-" * w for w in widths))
    out.extend(line(r) for r in cells)
    if not rows:
        out.append("(none)")
    return "\n".join(out)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) and 1e-3 <= abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def _share(value: float, total: float) -> str:
    return f"{100.0 * value / total:.1f}%" if total > 0 else "-"


def format_report(fisher: Any, *, top: int = 10, source: str | None = None) -> str:
    """Header, top heads, top MLP channels and per-layer totals of a Fisher artifact.

    Shares are the item's Fisher mass over the total of its table's kind (all heads, all
    channels, all parameters). Head and channel totals are those of
    :func:`hf_fisher.analysis.head_importance` / :func:`~hf_fisher.analysis.channel_importance`.
    A table the artifact cannot support (no layout, no heads) is replaced by a one-line note.
    """
    from hf_fisher import analysis

    md = fisher.metadata
    counts = fisher.counts
    total = fisher.total()
    header = [
        f"Fisher artifact: {source}" if source else "Fisher artifact",
        f"  task: {md.task}   estimator: {md.estimator}   reduction: {fisher.reduction}   "
        f"normalization: {md.normalization}   mode: {md.mode}",
        f"  model: {md.model_name_or_path or '-'} ({md.model_type or 'unknown type'})   data: {md.data_description or '-'}",
        f"  samples: {counts.samples}   tokens: {counts.tokens}   skipped: {counts.skipped}   "
        f"nonfinite: {getattr(counts, 'nonfinite', 0)}",
        f"  tensors: {len(fisher)}   total Fisher mass: {_cell(total)}",
    ]

    sections = ["\n".join(header)]
    layout = getattr(fisher, "layout", None)
    shapes = getattr(fisher, "param_shapes", {}) or {}
    for kind, fn, unit, parts in (
        ("attention heads", analysis.head_importance, "head", head_parts(layout, shapes)),
        ("MLP channels", analysis.channel_importance, "channel", channel_parts(layout, shapes)),
    ):
        try:
            values = fn(fisher)
        except (InvalidInputError, UnsupportedError) as e:
            sections.append(f"{kind[0].upper() + kind[1:]}: not available ({e})")
            continue
        kind_total = sum(values.values())
        rows = [
            (rank, layer, index, value, _share(value, kind_total))
            for rank, ((layer, index), value) in enumerate(_top(values, top), start=1)
        ]
        sections.append(
            format_table(["rank", "layer", unit, "Fisher", "share"], rows,
                         title=f"Top {len(rows)} of {len(values)} {kind} ({parts})")
        )
    layers = analysis.per_layer(fisher)
    layer_rows = [
        ("-" if layer is None else layer, value, _share(value, total))
        for layer, value in sorted(layers.items(), key=lambda kv: (kv[0] is None, kv[0] if kv[0] is not None else 0))
    ]
    sections.append(
        format_table(["layer", "Fisher", "share"], layer_rows,
                     title="Per-layer totals ('-' = outside the layers: embeddings, final norm, head)")
    )
    return "\n\n".join(sections)


def _module_names(params: Sequence[str]) -> dict[str, str]:
    """Short module names of parameters: ``model.layers.0.mlp.gate_proj.weight`` -> ``gate``
    (``_proj`` dropped); two components (``intermediate.dense``) where one is ambiguous."""
    def short(param: str, depth: int) -> str:
        parts = param.split(".")
        parts = parts[:-1] if len(parts) > 1 else parts  # drop "weight" / "bias"
        name = ".".join(parts[-depth:])
        stem = name[: -len("_proj")] if name.endswith("_proj") else name
        return stem if len(stem) > 1 else name  # gate_proj -> gate, but GPT-2's c_proj stays

    modules = list(dict.fromkeys(p.rsplit(".", 1)[0] for p in params))
    depth = 1
    while depth < 4 and len({short(m + ".w", depth) for m in modules}) < len(modules):
        depth += 1
    return {p: short(p, depth) for p in params}


def _axis_word(param: str, axis: int, shapes: dict) -> str:
    shape = shapes.get(param)
    if (shape is not None and len(shape) == 1) or (shape is None and param.endswith("bias")):
        return "bias"
    return {0: "row", 1: "column"}.get(axis, f"axis {axis}")


def channel_parts(layout: Any, shapes: dict | None = None) -> str:
    """What an MLP channel's total adds up, in the model's own terms: ``gate/up row + down
    column`` (LLaMA), ``c_fc column and bias + c_proj row`` (GPT-2's ``Conv1D`` weights are
    ``[in, out]``), read from the layout's first channel block."""
    blocks = getattr(layout, "mlp", None) or []
    if not blocks:
        return "its rows and columns in the MLP"
    roles = blocks[0].roles
    names = _module_names([r.param for r in roles])
    per_module: dict[str, list[str]] = {}
    for r in roles:
        words = per_module.setdefault(names[r.param], [])
        word = _axis_word(r.param, r.axis, shapes or {})
        if word not in words:
            words.append(word)
    merged: list[tuple[list[str], list[str]]] = []  # (modules, words): consecutive modules with equal words
    for module, words in per_module.items():
        if merged and merged[-1][1] == words:
            merged[-1][0].append(module)
        else:
            merged.append(([module], words))
    return " + ".join(f"{'/'.join(mods)} {' and '.join(words)}" for mods, words in merged)


def head_parts(layout: Any, shapes: dict | None = None) -> str:
    """What an attention head's total adds up: ``Q + K + V + O`` when every head has its own K, V
    (GPT-2, naming a fused QKV module), ``Q + O + its share of the kv-head's K, V`` under GQA/MQA."""
    atts = getattr(layout, "attention", None) or []
    shared = any(a.num_kv_heads < a.num_heads for a in atts)
    text = "Q + O + its share of the kv-head's K, V" if shared else "Q + K + V + O"
    heads = [h for a in atts for h in a.heads][:1]
    if heads:
        h = heads[0]
        qkv = {s.param.rsplit(".", 1)[0] for s in (*h.q, *h.k, *h.v)}
        if len(qkv) == 1:  # one fused projection (GPT-2's c_attn)
            text += f"; Q, K, V fused in {next(iter(qkv)).rsplit('.', 1)[-1]}"
    return text


def _top(values: dict, k: int) -> list:
    return sorted(values.items(), key=lambda kv: (-kv[1], kv[0]))[: max(k, 0)]
