"""Spectra of the Fisher and of the generalised Gauss-Newton matrix (built-in consumer "spectrum").

Two curvature matrices over the selected trainable parameters θ ∈ R^P and the N used samples
(samples with at least one label token), with the per-sample loss l_i of the normalisation in use
(``"mean"`` default: l_i = S_i / n_i, S_i the summed cross-entropy over the n_i label tokens of
sample i; see :mod:`hf_fisher.engine.losses`):

- **empirical Fisher** (``curvature="empirical"``)::

      F = (1/N) Σ_i g_i g_iᵀ,        g_i = d l_i / dθ,        F v = (1/N) Σ_i g_i (g_iᵀ v)

  Its diagonal is exactly the core's empirical diagonal Fisher (``hf_fisher.collect``, same
  normalisation). The signed per-sample gradients g_i come from the core engine
  (:class:`~hf_fisher.engine.per_sample.PerSampleEngine`, one batched forward/backward per
  batch, with its exactness checks) through a gradient sink, and are kept as an N x P float64
  matrix G; then ``F v = Gᵀ (G v) / N`` costs two matrix products. Where G would not fit in
  ``max_memory_mb`` the operator is matrix-free instead: per batch, ``u = J_l v`` by forward-mode
  AD (``torch.func.jvp`` of the per-sample losses l = (l_1..l_B)) and ``F v += J_lᵀ u / N`` by
  ``torch.func.vjp`` (block spectra need G and are then refused).

- **GGN = true Fisher** (``curvature="ggn"``)::

      G = (1/N) Σ_i c_i Σ_{t ∈ L_i} J_itᵀ H_it J_it,      H_it = diag(p_it) − p_it p_itᵀ

  with z_it the logits that predict label position t of sample i (causal LM: position t − 1),
  J_it = dz_it/dθ, p_it = softmax(z_it) and H_it the Hessian of the cross-entropy with respect
  to the logits (the same for every label, so no label enters: padding and -100 positions are
  masked out). ``G v`` is ``torch.func.jvp`` of the logits (J v), H applied analytically per
  position, then ``torch.func.vjp`` (Jᵀ ·): no double backward and no sampled labels.

  **Scale.** ``c_i = (w_i s_i)²`` with ``(w_i, s_i) = normalization_weights(n_i)``: 1/n_i² for
  "mean", 1 for "sum", 1/n_i for "token". With it G is *exactly* the expectation that the core's
  true Fisher estimator samples, ``G = (1/N) Σ_i E_{y ~ p_θ}[g_i(y) g_i(y)ᵀ]`` (label positions
  drawn independently; cross terms vanish since E[p − e_y] = 0), so ``diag(G)`` is the
  ``estimator="true"`` Fisher in the limit of infinitely many draws, and the GGN and the
  empirical Fisher are on the same scale. (The Gauss-Newton matrix of the *objective*
  (1/N) Σ_i l_i would instead weight sample i by w_i, i.e. 1/n_i for "mean": n_i times larger.)

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
import time
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import plugins
from ..engine.losses import (
    IGNORE_INDEX,
    NORMALIZATIONS,
    label_counts,
    normalization_weights,
    task_type_of,
    token_labels,
)
from ..engine.per_sample import ContributionSink, PerSampleEngine, Target
from ..errors import (
    EmptyDataError,
    InvalidInputError,
    NonFiniteError,
    NoTrainableParametersError,
    UnsupportedError,
)
from ..hookspecs import hookimpl

__all__ = [
    "BLOCK_KINDS",
    "CURVATURES",
    "BlockSpectrum",
    "EmpiricalFisherOperator",
    "GGNOperator",
    "SpectrumResult",
    "capacity_metrics",
    "hutchinson_trace",
    "lanczos",
    "slq_density",
    "spectrum",
]

log = logging.getLogger(__name__)

CURVATURES = ("empirical", "ggn")
BLOCK_KINDS = ("layer", "head", "head_qkvo")


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


# ============================================================================================
# the problem: model, parameters, prepared batches


class _GradientSink(ContributionSink):
    """Keeps the engine's signed per-sample gradients g_i of one batch (``reduction="param"``)."""

    accepts_gradients = True

    def __init__(self) -> None:
        self.rows: dict[str, list[torch.Tensor]] = {}
        self.squared: set[str] = set()

    def reset(self) -> None:
        self.rows = {}
        self.squared = set()

    def add(self, name: str, contributions: torch.Tensor) -> None:
        # the engine hands squares here on its per-sample path, zeros for a parameter without
        # parts: only the latter are usable as signed gradients
        if bool((contributions != 0).any()):
            self.squared.add(name)
        self.rows.setdefault(name, []).append(contributions.to(torch.float64))

    def add_gradients(self, name: str, gradients: torch.Tensor, *, owned: bool = False) -> list[int]:
        flat = gradients.reshape(gradients.shape[0], -1)
        if not bool(torch.isfinite(flat.sum())):
            return (~torch.isfinite(flat)).any(dim=1).nonzero().flatten().tolist()
        self.rows.setdefault(name, []).append(gradients.detach().to(torch.float64).clone())
        return []

    def commit(self, accumulators) -> None:  # pragma: no cover - never called: we read rows directly
        pass


@dataclass
class _Prepared:
    batch: dict[str, torch.Tensor]
    inputs: dict[str, Any]
    n_tokens: torch.Tensor      # [B] label tokens per sample
    used: torch.Tensor          # [B] bool: sample has label tokens
    label_mask: torch.Tensor    # [B, T] (or [B, 1]) bool: logit positions with a label
    w: torch.Tensor             # backward weight per sample
    s: torch.Tensor             # contribution scale per sample
    split: bool = False         # products taken sample by sample (see _Operator._functional_matvec)
    parts: list[_Prepared] | None = None


class _Problem:
    """Model, selected parameters and prepared batches shared by the curvature operators."""

    def __init__(self, model, batches, *, params, normalization: str, task_type: str | None):
        from ..collector import select_parameters

        if normalization not in NORMALIZATIONS:
            raise InvalidInputError(f"unknown normalization {normalization!r}; choose one of {NORMALIZATIONS}")
        named = select_parameters(model, params)
        if not named:
            raise NoTrainableParametersError(
                f"{type(model).__name__} has no trainable parameter (requires_grad=True); unfreeze the parameters "
                "whose spectrum you want"
            )
        self.model = model
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shapes = {n: tuple(p.shape) for n, p in named}
        self.numel = [int(p.numel()) for p in self.params]
        self.offsets = {}
        off = 0
        for n, k in zip(self.names, self.numel):
            self.offsets[n] = off
            off += k
        self.dim = off
        self.normalization = normalization
        self.restore_attn: str | None = None  # attention implementation to restore (see _forward_ad)
        self.task_type = task_type or task_type_of(model)
        self.problem_type = getattr(getattr(model, "config", None), "problem_type", None)
        self.engine = PerSampleEngine(
            model, [Target(n, p, None) for n, p in named], plugins.grad_rules(),
            task_type=self.task_type, normalization=normalization, on_nonfinite="raise",
        )
        self.device = self.engine.device
        self.param_dtype = self.params[0].dtype
        if batches is None:
            raise EmptyDataError("batches is None: pass an iterable of batch dicts with input_ids")
        self.batches: list[_Prepared] = []
        for i, b in enumerate(batches):
            self.batches.append(self._prepare(b, i))
        if not self.batches:
            raise EmptyDataError("no batches: pass at least one batch with input_ids")
        self.n_samples = int(sum(int(b.used.sum()) for b in self.batches))
        if self.n_samples == 0:
            raise EmptyDataError("no sample has a label token (all labels are -100 or padded); nothing to measure")

    def _prepare(self, batch: Mapping[str, Any], index: int) -> _Prepared:
        return self._prepared(self.engine.prepare(batch, index), alone=False)

    def split_parts(self, prep: _Prepared) -> list[_Prepared]:
        """The used samples of a batch, each alone without its padding (the engine's reference)."""
        from ..engine.per_sample import alone

        if prep.parts is None:
            idx = prep.used.nonzero().flatten().tolist()
            prep.parts = [self._prepared(alone(prep.batch, i), alone=True) for i in idx]
        return prep.parts

    def _prepared(self, b: dict[str, torch.Tensor], *, alone: bool) -> _Prepared:
        n = label_counts(b, self.task_type).to(self.device)
        w, s = normalization_weights(n, self.normalization, torch.float64)
        labels = token_labels(b, self.task_type)
        B = labels.shape[0]
        if self.task_type == "causal_lm":
            mask = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX) != IGNORE_INDEX
        elif self.task_type == "masked_lm":
            mask = labels != IGNORE_INDEX
        else:
            mask = (n > 0).view(B, 1)
        return _Prepared(b, self.engine.model_inputs(b, alone=alone), n, n > 0, mask.to(self.device), w.to(self.device), s.to(self.device))

    # ---------------------------------------------------------------- flat <-> dict
    def unflatten(self, v: np.ndarray | torch.Tensor, dtype=None) -> dict[str, torch.Tensor]:
        t = torch.as_tensor(v, dtype=torch.float64)
        out = {}
        for n, p, k in zip(self.names, self.params, self.numel):
            o = self.offsets[n]
            out[n] = t[o : o + k].view(p.shape).to(device=self.device, dtype=dtype or p.dtype)
        return out

    def flatten(self, tensors: Sequence[torch.Tensor]) -> np.ndarray:
        return torch.cat([t.reshape(-1).to(torch.float64).cpu() for t in tensors]).numpy()

    # ---------------------------------------------------------------- functional pieces
    def _call(self, pdict: dict[str, torch.Tensor], prep: _Prepared):
        return torch.func.functional_call(self.model, pdict, (), prep.inputs, strict=False)

    def logits_fn(self, prep: _Prepared):
        def f(*flat):
            out = self._call(dict(zip(self.names, flat)), prep)
            z = out.logits if hasattr(out, "logits") else out[0]
            return z
        return f

    def losses_fn(self, prep: _Prepared):
        """``θ -> l`` [B]: l_i = s_i w_i S_i, whose gradient is the engine's g_i."""
        def f(*flat):
            out = self._call(dict(zip(self.names, flat)), prep)
            losses = self.engine.sample_losses(out, prep.batch)
            return losses.loss_sum * (prep.w * prep.s).to(losses.loss_sum.dtype)
        return f

    def primals(self) -> tuple[torch.Tensor, ...]:
        return tuple(p.detach() for p in self.params)

    # ---------------------------------------------------------------- per-sample gradients
    def gradient_matrix(self) -> torch.Tensor:
        """G [N, P] (float64, CPU): row i is g_i of the i-th used sample (batches in order)."""
        rows = []
        for bi, prep in enumerate(self.batches):
            sink = _GradientSink()
            report = self.engine.process(prep.batch, sink, batch_index=bi)
            used = report.used_index
            if sink.squared or self.engine.loop_mode:
                # the engine's per-sample path hands squares: take signed gradients sample by sample
                per = [self._gradient_alone(prep, i, bi) for i in used]
                rows.append(torch.stack(per) if per else torch.zeros((0, self.dim), dtype=torch.float64))
                continue
            cols = []
            for n, k in zip(self.names, self.numel):
                parts = sink.rows.get(n)
                t = torch.cat(parts) if parts else torch.zeros((len(used), k), dtype=torch.float64)
                cols.append(t.reshape(t.shape[0], -1).cpu())
            rows.append(torch.cat(cols, dim=1))
        G = torch.cat(rows)
        if G.shape[0] != self.n_samples:
            raise NonFiniteError(f"expected {self.n_samples} per-sample gradients, the engine gave {G.shape[0]}")
        return G

    def _gradient_alone(self, prep: _Prepared, i: int, batch_index: int) -> torch.Tensor:
        grads = self.engine.gradient_alone(prep.batch, i)
        if grads is None:
            raise NonFiniteError(f"sample {i} of batch {batch_index} has a non-finite loss")
        return torch.cat([grads[id(p)].reshape(-1).to(torch.float64).cpu() for p in self.params])


@contextmanager
def _eval_mode(model):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def _forward_ad(fn, primals, tangents, problem: _Problem):
    """``torch.func.jvp``; a model whose attention kernel has no forward-mode derivative (PyTorch's
    CPU flash SDPA) is switched to the numerically equivalent "eager" attention for the call."""
    try:
        return torch.func.jvp(fn, primals, tangents)
    except (NotImplementedError, RuntimeError) as e:
        if "forward AD" not in str(e) and "forward-mode" not in str(e):
            raise
        model = problem.model
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
        if impl == "eager" or not hasattr(model, "set_attn_implementation"):
            raise UnsupportedError(
                f"forward-mode AD (needed for curvature-vector products) is not implemented for an operation of "
                f"this model: {str(e).splitlines()[0]}. Load the model with attn_implementation='eager'"
            ) from e
        log.info("hf_fisher: attention %r has no forward-mode AD; using 'eager' attention for the products", impl)
        model.set_attn_implementation("eager")
        problem.restore_attn = impl
        return torch.func.jvp(fn, primals, tangents)


# ============================================================================================
# operators


def _linear_operator_base():
    from scipy.sparse.linalg import LinearOperator

    return LinearOperator


class _Operator:
    """A symmetric P x P curvature operator on float64 numpy vectors (``matvec``), with a
    count of products and their time; :meth:`scipy` wraps it as a scipy ``LinearOperator``."""

    def __init__(self, problem: _Problem, *, retain_graphs: bool = False):
        self.problem = problem
        self.dim = problem.dim
        self.matvecs = 0
        self.seconds = 0.0
        self.retain_graphs = bool(retain_graphs)
        self._backs: dict[int, Any] = {}

    def _vjp(self, prep: _Prepared, fn):
        """The vjp closure of ``fn`` at θ: recomputed per product (one forward), or, with
        ``retain_graphs``, built once per batch and kept (no forward per product; memory: every
        batch's activations, as many training steps' worth)."""
        if not self.retain_graphs:
            return torch.func.vjp(fn, *self.problem.primals())[1]
        back = self._backs.get(id(prep))
        if back is None:
            back = self._backs[id(prep)] = torch.func.vjp(fn, *self.problem.primals())[1]
        return back

    def matvec(self, v: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        out = self._matvec(np.asarray(v, dtype=np.float64).ravel())
        self.seconds += time.perf_counter() - t0
        self.matvecs += 1
        if not np.isfinite(out).all():
            raise NonFiniteError("a curvature-vector product is not finite; check the model's weights and dtype")
        return out

    def _matvec(self, v: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _product(self, prep: _Prepared, tangents: tuple) -> tuple[torch.Tensor, ...]:
        """One batch's share of the product (already divided by N), per parameter."""
        raise NotImplementedError

    def _functional_matvec(self, v: np.ndarray) -> np.ndarray:
        """Σ over batches of :meth:`_product`. A batch whose product is not finite (a model giving
        NaN at padded positions, e.g. fully masked attention rows) is done sample by sample from
        then on, each sample alone without its padding, as the engine does."""
        pr = self.problem
        tang = tuple(pr.unflatten(v).values())
        acc = [torch.zeros_like(p, dtype=torch.float64) for p in pr.params]
        for bi, prep in enumerate(pr.batches):
            grads = None
            if not prep.split:
                grads = self._product(prep, tang)
                if not all(bool(torch.isfinite(g).all()) for g in grads):
                    prep.split = True
                    grads = None
                    self._backs.pop(id(prep), None)
                    log.warning(
                        "hf_fisher spectrum: batch %d gives a non-finite curvature-vector product in one pass (NaN at "
                        "padded positions?); its products are taken sample by sample, each without padding", bi,
                    )
            if grads is None:
                for part in pr.split_parts(prep):
                    for a, g in zip(acc, self._product(part, tang)):
                        a.add_(g.to(torch.float64))
                continue
            for a, g in zip(acc, grads):
                a.add_(g.to(torch.float64))
        return pr.flatten(acc)

    def scipy(self):
        LinearOperator = _linear_operator_base()
        return LinearOperator((self.dim, self.dim), matvec=self.matvec, rmatvec=self.matvec, dtype=np.float64)


class EmpiricalFisherOperator(_Operator):
    """``F v = (1/N) Σ_i g_i (g_iᵀ v)`` (module docstring). ``G`` given: ``Gᵀ (G v) / N`` from the
    engine's per-sample gradients; ``G=None``: matrix-free, ``J_lᵀ (J_l v) / N`` per batch by
    ``torch.func.jvp`` / ``vjp`` of the per-sample losses."""

    def __init__(self, problem: _Problem, G: torch.Tensor | None = None, *, retain_graphs: bool = False):
        super().__init__(problem, retain_graphs=retain_graphs)
        self.G = G

    def _matvec(self, v):
        N = self.problem.n_samples
        if self.G is not None:
            t = torch.from_numpy(v)
            return (self.G.T @ (self.G @ t)).div_(N).numpy()
        return self._functional_matvec(v)

    def _product(self, prep, tang):
        pr = self.problem
        fn = pr.losses_fn(prep)
        _, jv = _forward_ad(fn, pr.primals(), tang, pr)
        back = self._vjp(prep, fn)
        jv = torch.where(prep.used, jv.detach(), torch.zeros((), dtype=jv.dtype))
        return back((jv / pr.n_samples).to(jv.dtype))


class GGNOperator(_Operator):
    """``G v = (1/N) Σ_i c_i Σ_t J_itᵀ H_it J_it v`` (module docstring; H_it = diag(p) − ppᵀ)."""

    def __init__(self, problem: _Problem, *, retain_graphs: bool = False):
        super().__init__(problem, retain_graphs=retain_graphs)
        if problem.task_type == "sequence_classification" and problem.problem_type in ("regression", "multi_label_classification"):
            raise UnsupportedError(
                f"the GGN here is that of a softmax cross-entropy; this head's problem_type is {problem.problem_type!r}. "
                "Use curvature='empirical'"
            )

    def _matvec(self, v):
        return self._functional_matvec(v)

    def _product(self, prep, tang):
        pr = self.problem
        N = pr.n_samples
        fn = pr.logits_fn(prep)
        z, jz = _forward_ad(fn, pr.primals(), tang, pr)
        shape = z.shape
        B = shape[0]
        z64 = z.detach().to(torch.float64).reshape(B, -1, shape[-1])
        u = jz.detach().to(torch.float64).reshape(B, -1, shape[-1])
        keep = prep.label_mask.reshape(B, -1, 1)
        # positions without a label (padding, -100) are cut out with where, not a product:
        # a model may give NaN logits (or tangents) at padded positions
        z64 = torch.where(keep, z64, torch.zeros((), dtype=z64.dtype))
        u = torch.where(keep, u, torch.zeros((), dtype=u.dtype))
        p = torch.softmax(z64, dim=-1)
        hu = p * u - p * (p * u).sum(-1, keepdim=True)
        c = (prep.w * prep.s) ** 2 / N
        hu = torch.where(keep, hu * c.view(B, 1, 1), torch.zeros((), dtype=hu.dtype))
        return self._vjp(prep, fn)(hu.reshape(shape).to(z.dtype))


# ============================================================================================
# blocks


def _block_index(problem: _Problem, slices) -> torch.Tensor:
    """Flat coordinates (into θ) of a union of layout slices / whole parameters."""
    idx = []
    for item in slices:
        if isinstance(item, str):
            o = problem.offsets[item]
            idx.append(torch.arange(o, o + int(np.prod(problem.shapes[item], dtype=np.int64))))
            continue
        if item.param not in problem.offsets:
            continue
        shape = problem.shapes[item.param]
        grid = torch.arange(int(np.prod(shape, dtype=np.int64))).view(shape)
        idx.append(grid[item.index()].reshape(-1) + problem.offsets[item.param])
    if not idx:
        return torch.zeros(0, dtype=torch.long)
    return torch.unique(torch.cat(idx))


def block_definitions(problem: _Problem, kinds: Sequence[str]) -> dict[str, torch.Tensor]:
    """Block name -> flat coordinates, from the architecture adapter's layout.

    - ``"layer"``: ``layer{l}`` = every selected parameter of layer l (``ModelLayout.layer``),
      ``other`` = the rest (embeddings, final norm, head), when any;
    - ``"head"``: ``layer{l}.head{h}`` = head h's Q rows, its kv-head's K and V rows and its O
      columns (heads of one kv group share their K/V coordinates);
    - ``"head_qkvo"``: ``layer{l}.head{h}.q`` / ``.o`` and ``layer{l}.kv_head{g}.k`` / ``.v``.
    """
    bad = [k for k in kinds if k not in BLOCK_KINDS]
    if bad:
        raise InvalidInputError(f"unknown block kind(s) {bad}; choose from {BLOCK_KINDS}")
    layout = plugins.model_layout(problem.model)
    out: dict[str, torch.Tensor] = {}
    if "layer" in kinds:
        by_layer: dict[int | None, list[str]] = {}
        for n in problem.names:
            by_layer.setdefault(layout.layer(n), []).append(n)
        for l in sorted(k for k in by_layer if k is not None):
            out[f"layer{l}"] = _block_index(problem, by_layer[l])
        if None in by_layer:
            out["other"] = _block_index(problem, by_layer[None])
    if "head" in kinds or "head_qkvo" in kinds:
        for h in layout.heads():
            if "head" in kinds:
                ix = _block_index(problem, (*h.q, *h.k, *h.v, *h.o))
                if ix.numel():
                    out[f"layer{h.layer}.head{h.head}"] = ix
            if "head_qkvo" in kinds:
                for role, label in (("q", f"head{h.head}.q"), ("k", f"kv_head{h.kv_head}.k"), ("v", f"kv_head{h.kv_head}.v"), ("o", f"head{h.head}.o")):
                    ix = _block_index(problem, getattr(h, role))
                    if ix.numel():
                        out[f"layer{h.layer}.{label}"] = ix
    return out


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
    if N < dim:
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
