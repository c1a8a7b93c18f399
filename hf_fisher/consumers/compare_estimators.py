"""Built-in consumer "compare_estimators": run several curvature estimators on the same data and
compare their cost and their answers in one table.

:func:`compare_estimators` materialises ``batches`` once into a list, so every method sees exactly
the same data, then runs each method in turn:

- ``"empirical"``: ``hf_fisher.collect(estimator="empirical", reduction=...)``, the diagonal
  empirical Fisher F = mean_i g_i ⊙ g_i;
- ``"true"``: ``hf_fisher.collect(estimator="true", reduction=...)``, the diagonal true Fisher
  (labels drawn from the model; Monte Carlo, ``mc_samples=1`` and ``seed=0`` by default);
- ``"kfac"``: ``hf_fisher.collect(estimator="kfac")``, a :class:`hf_fisher.artifacts.kfac.KFACFisher`; its
  diagonal is ``kfac.to_diagonal()`` (it covers the Linear / Conv1D / Embedding weights only, so
  norm weights are absent from it);
- ``"spectrum"``: :func:`hf_fisher.consumers.spectrum.spectrum` (Lanczos / ``eigsh`` top-k of
  the empirical Fisher by default; ``options={"spectrum": {"curvature": "ggn"}}`` for the GGN),
  with ``blocks=None`` and ``slq_vectors=0`` unless the options say otherwise. It has no
  diagonal, so it takes no part in the agreement table.

Per method, a row (:attr:`EstimatorComparison.rows`) with:

- ``seconds``: wall time (``time.perf_counter``) of the method's call;
- ``peak_memory_mb`` and ``memory_source``: on CUDA, ``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats`` minus the memory allocated at the start (``"cuda"``: exact, for
  the PyTorch caching allocator only). On CPU, the growth of the process's resident set size
  (RSS) over its value at the start, sampled every 2 ms by a background thread reading
  ``/proc/self/statm`` (``"rss-sampled"``). Its limits: a spike shorter than the sampling period
  can be missed; it counts the whole process (any other thread's allocations too); memory freed
  by the allocator but kept by the process (glibc arenas) makes a later method look cheaper;
  pages already resident from an earlier method are not counted again. Without ``/proc`` the
  growth of ``resource.getrusage().ru_maxrss`` (the process's lifetime peak) is used
  (``"ru_maxrss"``): a lower bound, 0 whenever the method stayed below an earlier peak.
  tracemalloc is not used: it does not see PyTorch's tensor allocations;
- ``trace``: the sum of the diagonal (``Fisher.total()``; KFAC: ``to_diagonal().total()``, which
  is ``Σ_layers tr(G) tr(A)``); for ``spectrum`` its Hutchinson estimate (``trace_stderr`` its
  standard error; the exact ``‖G‖_F²/N`` is in ``details["trace_exact"]`` when kept);
- ``top_eigenvalues`` (k of them, descending) and ``condition_number`` where the method gives
  them: ``spectrum`` (eigsh, and its ``capacity["condition_number"]``: λ_1 / smallest non-zero
  eigenvalue, see :func:`~hf_fisher.consumers.spectrum.capacity_metrics`); ``kfac``, cheaply and
  exactly for the Kronecker approximation itself: the eigenvalues of a block-diagonal
  ``⊕_layers G ⊗ A`` are the products ``λ_G,i λ_A,j`` of the factors' eigenvalues, so the top k
  come from the top k of each factor of each layer, and the condition number (on the range) is
  ``max λ / min non-zero λ`` over all products (non-zero: above ``10 · dim · eps_64 · max λ``).
  Layers that share a parameter (tied embeddings) are a sum of Kronecker terms whose eigenvalues
  are not products: then both are ``None`` and ``details["eigen_note"]`` says why. The diagonal
  estimators give neither (``None``, shown as ``-``);
- ``status`` (``"ok"`` / ``"failed"``) and ``error`` (``"ErrorType: message"``): a method that
  raises is reported and the other methods still run.

Agreement (:attr:`EstimatorComparison.agreement`), for every pair of methods that returned a
diagonal (a method with itself included, as a check): with ``x``, ``y`` the two diagonals over
the parameters both cover (:func:`hf_fisher.analysis.compare`),

- ``pearson`` / ``spearman`` (``scipy.stats.spearmanr``): correlations over all elements of the
  common view: group values when ``reduction="group"`` (the KFAC diagonal is reduced to the same
  groups with ``Fisher.to_groups(layout)``), parameter elements when ``reduction="param"``;
- ``topk_overlap``: ``|top_k(x) ∩ top_k(y)| / k`` of the groups (both views reduced to the
  model's groups, ``hf_fisher.plugins.model_layout(model)``), ``k = min(top_k, #groups)``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hf_fisher.errors import EmptyDataError, InvalidInputError
from hf_fisher.hookspecs import hookimpl

__all__ = ["METHODS", "EstimatorComparison", "compare_estimators", "hf_fisher_register_consumers", "parse_methods"]

log = logging.getLogger(__name__)

METHODS = ("empirical", "true", "kfac", "spectrum")
DIAGONAL_METHODS = ("empirical", "true", "kfac")
_SPECTRUM_DEFAULTS = {"blocks": None, "slq_vectors": 0}


def parse_methods(methods: str | Sequence[str]) -> tuple[str, ...]:
    """``methods`` as a tuple of known method names (a comma-separated string or a sequence),
    refusing unknown names, duplicates and an empty list with an :class:`InvalidInputError`."""
    if isinstance(methods, str):
        names = [m.strip() for m in methods.split(",")]
    else:
        try:
            names = list(methods)
        except TypeError:
            raise InvalidInputError(f"methods must be a list of names from {list(METHODS)}, got {methods!r}") from None
    if not names or any(not isinstance(m, str) or not m for m in names):
        raise InvalidInputError(f"methods must be non-empty names from {list(METHODS)}, got {methods!r}")
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise InvalidInputError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    dup = sorted({m for m in names if names.count(m) > 1})
    if dup:
        raise InvalidInputError(f"method(s) {dup} listed more than once; list each method once")
    return tuple(names)


# ============================================================================================ memory


class _PeakMemory:
    """Peak memory growth of the block it wraps (see the module docstring for what and its limits)."""

    def __init__(self, device: torch.device, interval: float = 0.002):
        self.device = device
        self.interval = interval
        self.peak_mb: float | None = None
        self.source = ""

    @staticmethod
    def _rss() -> int | None:
        try:
            with open("/proc/self/statm", "rb") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError, AttributeError):
            return None

    @staticmethod
    def _maxrss() -> int:
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(r) if sys.platform == "darwin" else int(r) * 1024  # bytes on macOS, KiB on Linux

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            rss = self._rss()
            if rss is not None and rss > self._peak:
                self._peak = rss

    def __enter__(self) -> _PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            self.source = "cuda"
            return self
        start = self._rss()
        if start is None:
            self._start = self._maxrss()
            self.source = "ru_maxrss"
            return self
        self._start = self._peak = start
        self.source = "rss-sampled"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="hf_fisher-peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.source == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.source == "ru_maxrss":
            peak = self._maxrss()
        else:
            self._stop.set()
            self._thread.join()
            rss = self._rss()
            peak = max(self._peak, rss if rss is not None else 0)
        self.peak_mb = max(peak - self._start, 0) / 2**20


# ============================================================================================ result


def _finite(x: Any) -> Any:
    """JSON-safe: numpy scalars/arrays to Python, NaN / ±inf to None."""
    if isinstance(x, dict):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, np.ndarray):
        return [_finite(v) for v in x.tolist()]
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}" if math.isfinite(v) and (v == 0 or 1e-3 <= abs(v) < 1e5) else f"{v:.3e}"
    return str(v)


@dataclass
class EstimatorComparison:
    """What :func:`compare_estimators` measured (module docstring for every quantity).

    - ``rows``: one dict per method, in the order run, with keys ``method``, ``status``,
      ``error``, ``seconds``, ``peak_memory_mb``, ``memory_source``, ``trace``, ``trace_stderr``,
      ``top_eigenvalues``, ``condition_number``, ``num_elements`` (diagonal entries, or the
      dimension P for spectrum), ``details``;
    - ``agreement``: one dict per pair of diagonal methods (``a <= b`` in run order, self pairs
      included) with ``a``, ``b``, ``pearson``, ``spearman``, ``topk_overlap``, ``k``,
      ``num_elements``, ``unit``;
    - ``results``: the method's own result (a :class:`~hf_fisher.Fisher`, a
      :class:`~hf_fisher.artifacts.kfac.KFACFisher`, a :class:`~hf_fisher.consumers.spectrum.SpectrumResult`)
      by method name, for the methods that succeeded.
    """

    methods: tuple[str, ...]
    reduction: str
    k: int
    top_k: int
    n_batches: int
    device: str
    rows: list[dict[str, Any]]
    agreement: list[dict[str, Any]]
    results: dict[str, Any] = field(default_factory=dict, repr=False)

    def row(self, method: str) -> dict[str, Any]:
        """The row of ``method``."""
        for r in self.rows:
            if r["method"] == method:
                return r
        raise InvalidInputError(f"method {method!r} was not run; ran {list(self.methods)}")

    def pair(self, a: str, b: str) -> dict[str, Any]:
        """The agreement entry of methods ``a`` and ``b`` (either order)."""
        for p in self.agreement:
            if {p["a"], p["b"]} == {a, b} and (a != b or p["a"] == p["b"]):
                return p
        raise InvalidInputError(f"no agreement entry for {a!r} and {b!r}: both must have returned a diagonal")

    def to_dict(self) -> dict[str, Any]:
        return _finite({
            "methods": list(self.methods), "reduction": self.reduction, "k": self.k, "top_k": self.top_k,
            "n_batches": self.n_batches, "device": self.device, "rows": self.rows, "agreement": self.agreement,
        })

    def to_json(self, path: str | os.PathLike | None = None, **kwargs: Any) -> str:
        """JSON text of :meth:`to_dict` (NaN / inf as null); written to ``path`` if given."""
        text = json.dumps(self.to_dict(), **({"indent": 2} | kwargs))
        if path is not None:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text + "\n")
        return text

    def to_markdown(self) -> str:
        """The comparison as markdown: the per-method table, then the agreement table."""
        head = ["method", "status", "time (s)", "peak mem (MB)", "trace", f"top-{self.k} eigenvalues",
                "condition number", "error"]
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        for r in self.rows:
            eig = r["top_eigenvalues"]
            trace = _fmt(r["trace"])
            if r["trace"] is not None and r["trace_stderr"] is not None:
                trace += f" ± {_fmt(r['trace_stderr'])}"
            if r["details"].get("trace_exact") is not None:
                trace += f" (exact {_fmt(r['details']['trace_exact'])})"
            mem = _fmt(r["peak_memory_mb"]) + (f" ({r['memory_source']})" if r["memory_source"] else "")
            cells = [r["method"], r["status"], _fmt(r["seconds"]), mem, trace,
                     ", ".join(_fmt(float(v)) for v in eig) if eig else "-", _fmt(r["condition_number"]),
                     (r["error"] or "-").replace("|", "\\|").replace("\n", " ")]
            lines.append("| " + " | ".join(cells) + " |")
        if self.agreement:
            unit = self.agreement[0]["unit"]
            lines += ["", f"Agreement of the diagonals (correlations over {unit}s; overlap of the top-{self.top_k} groups):", "",
                      "| a | b | pearson | spearman | top-k overlap | k | elements |", "|---|---|---|---|---|---|---|"]
            for p in self.agreement:
                lines.append(f"| {p['a']} | {p['b']} | {_fmt(p['pearson'])} | {_fmt(p['spearman'])} | "
                             f"{_fmt(p['topk_overlap'])} | {p['k']} | {p['num_elements']} |")
        return "\n".join(lines)


# ============================================================================================ methods


def _kfac_eigen(kfac, k: int) -> tuple[list[float] | None, float | None, str | None]:
    """Top-k eigenvalues and condition number (on the range) of ``⊕_layers G ⊗ A``."""
    if any(len(c) > 1 for c in kfac._components()):
        return None, None, "layers share a parameter (tied weights): a sum of Kronecker terms has no product eigenvalues"
    eig = kfac.eigendecompose()
    tops: list[torch.Tensor] = []
    maxes, mins = [], []
    dim = 0
    for e in eig.values():
        g, a = e.g.double(), e.a.double()
        dim += g.numel() * a.numel()
        gk = torch.topk(g, min(k, g.numel())).values
        ak = torch.topk(a, min(k, a.numel())).values
        prod = torch.outer(gk, ak).reshape(-1)
        tops.append(torch.topk(prod, min(k, prod.numel())).values)
        maxes.append(float(g.max() * a.max()))
    if not tops:
        return None, None, "no layers"
    top = torch.topk(torch.cat(tops), min(k, sum(t.numel() for t in tops))).values.tolist()
    lam_max = max(maxes)
    thr = 10 * dim * np.finfo(np.float64).eps * lam_max
    for e in eig.values():
        g, a = e.g.double(), e.a.double()
        a_sorted = torch.sort(a).values
        gpos = g[g > 0]
        if gpos.numel() and a_sorted.numel():
            # per non-zero g, the smallest a with g * a above the threshold
            idx = torch.searchsorted(a_sorted, thr / gpos, right=True)
            ok = idx < a_sorted.numel()
            if bool(ok.any()):
                mins.append(float((gpos[ok] * a_sorted[idx[ok]]).min()))
    cond = lam_max / min(mins) if mins and lam_max > 0 else math.nan
    return top, cond, None


def _run_method(method, model, data, *, reduction, k, opts, progress):
    """Run one method; returns (result, diagonal Fisher or None, row fields)."""
    import hf_fisher.api as api

    fields: dict[str, Any] = {}
    if method in ("empirical", "true"):
        fisher = api.collect(model, data, estimator=method, reduction=reduction, progress=progress, **opts)
        fields.update(trace=fisher.total(), num_elements=sum(int(fisher[n].numel()) for n in fisher.names()))
        return fisher, fisher, fields
    if method == "kfac":
        kf = api.collect(model, data, estimator="kfac", progress=progress, **opts)
        diag = kf.to_diagonal()
        top, cond, note = _kfac_eigen(kf, k)
        fields.update(trace=diag.total(), top_eigenvalues=top, condition_number=cond,
                      num_elements=sum(int(diag[n].numel()) for n in diag.names()),
                      details={"layers": len(kf.layer_names()), **({"eigen_note": note} if note else {})})
        return kf, diag, fields
    from hf_fisher.consumers.spectrum import spectrum

    res = spectrum(model, data, k=k, **(_SPECTRUM_DEFAULTS | dict(opts)))
    fields.update(trace=res.trace, trace_stderr=res.trace_stderr, top_eigenvalues=[float(v) for v in res.eigenvalues],
                  condition_number=res.capacity.get("condition_number"), num_elements=res.dim,
                  details={"curvature": res.curvature, "trace_exact": res.trace_exact, "capacity_source": res.capacity_source,
                           "full_rank": res.capacity.get("full_rank"), "matvecs": res.matvecs, "backend": res.backend})
    return res, None, fields


def _agreement(diagonals: dict[str, Any], *, reduction: str, layout, top_k: int) -> list[dict[str, Any]]:
    from hf_fisher import analysis

    names = list(diagonals)
    grouped = {m: f.to_groups(layout) for m, f in diagonals.items()}
    views = grouped if reduction == "group" else diagonals
    out = []
    for i, a in enumerate(names):
        for b in names[i:]:
            corr = analysis.compare(views[a], views[b], k=top_k)
            top = analysis.compare(grouped[a], grouped[b], k=top_k)
            out.append({"a": a, "b": b, "pearson": corr["pearson"], "spearman": corr["spearman"],
                        "topk_overlap": top["topk_overlap"], "k": top["k"], "num_elements": corr["num_elements"],
                        "unit": corr["unit"], "num_params": corr["num_params"]})
    return out


def compare_estimators(
    model,
    batches: Iterable[Mapping[str, Any]],
    *,
    methods: str | Sequence[str] = METHODS,
    reduction: str = "group",
    k: int = 5,
    top_k: int = 20,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    progress: bool = True,
) -> EstimatorComparison:
    """Run ``methods`` on the same ``batches`` and compare time, memory, traces, spectra and the
    agreement of their diagonals (every quantity is defined in the module docstring).

    Args:
        methods: names from :data:`METHODS` (a sequence or a comma-separated string), run in order.
        reduction: ``"group"`` (default) or ``"param"``, for the empirical and true Fishers and
            the unit of the correlations.
        k: top eigenvalues of ``spectrum`` and ``kfac`` (``k < P`` for spectrum).
        top_k: groups in the top-k overlap.
        options: per method, keyword arguments passed to it, e.g. ``{"true": {"mc_samples": 4},
            "spectrum": {"curvature": "ggn"}, "kfac": {"fisher_type": "mc"}}``.
        progress: a progress bar over the methods (and the methods' own bars).

    Arguments are checked before any work (:class:`~hf_fisher.errors.InvalidInputError`); an
    error *inside* a method is reported in its row and the other methods still run.
    """
    methods = parse_methods(methods)
    if reduction not in ("group", "param"):
        raise InvalidInputError(f"reduction must be 'group' or 'param', got {reduction!r}")
    for name, value in (("k", k), ("top_k", top_k)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise InvalidInputError(f"{name} must be an integer >= 1, got {value!r}")
    options = {} if options is None else options
    if not isinstance(options, Mapping):
        raise InvalidInputError(f"options must be a dict of method name -> keyword arguments, got {type(options).__name__}")
    for m, o in options.items():
        if m not in methods:
            raise InvalidInputError(f"options given for {m!r}, which is not among the methods run {list(methods)}")
        if not isinstance(o, Mapping):
            raise InvalidInputError(f"options[{m!r}] must be a dict of keyword arguments, got {type(o).__name__}")
    if batches is None:
        raise EmptyDataError("batches is None: pass an iterable of batch dicts")
    data = list(batches)
    if not data:
        raise EmptyDataError("no batches: the data is empty; pass at least one batch with input_ids")

    from tqdm.auto import tqdm

    from hf_fisher import plugins

    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    layout = None
    rows: list[dict[str, Any]] = []
    results: dict[str, Any] = {}
    diagonals: dict[str, Any] = {}
    log.info("hf_fisher compare_estimators: %s on %d batches (%s)", ", ".join(methods), len(data), device)
    bar = tqdm(methods, desc="compare-estimators", unit="method", disable=not progress)
    for method in bar:
        bar.set_postfix_str(method)
        row: dict[str, Any] = {"method": method, "status": "ok", "error": None, "seconds": None, "peak_memory_mb": None,
                               "memory_source": None, "trace": None, "trace_stderr": None, "top_eigenvalues": None,
                               "condition_number": None, "num_elements": None, "details": {}}
        meter = _PeakMemory(device)
        t0 = time.perf_counter()
        try:
            with meter:
                result, diag, fields = _run_method(method, model, data, reduction=reduction, k=int(k),
                                                   opts=dict(options.get(method, {})), progress=progress)
            row.update(fields)
            results[method] = result
            if diag is not None:
                diagonals[method] = diag
        except Exception as e:  # reported in the table; the other methods still run
            row.update(status="failed", error=f"{type(e).__name__}: {e}")
            log.warning("hf_fisher compare_estimators: method %r failed: %s", method, row["error"])
            log.debug("method %r failed", method, exc_info=True)
        row["seconds"] = time.perf_counter() - t0
        row["peak_memory_mb"], row["memory_source"] = meter.peak_mb, meter.source or None
        rows.append(row)
    bar.close()
    agreement: list[dict[str, Any]] = []
    if diagonals:
        layout = plugins.model_layout(model)
        agreement = _agreement(diagonals, reduction=reduction, layout=layout, top_k=int(top_k))
    return EstimatorComparison(methods=methods, reduction=reduction, k=int(k), top_k=int(top_k), n_batches=len(data),
                               device=str(device), rows=rows, agreement=agreement, results=results)


@hookimpl
def hf_fisher_register_consumers(register) -> None:
    register("compare_estimators", compare_estimators)
