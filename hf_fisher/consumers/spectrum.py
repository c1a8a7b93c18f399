"""Spectra of the Fisher and of the generalised Gauss-Newton matrix (built-in consumer "spectrum").

Two curvature matrices over the selected trainable parameters θ ∈ R^P and the N used samples:
the **empirical Fisher** ``F = (1/N) Σ_i g_i g_iᵀ`` (``curvature="empirical"``) and the **GGN =
true Fisher** ``G = (1/N) Σ_i c_i Σ_t J_itᵀ H_it J_it`` (``curvature="ggn"``), on the same scale;
their definitions, scale and products are in :mod:`hf_fisher.estimators.curvature`, whose
operators this consumer measures.

What :func:`spectrum` returns (a :class:`SpectrumResult`):

- the top-k eigenvalues (eigenvectors on request) by ``scipy.sparse.linalg.eigsh`` (ARPACK's
  implicitly restarted Lanczos, which keeps its Lanczos basis orthogonal by DGKS
  reorthogonalisation) on a ``scipy.sparse.linalg.LinearOperator``;
- the Hutchinson trace ``tr(A) ≈ (1/m) Σ_j z_jᵀ A z_j`` with m seeded Rademacher probes and its
  standard error ``std_j(z_jᵀ A z_j) / sqrt(m)`` (plus the exact trace ``‖G‖_F² / N`` when the
  empirical gradient matrix is kept);
- the stochastic Lanczos quadrature (SLQ) spectral density (Ubaru, Chen & Saad 2017; Ghorbani,
  Krishnan & Xiao 2019): for each of n_v normalised Rademacher vectors v, m steps of Lanczos
  with full reorthogonalisation give T_m = U diag(θ) Uᵀ; the density of eigenvalues (normalised
  to integrate to 1 over the P eigenvalues) is ``ρ(x) = (1/n_v) Σ_v Σ_k U_0k² φ_σ(x − θ_k)``
  with φ_σ a Gaussian of width σ; ``Σ_k U_0k² θ_k = vᵀ A v`` so its mean estimates tr(A)/P;
- per-block spectra (empirical Fisher): for a block b of parameter coordinates (one layer; one
  attention head = its Q rows, the K and V rows of its kv-head (shared under GQA/MQA) and its O
  columns; or each of a head's Q/K/V/O slices alone) the principal sub-matrix
  ``F_bb = G_bᵀ G_b / N`` has the same non-zero eigenvalues as the N x N Gram matrix
  ``G_b G_bᵀ / N``, so its full spectrum is exact from whichever is smaller;
- capacity metrics of these spectra (:func:`capacity_metrics`, formulas there).

Registered as the consumer ``"spectrum"`` (``hf_fisher_register_consumers``): a spectrum is not a
diagonal :class:`~hf_fisher.Fisher` artifact, so it does not fit the estimator registry, whose
entries must return one.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hf_fisher.errors import InvalidInputError, UnsupportedError
from hf_fisher.estimators.curvature import (
    BLOCK_KINDS,
    CURVATURES,
    EmpiricalFisherOperator,
    GGNOperator,
    _eval_mode,
    _Operator,
    _Problem,
    block_definitions,
)
from hf_fisher.hookspecs import hookimpl

__all__ = [
    "BLOCK_KINDS",
    "CURVATURES",
    "BlockSpectrum",
    "SpectrumResult",
    "block_spectrum",
    "capacity_metrics",
    "hf_fisher_register_consumers",
    "hutchinson_trace",
    "lanczos",
    "slq_density",
    "spectrum",
]

log = logging.getLogger(__name__)


# ============================================================================================
# capacity metrics


def capacity_metrics(
    eigenvalues: Sequence[float] | np.ndarray,
    dim: int,
    *,
    trace: float | None = None,
    prior_precision: float = 1.0,
    n_samples: int | None = None,
    rtol: float | None = None,
) -> dict[str, Any]:
    """Capacity metrics of a PSD curvature matrix A (dimension ``dim``) from its eigenvalues.

    ``eigenvalues`` are the non-zero (or top-k) eigenvalues λ_1 ≥ λ_2 ≥ ...; the remaining
    ``dim - len(eigenvalues)`` are taken as 0 (exact for a block's full Gram spectrum; for a
    top-k spectrum the metrics are those of the top-k part, and ``trace`` may be passed to use
    an independent estimate of tr(A) for the energies). Eigenvalues below ``rtol · λ_1``
    (default ``max(dim, len) · eps_float64 · 10``) are rounding and count as 0. Returned keys:

    - ``trace``            tr(A) = Σ_j λ_j (or the ``trace`` given)
    - ``eigmax`` / ``sharpness``  λ_1, the sharpness (largest curvature)
    - ``eigmin_nonzero``   λ_r, the smallest eigenvalue above the rounding threshold
    - ``rank``             r = #{j: λ_j > rtol · λ_1} (numerical rank)
    - ``condition_number`` κ = λ_1 / λ_r on the range of A (κ of the whole matrix is ∞ when
      r < dim: ``full_rank`` says which); 1 for a rank-1 matrix, NaN for A = 0
    - ``energy_r8`` / ``energy_r16``  E_k = (Σ_{j ≤ k} λ_j) / tr(A) for k = 8, 16
    - ``effective_rank_90``  min {k : E_k ≥ 0.9}
    - ``entropy_effective_rank``  exp(−Σ_j q_j log q_j), q_j = λ_j / Σ λ (Roy & Vetterli 2007)
    - ``pac_bayes_complexity``  the curvature term of the KL divergence of a Laplace posterior
      Q = N(θ, (N·A + δ I)^{-1}) from the prior P = N(θ, δ^{-1} I) (δ = ``prior_precision``,
      N = ``n_samples``, 1 if not given):
      ``KL(Q‖P) = ½ Σ_j [log(1 + N λ_j / δ) − N λ_j / (N λ_j + δ)]`` (Gaussian KL; the
      ‖θ − θ_0‖² term is 0 here as the prior is centred at θ). This is the complexity term of
      McAllester-style PAC-Bayes bounds with Gaussian posteriors (McAllester 1999; Dziugaite &
      Roy 2017); flat directions (λ_j ≈ 0) cost nothing, each sharp one ≈ ½ log(N λ_j / δ).
    """
    lam = np.sort(np.asarray(eigenvalues, dtype=np.float64).ravel())[::-1]
    if dim < 1:
        raise InvalidInputError(f"dim must be >= 1, got {dim}")
    if lam.size > dim:
        raise InvalidInputError(f"{lam.size} eigenvalues for a matrix of dimension {dim}")
    if prior_precision <= 0:
        raise InvalidInputError(f"prior_precision must be positive, got {prior_precision}")
    top = float(lam[0]) if lam.size else 0.0
    if rtol is None:
        rtol = 10 * max(dim, lam.size) * np.finfo(np.float64).eps
    pos = lam[lam > rtol * top] if top > 0 else lam[:0]
    total = float(trace) if trace is not None else float(pos.sum())
    r = int(pos.size)
    cum = np.cumsum(pos)

    def energy(k: int) -> float:
        if total <= 0:
            return float("nan")
        return float(cum[min(k, r) - 1] / total) if r else 0.0

    eff90 = float("nan")
    if total > 0 and r:
        hit = np.nonzero(cum >= 0.9 * total * (1 - 1e-12))[0]
        eff90 = int(hit[0]) + 1 if hit.size else float("nan")  # nan: top-k holds < 90% of the trace
    q = pos / pos.sum() if r else pos
    entropy_rank = float(np.exp(-(q * np.log(q)).sum())) if r else 0.0
    n = 1 if n_samples is None else int(n_samples)
    x = n * pos / prior_precision
    pac = float(0.5 * (np.log1p(x) - x / (1 + x)).sum())
    return {
        "dim": int(dim),
        "trace": total,
        "eigmax": top,
        "sharpness": top,
        "eigmin_nonzero": float(pos[-1]) if r else 0.0,
        "rank": r,
        "full_rank": r == dim,
        "condition_number": float(top / pos[-1]) if r else float("nan"),
        "energy_r8": energy(8),
        "energy_r16": energy(16),
        "effective_rank_90": eff90,
        "entropy_effective_rank": entropy_rank,
        "pac_bayes_complexity": pac,
        "prior_precision": float(prior_precision),
        "n_samples": n,
    }


# ============================================================================================
# Lanczos, Hutchinson, SLQ (generic: any symmetric matvec on float64 numpy vectors)


def lanczos(matvec, v0: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """``steps`` steps of Lanczos with full reorthogonalisation from ``v0``.

    Returns the tridiagonal coefficients (α [m], β [m-1]) of T_m = Vᵀ A V, V the orthonormal
    Krylov basis of span{v0, A v0, ...}. Every new vector is orthogonalised twice against all
    previous ones (classical Gram-Schmidt, repeated: "twice is enough"), so V stays orthonormal
    to rounding and T_m has no spurious copies of converged eigenvalues. Stops early (m <
    ``steps``) when the Krylov space is exhausted (β below 1e-12 ‖A‖ estimate).
    """
    n = v0.shape[0]
    steps = max(1, min(int(steps), n))
    V = np.zeros((steps, n))
    alpha, beta = [], []
    v = v0 / np.linalg.norm(v0)
    scale = 0.0
    for j in range(steps):
        V[j] = v
        w = np.asarray(matvec(v), dtype=np.float64).ravel()
        a = float(w @ v)
        alpha.append(a)
        for _ in range(2):
            w -= V[: j + 1].T @ (V[: j + 1] @ w)
        b = float(np.linalg.norm(w))
        scale = max(scale, abs(a), b)
        if j == steps - 1 or b <= 1e-12 * max(scale, 1e-300):
            break
        beta.append(b)
        v = w / b
    return np.array(alpha), np.array(beta)


def _rademacher(n: int, gen: torch.Generator) -> np.ndarray:
    return (torch.randint(0, 2, (n,), generator=gen, dtype=torch.int64) * 2 - 1).double().numpy()


def hutchinson_trace(matvec, dim: int, probes: int, seed: int = 0) -> tuple[float, float, np.ndarray]:
    """Hutchinson's estimator with Rademacher probes z_j (seeded):
    ``tr(A) ≈ t̂ = (1/m) Σ_j z_jᵀ A z_j`` (unbiased, E[z zᵀ] = I), standard error
    ``std(z_jᵀ A z_j, ddof=1) / sqrt(m)``. Returns (t̂, standard error, the m samples)."""
    if probes < 2:
        raise InvalidInputError(f"hutchinson_probes must be >= 2 (a standard error needs two), got {probes}")
    gen = torch.Generator().manual_seed(int(seed))
    samples = np.empty(probes)
    for j in range(probes):
        z = _rademacher(dim, gen)
        samples[j] = float(z @ np.asarray(matvec(z)).ravel())
    return float(samples.mean()), float(samples.std(ddof=1) / math.sqrt(probes)), samples


def slq_density(
    matvec, dim: int, *, vectors: int = 8, steps: int = 40, grid_size: int = 256, sigma: float | None = None, seed: int = 1,
) -> dict[str, Any]:
    """Stochastic Lanczos quadrature density of the eigenvalues of A (see the module docstring).

    Returns ``grid`` and ``density`` (ρ on the grid, ∫ρ ≈ 1), ``nodes`` / ``weights`` (the
    Gauss quadrature of each vector: θ_k and U_0k², weights of a vector summing to 1), the
    quadrature ``mean`` ``(1/n_v) Σ_v Σ_k U_0k² θ_k`` (an estimate of tr(A)/dim) and ``sigma``
    (default: (θ_max − θ_min) / 100, or 1e-3·|θ_max| for a single node). The grid spans
    [θ_min − 6σ, θ_max + 6σ], so the Gaussians' mass lies on it.
    """
    gen = torch.Generator().manual_seed(int(seed))
    nodes, weights = [], []
    for _ in range(vectors):
        z = _rademacher(dim, gen)
        a, b = lanczos(matvec, z, steps)
        T = np.diag(a) + np.diag(b, 1) + np.diag(b, -1)
        theta, U = np.linalg.eigh(T)
        nodes.append(theta)
        weights.append(U[0] ** 2)
    allnodes = np.concatenate(nodes)
    lo, hi = float(allnodes.min()), float(allnodes.max())
    if sigma is None:
        sigma = (hi - lo) / 100 if hi > lo else max(1e-3 * abs(hi), 1e-12)
    grid = np.linspace(lo - 6 * sigma, hi + 6 * sigma, grid_size)
    dens = np.zeros(grid_size)
    for th, w in zip(nodes, weights):
        dens += (w[None, :] * np.exp(-0.5 * ((grid[:, None] - th[None, :]) / sigma) ** 2)).sum(1)
    dens /= vectors * sigma * math.sqrt(2 * math.pi)
    mean = float(np.mean([(w * th).sum() for th, w in zip(nodes, weights)]))
    return {"grid": grid, "density": dens, "nodes": nodes, "weights": weights, "mean": mean, "sigma": float(sigma),
            "vectors": int(vectors), "steps": int(steps)}


@dataclass
class BlockSpectrum:
    """Exact spectrum of one block F_bb of the empirical Fisher: ``eigenvalues`` are its non-zero
    eigenvalues (descending; at most min(N, dim) of them, the rest are 0) and ``metrics`` the
    :func:`capacity_metrics` of the block."""

    name: str
    dim: int
    eigenvalues: np.ndarray
    metrics: dict[str, Any]
    method: str  # "gram" (N x N) or "dense" (dim x dim)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dim": self.dim, "method": self.method,
                "eigenvalues": [float(x) for x in self.eigenvalues], "metrics": _jsonable(self.metrics)}


def block_spectrum(G: torch.Tensor, index: torch.Tensor, name: str, *, prior_precision: float) -> BlockSpectrum:
    """Full spectrum of ``F_bb = G_bᵀ G_b / N`` from ``G_b G_bᵀ / N`` (N < dim) or directly."""
    N = G.shape[0]
    Gb = G[:, index]
    dim = int(index.numel())
    if dim > N:
        lam = torch.linalg.eigvalsh(Gb @ Gb.T / N)
        method = "gram"
    else:
        lam = torch.linalg.eigvalsh(Gb.T @ Gb / N)
        method = "dense"
    lam = lam.flip(0).clamp(min=0).numpy()
    lam = lam[: min(N, dim)]
    metrics = capacity_metrics(lam, dim, prior_precision=prior_precision, n_samples=N)
    keep = lam[: max(metrics["rank"], 1)] if lam.size else lam
    return BlockSpectrum(name, dim, keep, metrics, method)


# ============================================================================================
# result


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return [_jsonable(v) for v in x.tolist()]
    if isinstance(x, (np.floating, float)):
        f = float(x)
        return f if math.isfinite(f) else (None if math.isnan(f) else ("inf" if f > 0 else "-inf"))
    if isinstance(x, (np.integer,)):
        return int(x)
    return x


@dataclass
class SpectrumResult:
    """What :func:`spectrum` measured (see the module docstring for every quantity).

    - ``eigenvalues`` [k] (descending) and ``eigenvectors`` [P, k] (or None): top-k of the
      curvature over the flat parameter vector; :meth:`eigenvector` gives one as ``{name: tensor}``;
    - ``trace`` / ``trace_stderr`` / ``trace_probes``: Hutchinson; ``trace_exact``: ‖G‖_F²/N
      (empirical with G kept) else None;
    - ``density``: SLQ (``grid``, ``density``, ``nodes``, ``weights``, ``mean``, ``sigma``) or None;
    - ``blocks``: name -> :class:`BlockSpectrum`;
    - ``capacity``: :func:`capacity_metrics` of the whole matrix, from the full non-zero spectrum
      (the N x N Gram of G) when G is kept (``capacity_source="gram"``), else from the top-k
      eigenvalues with the Hutchinson trace (``"top-k"``: a partial spectrum, so rank,
      condition number and PAC-Bayes term are those of the top-k part);
    - ``matvecs`` / ``seconds_per_matvec``: cost of the curvature-vector products.
    """

    curvature: str
    normalization: str
    dim: int
    n_samples: int
    names: list[str]
    shapes: dict[str, tuple[int, ...]]
    eigenvalues: np.ndarray
    eigenvectors: np.ndarray | None
    trace: float | None
    trace_stderr: float | None
    trace_probes: int
    trace_exact: float | None
    density: dict[str, Any] | None
    blocks: dict[str, BlockSpectrum]
    capacity: dict[str, Any]
    capacity_source: str
    matvecs: int
    seconds_per_matvec: float | None
    backend: str
    extra: dict[str, Any] = field(default_factory=dict)

    def eigenvector(self, j: int = 0) -> dict[str, torch.Tensor]:
        """Eigenvector ``j`` (0 = largest eigenvalue) as ``{param name: tensor of its shape}``."""
        if self.eigenvectors is None:
            raise InvalidInputError("no eigenvectors were kept: call spectrum(..., return_vectors=True)")
        if not 0 <= j < self.eigenvectors.shape[1]:
            raise InvalidInputError(f"eigenvector index {j} is outside [0, {self.eigenvectors.shape[1]})")
        v = torch.from_numpy(self.eigenvectors[:, j].copy())
        out, o = {}, 0
        for n in self.names:
            k = int(np.prod(self.shapes[n], dtype=np.int64))
            out[n] = v[o : o + k].view(self.shapes[n])
            o += k
        return out

    def to_dict(self) -> dict[str, Any]:
        d = {
            "curvature": self.curvature, "normalization": self.normalization, "dim": self.dim,
            "n_samples": self.n_samples, "backend": self.backend,
            "eigenvalues": self.eigenvalues,
            "trace": {"hutchinson": self.trace, "stderr": self.trace_stderr, "probes": self.trace_probes, "exact": self.trace_exact},
            "capacity": self.capacity, "capacity_source": self.capacity_source,
            "blocks": {k: b.to_dict() for k, b in self.blocks.items()},
            "matvecs": self.matvecs, "seconds_per_matvec": self.seconds_per_matvec,
            "extra": self.extra,
        }
        if self.density is not None:
            d["density"] = {k: self.density[k] for k in ("grid", "density", "mean", "sigma", "vectors", "steps")}
        return _jsonable(d)

    def to_json(self, path: str | None = None, **kwargs: Any) -> str:
        """JSON text of :meth:`to_dict` (eigenvectors left out); written to ``path`` if given."""
        text = json.dumps(self.to_dict(), **({"indent": 2} | kwargs))
        if path is not None:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text)
        return text


# ============================================================================================
# entry point


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InvalidInputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def spectrum(
    model,
    batches: Iterable[Mapping[str, Any]],
    *,
    curvature: str = "empirical",
    k: int = 5,
    blocks: str | Sequence[str] | None = ("layer", "head"),
    return_vectors: bool = False,
    hutchinson_probes: int = 32,
    slq_vectors: int = 4,
    slq_steps: int = 30,
    grid_size: int = 256,
    sigma: float | None = None,
    seed: int = 0,
    tol: float = 0.0,
    params: str | Iterable[str] | None = None,
    normalization: str = "mean",
    task_type: str | None = None,
    prior_precision: float = 1.0,
    max_memory_mb: float = 1024.0,
    retain_graphs: bool = False,
) -> SpectrumResult:
    """Spectrum of the empirical Fisher or the GGN of ``model`` on ``batches`` (module docstring).

    Args:
        curvature: ``"empirical"`` (F = (1/N) Σ g_i g_iᵀ) or ``"ggn"`` (the true Fisher
            (1/N) Σ_i c_i Σ_t J_itᵀ H_it J_it; scale in the module docstring).
        k: number of top eigenvalues (``1 <= k < P``), by ``scipy.sparse.linalg.eigsh``.
        blocks: block kinds for exact per-block spectra (``"layer"``, ``"head"``,
            ``"head_qkvo"``; empirical Fisher only), or None.
        return_vectors: keep the top-k eigenvectors (``SpectrumResult.eigenvector``).
        hutchinson_probes: Rademacher probes of the trace estimate (0 = none, else >= 2).
        slq_vectors / slq_steps / grid_size / sigma: SLQ density (``slq_vectors=0``: none).
        seed: seeds eigsh's start vector, the Hutchinson probes (seed) and SLQ (seed + 1).
        tol: eigsh's relative tolerance (0 = machine precision).
        params: restrict to some trainable parameters (regex or list of names, as in ``collect``).
        normalization: per-sample loss normalisation ("mean" | "sum" | "token").
        prior_precision: δ of the PAC-Bayes complexity term (:func:`capacity_metrics`).
        max_memory_mb: keep the empirical gradient matrix G (N x P float64) only within this;
            beyond it the empirical operator is matrix-free (jvp/vjp) and ``blocks`` is refused.
        retain_graphs: matrix-free products keep each batch's vjp closure across products
            (one forward less per batch and product; holds every batch's activations).

    The model runs in eval mode (restored afterwards); ``batches`` are read once and kept.
    """
    if curvature not in CURVATURES:
        raise InvalidInputError(f"unknown curvature {curvature!r}; choose one of {CURVATURES}")
    k = _check_int("k", k, 1)
    hutchinson_probes = _check_int("hutchinson_probes", hutchinson_probes, 0)
    if hutchinson_probes == 1:
        raise InvalidInputError("hutchinson_probes must be 0 (no trace estimate) or >= 2 (a standard error needs two)")
    slq_vectors = _check_int("slq_vectors", slq_vectors, 0)
    slq_steps = _check_int("slq_steps", slq_steps, 1)
    grid_size = _check_int("grid_size", grid_size, 2)
    if isinstance(blocks, str):
        blocks = (blocks,)
    blocks = tuple(blocks or ())
    bad = [b for b in blocks if b not in BLOCK_KINDS]
    if bad:
        raise InvalidInputError(f"unknown block kind(s) {bad}; choose from {BLOCK_KINDS} (or blocks=None)")
    if blocks and curvature != "empirical":
        raise UnsupportedError(
            "exact per-block spectra come from the Gram matrix of per-sample gradients, i.e. the empirical Fisher; "
            "pass blocks=None with curvature='ggn' (or curvature='empirical')"
        )
    if not (isinstance(prior_precision, (int, float)) and prior_precision > 0):
        raise InvalidInputError(f"prior_precision must be a positive number, got {prior_precision!r}")

    problem = _Problem(model, batches, params=params, normalization=normalization, task_type=task_type)
    P, N = problem.dim, problem.n_samples
    if k >= P:
        raise InvalidInputError(f"k={k} must be smaller than the number of parameters P={P} (eigsh needs k < P)")
    try:
        with _eval_mode(model):
            G = None
            if curvature == "empirical":
                need_mb = N * P * 8 / 2**20
                if need_mb <= max_memory_mb:
                    G = problem.gradient_matrix()
                    op: _Operator = EmpiricalFisherOperator(problem, G)
                    backend = "engine per-sample gradients (G kept)"
                else:
                    if blocks:
                        raise InvalidInputError(
                            f"per-block spectra need the per-sample gradient matrix ({N} x {P} float64 = {need_mb:.0f} MB) "
                            f"beyond max_memory_mb={max_memory_mb:g}; raise max_memory_mb, restrict params=..., use fewer "
                            "samples, or pass blocks=None"
                        )
                    op = EmpiricalFisherOperator(problem, None, retain_graphs=retain_graphs)
                    backend = "matrix-free jvp/vjp of per-sample losses"
            else:
                op = GGNOperator(problem, retain_graphs=retain_graphs)
                backend = "matrix-free jvp/vjp of the logits, analytic softmax Hessian"
            result = _measure(problem, op, G, curvature=curvature, k=k, blocks=blocks, return_vectors=return_vectors,
                              probes=hutchinson_probes, slq_vectors=slq_vectors, slq_steps=slq_steps, grid_size=grid_size,
                              sigma=sigma, seed=seed, tol=tol, prior_precision=prior_precision, backend=backend)
    finally:
        if problem.restore_attn is not None:
            model.set_attn_implementation(problem.restore_attn)
    return result


def _measure(problem, op, G, *, curvature, k, blocks, return_vectors, probes, slq_vectors, slq_steps, grid_size,
             sigma, seed, tol, prior_precision, backend) -> SpectrumResult:
    from scipy.sparse.linalg import eigsh

    P, N = problem.dim, problem.n_samples
    gen = torch.Generator().manual_seed(int(seed))
    v0 = torch.rand(P, generator=gen, dtype=torch.float64).numpy() + 0.5
    log.info("hf_fisher spectrum: %s curvature, P=%d parameters, N=%d samples, top-%d by eigsh", curvature, P, N, k)
    vals, vecs = eigsh(op.scipy(), k=k, which="LA", tol=tol, v0=v0, return_eigenvectors=True)
    order = np.argsort(vals)[::-1]
    vals, vecs = vals[order], vecs[:, order]
    trace = stderr = None
    if probes:
        trace, stderr, _ = hutchinson_trace(op.matvec, P, probes, seed=seed)
    density = slq_density(op.matvec, P, vectors=slq_vectors, steps=slq_steps, grid_size=grid_size, sigma=sigma, seed=seed + 1) if slq_vectors else None
    trace_exact = float(G.square().sum() / N) if G is not None else None
    if G is not None:
        K = G @ G.T / N
        lam = torch.linalg.eigvalsh(K).flip(0).clamp(min=0).numpy()[: min(N, P)]
        capacity = capacity_metrics(lam, P, prior_precision=prior_precision, n_samples=N)
        source = "gram"
    else:
        capacity = capacity_metrics(np.clip(vals, 0, None), P, trace=trace, prior_precision=prior_precision, n_samples=N)
        source = "top-k"
    block_results = {}
    if blocks and G is not None:
        for name, ix in block_definitions(problem, blocks).items():
            block_results[name] = block_spectrum(G, ix, name, prior_precision=prior_precision)
    return SpectrumResult(
        curvature=curvature, normalization=problem.normalization, dim=P, n_samples=N, names=list(problem.names),
        shapes=dict(problem.shapes), eigenvalues=vals, eigenvectors=vecs if return_vectors else None,
        trace=trace, trace_stderr=stderr, trace_probes=probes, trace_exact=trace_exact, density=density,
        blocks=block_results, capacity=capacity, capacity_source=source, matvecs=op.matvecs,
        seconds_per_matvec=(op.seconds / op.matvecs) if op.matvecs else None, backend=backend,
        extra={"k": k, "seed": seed, "tol": tol, "task_type": problem.task_type},
    )


@hookimpl
def hf_fisher_register_consumers(register):
    register("spectrum", spectrum)
