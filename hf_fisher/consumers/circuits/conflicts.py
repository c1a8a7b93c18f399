"""Cross-task sample conflicts: which samples of task A pull against which samples of task B.

Inputs are two sets of exact signed per-sample gradients ``g_i`` (task A, ``i < n_A``) and
``g_j`` (task B, ``j < n_B``) of the same parameters, from
:func:`hf_fisher.collection.gradients.store_gradients` (computed here from batches, or
passed in as :class:`~hf_fisher.collection.gradients.GradientStore`).

Quantities (all in float64, per element of the stored parameters):

- Diagonal Fisher ``F``: by default the pooled empirical Fisher of both tasks' samples,
  ``F = (Σ_{i∈A} g_i ⊙ g_i + Σ_{j∈B} g_j ⊙ g_j) / (n_A + n_B)``; or ``fisher[name]`` of a given
  :class:`hf_fisher.Fisher` with ``reduction="param"``.
- Natural-gradient coordinates ``ĝ = g / sqrt(F + eps)``.
- Parameter groups ``G``: ``groups="param"`` one group per stored parameter tensor (key: the
  parameter name), ``groups="layer"`` one per layer (key ``"layer L"`` from
  :func:`hf_fisher.layout.layer_of`; ``"no layer"`` for parameters outside the layers); always
  also ``"overall"`` = all stored parameters concatenated. ``ĝ_G`` is the flattened
  concatenation of ``ĝ`` over the group's parameters (``D_G`` coordinates).
- Cosine ``cos_ij,G = ĝ_i,G · ĝ_j,G / (‖ĝ_i,G‖ ‖ĝ_j,G‖)`` in ``[-1, 1]`` (``0`` when a norm is 0).
  A *conflict* is a negative cosine (the two samples' natural-gradient steps oppose).
- Unit-vector L2 effect size (the seeds' "vector effect magnitude"; NOT Cohen's d, which uses
  a pooled per-component variance): with unit vectors ``u = ĝ_i,G/‖ĝ_i,G‖`` and
  ``v = ĝ_j,G/‖ĝ_j,G‖`` (the zero vector when the norm is 0),
  ``d = ‖u − v‖₂ / 2``, so ``d = sqrt((1 − cos) / 2)`` when both norms are non-zero: ``d = 0``
  aligned, ``d = 1/√2 ≈ 0.707`` orthogonal, ``d > 0.707`` conflicting, ``d = 1`` opposite.
- P-value per (pair, group), H0_ij "sample j of B has no directional relation to sample i of A":
  ``ĝ_j`` is independent of ``ĝ_i`` and its direction is sign-symmetric (``ĝ`` and ``−ĝ`` equally
  likely). Under H0 ``cos_ij`` is symmetric about 0 with a scale ``σ_ij² = E[cos²]`` that depends
  on the two samples (how much of each lies in the directions the other task's gradients share)
  and on the gradients' effective dimension, which for real networks is far below the number of
  coordinates (a coordinate-permutation null, ``σ² ≈ 1/D_G``, calls near-zero cosines of large
  layers significant). ``σ_ij²`` is estimated from the same two samples' other cosines: the
  *reference* cosines ``R_ij = {cos_ij' : j' ≠ j} ∪ {cos_i'j : i' ≠ i}`` (sample i against the
  other samples of B, sample j against the other samples of A), keeping only the positive ones
  (by the sign symmetry of H0 they carry the whole scale, and conflicts, which are negative,
  cannot inflate it): ``σ̂_ij² = mean{c² : c ∈ R_ij, c > 0}`` from ``k_ij`` such values. Then
  ``t_ij = cos_ij / σ̂_ij`` is referred to Student's t with ``k_ij`` degrees of freedom (the
  scale is itself estimated), fewer when the positive ``t_ij`` of the group are heavier-tailed
  than that (see :func:`conflict_pvalues`), and ``p = P(T ≤ t_ij)`` (one-sided, for conflict). A pair with no
  positive reference (``k_ij = 0``) or a zero gradient gets ``p = 1`` (it cannot be tested). The
  test is conservative when the cosines share a positive offset (a common gradient direction) and
  when the effective dimension is small (the cosine is then bounded, lighter-tailed than t).
  It needs a few samples per task: at most ``n_A + n_B − 2`` references per pair. Why not a
  permutation of sample labels or a sign-flip of whole samples: they respect the samples, but
  their smallest p-value is ``1 / (1 + 2 (n_A + n_B − 2))`` per pair, which cannot pass the BH
  threshold ``alpha / m`` at the usual numbers of pairs; the parametric t extrapolates the tail
  from the same references. Very heavy-tailed gradient directions (a few samples dominated by a
  few shared directions) can still make it somewhat liberal; the effect-size floor bounds what
  such a case can report.
  Cost: one ``[n_A, D_G] x [D_G, n_B]`` product per group and ``O(n_A · n_B)`` afterwards.
- Effect-size floor (the seeds' ``min_conflict_effect_size``, here on the strength of the
  opposition ``−cos``): a conflict needs ``cos ≤ −min_effect_size`` (default 0.05: a
  natural-gradient step on one sample raises the other's loss at at least 5% of the rate an
  aligned step of the same length would lower it);
  ``min_effect_size = 0`` keeps only ``cos < 0``. Equivalently ``d ≥ sqrt((1 + min_effect_size)/2)``.
- Benjamini–Hochberg false-discovery-rate adjustment over every tested (pair, group) p-value
  together (``m = n_A · n_B · (number of groups + 1)``), by
  ``scipy.stats.false_discovery_control(p, method="bh")``:
  ``p_adj(r) = min_{s ≥ r} min(1, p_(s) · m / s)`` (``p_(s)`` the s-th smallest).
  ``significant = (p_adj < alpha) & (cos < 0) & (−cos ≥ min_effect_size)``; ``alpha`` defaults
  to 0.05. Both defaults live in :mod:`hf_fisher.consumers.circuits.conflict_defaults`, read by the API,
  ``analyze`` and ``hf-fisher conflicts`` alike.
- Clusters: connected components (``scipy.sparse.csgraph.connected_components``) of the
  bipartite graph whose nodes are the samples of A and B and whose edges are the significant
  conflicts of the ``"overall"`` group; components with at least one edge.

Cost: ``n_A · n_B · D`` multiply-adds for the natural-gradient dot products, one parameter
tensor at a time (``D`` stored coordinates; every group's and ``"overall"``'s cosines are sums
of its parameters' dot products and squared norms); the test is ``O(n_A · n_B)`` per group.
Memory: the float64 natural gradients of one parameter tensor, ``(n_A + n_B) · D_param · 8``
bytes. 16 x 16 samples of a 590k-coordinate layer: about a second.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from hf_fisher.collection.gradients import GradientStore, attention_params, require_samples, store_gradients
from hf_fisher.consumers.circuits.conflict_defaults import DEFAULT_ALPHA, DEFAULT_MIN_EFFECT_SIZE
from hf_fisher.errors import EmptyDataError, InvalidInputError, ModelMismatchError, regex_argument
from hf_fisher.hookspecs import hookimpl
from hf_fisher.layout import layer_of

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_MIN_EFFECT_SIZE",
    "GROUPS",
    "ConflictCluster",
    "ConflictResult",
    "conflict_pvalues",
    "fdr_bh",
    "format_p",
    "hf_fisher_register_consumers",
    "sample_conflicts",
    "unit_l2_effect_size",
]

GROUPS = ("param", "layer")
OVERALL = "overall"


# ----------------------------------------------------------------------------- results


@dataclass
class ConflictCluster:
    """Samples of A and B joined by significant ``"overall"`` conflicts (a connected component)."""

    samples_a: list[int]
    samples_b: list[int]
    n_conflicts: int
    mean_cosine: float

    def to_dict(self) -> dict[str, Any]:
        return {"samples_a": list(self.samples_a), "samples_b": list(self.samples_b),
                "n_conflicts": self.n_conflicts, "mean_cosine": self.mean_cosine}


@dataclass
class ConflictResult:
    """The outcome of :func:`sample_conflicts` (formulas in the module docstring).

    ``cosine``, ``effect_size`` (unit-vector L2 effect size), ``p_values`` (raw one-sided
    p-values of the sign-symmetric null), ``n_reference`` (the positive reference cosines that
    estimated each pair's null scale, the t test's degrees of freedom), ``p_adjusted``
    (Benjamini–Hochberg over all tested entries) and ``significant`` map each group key (``groups``, ending with ``"overall"``) to an ``[n_A, n_B]`` tensor; row
    ``i`` is sample ``i`` of task A (``sample_ids_a[i] = (batch, row)``), column ``j`` sample
    ``j`` of task B. ``top_conflicts`` lists the strongest significant (pair, group) entries,
    ``claims`` says them as sentences, ``clusters`` are the mutually conflicting groups of
    samples, ``recommendations`` has ``"samples"`` (to filter / down-weight), ``"hotspots"``
    (groups with the most significant conflicts) and ``"actions"`` (sentences).
    """

    groups: list[str]
    group_params: dict[str, list[str]]
    cosine: dict[str, torch.Tensor]
    effect_size: dict[str, torch.Tensor]
    p_values: dict[str, torch.Tensor]
    p_adjusted: dict[str, torch.Tensor]
    significant: dict[str, torch.Tensor]
    clusters: list[ConflictCluster]
    claims: list[str]
    recommendations: dict[str, Any]
    sample_ids_a: list[tuple[int, int]]
    sample_ids_b: list[tuple[int, int]]
    top_conflicts: list[dict[str, Any]] = field(default_factory=list)
    group_summary: dict[str, dict[str, Any]] = field(default_factory=dict)
    n_reference: dict[str, torch.Tensor] = field(default_factory=dict)
    alpha: float = DEFAULT_ALPHA
    min_effect_size: float = DEFAULT_MIN_EFFECT_SIZE
    eps: float = 1e-8
    fisher_source: str = "pooled"
    test: str = "sign-symmetric t (scale from the pair's positive reference cosines)"

    @property
    def num_a(self) -> int:
        return len(self.sample_ids_a)

    @property
    def num_b(self) -> int:
        return len(self.sample_ids_b)

    def to_dict(self) -> dict[str, Any]:
        def mat(d: Mapping[str, torch.Tensor]) -> dict[str, list]:
            return {k: v.tolist() for k, v in d.items()}

        return {
            "groups": list(self.groups), "group_params": {k: list(v) for k, v in self.group_params.items()},
            "sample_ids_a": [list(s) for s in self.sample_ids_a], "sample_ids_b": [list(s) for s in self.sample_ids_b],
            "test": self.test, "alpha": self.alpha, "min_effect_size": self.min_effect_size, "eps": self.eps,
            "fisher_source": self.fisher_source,
            "cosine": mat(self.cosine), "effect_size": mat(self.effect_size), "p_values": mat(self.p_values),
            "n_reference": mat(self.n_reference),
            "p_adjusted": mat(self.p_adjusted), "significant": mat(self.significant),
            "clusters": [c.to_dict() for c in self.clusters], "top_conflicts": self.top_conflicts,
            "group_summary": self.group_summary, "claims": list(self.claims), "recommendations": self.recommendations,
        }

    def to_json(self, path: str | os.PathLike | None = None, **kwargs: Any) -> str:
        """JSON text of :meth:`to_dict`; written to ``path`` if given."""
        text = json.dumps(self.to_dict(), **({"indent": 2} | kwargs))
        if path is not None:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text + "\n")
        return text


# ----------------------------------------------------------------------------- statistics


def fdr_bh(p_values: Any) -> torch.Tensor:
    """Benjamini–Hochberg adjusted p-values of a flat vector (``scipy.stats.false_discovery_control``,
    ``method="bh"``): ``p_adj(r) = min_{s ≥ r} min(1, p_(s) · m / s)``. Returns float64."""
    from scipy.stats import false_discovery_control

    p = torch.as_tensor(p_values, dtype=torch.float64).reshape(-1)
    if p.numel() == 0:
        return p.clone()
    if not bool(((p >= 0) & (p <= 1)).all()):
        raise InvalidInputError("p-values must lie in [0, 1]")
    return torch.from_numpy(false_discovery_control(p.numpy(), method="bh")).to(torch.float64)


def unit_l2_effect_size(cos: torch.Tensor, sq_a: torch.Tensor | None = None, sq_b: torch.Tensor | None = None) -> torch.Tensor:
    """Unit-vector L2 effect size ``d = ‖u − v‖₂ / 2`` from ``cos = u · v`` and the squared norms
    of the unit vectors (1, or 0 for a zero gradient; default 1): ``d = sqrt(‖u‖² + ‖v‖² − 2 cos) / 2``,
    i.e. ``sqrt((1 − cos) / 2)`` for non-zero gradients. Not Cohen's d."""
    a = torch.ones(cos.shape[0], dtype=cos.dtype) if sq_a is None else sq_a
    b = torch.ones(cos.shape[1], dtype=cos.dtype) if sq_b is None else sq_b
    return (a[:, None] + b[None, :] - 2 * cos).clamp_min(0).sqrt() / 2


def conflict_pvalues(cos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One-sided (conflict) p-values of a cosine matrix ``cos`` ``[n_A, n_B]`` under the
    sign-symmetric null of the module docstring, and the number of reference cosines of each pair.

    For pair ``(i, j)`` the references are the other cosines of row ``i`` and of column ``j``;
    of these the positive ones (``k_ij`` of them) give the null scale
    ``σ̂_ij² = mean{c²}``, and ``p_ij = P(T ≤ t_ij)``, ``t_ij = cos_ij / σ̂_ij``, for ``T``
    Student's t (``scipy.stats.t``) with ``min(k_ij, ν)`` degrees of freedom; ``ν`` guards
    against heavier tails than a t's: with ``κ`` the kurtosis ``mean(t⁴) / mean(t²)²`` of the
    positive ``t_ij`` (at least 8 of them; negative ones, where conflicts lie, are not used),
    ``ν = 4 + 6 / (κ − 3)`` (a t's kurtosis solved for its degrees of freedom) when ``κ > 3``,
    else no bound. ``p = 1`` where ``k_ij = 0``.
    Returns ``(p, k)``, float64 and int64 ``[n_A, n_B]``."""
    from scipy.stats import t as student_t

    cos = torch.as_tensor(cos, dtype=torch.float64)
    if cos.dim() != 2:
        raise InvalidInputError(f"cos must be a [n_A, n_B] matrix, got shape {tuple(cos.shape)}")
    if not bool(torch.isfinite(cos).all()) or bool((cos.abs() > 1 + 1e-9).any()):
        raise InvalidInputError("cos must hold finite cosines in [-1, 1]")
    pos = (cos > 0).to(torch.float64)
    sq = cos.square() * pos
    # the row's and the column's positive cosines, the pair itself left out (it is in both)
    k = pos.sum(1, keepdim=True) + pos.sum(0, keepdim=True) - 2 * pos
    total = sq.sum(1, keepdim=True) + sq.sum(0, keepdim=True) - 2 * sq
    ok = (k > 0) & (total > 0)
    scale = torch.where(ok, (total / k.clamp_min(1)).sqrt(), torch.ones_like(total))
    t = cos / scale
    df = k.clamp_min(1).expand_as(t).clone()
    # heavier tails than a t's: the kurtosis of the positive statistics (conflicts cannot reach
    # them) gives the t's degrees of freedom by moments, 4 + 6 / (kurtosis - 3); the smaller is used
    upper = t[ok & (t > 0)]
    if upper.numel() >= 8:
        excess = float(upper.pow(4).mean() / upper.square().mean().square()) - 3.0
        if excess > 0:
            df = df.clamp_max(4.0 + 6.0 / excess)
    p = torch.from_numpy(student_t.cdf(t.numpy(), df.numpy())).to(torch.float64)
    p = torch.where(ok, p, torch.ones_like(p))
    return p, k.round().to(torch.int64)


def format_p(p: float) -> str:
    """``"p < 0.001"`` when ``p < 0.001``, else ``"p = 0.012"`` (three decimals)."""
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


# ----------------------------------------------------------------------------- naming


def _short_module(name: str) -> str:
    """Short module name of a parameter: ``...self_attn.q_proj.weight`` -> ``q_proj``,
    ``...c_attn.bias`` -> ``c_attn bias``, ``...q_proj.lora_A.default.weight`` -> ``q_proj lora_A``."""
    parts = name.split(".")
    suffix = ""
    if parts and parts[-1] in ("weight", "bias"):
        suffix = " bias" if parts[-1] == "bias" else ""
        parts = parts[:-1]
    for k in range(len(parts) - 1, 0, -1):
        if parts[k].startswith("lora_"):
            return f"{parts[k - 1]} {parts[k]}{suffix}"
    return (parts[-1] if parts else name) + suffix


def _group_phrase(key: str, n_params: int) -> str:
    if key == OVERALL:
        return f"across all {n_params} analysed parameter{'s' if n_params != 1 else ''}"
    if key.startswith("layer ") or key == "no layer":
        return f"on {key}" if key != "no layer" else "on the parameters outside the layers"
    layer = layer_of(key)
    return f"on layer {layer} {_short_module(key)}" if layer is not None else f"on {_short_module(key)}"


def _group_label(key: str) -> str:
    return _group_phrase(key, 0).removeprefix("on ") if key != OVERALL else OVERALL


# ----------------------------------------------------------------------------- validation


def _is_batches(x: Any) -> bool:
    return not isinstance(x, (GradientStore, Mapping, str, bytes)) and x is not None


def _check_batches(batches: Any, task: str) -> list:
    if not _is_batches(batches):
        raise InvalidInputError(f"batches_{task} must be a GradientStore or a list of batch dicts with input_ids")
    batches = list(batches)
    for i, b in enumerate(batches):
        if not isinstance(b, Mapping) or not isinstance(b.get("input_ids"), torch.Tensor) or b["input_ids"].dim() != 2:
            raise InvalidInputError(f"batches_{task}: batch {i} must be a dict with input_ids [batch, seq_len]")
    return batches


def _select(names: Sequence[str], params: Any, layers: Iterable[int] | None, where: str) -> list[str]:
    """``params`` (regex or list) and ``layers`` (by :func:`layer_of`) applied to ``names``."""
    out = list(names)
    if params is not None:
        if isinstance(params, str):
            pattern = regex_argument("params", params)
            out = [n for n in out if pattern.search(n)]
        else:
            wanted = list(params)
            missing = [n for n in wanted if n not in out]
            if missing:
                raise InvalidInputError(f"params {missing[:3]} are not {where}")
            out = wanted
    if layers is not None:
        want = {int(x) for x in layers}
        out = [n for n in out if layer_of(n) in want]
    if not out:
        raise InvalidInputError(f"params={params!r}, layers={layers!r} select no parameter of {where}")
    return out


def _resolve_names(model: Any, params: Any, layers: Iterable[int] | None) -> list[str]:
    from hf_fisher import plugins

    all_names = [n for n, _ in model.named_parameters()]
    if params is None:
        return attention_params(model, plugins.model_layout(model), layers)
    return _select(all_names, params, layers, "parameters of the model")


def _check_budget(model: Any, names: list[str], batches: list, dtype: torch.dtype, budget: float, task: str) -> None:
    from hf_fisher.collection.gradients import samples_that_fit

    fit, per_sample = samples_that_fit(model, names, dtype, budget)
    n = sum(int(b["input_ids"].shape[0]) for b in batches)
    if n > fit:
        raise InvalidInputError(
            f"task {task}: {n} samples x {per_sample / 2**20:.2f} MB of gradients need {n * per_sample / 2**20:.1f} MB; "
            f"memory_budget_mb={budget:g} holds {fit} samples. Raise memory_budget_mb, pass fewer samples or "
            "parameters (params=, layers=), or use a smaller dtype"
        )


def _check_fisher(fisher: Any, model: Any, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    from hf_fisher.artifacts.fisher import Fisher

    if not isinstance(fisher, Fisher):
        raise InvalidInputError(
            f"fisher must be a hf_fisher.Fisher (reduction='param'), got {type(fisher).__name__}; pass "
            "hf_fisher.collect(model, batches, reduction='param') or fisher=None for the pooled Fisher of both tasks"
        )
    if fisher.reduction != "param":
        raise InvalidInputError(
            f"fisher has reduction={fisher.reduction!r}; sample conflicts need a per-element Fisher: collect it "
            "with reduction='param', or pass fisher=None for the pooled Fisher of both tasks"
        )
    if model is not None:
        try:
            fisher.validate(model)
        except ModelMismatchError as e:
            raise InvalidInputError(f"fisher does not belong to this model: {e}") from None
    missing = [n for n in shapes if n not in fisher]
    if missing:
        raise InvalidInputError(
            f"fisher does not cover {len(missing)} analysed parameter(s) (e.g. {missing[:3]}); collect it with "
            "these parameters trainable, analyse only the parameters it covers (params=, layers=), or pass fisher=None"
        )
    out = {}
    for n, shape in shapes.items():
        f = fisher[n]
        if tuple(f.shape) != tuple(shape):
            raise InvalidInputError(f"fisher[{n!r}] has shape {tuple(f.shape)}, the gradients {tuple(shape)}")
        f = f.detach().to("cpu", torch.float64)
        if not bool(torch.isfinite(f).all()) or bool((f < 0).any()):
            raise InvalidInputError(f"fisher[{n!r}] has negative or non-finite values; a diagonal Fisher is >= 0")
        out[n] = f
    return out


# ----------------------------------------------------------------------------- main


def sample_conflicts(
    model: Any,
    batches_a: Iterable[Mapping[str, Any]] | GradientStore,
    batches_b: Iterable[Mapping[str, Any]] | GradientStore,
    *,
    fisher: Any = None,
    params: str | Sequence[str] | None = None,
    layers: Iterable[int] | None = None,
    eps: float = 1e-8,
    groups: str = "param",
    alpha: float = DEFAULT_ALPHA,
    min_effect_size: float = DEFAULT_MIN_EFFECT_SIZE,
    memory_budget_mb: float = 512.0,
    dtype: torch.dtype = torch.float32,
    top_k: int = 20,
    progress: bool = True,
) -> ConflictResult:
    """Sample-level conflicts between task A and task B in natural-gradient space.

    ``batches_a`` / ``batches_b``: lists of batch dicts (their per-sample gradients are stored with
    :func:`store_gradients`, each task within ``memory_budget_mb``, in ``dtype``) or precomputed
    :class:`GradientStore` objects (then ``model`` may be ``None`` when both are stores, and a
    given Fisher is then checked against the stores' names and shapes only; a store given for one
    task fixes the parameters and the loss normalization of the other). ``params`` (regex or names; default the
    attention projections) and ``layers`` (a filter by :func:`layer_of`) choose the parameters.

    Natural-gradient coordinates ``ĝ = g / sqrt(F + eps)`` with ``F`` the pooled
    ``mean over A ∪ B of g ⊙ g`` (``fisher=None``) or ``fisher[name]`` of a
    ``reduction="param"`` :class:`hf_fisher.Fisher`. For every pair ``(i, j)`` and group ``G``
    (``groups="param"`` or ``"layer"``, plus ``"overall"``): ``cos = ĝ_i·ĝ_j / (‖ĝ_i‖ ‖ĝ_j‖)``,
    unit-vector L2 effect size ``d = ‖ĝ_i/‖ĝ_i‖ − ĝ_j/‖ĝ_j‖‖₂ / 2`` (``= sqrt((1 − cos)/2)``), the
    one-sided p-value of the sign-symmetric null (the pair's scale estimated from the two samples'
    other positive cosines, Student's t; :func:`conflict_pvalues`) and its Benjamini–Hochberg
    adjustment over all tested entries; ``significant = p_adj < alpha and cos ≤ −min_effect_size``
    (and ``cos < 0``). See the module docstring for the null, why not a coordinate permutation,
    and the cost.

    The ``top_k`` strongest significant entries (smallest adjusted p, then most negative cosine)
    become ``top_conflicts`` and ``claims`` ("sample 7 of task A conflicts with sample 23 of task B
    on layer 3 q_proj (p < 0.001, d = 0.73)", p the BH-adjusted p-value, samples numbered by
    their row in the store, ``sample_ids_*`` give ``(batch, row)``). Recommendations: a sample with
    significant overall conflicts with at least half of the other task's samples is to *filter*,
    one with fewer to *down-weight* (a heuristic); hotspots are the groups with the most
    significant conflicts. An empty task (no batch, no sample with a label token, an empty
    store) raises :class:`~hf_fisher.errors.EmptyDataError` before any work.

    Raises :class:`InvalidInputError` before any work on bad arguments (unknown ``groups``,
    ``eps <= 0``, ``alpha`` outside (0, 1), ``min_effect_size`` outside [0, 1), a Fisher of another model, of
    ``reduction="group"`` or not covering the parameters, malformed batches, a budget too small).
    """
    from tqdm.auto import tqdm

    # --- arguments, all checked before any gradient is computed
    if groups not in GROUPS:
        raise InvalidInputError(f"groups={groups!r}: choose 'param' (one group per parameter tensor) or 'layer'")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or not eps > 0:
        raise InvalidInputError(f"eps must be a positive finite number (the damping of sqrt(F + eps)), got {eps!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise InvalidInputError(f"alpha must lie strictly between 0 and 1 (the FDR level), got {alpha!r}")
    if (isinstance(min_effect_size, bool) or not isinstance(min_effect_size, (int, float))
            or not 0 <= min_effect_size < 1):
        raise InvalidInputError(
            f"min_effect_size must lie in [0, 1) (a conflict needs cos <= -min_effect_size; 0 keeps every cos < 0), "
            f"got {min_effect_size!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise InvalidInputError(f"top_k must be a non-negative integer, got {top_k!r}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise InvalidInputError(f"dtype must be a floating torch dtype, got {dtype!r}")
    if isinstance(memory_budget_mb, bool) or not isinstance(memory_budget_mb, (int, float)) or not memory_budget_mb > 0:
        raise InvalidInputError(f"memory_budget_mb must be a positive number of MB, got {memory_budget_mb!r}")
    stores = {"a": batches_a if isinstance(batches_a, GradientStore) else None,
              "b": batches_b if isinstance(batches_b, GradientStore) else None}
    raw = {t: (None if stores[t] is not None else _check_batches(x, t)) for t, x in (("a", batches_a), ("b", batches_b))}
    if model is None and (raw["a"] is not None or raw["b"] is not None):
        raise InvalidInputError("model is required unless both tasks are given as GradientStores")
    given = [s for s in stores.values() if s is not None]
    if given:
        first = given[0]
        if len(given) == 2:
            sa, sb = given
            if sa.names != sb.names or any(sa.grads[n].shape[1:] != sb.grads[n].shape[1:] for n in sa.names):
                raise InvalidInputError("the two GradientStores hold different parameters or shapes; store the same params for both tasks")
            if sa.normalization != sb.normalization:
                raise InvalidInputError(
                    f"the GradientStores use different loss normalizations ({sa.normalization!r} vs {sb.normalization!r}); "
                    "store both tasks with the same normalization")
        names = _select(first.names, params, layers, "parameters of the gradient store")
        shapes = {n: tuple(first.grads[n].shape[1:]) for n in names}
        if model is not None:
            mp = {n: tuple(p.shape) for n, p in model.named_parameters()}
            bad = [n for n in names if mp.get(n) != shapes[n]]
            if bad:
                raise InvalidInputError(f"the gradient store's parameters {bad[:3]} are not parameters of the model with those shapes")
    else:
        names = _resolve_names(model, params, layers)
        mp = dict(model.named_parameters())
        shapes = {n: tuple(mp[n].shape) for n in names}
    for t in ("a", "b"):
        require_samples(model, raw[t] if raw[t] is not None else stores[t], f"task {t.upper()}")
        if raw[t] is not None:
            _check_budget(model, names, raw[t], dtype, memory_budget_mb, t.upper())
    fisher_given = None if fisher is None else _check_fisher(fisher, model, shapes)

    # --- per-sample gradients
    normalization = given[0].normalization if given else "mean"
    for t in ("a", "b"):
        if stores[t] is None:
            stores[t] = store_gradients(model, raw[t], params=names, task=f"task {t.upper()}", dtype=dtype,
                                        memory_budget_mb=memory_budget_mb, normalization=normalization, progress=progress)
    sa, sb = stores["a"], stores["b"]
    n_a, n_b = sa.num_samples, sb.num_samples

    # --- groups
    group_params: dict[str, list[str]] = {}
    for n in names:
        if groups == "param":
            key = n
        else:
            layer = layer_of(n)
            key = "no layer" if layer is None else f"layer {layer}"
        group_params.setdefault(key, []).append(n)
    group_params[OVERALL] = list(names)
    keys = list(group_params)

    common = dict(groups=keys, group_params=group_params, sample_ids_a=list(sa.sample_ids), sample_ids_b=list(sb.sample_ids),
                  alpha=float(alpha), min_effect_size=float(min_effect_size), eps=float(eps),
                  fisher_source="pooled" if fisher is None else "given")
    if n_a == 0 or n_b == 0:  # e.g. every sample dropped by the engine
        raise EmptyDataError(f"sample_conflicts: task {'A' if n_a == 0 else 'B'} gave no per-sample gradient; "
                             "pass data with label tokens")

    # --- Fisher and natural-gradient coordinates
    if fisher_given is None:
        F = {n: ((sa.grads[n].double() ** 2).sum(0) + (sb.grads[n].double() ** 2).sum(0)) / (n_a + n_b) for n in names}
    else:
        F = fisher_given
    # --- per parameter: natural-gradient dot products of every pair and squared norms; a group's
    # (and "overall"'s) cosines are sums of its parameters' (no concatenated copies)
    dots, sq_a, sq_b = {}, {}, {}
    for n in tqdm(names, desc="conflict cosines", unit="param", disable=not progress):
        scale = (F[n] + eps).rsqrt().reshape(-1)
        xa = sa.grads[n].reshape(n_a, -1).double() * scale
        xb = sb.grads[n].reshape(n_b, -1).double() * scale
        dots[n], sq_a[n], sq_b[n] = xa @ xb.T, xa.square().sum(1), xb.square().sum(1)
        del xa, xb

    # --- cosines, effect sizes, p-values of the sign-symmetric null
    cosine, effect, pvals, nref = {}, {}, {}, {}
    for key in keys:
        plist = group_params[key]
        na = torch.stack([sq_a[n] for n in plist]).sum(0).sqrt()
        nb = torch.stack([sq_b[n] for n in plist]).sum(0).sqrt()
        valid = (na[:, None] > 0) & (nb[None, :] > 0)
        denom = torch.where(valid, na[:, None] * nb[None, :], torch.ones_like(valid, dtype=torch.float64))
        cos = torch.where(valid, torch.stack([dots[n] for n in plist]).sum(0) / denom, 0.0).clamp_(-1.0, 1.0)
        p, k = conflict_pvalues(cos)
        # a zero gradient has no direction: its cosines are 0 and cannot be tested
        p = torch.where(valid, p, torch.ones_like(p))
        unit_a, unit_b = (na > 0).to(torch.float64), (nb > 0).to(torch.float64)
        cosine[key], effect[key], pvals[key], nref[key] = cos, unit_l2_effect_size(cos, unit_a, unit_b), p, k

    flat = torch.cat([pvals[k].reshape(-1) for k in keys])
    adj_flat = fdr_bh(flat)
    padj, sig, offset = {}, {}, 0
    for k in keys:
        padj[k] = adj_flat[offset:offset + n_a * n_b].reshape(n_a, n_b)
        offset += n_a * n_b
        sig[k] = (padj[k] < alpha) & (cosine[k] < 0) & (cosine[k] <= -min_effect_size)

    clusters = _clusters(sig[OVERALL], cosine[OVERALL])
    top = _top_conflicts(keys, cosine, effect, pvals, padj, sig, sa.sample_ids, sb.sample_ids, top_k)
    claims = [
        f"sample {t['a']} of task A conflicts with sample {t['b']} of task B "
        f"{_group_phrase(t['group'], len(names))} ({format_p(t['p_adjusted'])}, d = {t['effect_size']:.2f})"
        for t in top
    ]
    summary = {
        k: {"label": _group_label(k), "params": len(group_params[k]), "mean_cosine": float(cosine[k].mean()),
            "fraction_negative": float((cosine[k] < 0).double().mean()), "n_significant": int(sig[k].sum()),
            "n_pairs": n_a * n_b}
        for k in keys
    }
    recs = _recommendations(sig, summary, keys, n_a, n_b, top_k, alpha, min_effect_size)
    return ConflictResult(cosine=cosine, effect_size=effect, p_values=pvals, p_adjusted=padj, significant=sig,
                          n_reference=nref,
                          clusters=clusters, claims=claims, recommendations=recs, top_conflicts=top,
                          group_summary=summary, **common)


def _clusters(sig: torch.Tensor, cos: torch.Tensor) -> list[ConflictCluster]:
    import numpy as np
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n_a, n_b = sig.shape
    ii, jj = sig.nonzero(as_tuple=True)
    if ii.numel() == 0:
        return []
    rows, cols = ii.numpy(), jj.numpy() + n_a
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n_a + n_b, n_a + n_b)).tocsr()
    _, labels = connected_components(graph, directed=False)
    out = []
    for lab in sorted(set(labels[rows].tolist())):
        members = np.flatnonzero(labels == lab)
        a = [int(m) for m in members if m < n_a]
        b = [int(m) - n_a for m in members if m >= n_a]
        edges = labels[rows] == lab
        out.append(ConflictCluster(a, b, int(edges.sum()), float(cos[ii[edges], jj[edges]].mean())))
    out.sort(key=lambda c: (-(len(c.samples_a) + len(c.samples_b)), -c.n_conflicts, c.samples_a, c.samples_b))
    return out


def _top_conflicts(keys, cosine, effect, pvals, padj, sig, ids_a, ids_b, top_k) -> list[dict[str, Any]]:
    entries = []
    for k in keys:
        for i, j in sig[k].nonzero().tolist():
            entries.append((float(padj[k][i, j]), float(cosine[k][i, j]), k, i, j))
    entries.sort(key=lambda e: (e[0], e[1], keys.index(e[2]), e[3], e[4]))
    return [
        {"a": i, "b": j, "sample_id_a": list(ids_a[i]), "sample_id_b": list(ids_b[j]), "group": k,
         "label": _group_label(k), "cosine": c, "effect_size": float(effect[k][i, j]),
         "p_value": float(pvals[k][i, j]), "p_adjusted": p}
        for p, c, k, i, j in entries[:top_k]
    ]


def _recommendations(sig, summary, keys, n_a, n_b, top_k, alpha, min_effect_size) -> dict[str, Any]:
    overall = sig[OVERALL]
    samples = []
    for task, counts, other in (("A", overall.sum(1), n_b), ("B", overall.sum(0), n_a)):
        for idx in counts.nonzero().flatten().tolist():
            c = int(counts[idx])
            samples.append({"task": task, "sample": idx, "conflicts": c, "of": other,
                            "action": "filter" if 2 * c >= other else "down-weight"})
    samples.sort(key=lambda s: (-s["conflicts"], s["task"], s["sample"]))
    samples = samples[:top_k]
    parts = [k for k in keys if k != OVERALL] or [OVERALL]
    hotspots = [{"group": k, **summary[k]} for k in parts if summary[k]["n_significant"] > 0]
    hotspots.sort(key=lambda h: (-h["n_significant"], h["mean_cosine"]))
    hotspots = hotspots[:top_k]
    actions = []
    for s in samples:
        verb = "Filter" if s["action"] == "filter" else "Down-weight"
        other = "B" if s["task"] == "A" else "A"
        actions.append(f"{verb} sample {s['sample']} of task {s['task']}: it conflicts significantly with "
                       f"{s['conflicts']} of {s['of']} task {other} samples overall.")
    for h in hotspots:
        actions.append(f"Conflict hotspot: {h['label']} ({h['n_significant']} of {h['n_pairs']} sample pairs conflict "
                       f"significantly, mean cosine {h['mean_cosine']:.3f}); consider task-specific adapters or "
                       "gradient surgery there.")
    if not actions:
        actions.append(f"No significant conflicts at FDR level alpha = {alpha:g} with cosine <= -{min_effect_size:g}: "
                       "nothing to filter or down-weight.")
    return {"samples": samples, "hotspots": hotspots, "actions": actions}


@hookimpl
def hf_fisher_register_consumers(register):
    register("sample_conflicts", sample_conflicts)
