"""The formulas of the merge methods, one tensor at a time.

Every function takes the same tensor of each input model (``thetas[i]``: model i's value, all of
one shape) and returns the merged tensor. They hold no state and read no files, so the streaming
merger (:mod:`hf_fisher.consumers.merge.api`), the LoRA merger (in delta-W space) and the tests
share one definition of each method. Notation: λ_i model weights, F_i model i's (diagonal)
Fisher for this tensor, θ_base the base model's tensor, τ_i = θ_i − θ_base task vectors.

Arithmetic runs in ``compute_dtype(...)`` (float32 at least, float64 when an input is float64);
callers cast the result to the output dtype.

Memory: the elementwise formulas run over blocks of whole rows (:func:`row_blocks`, about
``BLOCK_ELEMENTS`` elements each), so besides the inputs a merge holds its output and O(block)
scratch, whatever the tensor's size (a 128k-row vocabulary table included). TIES' trim finds the
k-th largest ``|τ|`` by a radix selection over the blocks (:class:`TopK`: histograms of the bit
pattern, exact counts), never a full-size sort or index tensor; Model Breadcrumbs' two cuts are two
such selections of the smallest magnitudes; DELLA ranks within blocks of whole rows; random masks
are drawn block after block from one generator. mergekit's L1 rescaling and nuslerp's norms and
dot products reduce over one whole-size buffer (the reduction mergekit runs, hence its bits),
freed before the output is made. The results are the same bits as the whole-tensor formulas (the
tests keep those as references); peak scratch besides the inputs: about 1.1-1.25 x the output
(tests/test_merge_stream_memory*.py).
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Sequence

import torch

from hf_fisher.errors import InvalidInputError

__all__ = [
    "BLOCK_ELEMENTS",
    "TopK",
    "compute_dtype",
    "dare",
    "dare_drop",
    "fisher_task_vector",
    "fisher_weighted",
    "row_blocks",
    "task_arithmetic",
    "tensor_generator",
    "ties",
    "trim_to_density",
    "weighted_average",
]


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


#: elements per block of the block-wise formulas (4 MB of float32: a few tens of MB of scratch;
#: smaller blocks mean more parallel regions per tensor, which costs a lot of CPU time on a
#: loaded machine)
BLOCK_ELEMENTS = 1 << 20


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` with at least one dimension (a 0-d tensor as one row of one element)."""
    return t.reshape(1) if t.dim() == 0 else t


def row_blocks(shape: Sequence[int]) -> list[slice]:
    """Slices of dim 0 that cover a tensor of ``shape`` in order, each of whole rows and about
    ``BLOCK_ELEMENTS`` elements (one row when a row is larger)."""
    shape = tuple(shape) or (1,)
    step = max(1, BLOCK_ELEMENTS // max(1, math.prod(shape[1:])))
    return [slice(s, min(s + step, shape[0])) for s in range(0, shape[0], step)]


def _by_blocks(shape: Sequence[int], dtype: torch.dtype, block) -> torch.Tensor:
    """The tensor of ``shape`` and ``dtype`` whose rows ``sl`` are ``block(sl)``, for the slices of
    :func:`row_blocks` in order (``block`` is called once per slice, first to last)."""
    out = torch.empty(tuple(shape), dtype=dtype)
    view = _rows(out)
    for sl in row_blocks(shape):
        view[sl] = block(sl)
    return out


_KEY_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_DIGIT = 16  # bits per pass of the radix selection
#: the key every NaN gets: one above +inf's bit pattern (any NaN's pattern is above it)
_NAN_KEY = {d: int(torch.tensor(float("inf"), dtype=d).view(_KEY_INT[d.itemsize])) + 1
            for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


def _magnitude_keys(x: torch.Tensor) -> torch.Tensor:
    """``|x|`` flattened, as the integers of its bit pattern: for non-negative floats they order
    as the values do (every NaN clamped to one pattern just above +inf's, where sorts place NaN)."""
    a = x.abs().reshape(-1)
    keys = a.view(_KEY_INT[a.element_size()])
    keys = keys.to(torch.int32) if keys.dtype == torch.int16 else keys
    return keys.clamp_max_(_NAN_KEY[a.dtype])


def _kth_largest_key(key_blocks, k: int, bits: int) -> tuple[int, int]:
    """``(T, r)``: the k-th largest of the non-negative ``bits``-bit keys that ``key_blocks()``
    yields (one pass per call), and how many keys equal to ``T`` are among the k largest.

    Radix selection, most significant 16 bits first: a pass counts the next digit of the keys that
    match the digits fixed so far (exact integer histograms over the blocks) and fixes the digit
    where the count from the top reaches the rank still needed; ``bits / 16`` passes."""
    prefix, need = 0, k
    for shift in range(bits - _DIGIT, -1, -_DIGIT):
        hist = torch.zeros(1 << _DIGIT, dtype=torch.int64)
        for keys in key_blocks():
            if shift + _DIGIT < bits:
                keys = keys[(keys >> (shift + _DIGIT)) == prefix]
            if keys.numel():
                hist += torch.bincount((keys >> shift) & ((1 << _DIGIT) - 1), minlength=1 << _DIGIT)
        at_least = hist.flip(0).cumsum(0)  # [j]: keys whose digit is >= 65535 - j
        j = int(torch.searchsorted(at_least, need))
        need -= int(at_least[j - 1]) if j else 0
        prefix = (prefix << _DIGIT) | ((1 << _DIGIT) - 1 - j)
    return prefix, need


class TopK:
    """The ``k`` entries of largest ``|x|`` (``smallest``: of smallest ``|x|``) of a tensor that is read
    block by block: exactly ``k``, the entries tied at the k-th magnitude kept first by position
    (NaN counts as the largest).

    ``blocks()`` yields the tensor's blocks in order (a fresh pass per call; called
    ``bits / 16`` times here, ``bits`` the dtype's width); :meth:`mask` then takes the same blocks
    in the same order, once each, and returns each one's keep mask (:meth:`fresh`: a copy for
    another pass of :meth:`mask`). Memory: O(block). ``smallest`` selects by the keys
    ``K − key`` (``K`` the NaN key, above every other): the k largest of those are the k smallest
    magnitudes, ties again first by position."""

    def __init__(self, blocks, n: int, k: int, dtype: torch.dtype, *, smallest: bool = False) -> None:
        self.all, self.none = k >= n, k <= 0
        self.threshold, self.ties_left = 0, 0
        self.smallest = smallest
        if not (self.all or self.none):
            bits = 8 * torch.empty((), dtype=dtype).element_size()
            self.threshold, self.ties_left = _kth_largest_key(lambda: (self._keys(x) for x in blocks()), k, bits)

    def _keys(self, x: torch.Tensor) -> torch.Tensor:
        keys = _magnitude_keys(x)
        return _NAN_KEY[x.dtype] - keys if self.smallest else keys

    def fresh(self) -> TopK:
        """A copy for a new pass of :meth:`mask` (the ties still to keep as after construction;
        call it before the first :meth:`mask` of this one)."""
        return copy.copy(self)

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """The keep mask of the next block ``x``: ``|x| > T``, and the next of the entries ``|x| = T``
        while fewer than the needed ones have been kept."""
        if self.all or self.none:
            return torch.full(x.shape, self.all, dtype=torch.bool)
        keys = self._keys(x)
        keep = keys > self.threshold
        if self.ties_left:
            tied = keys == self.threshold
            take = tied & (tied.cumsum(0) <= self.ties_left)
            keep |= take
            self.ties_left -= int(take.sum())
        return keep.reshape(x.shape)


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
    """``θ* = Σ_i λ_i θ_i / Σ_i λ_i`` (block by block)."""
    _check(thetas, weights)
    total = float(sum(weights))
    if total == 0:
        raise InvalidInputError(f"the model weights sum to 0 ({list(weights)}); an average needs a non-zero sum")
    dt = compute_dtype(*thetas)

    def block(sl):
        out = torch.zeros(_rows(thetas[0])[sl].shape, dtype=dt)
        for w, t in zip(weights, thetas):
            out.add_(_rows(t)[sl].to(dt), alpha=float(w))
        return out.div_(total)

    return _by_blocks(thetas[0].shape, dt, block)


def _fisher_block(thetas: Sequence[torch.Tensor], fishers: Sequence[torch.Tensor], weights: Sequence[float],
                  floor: float, dt: torch.dtype) -> torch.Tensor:
    """``Σ_i λ_i F̃_i θ_i / Σ_i λ_i F̃_i`` of one block (``F̃_i = max(F_i, floor)``), in ``dt``."""
    num = torch.zeros(thetas[0].shape, dtype=dt)
    den = torch.zeros(thetas[0].shape, dtype=dt)
    for w, t, f in zip(weights, thetas, fishers):
        wf = f.to(dt).clamp_min(floor).mul_(float(w))
        num.addcmul_(wf, t.to(dt))
        den.add_(wf)
    return num.div_(den)


def _check_fishers(thetas, fishers, weights, floor) -> None:
    if len(fishers) != len(thetas):
        raise InvalidInputError(f"{len(fishers)} Fisher tensors for {len(thetas)} models")
    if not floor > 0 or not math.isfinite(floor):
        raise InvalidInputError(f"fisher_floor must be a positive finite number, got {floor!r}")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise InvalidInputError(f"Fisher merging needs non-negative model weights with a positive sum, got {list(weights)}")
    for i, (t, f) in enumerate(zip(thetas, fishers)):
        if tuple(f.shape) != tuple(t.shape):
            raise InvalidInputError(f"Fisher {i} has shape {tuple(f.shape)}, its tensor {tuple(t.shape)}")


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
    Computed block by block (:func:`row_blocks`): the scratch is O(block).
    """
    _check(thetas, weights)
    _check_fishers(thetas, fishers, weights, floor)
    dt = compute_dtype(*thetas, *fishers)
    return _by_blocks(thetas[0].shape, dt, lambda sl: _fisher_block(
        [_rows(t)[sl] for t in thetas], [_rows(f)[sl] for f in fishers], weights, floor, dt))


def fisher_task_vector(
    base: torch.Tensor,
    thetas: Sequence[torch.Tensor],
    fishers: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    floor: float,
) -> torch.Tensor:
    """``θ* = θ_base + Σ_i λ_i F̃_i τ_i / Σ_i λ_i F̃_i`` (Fisher merging of task vectors, floor as in
    :func:`fisher_weighted`), block by block."""
    _check(thetas, weights)
    _check_fishers(thetas, fishers, weights, floor)
    dt = compute_dtype(base, *thetas)
    out_dt = compute_dtype(torch.empty(0, dtype=dt), *fishers)

    def block(sl):
        b = _rows(base)[sl].to(dt)
        taus = [_rows(t)[sl].to(dt) - b for t in thetas]
        return _fisher_block(taus, [_rows(f)[sl] for f in fishers], weights, floor, out_dt).add_(b)

    return _by_blocks(base.shape, out_dt, block)


def task_arithmetic(
    base: torch.Tensor, thetas: Sequence[torch.Tensor], weights: Sequence[float], *, scaling: float
) -> torch.Tensor:
    """Task arithmetic (Ilharco et al. 2023): ``θ* = θ_base + s Σ_i λ_i τ_i`` (block by block)."""
    _check(thetas, weights)
    dt = compute_dtype(base, *thetas)
    return _by_blocks(base.shape, dt, lambda sl: _task_arithmetic_block(
        _rows(base)[sl].to(dt), [_rows(t)[sl].to(dt) for t in thetas], weights, scaling))


def _task_arithmetic_block(b: torch.Tensor, thetas: Sequence[torch.Tensor], weights: Sequence[float],
                           scaling: float) -> torch.Tensor:
    out = torch.zeros(b.shape, dtype=b.dtype)
    for w, t in zip(weights, thetas):
        out.add_(t - b, alpha=float(w))
    return out.mul_(float(scaling)).add_(b)


def _check_density(density: float) -> None:
    if not 0 < density <= 1:
        raise InvalidInputError(f"density must be in (0, 1], got {density!r}")


def trim_to_density(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``k = round(density · numel)`` entries of largest ``|τ|`` (exactly k, ties at the k-th
    magnitude broken by position: the first ones kept), zero the rest (TIES' trim step). Selected
    block by block (:class:`TopK`), no full-size sort."""
    _check_density(density)
    n = tau.numel()
    k = round(density * n)
    if k >= n:
        return tau.clone()
    if k == 0:
        return torch.zeros_like(tau)
    rows = _rows(tau)
    blocks = row_blocks(tau.shape)
    top = TopK(lambda: (rows[sl] for sl in blocks), n, k, tau.dtype)
    return _by_blocks(tau.shape, tau.dtype, lambda sl: torch.where(top.mask(rows[sl]), rows[sl], 0))


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


def _ties_streams(base: torch.Tensor, streams, weights: Sequence[float], *, density: float, scaling: float,
                  dt: torch.dtype) -> torch.Tensor:
    """TIES (``"hf_fisher"`` convention) over models given as streams: ``streams[i]()`` yields model
    i's ``θ_i`` blocks (in ``dt``, for the slices of :func:`row_blocks` in order; a fresh pass per
    call). Trim ``λ_i τ_i`` to ``round(d · n)`` entries (:class:`TopK`), elect, disjoint mean."""
    rows = _rows(base)
    blocks = row_blocks(base.shape)
    n = base.numel()
    k = round(density * n)

    def weighted(i):
        for sl, t in zip(blocks, streams[i]()):
            yield (t - rows[sl].to(dt)).mul_(float(weights[i]))

    tops = [TopK(lambda i=i: weighted(i), n, k, dt) for i in range(len(streams))]
    passes = [weighted(i) for i in range(len(streams))]

    def block(sl):
        taus = []
        for top, it in zip(tops, passes):
            x = next(it)
            taus.append(torch.where(top.mask(x), x, 0))
        return _elect_and_mean(taus).mul_(float(scaling)).add_(rows[sl].to(dt))

    return _by_blocks(base.shape, dt, block)


def _blocks_of(t: torch.Tensor, dt: torch.dtype):
    """A stream (for :func:`_ties_streams`) of ``t``'s row blocks in ``dt``."""
    rows = _rows(t)
    return lambda: (rows[sl].to(dt) for sl in row_blocks(t.shape))


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
    that agree with it (disjoint mean), ``θ* = θ_base + s · mean``. Block by block: the trim's
    selection reads the task vectors ``bits / 16`` times (:class:`TopK`), nothing is whole-size
    but the output."""
    _check(thetas, weights)
    _check_density(density)
    dt = compute_dtype(base, *thetas)
    return _ties_streams(base, [_blocks_of(t, dt) for t in thetas], weights, density=density, scaling=scaling, dt=dt)


def dare_drop(tau: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """DARE (Yu et al. 2024): drop each entry with probability ``p``, rescale the kept ones by
    ``1 / (1 − p)`` (so the expectation is ``τ``). The draws are one float64 uniform per entry in
    order, so a tensor's row blocks dropped one after the other from the same generator give the
    same result as the whole tensor."""
    _check_drop(p)
    if p == 0:
        return tau.clone()
    keep = torch.rand(tau.shape, generator=generator, dtype=torch.float64) >= p
    return torch.where(keep, tau / (1 - p), torch.zeros_like(tau))


def _check_drop(p: float) -> None:
    if not 0 <= p < 1:
        raise InvalidInputError(f"DARE drop probability must be in [0, 1), got {p!r}")


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
    rescaled task vectors, with scaling ``s``. Block by block: each pass over a model's blocks
    draws from a copy of ``generators[i]``'s state (TIES' selection makes several passes), which
    is left as it was given."""
    _check(thetas, weights)
    if then not in ("task_arithmetic", "ties"):
        raise InvalidInputError(f"DARE is followed by 'task_arithmetic' or 'ties', got {then!r}")
    if len(generators) != len(thetas):
        raise InvalidInputError(f"{len(generators)} generators for {len(thetas)} models")
    _check_drop(p)
    if then == "ties":
        _check_density(density)
    dt = compute_dtype(base, *thetas)
    rows = _rows(base)
    blocks = row_blocks(base.shape)
    states = [g.get_state() for g in generators]

    def dropped(i):  # model i's b + dare_drop(θ_i − b) blocks, drawn from a fresh copy of its generator
        g = torch.Generator().set_state(states[i])
        for sl in blocks:
            b = rows[sl].to(dt)
            yield b + dare_drop(_rows(thetas[i])[sl].to(dt) - b, p, g)

    if then == "ties":
        return _ties_streams(base, [lambda i=i: dropped(i) for i in range(len(thetas))], weights, density=density,
                             scaling=scaling, dt=dt)
    passes = [dropped(i) for i in range(len(thetas))]
    return _by_blocks(base.shape, dt, lambda sl: _task_arithmetic_block(
        rows[sl].to(dt), [next(it) for it in passes], weights, scaling))


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


def _della_probs(t2: torch.Tensor, density: float, epsilon: float, work: torch.dtype) -> torch.Tensor:
    """DELLA's keep probabilities of a tensor of 2 or more dimensions, ranked along dim 1:
    ``p = d − ε + 2ε · (r − r_min)/(r_max − r_min)`` (clamped to ``[d − ε, d + ε]``), ``r`` the
    ascending ``|τ|`` rank (mergekit's ``argsort(argsort(|τ|)) + 1``, from 1), in the work dtype. The
    second ``argsort`` inverts a permutation, whose inverse is unique: it is formed by a scatter."""
    order = torch.argsort(t2.abs(), dim=1, descending=False)
    pos = torch.arange(t2.shape[1]).reshape(1, -1, *([1] * (t2.dim() - 2))).expand_as(order)
    ranks = torch.empty_like(order).scatter_(1, order, pos).to(work) + 1
    lo = ranks.min(dim=1, keepdim=True).values
    hi = ranks.max(dim=1, keepdim=True).values
    return (density - epsilon) + ((ranks - lo) / (hi - lo)).clamp(0, 1) * 2 * epsilon


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
    mask = torch.bernoulli(_della_probs(t2, density, epsilon, work), generator=generator).to(work)
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
    ``θ* = θ_base + s · S / D`` (``normalize``) or ``θ_base + s · S``.

    Block by block (:func:`generalized_streams`), the sparsified task vectors as streams
    (:class:`Sparsified`): the magnitude trim's k-th largest ``|τ_i|`` found by :class:`TopK`, the
    outliers' two cuts by two :class:`TopK` of the smallest (:class:`RankSparsified`; entries tied at
    a cut go by position; mergekit's by torch's unstable sort, an order torch does not define: the
    results differ only where magnitudes tie at a cut), the random and DELLA masks drawn block after
    block (:class:`RandomSparsified`, :class:`DellaSparsified`). Scratch: the output, O(block), and
    with ``rescale`` one whole-size buffer for the L1 norms while a model's stream is prepared.
    DELLA on a tensor of fewer than 2 dimensions (ranked as one row) runs on the whole tensor."""
    _check(thetas, weights)
    n = len(thetas)
    dt = compute_dtype(base, *thetas)
    dens = [float(d) for d in densities] if densities is not None else [1.0] * n
    w = torch.tensor([float(x) for x in weights], dtype=dt)
    if consensus and consensus not in ("sum", "count"):
        raise InvalidInputError(f"consensus must be 'sum' or 'count', got {consensus!r}")
    if sparsification is not None and sparsification not in SPARSIFIERS:
        raise InvalidInputError(f"sparsification must be one of {list(SPARSIFIERS)}, got {sparsification!r}")
    gam = [float(x) for x in gammas] if gammas is not None else [0.01] * n
    eps = [float(x) for x in epsilons] if epsilons is not None else [0.15] * n
    if sparsification == "della_magprune":
        for d, e in zip(dens, eps):
            if 0 < d < 1 and (d + e >= 1 or d - e <= 0):
                raise InvalidInputError(f"DELLA: epsilon ({e}) must keep density ± epsilon in (0, 1) (density {d})")
    if sparsification in ("random", "della_magprune") and generator is None:
        generator = torch.default_generator
    if sparsification == "della_magprune" and base.dim() < 2:
        return _generalized_whole(base, thetas, w, dens, eps, consensus=consensus, normalize=normalize,
                                  rescale=rescale, scaling=scaling, generator=generator, dt=dt)
    taus = task_vector_streams(base, thetas, dt)
    if sparsification is None or (sparsification == "magnitude" and not rescale):
        return generalized_streams(base, taus, w, dens if sparsification else None,
                                   consensus=consensus, normalize=normalize, scaling=scaling, dt=dt)
    shape = base.shape
    if sparsification == "random":
        streams = [RandomSparsified(taus[i], shape, dens[i], rescale, generator, dt) for i in range(n)]
    elif sparsification == "della_magprune":
        streams = [DellaSparsified(taus[i], shape, dens[i], rescale, generator, dt, eps[i]) for i in range(n)]
    else:
        streams = [RankSparsified(taus[i], shape, dens[i], rescale, dt, sparsification, gam[i]) for i in range(n)]
    return generalized_streams(base, streams, w, None, consensus=consensus, normalize=normalize,
                               scaling=scaling, dt=dt)


def _generalized_whole(base, thetas, w, dens, eps, *, consensus, normalize, rescale, scaling, generator, dt):
    """:func:`generalized_task_arithmetic` with DELLA on whole tensors (of fewer than 2 dimensions)."""
    b = base.to(dt)
    deltas = b.new_empty((len(thetas), *b.shape))
    for i, t in enumerate(thetas):
        deltas[i] = sparsify(t.to(dt) - b, dens[i], "della_magprune", rescale=rescale, generator=generator,
                             epsilon=eps[i])
    return b + _combine(deltas, w, consensus=consensus, normalize=normalize, scaling=scaling)


def _combine(deltas: torch.Tensor, w: torch.Tensor, *, consensus: str | None, normalize: bool,
             scaling: float) -> torch.Tensor:
    """``s · S / D`` (or ``s · S``) of :func:`generalized_task_arithmetic` from the stacked
    sparsified task vectors ``deltas`` (models on dim 0; multiplied by the weights ``w`` in place)."""
    w = w.clone()
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
    return mixed


def task_vector_streams(base: torch.Tensor, thetas: Sequence[torch.Tensor], dt: torch.dtype):
    """``[τ_0, τ_1, ...]`` as streams: ``streams[i]()`` yields ``θ_i − θ_base`` (in ``dt``) block by
    block (:func:`row_blocks` of the base's shape), a fresh pass per call."""
    rows = _rows(base)
    blocks = row_blocks(base.shape)

    def stream(i):
        for sl in blocks:
            yield _rows(thetas[i])[sl].to(dt) - rows[sl].to(dt)

    return [lambda i=i: stream(i) for i in range(len(thetas))]


class Sparsified:
    """mergekit's sparsification (:func:`sparsify`) of one task vector given as a stream
    (:func:`task_vector_streams`), block by block, with the same bits: ``m ⊙ τ`` in the work dtype,
    times ``‖τ‖₁ / ‖m ⊙ τ‖₁`` when ``rescale`` (and both are at least ``eps``), cast to ``dt``.
    Subclasses give the masks (:meth:`_pairs`). The two norms are summed over one whole-size
    buffer of ``|τ|`` then ``|m ⊙ τ|`` (the same reduction as mergekit's, hence the same bits): the
    scratch is that buffer, only while the object is built. Calling the object makes a pass over the
    sparsified blocks (in ``dt``); ``density >= 1``: ``τ`` itself; :meth:`_zero`: zeros (no work)."""

    #: whether the masks are drawn from a generator (a first pass then draws them all, to leave it as
    #: the whole tensor's draws would)
    draws = False

    def __init__(self, taus, shape: Sequence[int], density: float, rescale: bool, dt: torch.dtype,
                 work: torch.dtype, eps: float = 1e-7) -> None:
        self.taus, self.shape, self.density, self.dt, self.work = taus, tuple(shape), float(density), dt, work
        self.factor = None
        if self.density >= 1 or self._zero():
            return
        self._prepare()
        blocks = row_blocks(shape)
        if rescale:
            buf = torch.empty(self.shape, dtype=work)
            view = _rows(buf)
            for sl, tau in zip(blocks, taus()):
                view[sl] = tau.to(work).abs()
            before = buf.sum()
        if rescale or self.draws:
            for sl, (tau, mask) in zip(blocks, self._pairs()):  # a whole pass (a generator's draws: all of them)
                if rescale:
                    view[sl] = (tau.to(work) * mask).abs()
            self._passed()
        if rescale:
            after = buf.sum()
            del buf, view
            if not (before < eps or after < eps):
                self.factor = before / after

    def _zero(self) -> bool:
        """Whether the result is zeros (``zeros_like(τ)``, not ``0 · τ``, which is −0 where ``τ < 0``)."""
        return False

    def _prepare(self) -> None:
        """Work before the first pass (e.g. a selection's thresholds)."""

    def _pairs(self):
        """A pass of ``(τ block, its mask in the work dtype)``."""
        raise NotImplementedError

    def _passed(self) -> None:
        """Called after the first whole pass."""

    def __call__(self):
        """A pass over the sparsified blocks (in ``dt``)."""
        if self.density >= 1:
            yield from self.taus()
            return
        if self._zero():
            for tau in self.taus():
                yield torch.zeros_like(tau)
            return
        for tau, mask in self._pairs():
            masked = tau.to(self.work) * mask
            if self.factor is not None:
                masked = masked * self.factor
            yield masked.to(self.dt)


class RandomSparsified(Sparsified):
    """DARE's random sparsification (``sparsify(τ, d, "random", rescale)``): ``m ~ Bernoulli(d)`` one
    draw per entry in order from ``generator`` (left where the whole tensor's draws leave it, so the
    next model draws on from there, as mergekit's do), in mergekit's work dtype (:func:`_work_dtype`)."""

    draws = True

    def __init__(self, taus, shape: Sequence[int], density: float, rescale: bool, generator: torch.Generator,
                 dt: torch.dtype) -> None:
        self.generator = generator
        self.state = generator.get_state()
        super().__init__(taus, shape, density, rescale, dt, _work_dtype(torch.empty(0, dtype=dt)))

    def _probs(self, tau: torch.Tensor) -> torch.Tensor:
        return torch.full(tau.shape, self.density, dtype=self.work)

    def _pairs(self):
        self._g = torch.Generator().set_state(self.state)
        for tau in self.taus():
            yield tau, torch.bernoulli(self._probs(tau), generator=self._g).to(self.work)

    def _passed(self) -> None:
        self.generator.set_state(self._g.get_state())


class DellaSparsified(RandomSparsified):
    """DELLA's magnitude-ranked sparsification (``sparsify(τ, d, "della_magprune", rescale, epsilon)``):
    ``m ~ Bernoulli(p)`` with :func:`_della_probs` of each block's rows, for a tensor of 2 or more
    dimensions (its ranks run along dim 1, within a block of whole dim-0 rows)."""

    def __init__(self, taus, shape: Sequence[int], density: float, rescale: bool, generator: torch.Generator,
                 dt: torch.dtype, epsilon: float) -> None:
        if len(shape) < 2:
            raise InvalidInputError(f"DELLA by blocks ranks rows of a tensor of 2 or more dimensions, got shape {tuple(shape)}")
        self.epsilon = float(epsilon)
        super().__init__(taus, shape, density, rescale, generator, dt)

    def _zero(self) -> bool:
        return self.density <= 0

    def _probs(self, tau: torch.Tensor) -> torch.Tensor:
        return _della_probs(tau, self.density, self.epsilon, self.work)


class RankSparsified(Sparsified):
    """The magnitude sparsifications by rank over the whole tensor, selected block by block
    (:class:`TopK`, no sort): ``"magnitude"`` keeps the ``max(1, int(d · n))`` largest ``|τ|``
    (ties at the cut first by position); ``"magnitude_outliers"`` (Model Breadcrumbs) keeps the
    entries of ascending ``|τ|`` rank ``[n_bot, n_bot + int(d · n))``, ``n_bot = max(0, n − int(d · n) −
    int(γ · n))`` (ranks of tied magnitudes by position: the k smallest of :class:`TopK` with
    ``smallest``, minus the ``n_bot`` smallest). mergekit ranks by torch's unstable sort, whose order
    of tied entries torch does not define: the results differ only where magnitudes tie at a cut.
    The mask is in ``τ``'s dtype (``dt``), the work dtype."""

    def __init__(self, taus, shape: Sequence[int], density: float, rescale: bool, dt: torch.dtype, how: str,
                 gamma: float = 0.0) -> None:
        self.how, self.gamma = how, float(gamma)
        super().__init__(taus, shape, density, rescale, dt, dt)

    def _prepare(self) -> None:
        n = math.prod(self.shape)
        if self.how == "magnitude":
            k = max(1, int(self.density * n)) if self.density > 0 and n else 0
            self.tops = [(TopK(self.taus, n, k, self.dt), True)]
        else:
            target = int(self.density * n)
            n_bot = max(0, n - target - int(self.gamma * n))
            self.tops = [(TopK(self.taus, n, n_bot + target, self.dt, smallest=True), True),
                         (TopK(self.taus, n, n_bot, self.dt, smallest=True), False)]

    def _pairs(self):
        tops = [(top.fresh(), keep) for top, keep in self.tops]
        for tau in self.taus():
            mask = None
            for top, keep in tops:
                m = top.mask(tau) if keep else ~top.mask(tau)
                mask = m if mask is None else mask & m
            yield tau, mask.to(self.dt)

    def _zero(self) -> bool:
        return self.how == "magnitude" and self.density <= 0


def generalized_streams(base: torch.Tensor, taus, w: torch.Tensor, densities: Sequence[float] | None, *,
                        consensus: str | None, normalize: bool, scaling: float, dt: torch.dtype,
                        zero_base: bool = False) -> torch.Tensor:
    """:func:`generalized_task_arithmetic` of task vectors given as streams (``taus[i]()`` yields
    model i's ``τ_i`` blocks in ``dt``, :func:`task_vector_streams`), block by block: each trimmed to
    its ``max(1, int(d_i · numel))`` largest magnitudes (:class:`TopK`) unless ``densities`` is
    None or ``d_i >= 1``, weighted, combined (:func:`_combine`), added to ``θ_base``
    (``zero_base``: ``θ_base + (0 + S)``, a merge around a zero base added to ``θ_base``)."""
    rows = _rows(base)
    numel = base.numel()
    tops: list[TopK | None] = []
    for i, d in enumerate(densities or [1.0] * len(taus)):
        d = float(d)
        if d >= 1:
            tops.append(None)
        else:
            k = max(1, int(d * numel)) if d > 0 and numel else 0
            tops.append(TopK(taus[i], numel, k, dt))
    passes = [stream() for stream in taus]

    def block(sl):
        b = rows[sl].to(dt)
        deltas = b.new_empty((len(taus), b.numel()))
        for i, (top, it) in enumerate(zip(tops, passes)):
            delta = next(it).reshape(-1)
            if top is not None:
                delta = torch.zeros_like(delta) if top.none else delta * top.mask(delta).to(dt)
            deltas[i] = delta
        mixed = _combine(deltas, w, consensus=consensus, normalize=normalize, scaling=scaling)
        if zero_base:
            mixed = torch.zeros_like(mixed) + mixed
        return (b.reshape(-1) + mixed).reshape(b.shape)

    return _by_blocks(base.shape, dt, block)


def linear(thetas: Sequence[torch.Tensor], weights: Sequence[float], *, normalize: bool = True) -> torch.Tensor:
    """mergekit's ``linear``: ``θ* = Σ_i λ_i θ_i / Σ_i λ_i`` (``normalize``, no check of the sum) or
    ``Σ_i λ_i θ_i``, accumulated in mergekit's order (``addcmul``), block by block (each input cast to
    the compute dtype one block at a time)."""
    _check(thetas, weights)
    dt = compute_dtype(*thetas)
    w = torch.tensor([float(x) for x in weights], dtype=dt)
    total = w.sum()

    def block(sl):
        out = torch.zeros(_rows(thetas[0])[sl].shape, dtype=dt)
        for t, c in zip(thetas, w.unbind(0)):
            out.addcmul_(_rows(t)[sl].to(dt), c)
        return out.div_(total) if normalize else out

    return _by_blocks(thetas[0].shape, dt, block)


_SLERP_CHUNK = 1024 * 1024  # mergekit's _CHUNK_ELEMENTS


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation of whole tensors (mergekit's ``slerp``): with ``Ω`` the angle between
    ``v0`` and ``v1`` (flattened, each normalised),
    ``θ* = sin((1 − t)Ω)/sin Ω · v0 + sin(tΩ)/sin Ω · v1``; the linear ``(1 − t) v0 + t v1`` where
    ``|cos Ω| > dot_threshold``. Norms and dot products chunked as mergekit chunks them (1M elements), the
    output formed block by block (:func:`row_blocks`): scratch O(chunk) besides the output."""
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
    r0, r1 = _rows(v0), _rows(v1)
    return _by_blocks(v0.shape, dt, lambda sl: coef_a.reshape(()) * r0[sl].to(dt) + coef_b.reshape(()) * r1[sl].to(dt))


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, base: torch.Tensor | None = None, row_wise: bool = False,
            flatten: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """mergekit's ``nuslerp`` interpolation: SLERP of the flattened tensors (``flatten``), else of each
    row (``row_wise``: each column) separately, ``(sin((1 − t)Ω) v0 + sin(tΩ) v1) / sin Ω`` with
    ``cos Ω = ⟨v0/‖v0‖, v1/‖v1‖⟩`` (norms clamped to 1e−7), linear ``(1 − t) v0 + t v1`` where
    ``1 − cos²Ω ≤ eps²``. With ``base``: ``θ_base + nuslerp(t, v0 − θ_base, v1 − θ_base)`` (task vectors).
    In ``compute_dtype(v0, v1)`` (the base cast to it).

    Block by block (:func:`row_blocks`): the norms and the dot products are reduced over one
    whole-size buffer laid out as the whole-tensor formula's operands (the same reductions, hence
    the same bits), then the output is formed block after block: the scratch is that buffer."""
    dt = compute_dtype(v0, v1)
    shape = tuple(v0.shape)
    r0, r1 = _rows(v0), _rows(v1)
    rb = None if base is None else _rows(base)

    def x(r, sl):  # the interpolated vector's rows sl (a task vector with a base)
        v = r[sl].to(dt)
        return v if rb is None else v - rb[sl].to(dt)

    if not v0.dim() or not v0.numel():
        whole = slice(None)
        out = _nuslerp_whole(t, x(r0, whole), x(r1, whole), row_wise=row_wise, flatten=flatten, eps=eps)
        return (out if rb is None else rb.to(dt) + out).reshape(shape)
    dim = 0 if row_wise else -1

    def view(u):  # the layout the whole-tensor formula reduces in (over its last dim)
        if flatten:
            return u.reshape(-1)
        return u.transpose(dim, -1) if dim != -1 else u

    def back(c):  # a per-vector quantity (view layout, kept dim) broadcast in the tensor's layout
        if flatten:
            return c.reshape((1,) * len(shape))
        return c.transpose(dim, -1) if dim != -1 else c

    def part(c, sl):
        return c[sl] if c.shape[0] == shape[0] else c

    blocks = row_blocks(shape)
    buf = torch.empty(shape, dtype=dt)
    rows = _rows(buf)
    norms = []
    for r in (r0, r1):
        for sl in blocks:
            rows[sl] = x(r, sl)
        norms.append(back(torch.norm(view(buf), dim=-1, keepdim=True).clamp(min=1e-7)))
    for sl in blocks:
        rows[sl] = (x(r0, sl) / part(norms[0], sl)) * (x(r1, sl) / part(norms[1], sl))
    cos = torch.sum(view(buf), dim=-1, keepdim=True).clamp(-1, 1)
    del buf, rows
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    s0, s1, st, col = (back(c) for c in (torch.sin((1 - t) * theta), torch.sin(t * theta), torch.sin(theta), colinear))

    def block(sl):
        a, b = x(r0, sl), x(r1, sl)
        out = (part(s0, sl) * a + part(s1, sl) * b) / part(st, sl)
        out = torch.where(part(col, sl), (1 - t) * a + t * b, out)
        return out if rb is None else rb[sl].to(dt) + out

    return _by_blocks(shape, dt, block)


def _nuslerp_whole(t: float, v0: torch.Tensor, v1: torch.Tensor, *, row_wise: bool, flatten: bool,
                   eps: float) -> torch.Tensor:
    """:func:`nuslerp` of whole tensors (0-d or empty ones)."""
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
