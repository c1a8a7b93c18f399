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
