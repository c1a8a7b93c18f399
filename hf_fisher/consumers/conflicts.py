"""Cross-task sample conflicts: which samples of task A pull against which samples of task B.

Inputs are two sets of exact signed per-sample gradients ``g_i`` (task A, ``i < n_A``) and
``g_j`` (task B, ``j < n_B``) of the same parameters, from
:func:`hf_fisher.consumers.gradient_store.store_gradients` (computed here from batches, or
passed in as :class:`~hf_fisher.consumers.gradient_store.GradientStore`).

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
- Permutation p-value per (pair, group), H0 "no alignment beyond chance": the null cosines are
  ``cos(ĝ_i,G, π_k(ĝ_j,G))`` for ``k = 1..K`` (``K = n_permutations``) random permutations
  ``π_k`` of the group's ``D_G`` coordinates (drawn by a ``torch.Generator`` seeded from ``seed``
  and the group key, so a group's p-values do not depend on which other groups are tested; the
  same ``π_k`` serve every pair of the group). One-sided for conflict:
  ``p = (1 + #{k : cos_k ≤ cos_obs}) / (1 + K)`` (a null cosine within ``1e-12`` of the observed
  one counts as ``≤``: ties never make p smaller). The smallest possible p is ``1 / (1 + K)``.
  A norm of 0 gives ``cos_obs = 0 = cos_k`` and ``p = 1``.
- Benjamini–Hochberg false-discovery-rate adjustment over every tested (pair, group) p-value
  together (``m = n_A · n_B · (number of groups + 1)``), by
  ``scipy.stats.false_discovery_control(p, method="bh")``:
  ``p_adj(r) = min_{s ≥ r} min(1, p_(s) · m / s)`` (``p_(s)`` the s-th smallest).
  ``significant = (p_adj < alpha) & (cos < 0)``.
- Clusters: connected components (``scipy.sparse.csgraph.connected_components``) of the
  bipartite graph whose nodes are the samples of A and B and whose edges are the significant
  conflicts of the ``"overall"`` group; components with at least one edge.

Cost: the permutation test is ``O(K · n_A · n_B · Σ_G D_G)`` multiply-adds (float64 matrix
products of the ``n_A x D_G`` unit vectors with ``K`` permuted copies of the ``n_B x D_G`` ones,
in chunks of about ``_CHUNK_BYTES``), plus the gathers. ``Σ_G D_G`` is twice the stored
coordinates (the groups and ``"overall"``). Example: 64 x 64 pairs, 2 x 1,024 coordinates,
K = 1,000 is ~8.4 G multiply-adds, about 1.2 s on one CPU core. Memory: the float64 natural
gradients of one group (``(n_A + n_B) · D_G · 8`` bytes; for ``"overall"`` twice a float32 store)
plus the permutation chunks.
"""

from __future__ import annotations

import json
import math
import os
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch

from hf_fisher.consumers.gradient_store import GradientStore, attention_params, store_gradients
from hf_fisher.errors import InvalidInputError, ModelMismatchError, regex_argument
from hf_fisher.hookspecs import hookimpl
from hf_fisher.layout import layer_of

__all__ = [
    "GROUPS",
    "ConflictCluster",
    "ConflictResult",
    "sample_conflicts",
    "permutation_pvalues",
    "fdr_bh",
    "unit_l2_effect_size",
    "format_p",
    "hf_fisher_register_consumers",
]

GROUPS = ("param", "layer")
OVERALL = "overall"
_TIE_TOL = 1e-12
_CHUNK_BYTES = 32 * 2**20


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

    ``cosine``, ``effect_size`` (unit-vector L2 effect size), ``p_values`` (raw permutation
    p-values), ``p_adjusted`` (Benjamini–Hochberg over all tested entries) and ``significant``
    map each group key (``groups``, ending with ``"overall"``) to an ``[n_A, n_B]`` tensor; row
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
    n_permutations: int = 1000
    alpha: float = 0.05
    eps: float = 1e-8
    seed: int = 0
    fisher_source: str = "pooled"

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
            "n_permutations": self.n_permutations, "alpha": self.alpha, "eps": self.eps, "seed": self.seed,
            "fisher_source": self.fisher_source,
            "cosine": mat(self.cosine), "effect_size": mat(self.effect_size), "p_values": mat(self.p_values),
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


def _unit(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``x`` scaled to unit norm (zero rows stay zero) and the squared norms of the result (1 or 0)."""
    norm = x.norm(dim=1, keepdim=True)
    nz = norm > 0
    u = torch.where(nz, x / torch.where(nz, norm, torch.ones_like(norm)), torch.zeros_like(x))
    return u, nz.squeeze(1).to(x.dtype)


def unit_l2_effect_size(cos: torch.Tensor, sq_a: torch.Tensor | None = None, sq_b: torch.Tensor | None = None) -> torch.Tensor:
    """Unit-vector L2 effect size ``d = ‖u − v‖₂ / 2`` from ``cos = u · v`` and the squared norms
    of the unit vectors (1, or 0 for a zero gradient; default 1): ``d = sqrt(‖u‖² + ‖v‖² − 2 cos) / 2``,
    i.e. ``sqrt((1 − cos) / 2)`` for non-zero gradients. Not Cohen's d."""
    a = torch.ones(cos.shape[0], dtype=cos.dtype) if sq_a is None else sq_a
    b = torch.ones(cos.shape[1], dtype=cos.dtype) if sq_b is None else sq_b
    return (a[:, None] + b[None, :] - 2 * cos).clamp_min(0).sqrt() / 2


def permutation_pvalues(
    x_a: torch.Tensor, x_b: torch.Tensor, *, n_permutations: int = 1000, seed: int = 0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines ``[n_A, n_B]`` of the rows of ``x_a`` ``[n_A, D]`` and ``x_b`` ``[n_B, D]`` and their
    one-sided (conflict) permutation p-values ``p = (1 + #{k : cos(x_a,i, π_k(x_b,j)) ≤ cos_ij}) / (1 + K)``,
    ``π_k`` random permutations of the D coordinates (shared by all pairs), drawn from ``generator``
    (default: a CPU generator seeded with ``seed``). Computed in float64, in chunks of permutations."""
    if isinstance(n_permutations, bool) or not isinstance(n_permutations, int) or n_permutations < 1:
        raise InvalidInputError(f"n_permutations must be a positive integer, got {n_permutations!r}")
    x_a = x_a.detach().to("cpu", torch.float64).reshape(x_a.shape[0], -1)
    x_b = x_b.detach().to("cpu", torch.float64).reshape(x_b.shape[0], -1)
    if x_a.shape[1] != x_b.shape[1]:
        raise InvalidInputError(f"x_a has {x_a.shape[1]} coordinates, x_b {x_b.shape[1]}: they must match")
    u, _ = _unit(x_a)
    v, _ = _unit(x_b)
    cos = (u @ v.T).clamp_(-1.0, 1.0)
    n_a, n_b, dim = u.shape[0], v.shape[0], u.shape[1]
    count = torch.zeros((n_a, n_b), dtype=torch.float64)
    if n_a and n_b and dim:
        gen = generator if generator is not None else torch.Generator().manual_seed(int(seed))
        per_perm = 8 * (n_b * dim + 2 * n_a * n_b + 2 * dim)  # gathered copy, null cosines + mask, keys + indices
        chunk = max(1, min(n_permutations, _CHUNK_BYTES // per_perm))
        bound = (cos + _TIE_TOL)[:, :, None]
        done = 0
        while done < n_permutations:
            k = min(chunk, n_permutations - done)
            perms = torch.rand((k, dim), generator=gen, dtype=torch.float64).argsort(dim=1)  # [k, D]
            vp = v[:, perms]  # [n_B, k, D]
            null = (u @ vp.reshape(n_b * k, dim).T).reshape(n_a, n_b, k)
            count += (null <= bound).sum(dim=2).to(torch.float64)
            done += k
    return cos, (1.0 + count) / (1.0 + n_permutations)


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
    from hf_fisher.consumers.gradient_store import samples_that_fit

    fit, per_sample = samples_that_fit(model, names, dtype, budget)
    n = sum(int(b["input_ids"].shape[0]) for b in batches)
    if n > fit:
        raise InvalidInputError(
            f"task {task}: {n} samples x {per_sample / 2**20:.2f} MB of gradients need {n * per_sample / 2**20:.1f} MB; "
            f"memory_budget_mb={budget:g} holds {fit} samples. Raise memory_budget_mb, pass fewer samples or "
            "parameters (params=, layers=), or use a smaller dtype"
        )


def _check_fisher(fisher: Any, model: Any, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    from hf_fisher.fisher import Fisher

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
    batches_a: "Iterable[Mapping[str, Any]] | GradientStore",
    batches_b: "Iterable[Mapping[str, Any]] | GradientStore",
    *,
    fisher: Any = None,
    params: "str | Sequence[str] | None" = None,
    layers: Iterable[int] | None = None,
    eps: float = 1e-8,
    groups: str = "param",
    n_permutations: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
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
    one-sided permutation p-value ``p = (1 + #{cos_perm ≤ cos}) / (1 + n_permutations)`` and its
    Benjamini–Hochberg adjustment over all tested entries; ``significant = p_adj < alpha and
    cos < 0``. See the module docstring for the details and the cost.

    The ``top_k`` strongest significant entries (smallest adjusted p, then most negative cosine)
    become ``top_conflicts`` and ``claims`` ("sample 7 of task A conflicts with sample 23 of task B
    on layer 3 q_proj (p < 0.001, d = 0.73)", p the BH-adjusted p-value, samples numbered by
    their row in the store, ``sample_ids_*`` give ``(batch, row)``). Recommendations: a sample with
    significant overall conflicts with at least half of the other task's samples is to *filter*,
    one with fewer to *down-weight* (a heuristic); hotspots are the groups with the most
    significant conflicts. An empty task gives empty results and a warning.

    Raises :class:`InvalidInputError` before any work on bad arguments (unknown ``groups``,
    ``eps <= 0``, ``alpha`` outside (0, 1), ``n_permutations < 1``, a Fisher of another model, of
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
    if isinstance(n_permutations, bool) or not isinstance(n_permutations, int) or n_permutations < 1:
        raise InvalidInputError(f"n_permutations must be a positive integer, got {n_permutations!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidInputError(f"seed must be an integer, got {seed!r}")
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

    def empty(dt: torch.dtype) -> dict[str, torch.Tensor]:
        return {k: torch.zeros((n_a, n_b), dtype=dt) for k in keys}

    common = dict(groups=keys, group_params=group_params, sample_ids_a=list(sa.sample_ids), sample_ids_b=list(sb.sample_ids),
                  n_permutations=n_permutations, alpha=float(alpha), eps=float(eps), seed=seed,
                  fisher_source="pooled" if fisher is None else "given")
    if n_a == 0 or n_b == 0:
        warnings.warn(f"sample_conflicts: task {'A' if n_a == 0 else 'B'} has no sample with a gradient; "
                      "returning empty results", UserWarning, stacklevel=2)
        ones = {k: torch.ones((n_a, n_b), dtype=torch.float64) for k in keys}
        return ConflictResult(cosine=empty(torch.float64), effect_size=empty(torch.float64), p_values=ones,
                              p_adjusted={k: v.clone() for k, v in ones.items()}, significant=empty(torch.bool),
                              clusters=[], claims=[], recommendations={"samples": [], "hotspots": [], "actions": [
                                  "No conflicts can be computed: one of the tasks has no sample."]}, **common)

    # --- Fisher and natural-gradient coordinates
    if fisher_given is None:
        F = {n: ((sa.grads[n].double() ** 2).sum(0) + (sb.grads[n].double() ** 2).sum(0)) / (n_a + n_b) for n in names}
    else:
        F = fisher_given
    scale = {n: (F[n] + eps).rsqrt() for n in names}

    def natural(store: GradientStore, plist: list[str]) -> torch.Tensor:
        return torch.cat([(store.grads[n].double() * scale[n]).reshape(store.num_samples, -1) for n in plist], dim=1)

    # --- cosines, effect sizes, permutation p-values
    cosine, effect, pvals = {}, {}, {}
    for key in tqdm(keys, desc="conflict permutation tests", unit="group", disable=not progress):
        xa, xb = natural(sa, group_params[key]), natural(sb, group_params[key])
        gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(key.encode())) % (2**63))
        cos, p = permutation_pvalues(xa, xb, n_permutations=n_permutations, generator=gen)
        _, sq_a = _unit(xa)
        _, sq_b = _unit(xb)
        cosine[key], effect[key], pvals[key] = cos, unit_l2_effect_size(cos, sq_a, sq_b), p

    flat = torch.cat([pvals[k].reshape(-1) for k in keys])
    adj_flat = fdr_bh(flat)
    padj, sig, offset = {}, {}, 0
    for k in keys:
        padj[k] = adj_flat[offset:offset + n_a * n_b].reshape(n_a, n_b)
        offset += n_a * n_b
        sig[k] = (padj[k] < alpha) & (cosine[k] < 0)

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
    recs = _recommendations(sig, summary, keys, n_a, n_b, top_k, alpha)
    return ConflictResult(cosine=cosine, effect_size=effect, p_values=pvals, p_adjusted=padj, significant=sig,
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


def _recommendations(sig, summary, keys, n_a, n_b, top_k, alpha) -> dict[str, Any]:
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
        actions.append(f"No significant conflicts at FDR level alpha = {alpha:g}: nothing to filter or down-weight.")
    return {"samples": samples, "hotspots": hotspots, "actions": actions}


@hookimpl
def hf_fisher_register_consumers(register):
    register("sample_conflicts", sample_conflicts)
