"""Built-in consumer "report": a folder with a tall CSV, a readable summary and plots of one or two
Fisher artifacts (e.g. two tasks on the same model).

Files written by :func:`write_report` (atomically: a temporary folder beside ``out``, renamed into
place, :mod:`hf_fisher.artifacts.atomic`):

- ``report.csv``: columns ``run, layer, head, metric, value`` (:data:`CSV_COLUMNS`), one row per
  number. Notation: ``F`` the Fisher values of the artifact, ``F(slices)`` their sum over slices
  (:func:`hf_fisher.analysis.slice_value`), ``H``/``H_kv`` query/kv heads of the layer.

  ========================================  ==========  =======  ==================================
  metric                                    layer       head     value
  ========================================  ==========  =======  ==================================
  ``trace``                                 ``global``  ``all``  ``Σ F`` (:meth:`Fisher.total`)
  ``trace_per_param``                       ``global``  ``all``  ``Σ F / N``, N model parameters
  ``samples`` / ``tokens``                  ``global``  ``all``  :attr:`Fisher.counts`
  ``layer_total``                           layer [#]_  ``all``  :meth:`Fisher.per_layer`
  ``mlp_total``                             layer       ``all``  ``Σ_c`` channel_importance
  ``group_fisher_q`` / ``_o``               layer       head     ``F(Q rows)`` / ``F(O columns)``
  ``group_fisher_k`` / ``_v``               layer       head     ``F(K rows)`` / ``F(V rows)`` of
                                                                 the head's kv-head (not split)
  ``head_total``                            layer       head     ``q + o + (k + v) · H_kv / H``
                                                                 (:meth:`Fisher.head_importance`)
  ``head_total_stderr_bound``               layer       head     see below (only with variances)
  ``head_total_ci95_halfwidth_bound``       layer       head     ``t_{0.975, n-1} ·`` the bound

  ``spectral_eigmax``                       layer       head     λ_1 of the head's empirical
                                                                 Fisher block (only with spectra)
  ``spectral_condition_number``             layer       head     λ_1 / λ_r on its range
  ``spectral_energy_r8``                    layer       head     low-rank energy Σ_{j≤8} λ_j / tr
  ``spectral_rank``                         layer       head     numerical rank r
  ========================================  ==========  =======  ==================================

  .. [#] ``other`` for parameters outside the layer stack (embeddings, final norm, LM head).

  **Per-head spectral metrics** (``spectral_*``, the seeds' condition number, largest eigenvalue
  and low-rank energy) are the :func:`~hf_fisher.consumers.spectrum.capacity_metrics` of the
  block ``F_bb`` of head b (its Q rows, its kv-head's K/V rows, its O columns) of the *full*
  empirical Fisher, from :func:`hf_fisher.consumers.spectrum.spectrum` with ``blocks="head"``
  (exact, from the N x N Gram matrix of per-sample gradients). A diagonal artifact does not hold
  the off-diagonal entries they need, so they are written only when ``spectra=`` is given
  (``hf-fisher analyze`` computes them when its per-sample gradient matrix fits; ``hf-fisher
  report`` on artifact folders cannot, and the summary says so). Values are the spectrum's own.

  Values are written with ``repr(float)``, so they read back exactly equal to the artifact's.
  **Uncertainty bound**: ``head_total`` sums several stored values (groups, or elements of a
  parameter-level Fisher) whose covariances are not stored; its standard error is bounded with the
  triangle inequality ``sd(Σ_g a_g X_g) <= Σ_g a_g sd(X_g)``: ``se_bound = Σ_{g in Q, O} se_g +
  (H_kv / H) Σ_{g in K, V} se_g`` with ``se_g = sqrt(Var_i(C_ig) / n)`` (:meth:`Fisher.stderr`).
  It is conservative (exact only for perfectly correlated groups), not an estimate.
- ``summary.txt``: curvature scale, layers ranked, hotspots (top ``k`` heads and channels with
  their share of the trace), critical / compressible units with the thresholds of
  :func:`hf_fisher.analysis.importance.classify_units`, and for two runs a comparison
  (:func:`hf_fisher.analysis.compare`).
- PNG plots when matplotlib is installed (Agg backend, imported lazily): ``heads_qkvo_run<i>.png``
  (layer x head heatmaps of Q/K/V/O group Fisher), ``mlp_per_layer_run<i>.png``,
  ``head_uncertainty_run<i>.png`` (with variances), ``heads_scatter.png`` (two runs).
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_fisher import analysis
from hf_fisher.analysis.importance import UnitLabels, classify_units
from hf_fisher.analysis.summary import (
    fmt as _e,
)
from hf_fisher.analysis.summary import (
    has_heads as _has_heads,
)
from hf_fisher.analysis.summary import (
    has_mlp as _has_mlp,
)
from hf_fisher.analysis.summary import (
    listing as _listing,
)
from hf_fisher.analysis.summary import (
    num_params as _num_params,
)
from hf_fisher.analysis.summary import (
    pct as _pct,
)
from hf_fisher.analysis.summary import (
    rule_text as _rule_text,
)
from hf_fisher.analysis.summary import (
    summary_markdown,
)
from hf_fisher.analysis.summary import (
    unit_label as _unit,
)
from hf_fisher.consumers.plotting import discrete_colormap, integer_ticks
from hf_fisher.errors import ArtifactError, InvalidInputError
from hf_fisher.hookspecs import hookimpl

if TYPE_CHECKING:  # pragma: no cover
    from hf_fisher.artifacts.fisher import Fisher

__all__ = [
    "CSV_COLUMNS",
    "ReportResult",
    "head_table",
    "hf_fisher_register_consumers",
    "report_rows",
    "summary_markdown",
    "write_report",
]

logger = logging.getLogger(__name__)

CSV_NAME = "report.csv"
SUMMARY_NAME = "summary.txt"
CSV_COLUMNS = ("run", "layer", "head", "metric", "value")
PLOTS_HINT = 'pip install "hf-fisher[plots]"'
ROLES = "qkvo"
SPECTRAL_METRICS = {"spectral_eigmax": "eigmax", "spectral_condition_number": "condition_number",
                    "spectral_energy_r8": "energy_r8", "spectral_rank": "rank"}
"""CSV metric -> key of the spectrum's per-head :func:`~hf_fisher.consumers.spectrum.capacity_metrics`."""


@dataclass
class ReportResult:
    """What :func:`write_report` wrote: ``out`` (the folder), ``files`` (the names of the files in
    it), ``summary`` (the text of summary.txt) and ``notes`` (e.g. why there are no plots)."""

    out: Path
    files: list[str]
    summary: str
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------- numbers
def _stderr_fisher(fisher: Fisher) -> Fisher | None:
    """The same artifact with ``se = sqrt(Var/n)`` as its values (None without variances)."""
    if not fisher.has_variance or set(fisher.names()) - set(fisher.variances):
        return None
    return fisher._replace(mean={n: analysis.stderr(fisher, n) for n in fisher.names()}, variance=None)


def head_table(fisher: Fisher) -> dict[tuple[int, int], dict[str, float]]:
    """Per attention head ``{(layer, head): {metric: value}}`` with the head metrics of the CSV:
    ``group_fisher_q/k/v/o`` (``Σ`` slice_value over the head's slices of that role, parameters
    missing from the Fisher contributing nothing), ``head_total`` and, with variances,
    ``head_total_stderr_bound`` and ``head_total_ci95_halfwidth_bound`` (module docstring).
    ``{}`` when the layout describes no heads or the Fisher holds none of their parameters (e.g. the
    Fisher of a LoRA adapter)."""
    layout = fisher.layout
    if not _has_heads(fisher):
        return {}
    totals = analysis.head_importance(fisher)
    se_f = _stderr_fisher(fisher)
    bound = analysis.head_importance(se_f) if se_f is not None else None
    n = analysis.effective_count(fisher)
    t = math.inf
    if n >= 2:
        from scipy import stats as sps

        t = float(sps.t.ppf(0.975, df=n - 1))
    out: dict[tuple[int, int], dict[str, float]] = {}
    for h in layout.heads():
        key = (h.layer, h.head)
        row = {
            f"group_fisher_{r}": float(sum(analysis.slice_value(fisher, s) for s in getattr(h, r) if s.param in fisher))
            for r in ROLES
        }
        row["head_total"] = totals[key]
        if bound is not None:
            row["head_total_stderr_bound"] = bound[key]
            row["head_total_ci95_halfwidth_bound"] = t * bound[key]
        out[key] = row
    return out


def _mlp_per_layer(fisher: Fisher) -> dict[int, float]:
    if not _has_mlp(fisher):
        return {}
    out: dict[int, float] = {}
    for (layer, _), v in analysis.channel_importance(fisher).items():
        out[layer] = out.get(layer, 0.0) + v
    return out


def report_rows(fisher: Fisher, run: str) -> list[tuple[str, str, str, str, float | int]]:
    """The CSV rows ``(run, layer, head, metric, value)`` of one Fisher (see the module docstring)."""
    g = ("global", "all")
    rows: list[tuple[str, str, str, str, float | int]] = [
        (run, *g, "trace", fisher.total()),
        (run, *g, "trace_per_param", fisher.total() / max(1, _num_params(fisher))),
        (run, *g, "samples", fisher.counts.samples),
        (run, *g, "tokens", fisher.counts.tokens),
    ]
    for layer, v in analysis.per_layer(fisher).items():
        rows.append((run, "other" if layer is None else str(layer), "all", "layer_total", v))
    for layer, v in _mlp_per_layer(fisher).items():
        rows.append((run, str(layer), "all", "mlp_total", v))
    for (layer, head), metrics in head_table(fisher).items():
        rows.extend((run, str(layer), str(head), m, v) for m, v in metrics.items())
    return rows


def _csv_value(v: float | int) -> str:
    return str(v) if isinstance(v, int) else repr(float(v))


# ---------------------------------------------------------------------------- one run
@dataclass
class _Run:
    name: str
    fisher: Fisher
    heads: dict[tuple[int, int], dict[str, float]]
    channels: dict[tuple[int, int], float]
    mlp: dict[int, float]
    head_labels: UnitLabels | None
    channel_labels: UnitLabels | None
    rows: list
    missing: list[str]
    spectral: dict[tuple[int, int], dict[str, float]] = field(default_factory=dict)
    spectral_note: str = ""


def head_spectral_metrics(spec: Any) -> dict[tuple[int, int], dict[str, float]]:
    """``{(layer, head): {spectral metric: value}}`` (:data:`SPECTRAL_METRICS`) from the head
    blocks ``layer{l}.head{h}`` of a :class:`~hf_fisher.consumers.spectrum.SpectrumResult`."""
    import re

    out = {}
    for name, block in spec.blocks.items():
        m = re.fullmatch(r"layer(\d+)\.head(\d+)", name)
        if m:
            out[(int(m.group(1)), int(m.group(2)))] = {k: block.metrics[v] for k, v in SPECTRAL_METRICS.items()}
    return out


def _check_spectra(spectra: Any, pairs: list) -> list:
    """One SpectrumResult with head blocks (or None) per run, its heads those of the run's layout."""
    from hf_fisher.consumers.spectrum import SpectrumResult

    if spectra is None:
        return [None] * len(pairs)
    items = [spectra] if isinstance(spectra, SpectrumResult) else list(spectra)
    if len(items) != len(pairs):
        raise InvalidInputError(f"spectra must hold one SpectrumResult (or None) per Fisher: {len(pairs)}, got {len(items)}")
    for i, (spec, (fisher, _)) in enumerate(zip(items, pairs), 1):
        if spec is None:
            continue
        if not isinstance(spec, SpectrumResult):
            raise InvalidInputError(f"spectra[{i - 1}] must be a hf_fisher SpectrumResult or None, got {type(spec).__name__}")
        heads = head_spectral_metrics(spec)
        if not heads:
            raise InvalidInputError(f"spectra[{i - 1}] has no per-head blocks: compute it with spectrum(..., blocks='head')")
        known = {(h.layer, h.head) for h in fisher.layout.heads()}
        alien = sorted(set(heads) - known)
        if alien:
            raise InvalidInputError(f"spectra[{i - 1}] has heads {alien[:3]} that Fisher {i}'s model does not have; "
                                    "pass the spectrum of the same model")
    return items


def _analyse(fisher: Fisher, name: str, spec: Any = None) -> _Run:
    has_heads, has_mlp = _has_heads(fisher), _has_mlp(fisher)
    missing = [
        f"no {what}: the layout ({fisher.layout.adapter!r}) describes none, or the Fisher holds none of their "
        "parameters (e.g. a Fisher of adapter weights only)"
        for what, ok in (("attention heads", has_heads), ("MLP channels", has_mlp)) if not ok
    ]
    run = _Run(
        name=name,
        fisher=fisher,
        heads=head_table(fisher),
        channels=analysis.channel_importance(fisher) if has_mlp else {},
        mlp=_mlp_per_layer(fisher),
        head_labels=classify_units(fisher, unit="heads") if has_heads else None,
        channel_labels=classify_units(fisher, unit="channels") if has_mlp else None,
        rows=report_rows(fisher, name),
        missing=missing,
    )
    if spec is None:
        run.spectral_note = (
            "not computed: they need per-sample gradients, which a diagonal Fisher artifact does not hold; pass "
            "spectra= (hf_fisher.spectrum(model, batches, blocks='head')) or use hf-fisher analyze")
    else:
        run.spectral = head_spectral_metrics(spec)
        run.rows += [(name, str(l), str(h), m, v) for (l, h), ms in sorted(run.spectral.items()) for m, v in ms.items()]
        run.spectral_note = (f"exact blocks of the empirical Fisher from {spec.n_samples} samples (spectrum, blocks='head')"
                             + ("" if spec.n_samples == fisher.counts.samples else
                                f"; the Fisher artifact counts {fisher.counts.samples} samples"))
    return run


def _run_summary(run: _Run, k: int) -> list[str]:
    f = run.fisher
    md = f.metadata
    total = f.total()
    lines = [
        f'Run "{run.name}"',
        "-" * (len(run.name) + 6),
        f"task {md.task!r}, estimator {md.estimator}, reduction {f.reduction}, model {md.model_name_or_path or 'unknown'}, "
        f"{f.counts.samples} samples, {f.counts.tokens} label tokens",
        "",
        "Curvature scale",
        f"  trace (sum of all Fisher values) = {_e(total)}",
        f"  per-parameter mean = trace / {_num_params(f)} parameters = {_e(total / max(1, _num_params(f)))}",
        "",
        "Layers ranked by Fisher mass (share of the trace)",
    ]
    per_layer = analysis.per_layer(f)
    attn: dict[int, float] = {}
    for (layer, _), m in run.heads.items():
        attn[layer] = attn.get(layer, 0.0) + m["head_total"]
    ranked = sorted(per_layer.items(), key=lambda kv: -kv[1])
    for i, (layer, v) in enumerate(ranked, 1):
        where = "outside the layers (embeddings, final norm, LM head)" if layer is None else f"layer {layer}"
        parts = []
        if layer in attn:
            parts.append(f"heads {_e(attn[layer])}")
        if layer in run.mlp:
            parts.append(f"MLP {_e(run.mlp[layer])}")
        extra = f"  [{', '.join(parts)}]" if parts else ""
        lines.append(f"  {i:3d}. {where}: {_e(v)} ({_pct(v, total)}){extra}")
    lines += [f"Note: {m}" for m in run.missing]
    if run.heads:
        lines += ["", f"Hotspots: top {k} heads (head total, share of the trace; Q/O group Fisher of the head, K/V of its kv-head)"]
        top = sorted(run.heads.items(), key=lambda kv: (-kv[1]["head_total"], kv[0]))[:k]
        for i, (u, m) in enumerate(top, 1):
            se = f" +- {_e(m['head_total_stderr_bound'])} (se bound)" if "head_total_stderr_bound" in m else ""
            qkvo = " ".join(f"{r.upper()} {_e(m[f'group_fisher_{r}'])}" for r in ROLES)
            lines.append(f"  {i:3d}. layer {u[0]} head {u[1]}: {_e(m['head_total'])}{se} ({_pct(m['head_total'], total)}); {qkvo}")
    if run.channels:
        lines += ["", f"Hotspots: top {k} MLP channels (channel total, share of the trace)"]
        top_c = sorted(run.channels.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
        for i, (u, v) in enumerate(top_c, 1):
            lines.append(f"  {i:3d}. layer {u[0]} channel {u[1]}: {_e(v)} ({_pct(v, total)})")
    for lab in (run.head_labels, run.channel_labels):
        if lab is None:
            continue
        crit, comp = _rule_text(lab)
        name = "heads" if lab.unit == "heads" else "MLP channels"
        lines += [
            "",
            f"Critical {name} (protect: keep precision, do not prune) - rule: {crit}",
            f"  {_listing(lab, 'critical', k)}",
            f"Compressible {name} (candidates to prune, quantise or merge freely) - rule: {comp}",
            f"  {_listing(lab, 'compressible', k)} (together {_e(lab.thresholds['compressible_mass'])} of "
            f"{_e(lab.thresholds['total'])})",
        ]
    if run.heads:
        lines += ["", "Per-head spectra (largest eigenvalue, condition number on the range, low-rank energy of the top 8)"]
        if not run.spectral:
            lines.append(f"  {run.spectral_note}")
        else:
            lines.append(f"  {run.spectral_note}; top {k} heads by largest eigenvalue:")
            top_s = sorted(run.spectral.items(), key=lambda kv: (-kv[1]["spectral_eigmax"], kv[0]))[:k]
            for i, (u, m) in enumerate(top_s, 1):
                lines.append(f"  {i:3d}. layer {u[0]} head {u[1]}: eigmax {_e(m['spectral_eigmax'])}, condition number "
                             f"{_e(m['spectral_condition_number'])}, energy(top 8) {100 * m['spectral_energy_r8']:.1f} %, "
                             f"rank {m['spectral_rank']}")
    bounded = [m for m in run.heads.values() if "head_total_stderr_bound" in m and m["head_total"] > 0]
    if bounded:
        rel = sorted(m["head_total_stderr_bound"] / m["head_total"] for m in bounded)
        lines += [
            "",
            "Uncertainty of head totals (se bound = sum of group standard errors, a conservative upper bound)",
            f"  relative se bound: median {100 * rel[len(rel) // 2]:.1f} %, max {100 * rel[-1]:.1f} % "
            f"over {len(rel)} heads ({f.counts.samples} samples)",
        ]
    return lines


def _comparison(a: _Run, b: _Run, k: int) -> list[str]:
    c = analysis.compare(a.fisher, b.fisher, k=k)
    lines = [
        f'Comparison: "{a.name}" vs "{b.name}"',
        f"  over {c['num_elements']} {c['unit']} values of {c['num_params']} common parameters",
        f"  cosine {c['cosine']:.4f}, Pearson {c['pearson']:.4f}, Spearman {c['spearman']:.4f}, "
        f"top-{c['k']} overlap {c['topk_overlap']:.3f}",
    ]
    common = sorted(set(a.heads) & set(b.heads))
    if common:
        kk = min(k, len(common))

        def top(run: _Run) -> set:
            return set(sorted(common, key=lambda u: (-run.heads[u]["head_total"], u))[:kk])

        lines.append(f"  heads: top-{kk} overlap of head totals {len(top(a) & top(b)) / kk:.3f} over {len(common)} common heads")
    if c["only_in_a"] or c["only_in_b"]:
        lines.append(f"  parameters in one run only: {len(c['only_in_a'])} in \"{a.name}\", {len(c['only_in_b'])} in \"{b.name}\"")
    return lines


# ---------------------------------------------------------------------------- plots
def _matplotlib():
    """``(Figure, FigureCanvasAgg, LogNorm)``, or None when matplotlib is not importable."""
    try:
        import matplotlib  # noqa: F401  (first: a blocked top-level package blocks its cached submodules too)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import LogNorm
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure, FigureCanvasAgg, LogNorm


def _save(mpl, fig, path: Path) -> None:
    mpl[1](fig)  # attach the Agg canvas (no pyplot, no global backend state)
    fig.savefig(path, dpi=100)


def _grid(run: _Run, metric: str):
    layers = sorted({u[0] for u in run.heads})
    width = max(u[1] for u in run.heads) + 1
    grid = [[math.nan] * width for _ in layers]
    for (layer, head), m in run.heads.items():
        grid[layers.index(layer)][head] = m[metric]
    return layers, grid


def figures(runs: list[_Run], mpl) -> list[tuple[str, Any]]:
    """``(file name, matplotlib Figure)`` of every plot of the report (module docstring)."""
    Figure, _, LogNorm = mpl
    files: list[tuple[str, Any]] = []
    for i, run in enumerate(runs, 1):
        if run.heads:
            fig = Figure(figsize=(10, 8), layout="constrained")
            for j, r in enumerate(ROLES):
                ax = fig.add_subplot(2, 2, j + 1)
                layers, grid = _grid(run, f"group_fisher_{r}")
                vals = [v for row in grid for v in row if not math.isnan(v)]
                norm = LogNorm() if vals and min(vals) > 0 else None
                im = ax.imshow(grid, aspect="auto", cmap="viridis", norm=norm, interpolation="nearest")
                ax.set_title(f"{r.upper()} group Fisher")
                ax.set_xlabel("query head")
                ax.set_ylabel("layer")
                integer_ticks(ax.xaxis, list(range(len(grid[0]))), max_ticks=16)
                integer_ticks(ax.yaxis, layers)
                cbar = fig.colorbar(im, ax=ax)
                cbar.set_label(f"Σ F over the head's {r.upper()} slices" + (" (log scale)" if norm is not None else ""))
            fig.suptitle(f"{run.name}: group Fisher per head (K/V: the head's kv-head)")
            files.append((f"heads_qkvo_run{i}.png", fig))
        if run.mlp:
            fig = Figure(figsize=(8, 4), layout="constrained")
            ax = fig.add_subplot(1, 1, 1)
            layers = sorted(run.mlp)
            ax.bar([str(x) for x in layers], [run.mlp[x] for x in layers])
            ax.set_xlabel("layer")
            ax.set_ylabel("MLP Fisher (sum over channels)")
            ax.set_title(f"{run.name}: MLP importance per layer")
            files.append((f"mlp_per_layer_run{i}.png", fig))
        bounded = [(u, m) for u, m in sorted(run.heads.items()) if "head_total_stderr_bound" in m]
        if bounded:
            fig = Figure(figsize=(min(max(7.0, 0.3 * len(bounded)), 16.0), 4.5), layout="constrained")
            ax = fig.add_subplot(1, 1, 1)
            ax.errorbar(range(len(bounded)), [m["head_total"] for _, m in bounded],
                        yerr=[m["head_total_stderr_bound"] for _, m in bounded], fmt="o", capsize=2, markersize=4)
            if len(bounded) <= 32:  # one readable label per head
                ax.set_xticks(range(len(bounded)), [_unit("heads", u) for u, _ in bounded], rotation=90, fontsize=9)
                ax.set_xlabel("head")
            else:  # one label per layer at its first head, a minor tick per head, a line between layers
                starts = [p for p, (u, _) in enumerate(bounded) if p == 0 or u[0] != bounded[p - 1][0][0]]
                ax.set_xticks(starts, [f"L{bounded[p][0][0]}" for p in starts], fontsize=9)
                ax.set_xticks(range(len(bounded)), minor=True)
                for p in starts[1:]:
                    ax.axvline(p - 0.5, color="grey", linewidth=0.5, alpha=0.6)
                ax.set_xlabel("head, grouped by layer (label at each layer's head 0)")
            ax.set_xlim(-0.5, len(bounded) - 0.5)
            ax.set_ylabel("head total ± se bound")
            ax.set_title(f"{run.name}: head totals with a conservative standard-error bound")
            files.append((f"head_uncertainty_run{i}.png", fig))
    if len(runs) == 2:
        a, b = runs
        common = sorted(set(a.heads) & set(b.heads))
        if common:
            fig = Figure(figsize=(5.5, 5), layout="constrained")
            ax = fig.add_subplot(1, 1, 1)
            x = [a.heads[u]["head_total"] for u in common]
            y = [b.heads[u]["head_total"] for u in common]
            layers = sorted({u[0] for u in common})
            from matplotlib.colors import BoundaryNorm

            cmap = discrete_colormap("viridis", len(layers))
            norm = BoundaryNorm([i - 0.5 for i in range(len(layers) + 1)], cmap.N)
            pts = ax.scatter(x, y, c=[layers.index(u[0]) for u in common], cmap=cmap, norm=norm, s=14)
            lo, hi = min(x + y), max(x + y)
            ax.plot([lo, hi], [lo, hi], color="grey", linewidth=0.8, linestyle="--", label="y = x")
            if min(x + y) > 0:
                ax.set_xscale("log")
                ax.set_yscale("log")
                from matplotlib.ticker import FormatStrFormatter, LogLocator

                # labels at 10^k, and at 2, 5 x 10^k only when the axis spans at most two decades
                # (over a wider span they crowd into each other)
                few_decades = hi / lo <= 100
                for axis in (ax.xaxis, ax.yaxis):
                    axis.set_major_formatter(FormatStrFormatter("%.3g"))
                    if few_decades:
                        axis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
                        axis.set_minor_formatter(FormatStrFormatter("%.3g"))
            ax.legend(loc="best", fontsize=9)  # where it hides the fewest points
            cbar = fig.colorbar(pts, ax=ax)
            cbar.set_label("layer")
            integer_ticks(cbar.ax.yaxis, layers)
            ax.set_xlabel(f"{a.name}: head total")
            ax.set_ylabel(f"{b.name}: head total")
            ax.set_title(f"head totals, {a.name} vs {b.name} (one point per head)")
            files.append(("heads_scatter.png", fig))
    return files


def _plots(runs: list[_Run], tmp: Path, mpl) -> list[str]:
    names = []
    for name, fig in figures(runs, mpl):
        _save(mpl, fig, tmp / name)
        names.append(name)
    return names


# ---------------------------------------------------------------------------- inputs
def _load(item: Any) -> Fisher:
    from hf_fisher.artifacts.fisher import Fisher

    if isinstance(item, Fisher):
        return item
    if isinstance(item, (str, os.PathLike)):
        path = Path(os.fspath(item))
        if not path.is_dir():
            raise InvalidInputError(f"{path} is not a folder; pass a Fisher artifact folder written by Fisher.save_pretrained")
        try:
            return Fisher.from_pretrained(path)
        except ArtifactError as e:
            raise InvalidInputError(f"{path} is not a readable Fisher artifact: {e}") from e
    raise InvalidInputError(f"expected a Fisher or an artifact folder path, got {type(item).__name__}")


def _inputs(fishers: Any, names: Sequence[str] | None) -> list[tuple[Fisher, str]]:
    from hf_fisher.artifacts.fisher import Fisher

    if isinstance(fishers, (Fisher, str, os.PathLike)):
        items = [fishers]
    else:
        try:
            items = list(fishers)
        except TypeError:
            raise InvalidInputError(
                f"expected a Fisher, an artifact folder path, or a list of one or two of them, got {type(fishers).__name__}"
            ) from None
    if not 1 <= len(items) <= 2:
        raise InvalidInputError(f"a report takes one or two Fishers (to compare two runs), got {len(items)}")
    loaded = [_load(x) for x in items]
    for i, f in enumerate(loaded):
        if f.layout is None:
            raise InvalidInputError(
                f"Fisher {i + 1} has no model layout, so heads and channels are unknown; collect it with "
                "hf_fisher.collect (which records the layout) or pass layout=hf_fisher.plugins.model_layout(model)"
            )
    if names is None:
        tasks = [str(f.metadata.task) for f in loaded]
        run_names = tasks if len(set(tasks)) == len(tasks) else [f"{t}#{i + 1}" for i, t in enumerate(tasks)]
    else:
        run_names = [names] if isinstance(names, str) else list(names)
        if len(run_names) != len(loaded) or not all(isinstance(n, str) and n for n in run_names):
            raise InvalidInputError(f"names must be {len(loaded)} non-empty string(s), one per Fisher, got {names!r}")
        if len(set(run_names)) != len(run_names):
            raise InvalidInputError(f"names must differ (they are the CSV's run column), got {run_names}")
    return list(zip(loaded, run_names))


def _is_report_file(name: str) -> bool:
    return name in (CSV_NAME, SUMMARY_NAME) or name.endswith(".png")


# ---------------------------------------------------------------------------- entry point
def write_report(
    fishers: Any,
    out: str | os.PathLike,
    *,
    names: Sequence[str] | None = None,
    k: int = 10,
    overwrite: bool = False,
    spectra: Any = None,
) -> ReportResult:
    """Write a report of one or two Fishers (objects or artifact folder paths) into folder ``out``.

    ``names``: the run names (CSV column ``run``), default each Fisher's task (``task#1``,
    ``task#2`` when both tasks are equal); ``k``: hotspots listed per kind. Every input is
    checked before anything is written (:class:`InvalidInputError`: not one or two Fishers, a path
    that is not an artifact, a Fisher without layout, bad ``names``/``k``, an ``out`` that is not
    empty — unless ``overwrite`` and it holds only report files). The folder is written
    atomically. Files and definitions: module docstring. Without matplotlib the CSV and text are
    still written and ``notes`` says how to get the plots. ``spectra``: one
    :class:`~hf_fisher.consumers.spectrum.SpectrumResult` with ``blocks="head"`` (or None) per
    Fisher, whose per-head metrics go to the CSV (``spectral_*``) and the summary.
    """
    from hf_fisher.artifacts.atomic import atomic_folder, check_target

    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidInputError(f"k must be a positive integer (hotspots per kind), got {k!r}")
    pairs = _inputs(fishers, names)
    specs = _check_spectra(spectra, pairs)
    try:
        target = check_target(out, allowed=_is_report_file, what="report", overwrite=overwrite)
    except ArtifactError as e:
        raise InvalidInputError(str(e)) from e
    runs = [_analyse(f, n, s) for (f, n), s in zip(pairs, specs)]
    lines = ["hf_fisher report", "================", ""]
    for run in runs:
        lines += [*_run_summary(run, k), ""]
    if len(runs) == 2:
        lines += [*_comparison(runs[0], runs[1], k), ""]
    notes: list[str] = []
    mpl = _matplotlib()
    if mpl is None:
        notes.append(f"matplotlib is not installed, so no plots were drawn; {PLOTS_HINT} to get them")
        logger.warning("report %s: %s", target, notes[-1])
    with atomic_folder(target, what="report") as tmp:
        with open(tmp / CSV_NAME, "w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(CSV_COLUMNS)
            for run in runs:
                writer.writerows((*row[:4], _csv_value(row[4])) for row in run.rows)
        plots = _plots(runs, tmp, mpl) if mpl is not None else []
        lines += ["Files", f"  {CSV_NAME}: columns {', '.join(CSV_COLUMNS)}", *(f"  {p}" for p in plots)]
        lines += [f"Note: {n}" for n in notes]
        summary = "\n".join(lines) + "\n"
        (tmp / SUMMARY_NAME).write_text(summary, encoding="utf-8")
    files = [CSV_NAME, SUMMARY_NAME, *plots]
    logger.info("wrote report of %d run(s) to %s: %s", len(runs), target, ", ".join(files))
    return ReportResult(out=target, files=files, summary=summary, notes=notes)


@hookimpl
def hf_fisher_register_consumers(register) -> None:
    register("report", write_report)
