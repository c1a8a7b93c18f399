"""The formulas of the merge methods, one tensor at a time.

Every function takes the same tensor of each input model (``thetas[i]``: model i's value, all of
one shape) and returns the merged tensor. They hold no state and read no files, so the streaming
merger (:mod:`hf_fisher.consumers.merge.api`), the LoRA merger (in delta-W space) and the tests
share one definition of each method. Notation: λ_i model weights, F_i model i's (diagonal)
Fisher for this tensor, θ_base the base model's tensor, τ_i = θ_i − θ_base task vectors.

Arithmetic runs in ``compute_dtype(...)`` (float32 at least, float64 when an input is float64);
callers cast the result to the output dtype.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

from hf_fisher.errors import InvalidInputError

__all__ = [
    "compute_dtype",
    "dare",
    "dare_drop",
    "fisher_task_vector",
    "fisher_weighted",
    "task_arithmetic",
    "tensor_generator",
    "ties",
    "trim_to_density",
    "weighted_average",
]


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _up(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    return [t.to(dtype) for t in tensors]


def _check(thetas: Sequence[torch.Tensor], weights: Sequence[float]) -> None:
    if not thetas:
        raise InvalidInputError("nothing to merge: no input tensors")
    if len(weights) != len(thetas):
        raise InvalidInputError(f"{len(weights)} weights for {len(thetas)} models; give one weight per model")
    shape = tuple(thetas[0].shape)
    for i, t in enumerate(thetas):
        if tuple(t.shape) != shape:
            raise InvalidInputError(f"model {i} has shape {tuple(t.shape)}, model 0 has {shape}")


def weighted_average(thetas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``θ* = Σ_i λ_i θ_i / Σ_i λ_i``."""
    _check(thetas, weights)
    total = float(sum(weights))
    if total == 0:
        raise InvalidInputError(f"the model weights sum to 0 ({list(weights)}); an average needs a non-zero sum")
    dt = compute_dtype(*thetas)
    out = torch.zeros(thetas[0].shape, dtype=dt)
    for w, t in zip(weights, _up(thetas, dt)):
        out.add_(t, alpha=float(w))
    return out.div_(total)


def fisher_weighted(
    thetas: Sequence[torch.Tensor],
    fishers: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    floor: float,
) -> torch.Tensor:
    """Fisher merging (Matena & Raffel 2022), per element:

    ``θ* = Σ_i λ_i F̃_i θ_i / Σ_i λ_i F̃_i`` with ``F̃_i = max(F_i, floor)``.

    The floor keeps the denominator positive: where every model's Fisher is at or below the
    floor, ``F̃_i = floor`` for all i and the result is the λ-weighted average; where one model's
    Fisher is large and the others' vanish, the result is (up to ``floor / F``) that model's value.
    ``fishers[i]`` must have ``thetas[i]``'s shape (group Fishers are expanded by the caller).
    """
    _check(thetas, weights)
    if len(fishers) != len(thetas):
        raise InvalidInputError(f"{len(fishers)} Fisher tensors for {len(thetas)} models")
    if not floor > 0 or not math.isfinite(floor):
        raise InvalidInputError(f"fisher_floor must be a positive finite number, got {floor!r}")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise InvalidInputError(f"Fisher merging needs non-negative model weights with a positive sum, got {list(weights)}")
    dt = compute_dtype(*thetas, *fishers)
    num = torch.zeros(thetas[0].shape, dtype=dt)
    den = torch.zeros(thetas[0].shape, dtype=dt)
    for i, (w, t, f) in enumerate(zip(weights, _up(thetas, dt), _up(fishers, dt))):
        if tuple(f.shape) != tuple(t.shape):
            raise InvalidInputError(f"Fisher {i} has shape {tuple(f.shape)}, its tensor {tuple(t.shape)}")
        wf = f.clamp_min(floor).mul_(float(w))
        num.addcmul_(wf, t)
        den.add_(wf)
    return num.div_(den)


def fisher_task_vector(
    base: torch.Tensor,
    thetas: Sequence[torch.Tensor],
    fishers: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    floor: float,
) -> torch.Tensor:
    """``θ* = θ_base + Σ_i λ_i F̃_i τ_i / Σ_i λ_i F̃_i`` (Fisher merging of task vectors, floor as in
    :func:`fisher_weighted`)."""
    dt = compute_dtype(base, *thetas)
    b = base.to(dt)
    taus = [t.to(dt) - b for t in thetas]
    return fisher_weighted(taus, fishers, weights, floor=floor).add_(b)


def task_arithmetic(
    base: torch.Tensor, thetas: Sequence[torch.Tensor], weights: Sequence[float], *, scaling: float
) -> torch.Tensor:
    """Task arithmetic (Ilharco et al. 2023): ``θ* = θ_base + s Σ_i λ_i τ_i``."""
    _check(thetas, weights)
    dt = compute_dtype(base, *thetas)
    b = base.to(dt)
    out = torch.zeros(b.shape, dtype=dt)
    for w, t in zip(weights, _up(thetas, dt)):
        out.add_(t - b, alpha=float(w))
    return out.mul_(float(scaling)).add_(b)


def trim_to_density(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``k = round(density · numel)`` entries of largest ``|τ|`` (exactly k, ties broken by
    position), zero the rest (TIES' trim step)."""
    if not 0 < density <= 1:
        raise InvalidInputError(f"density must be in (0, 1], got {density!r}")
    n = tau.numel()
    k = round(density * n)
    if k >= n:
        return tau.clone()
    out = torch.zeros_like(tau)
    if k == 0:
        return out
    flat = tau.reshape(-1)
    idx = torch.topk(flat.abs(), k, sorted=False).indices
    out.view(-1)[idx] = flat[idx]
    return out


def _elect_and_mean(taus: Sequence[torch.Tensor]) -> torch.Tensor:
    """TIES' sign election and disjoint mean: ``γ = sign(Σ_i τ_i)`` per entry (the sign with the
    larger total magnitude); the mean of the τ_i that are non-zero with sign γ (0 where none)."""
    total = torch.zeros_like(taus[0])
    for t in taus:
        total.add_(t)
    sign = torch.sign(total)
    num = torch.zeros_like(total)
    cnt = torch.zeros_like(total)
    for t in taus:
        agree = (torch.sign(t) == sign) & (t != 0)
        num.add_(torch.where(agree, t, torch.zeros_like(t)))
        cnt.add_(agree.to(cnt.dtype))
    return num.div_(cnt.clamp_min(1))


def ties(
    base: torch.Tensor,
    thetas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    density: float,
    scaling: float,
) -> torch.Tensor:
    """TIES merging (Yadav et al. 2023): trim each ``λ_i τ_i`` to its top-``density`` magnitudes
    (:func:`trim_to_density`), elect each entry's sign by the summed values, average the entries
    that agree with it (disjoint mean), ``θ* = θ_base + s · mean``."""
    _check(thetas, weights)
    dt = compute_dtype(base, *thetas)
    b = base.to(dt)
    taus = [trim_to_density((t.to(dt) - b).mul_(float(w)), density) for w, t in zip(weights, thetas)]
    return _elect_and_mean(taus).mul_(float(scaling)).add_(b)


def dare_drop(tau: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """DARE (Yu et al. 2024): drop each entry with probability ``p``, rescale the kept ones by
    ``1 / (1 − p)`` (so the expectation is ``τ``)."""
    if not 0 <= p < 1:
        raise InvalidInputError(f"DARE drop probability must be in [0, 1), got {p!r}")
    if p == 0:
        return tau.clone()
    keep = torch.rand(tau.shape, generator=generator, dtype=torch.float64) >= p
    return torch.where(keep, tau / (1 - p), torch.zeros_like(tau))


def tensor_generator(seed: int, name: str, index: int) -> torch.Generator:
    """A generator seeded from ``(seed, tensor name, model index)``: DARE's masks do not depend on
    the order tensors are streamed in, and a rerun with the same seed is identical."""
    digest = hashlib.sha256(f"{int(seed)}\x00{name}\x00{int(index)}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def dare(
    base: torch.Tensor,
    thetas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    p: float,
    generators: Sequence[torch.Generator],
    then: str = "task_arithmetic",
    density: float = 1.0,
    scaling: float = 1.0,
) -> torch.Tensor:
    """DARE: :func:`dare_drop` on each task vector (model i with ``generators[i]``), then task
    arithmetic (``then="task_arithmetic"``) or TIES (``then="ties"``, with ``density``) on the
    rescaled task vectors, with scaling ``s``."""
    _check(thetas, weights)
    if then not in ("task_arithmetic", "ties"):
        raise InvalidInputError(f"DARE is followed by 'task_arithmetic' or 'ties', got {then!r}")
    if len(generators) != len(thetas):
        raise InvalidInputError(f"{len(generators)} generators for {len(thetas)} models")
    dt = compute_dtype(base, *thetas)
    b = base.to(dt)
    dropped = [b + dare_drop(t.to(dt) - b, p, g) for t, g in zip(thetas, generators)]
    if then == "ties":
        return ties(b, dropped, weights, density=density, scaling=scaling)
    return task_arithmetic(b, dropped, weights, scaling=scaling)


# ---------------------------------------------------------------------------- mergekit's conventions
# The functions below reproduce mergekit 0.1.5 (``mergekit/sparsify.py``,
# ``mergekit/merge_methods/generalized_task_arithmetic.py`` and ``linear.py``) operation by operation, so
# that on float32 (or float64) inputs the result is the same to the last bit. They differ from the
# functions above (the ``"hf_fisher"`` convention) in: the trim count ``k = max(1, int(d·n))`` (not
# ``round(d·n)``); an exactly zero sign sum electing ``+1`` (not dropping the entry); with weights, the
# agreeing sum divided by the sum of the agreeing weights (``normalize``), not by their count; DARE's kept
# entries rescaled to the task vector's L1 norm (``rescale``), not by ``1/(1 − p)``; the DARE mask drawn as
# ``torch.bernoulli(full(density))`` (float32), models in order, from one generator per tensor (mergekit
# draws from torch's global generator in its execution order, so a whole model's masks are not mergekit's
# draws: the only difference, on DARE/DELLA only).

#: the ways a task vector is sparsified (mergekit's ``SparsificationMethod``)
SPARSIFIERS = ("magnitude", "random", "magnitude_outliers", "della_magprune")


def _rescaled(tau: torch.Tensor, mask: torch.Tensor, rescale: bool, eps: float = 1e-7) -> torch.Tensor:
    """``m ⊙ τ``, times ``‖τ‖₁ / ‖m ⊙ τ‖₁`` when ``rescale`` (and both norms are at least ``eps``)."""
    masked = tau * mask
    if not rescale:
        return masked
    before = tau.abs().sum()
    after = masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def _work_dtype(tau: torch.Tensor) -> torch.dtype:
    """mergekit's work dtype of the random masks on CPU: bfloat16 stays, anything else is float32."""
    return tau.dtype if tau.dtype == torch.bfloat16 else torch.float32


def sparsify(tau: torch.Tensor, density: float, how: str, *, rescale: bool = False, gamma: float = 0.01,
             epsilon: float = 0.15, generator: torch.Generator | None = None) -> torch.Tensor:
    """mergekit's sparsification of one task vector, keeping a fraction ``density`` (``≥ 1``: all):

    - ``"magnitude"`` (TIES' trim): the ``k = max(1, int(density · n))`` entries of largest ``|τ|``;
    - ``"random"`` (DARE): ``m ~ Bernoulli(density)`` per entry;
    - ``"magnitude_outliers"`` (Model Breadcrumbs): drop the ``int(gamma · n)`` largest ``|τ|`` and the
      smallest, keeping ``int(density · n)`` entries;
    - ``"della_magprune"`` (DELLA): ``m ~ Bernoulli(p_j)`` per row, ``p_j = density − ε + 2ε · r_j``, ``r_j``
      the entry's magnitude rank in its row scaled to ``[0, 1]``;

    then ``m ⊙ τ``, rescaled to ``τ``'s L1 norm when ``rescale`` (:func:`_rescaled`). Random masks come from
    ``generator``. The random ones run in mergekit's CPU work dtype (float32, bfloat16 kept) and are
    cast back."""
    if how not in SPARSIFIERS:
        raise InvalidInputError(f"sparsification must be one of {list(SPARSIFIERS)}, got {how!r}")
    if density >= 1:
        return tau
    if how == "magnitude":
        if density <= 0 or tau.numel() == 0:
            return torch.zeros_like(tau)
        k = max(1, int(density * tau.numel()))
        mask = torch.zeros(tau.numel(), dtype=tau.dtype)
        w = tau.abs().reshape(-1)
        if w.dtype != torch.float64:
            w = w.float()
        mask[torch.argsort(w, descending=True)[:k]] = 1
        return _rescaled(tau, mask.reshape_as(tau), rescale)
    if how == "magnitude_outliers":
        n = tau.numel()
        target = int(density * n)
        n_bot = max(0, n - target - int(gamma * n))
        w = tau.abs().reshape(-1)
        if w.dtype != torch.float64:
            w = w.float()
        mask = torch.zeros(n, dtype=tau.dtype)
        mask[torch.sort(w, descending=False).indices[n_bot:n_bot + target]] = 1
        return _rescaled(tau, mask.reshape_as(tau), rescale)
    work = _work_dtype(tau)
    if how == "random":
        mask = torch.bernoulli(torch.full_like(tau, density, dtype=work), generator=generator)
        return _rescaled(tau.to(work), mask, rescale).to(tau.dtype)
    if density <= 0:
        return torch.zeros_like(tau)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise InvalidInputError(f"DELLA: epsilon ({epsilon}) must keep density ± epsilon in (0, 1) (density {density})")
    shape = tau.shape
    t2 = tau.unsqueeze(0) if tau.dim() < 2 else tau
    ranks = torch.argsort(t2.abs(), dim=1, descending=False).argsort(dim=1).to(work) + 1
    lo = ranks.min(dim=1, keepdim=True).values
    hi = ranks.max(dim=1, keepdim=True).values
    probs = (density - epsilon) + ((ranks - lo) / (hi - lo)).clamp(0, 1) * 2 * epsilon
    mask = torch.bernoulli(probs, generator=generator).to(work)
    return _rescaled(t2.to(work), mask, rescale).to(tau.dtype).reshape(shape)


def consensus_mask(deltas: torch.Tensor, method: str = "sum") -> torch.Tensor:
    """mergekit's TIES sign election over the stacked weighted task vectors ``deltas`` (models on dim
    0): ``γ = +1`` where ``Σ_i δ_i ≥ 0`` (``"sum"``; ``"count"``: where ``Σ_i sign δ_i ≥ 0``), else ``−1``;
    the mask is ``sign δ_i = γ`` (a zero entry never agrees)."""
    sign = deltas.sign()
    if method == "sum":
        majority = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
    elif method == "count":
        majority = (sign.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
    else:
        raise InvalidInputError(f"consensus must be 'sum' or 'count', got {method!r}")
    return sign == majority


def generalized_task_arithmetic(
    base: torch.Tensor,
    thetas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    sparsification: str | None,
    consensus: str | None,
    densities: Sequence[float] | None = None,
    normalize: bool,
    rescale: bool = False,
    scaling: float = 1.0,
    gammas: Sequence[float] | None = None,
    epsilons: Sequence[float] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """mergekit's generalized task arithmetic (``task_arithmetic``, ``ties``, ``dare_ties``,
    ``dare_linear``, ``breadcrumbs(_ties)``, ``della(_linear)``), per tensor:

    ``δ_i = λ_i · sparsify(θ_i − θ_base, d_i)`` (:func:`sparsify`, models in order);
    with ``consensus``: ``m_i = [sign δ_i = γ]`` (:func:`consensus_mask`), ``S = Σ_i m_i δ_i``,
    ``D = Σ_i m_i λ_i`` (0 → 1); without: ``S = Σ_i δ_i``, ``D = Σ_i λ_i`` (``|D| < 1e−8`` → 1);
    ``θ* = θ_base + s · S / D`` (``normalize``) or ``θ_base + s · S``."""
    _check(thetas, weights)
    n = len(thetas)
    dt = compute_dtype(base, *thetas)
    b = base.to(dt)
    dens = list(densities) if densities is not None else [1.0] * n
    extra: dict[str, Sequence[float]] = {}
    if sparsification == "magnitude_outliers":
        extra["gamma"] = list(gammas) if gammas is not None else [0.01] * n
    if sparsification == "della_magprune":
        extra["epsilon"] = list(epsilons) if epsilons is not None else [0.15] * n
    deltas = b.new_empty((n, *b.shape))
    for i, t in enumerate(thetas):
        delta = t.to(dt) - b
        if sparsification:
            delta = sparsify(delta, float(dens[i]), sparsification, rescale=rescale, generator=generator,
                             **{k: float(v[i]) for k, v in extra.items()})
        deltas[i] = delta
    w = torch.tensor([float(x) for x in weights], dtype=dt)
    while deltas.dim() > w.dim():
        w.unsqueeze_(-1)
    deltas.mul_(w)
    if consensus:
        mask = consensus_mask(deltas, consensus)
        mixed = (deltas * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if scaling != 1:
        mixed *= scaling
    return b + mixed


def linear(thetas: Sequence[torch.Tensor], weights: Sequence[float], *, normalize: bool = True) -> torch.Tensor:
    """mergekit's ``linear``: ``θ* = Σ_i λ_i θ_i / Σ_i λ_i`` (``normalize``, no check of the sum) or
    ``Σ_i λ_i θ_i``, accumulated in mergekit's order (``addcmul``)."""
    _check(thetas, weights)
    dt = compute_dtype(*thetas)
    w = torch.tensor([float(x) for x in weights], dtype=dt)
    out = torch.zeros(thetas[0].shape, dtype=dt)
    for t, c in zip(thetas, w.unbind(0)):
        out.addcmul_(t.to(dt), c)
    if normalize:
        out.div_(w.sum())
    return out


_SLERP_CHUNK = 1024 * 1024  # mergekit's _CHUNK_ELEMENTS


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation of whole tensors (mergekit's ``slerp``): with ``Ω`` the angle between
    ``v0`` and ``v1`` (flattened, each normalised),
    ``θ* = sin((1 − t)Ω)/sin Ω · v0 + sin(tΩ)/sin Ω · v1``; the linear ``(1 − t) v0 + t v1`` where
    ``|cos Ω| > dot_threshold``. Norms and dot products chunked as mergekit chunks them."""
    dt = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a = v0.reshape(1, -1)
    b = v1.reshape(1, -1)
    tt = torch.tensor([float(t)], dtype=dt).reshape(-1, 1)
    if not a.shape[1]:
        return ((1 - tt) * a + tt * b).reshape(v0.shape).to(dt)
    step = _SLERP_CHUNK
    chunks = range(0, a.shape[1], step)
    norm_a = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(a[:, s:s + step].to(dt), dim=1, keepdim=True)
                                                   for s in chunks]), dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(b[:, s:s + step].to(dt), dim=1, keepdim=True)
                                                   for s in chunks]), dim=0)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot = torch.stack([((a[:, s:s + step].to(dt) / norm_a) * (b[:, s:s + step].to(dt) / norm_b)).sum(dim=1, keepdim=True)
                       for s in chunks]).sum(dim=0).clamp(-1, 1)
    lin = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(lin, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(lin, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(lin, tt, torch.sin(tt * theta) / sin_theta)
    out = torch.empty_like(a, dtype=dt)
    for s in chunks:
        out[:, s:s + step] = coef_a * a[:, s:s + step].to(dt) + coef_b * b[:, s:s + step].to(dt)
    return out.reshape(v0.shape)


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, row_wise: bool = False, flatten: bool = True,
            eps: float = 1e-8) -> torch.Tensor:
    """mergekit's ``nuslerp`` interpolation: SLERP of the flattened tensors (``flatten``), else of each
    row (``row_wise``: each column) separately, ``(sin((1 − t)Ω) v0 + sin(tΩ) v1) / sin Ω``, linear
    where ``1 − cos²Ω ≤ eps²``."""
    shape = v0.shape
    dim = 0 if row_wise else -1
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if dim != -1 and not flatten:
        out = out.transpose(dim, -1)
    return out.reshape(shape)
