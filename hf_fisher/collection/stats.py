"""Streaming statistics of per-sample tensors: Welford/Chan moments and a bias-corrected EMA.

Pure tensor math, no model knowledge. The engine feeds per-sample contributions
``C_i = g_i ⊙ g_i`` (a ``[b, *shape]`` batch, or precomputed per-chunk moments) and reads back
``F = mean_i C_i`` with its sample variance.

Two accumulators share one interface (``update``, ``count``, ``mean``, ``m2``, ``variance``,
``stderr``, ``effective_count``, ``mean_as``, ``variance_as``, ``state_dict``/``from_state_dict``,
and the exact in-memory state ``state()``/``from_state()`` as an :class:`AccumulatorState`, which
the cross-rank merge and the collector's checkpoints read instead of the accumulators' internals):

- :class:`Welford` — exact, order-independent mean and centred sum of squares, mergeable across
  batches, ranks and checkpoints with Chan et al.'s pairwise formula. The default.
- :class:`EMA` — exponentially weighted mean/variance with bias correction; order dependent, so
  it cannot be merged.

Accumulation always happens in the accumulator's dtype (float64 by default) whatever the
input dtype; ``mean_as``/``variance_as`` export in a storage dtype/device.

The fast path of the collector (``reduction="param"``) is two pieces that avoid any float64
``[b, *shape]`` temporary:

- :func:`shifted_moments_` summarises a chunk of per-sample values (or of their squares, so the
  square is not a separate step) in their own precision, in place, as a *shift*, a *residual* and
  a centred ``M2`` (the corrected two-pass algorithm, see there);
- :meth:`Welford.update_shifted_` Chan-merges such a summary into the float64 state in place,
  with reusable scratch buffers from a :class:`Workspace`.
"""

from __future__ import annotations

import ctypes
import functools
import math
import mmap
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hf_fisher.errors import EmptyDataError, InvalidInputError, UnsupportedError

__all__ = ["EMA", "AccumulatorState", "MappedStore", "Welford", "Workspace", "confidence_interval", "make_accumulator", "sample_sum", "shifted_moments_", "zeros_like_free"]


def _as_shape(shape: Sequence[int] | torch.Size | int | None) -> tuple[int, ...] | None:
    if shape is None:
        return None
    if isinstance(shape, int):
        return (shape,)
    return tuple(int(s) for s in shape)


def _count_of(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return int(value.item())
    return int(value)


class Workspace:
    """Reusable scratch buffers for the in-place updates (:meth:`Welford.update_shifted_`).

    One flat buffer per ``(slot, dtype, device)``, grown to the largest size asked for and then
    handed out as views: a long collection allocates its float64 temporaries once instead of at
    every batch and parameter (fresh multi-megabyte allocations cost page faults, several times
    an in-place pass on CPU). Not thread-safe; :meth:`clear` releases the memory.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}

    def get(self, slot: str, shape: Sequence[int] | torch.Size, dtype: torch.dtype, device) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` (a view of the slot's buffer: valid until the slot is asked for again)."""
        shape = tuple(int(d) for d in shape)
        numel = math.prod(shape)
        key = (slot, dtype, torch.device(device))
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[key] = buf
        return buf[:numel].view(shape)

    def clear(self) -> None:
        self._buffers = {}


def shifted_moments_(
    x: torch.Tensor, *, square: bool = False, total: torch.Tensor | None = None, corrected: bool = True, m2_out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Moments over dim 0 of ``x`` (``[b, *shape]``), or of ``x²`` with ``square=True``; **overwrites** ``x``.

    Returns ``(shift, m2, residual)`` in ``x``'s precision (float32 or float64; lower precisions
    are first promoted to float32) such that, for the ``b`` values ``y_i`` (``x_i`` or ``x_i²``)::

        mean = shift + residual / b      (evaluate in the accumulation dtype; residual None: mean = shift)
        M2   = Σ_i (y_i − mean)² = m2    (m2 >= 0)

    ``total``, if given, is ``x.sum(0)`` already computed by the caller (e.g. to check
    finiteness before ``x`` is overwritten); it is consumed (divided in place) and cannot be
    combined with ``square``. ``m2_out``, if given, is a contiguous tensor of ``x.shape[1:]`` and
    ``x``'s dtype that receives ``m2`` (e.g. rows of a larger buffer: no copy). With ``b == 1``: ``shift = y_0``, ``m2 = 0`` (a read-only broadcast zero, :func:`zeros_like_free`), ``residual = None``.

    Two-pass, never a sum of squares: ``shift = fl(Σ y / b)``, then ``M2`` is summed from the
    centred values ``d_i = y_i − shift``, so there is no cancellation between large terms
    (``M2 = Σ y² − b·mean²`` in float32 loses every digit when the mean is large against the
    spread; a float64 version would need float64 copies of ``x``, and ``sum(dtype=float64)``
    over the batch dimension is ~20x slower than a float32 sum on CPU).

    ``corrected=True`` (default) is the corrected two-pass algorithm (Björck; Chan, Golub &
    LeVeque 1983): also ``residual = Σ d_i``, and ``m2 = Σ d_i² − residual² / b``. Its error is
    a few units of ``x``'s precision relative to ``M2`` whatever the mean/spread ratio, and
    ``shift + residual / b`` gives the mean beyond ``x``'s precision. Passes over ``x``:
    (square), sum, subtract, sum, square, sum. The sums over the samples are
    :func:`sample_sum`'s matrix-vector products.

    ``corrected=False`` skips the residual: ``m2 = Σ (y_i − shift)²`` (subtract and square fused
    in one pass), the plain two-pass algorithm. It overestimates ``M2`` by exactly
    ``b·(mean − shift)²``; the shift is the rounded mean, ``|mean − shift| <= k·eps·|mean|``
    (``k ~ log2(b) + 2``), so the *variance* is off by at most ``~(k·eps·mean)²``, i.e. its
    square root by ``k·eps·|mean|``. Relative to ``M2`` that is only visible when all ``b``
    values agree to ~5 significant digits in float32 (coefficient of variation <~ 1e-4), and it
    is then still smaller than what rounding the values themselves to ``x``'s precision
    (``eps/2`` each) does to ``M2``: ``~eps·|mean|·spread·sqrt(b)``. That is the case of the
    engine's contributions ``C_i = g_i ⊙ g_i``, computed and rounded in the compute dtype, so the
    collector's sink uses this cheaper form (the same accuracy as before the fused path;
    tests/test_stats.py checks both statements). Passes over ``x``: (square), sum, fused
    subtract-square, sum.

    No ``[b, *shape]`` temporary is allocated in either form.
    """
    if total is not None and (square or total.dtype != x.dtype):
        raise InvalidInputError("shifted_moments_: total must be x.sum(0) of the values themselves (no square, same dtype)")
    if x.dtype not in (torch.float32, torch.float64):
        x = x.to(torch.float32)
    if square:
        x.square_()
    b = x.shape[0]
    s = sample_sum(x) if total is None else total
    if b == 1:  # M2 = 0: a broadcast zero, no parameter-sized tensor (see zeros_like_free)
        return s, zeros_like_free(s), None
    shift = s.div_(b)
    if not corrected:
        # (x - shift)² in one pass (mse_loss without reduction, written over x)
        torch.ops.aten.mse_loss.out(x, shift.expand_as(x), 0, out=x)
        return shift, sample_sum(x, out=m2_out), None
    x.sub_(shift)
    residual = sample_sum(x)
    m2 = sample_sum(x.square_(), out=m2_out).addcmul_(residual, residual, value=-1.0 / b).clamp_min_(0.0)
    return shift, m2, residual


def sample_sum(x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``Σ_i x_i`` over dim 0 of ``x`` (``[b, *shape]``) in ``x``'s precision, into ``out`` (a
    contiguous ``shape`` tensor) when given.

    For a contiguous ``x`` it is the product ``1ᵀ X`` with ``X`` the ``[b, N]`` view: one
    matrix-vector product, about twice the speed of ``x.sum(0)`` (a strided reduction) on a
    CPU; the same sums in another order."""
    b = x.shape[0]
    if b == 1 or not x.is_contiguous() or not x.dtype.is_floating_point or x.numel() == 0 or (out is not None and not out.is_contiguous()):
        return x.sum(0) if out is None else torch.sum(x, 0, out=out)
    row = _ones_row(b, x.dtype, x.device)
    if out is None:
        return (row @ x.view(b, -1)).view(x.shape[1:])
    torch.mm(row, x.view(b, -1), out=out.view(1, -1))
    return out


@functools.lru_cache(maxsize=16)
def _ones_row(b: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A ``[1, b]`` row of ones (read only), for :func:`sample_sum`."""
    return torch.ones(1, b, dtype=dtype, device=device)


class MappedStore:
    """Files that hold accumulator state tensors, memory-mapped (Fishers larger than RAM).

    ``MappedStore(root)`` makes a fresh folder ``root/hf-fisher-accumulators-<random>``; each
    :meth:`zeros` is one file there, created sparse (all zeros) and mapped with
    ``torch.from_file(shared=True)``: the tensor's pages are the file's, so the kernel writes
    them back and drops them under memory pressure instead of the process holding them
    (resident memory is bounded by what the updates touch, not by the Fisher's size). The
    arithmetic is the same as in memory, so the results are bit for bit those of in-memory
    accumulators of the same dtype.

    :meth:`close` removes the folder (and it is removed when the store is garbage collected or
    the interpreter exits); tensors already mapped stay valid until dropped (the files are only
    unlinked). A process killed hard leaves its folder behind, recognisable by its name:
    delete it.
    """

    PREFIX = "hf-fisher-accumulators-"

    def __init__(self, root) -> None:
        import tempfile
        import weakref
        from pathlib import Path

        root = Path(root)
        try:
            root.mkdir(parents=True, exist_ok=True)
            self.folder = Path(tempfile.mkdtemp(prefix=self.PREFIX, dir=root))
        except OSError as e:
            raise InvalidInputError(f"cannot create the accumulator files under {str(root)!r}: {e}; pass a writable offload_dir") from e
        self._files = 0
        # (address, bytes) of every file's mapping, for release()
        self._mapped: list[tuple[int, int]] = []
        self._finalizer = weakref.finalize(self, _remove_tree, str(self.folder))

    def zeros(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """A new zero tensor of ``shape``/``dtype`` whose data is a file of this store."""
        shape = tuple(int(d) for d in shape)
        numel = math.prod(shape)
        if numel == 0:
            return torch.zeros(shape, dtype=dtype)
        path = self.folder / f"{self._files:06d}.bin"
        self._files += 1
        with open(path, "wb") as f:
            f.truncate(numel * dtype.itemsize)
        t = torch.from_file(str(path), shared=True, size=numel, dtype=dtype).view(shape)
        self._mapped.append((t.data_ptr(), numel * dtype.itemsize))
        return t

    def release(self, *tensors: torch.Tensor | None) -> None:
        """Drop the pages of ``tensors`` (contiguous views of this store's files) from the
        process's resident memory: ``madvise(MADV_DONTNEED)`` on the whole pages they cover,
        clipped to the file's mapping. The data is the file's (a shared mapping: dirty pages
        stay in the page cache and are written back), so a later access reads the same values
        again; only the resident set shrinks, to what is being updated now. A no-op where
        ``madvise`` is not available and for tensors that are not in a file of this store."""
        libc = _libc()
        if libc is None:
            return
        for t in tensors:
            if t is None or t.numel() == 0 or not t.is_contiguous():
                continue
            lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
            for base, size in self._mapped:
                if base <= lo and hi <= base + size:
                    start = max(base, lo - lo % _PAGE)
                    end = min(base + size + (-size) % _PAGE, hi + (-hi) % _PAGE)
                    libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)
                    break

    @property
    def nbytes(self) -> int:
        """Bytes of the files (their logical sizes)."""
        return sum(p.stat().st_size for p in self.folder.glob("*.bin")) if self.folder.exists() else 0

    def close(self) -> None:
        """Remove the folder (idempotent)."""
        self._finalizer()


_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)


@functools.cache
def _libc():
    """The C library, for its ``madvise`` (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


def _remove_tree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class AccumulatorState:
    """The exact state of a :class:`Welford` or :class:`EMA` accumulator.

    ``count`` = n samples; ``mean`` = μ; ``m2`` = Welford's ``M2 = Σ_i (x_i − μ)²`` or the EMA's
    unnormalised weighted dispersion ``S = Σ_k w_k (x_k − μ)²`` (its :attr:`EMA.m2` is ``S / W``);
    EMA only: ``decay``, ``weight_sum`` ``W = Σ_k w_k`` and ``weight_sq_sum`` ``Σ_k w_k²``.
    ``mean``/``m2`` are None for an accumulator created without a shape that saw no sample;
    ``m2`` is None for a mean-only :class:`Welford` (``variance=False``).
    ``mean_lo``: a compensated :class:`Welford`'s low-order part of the mean (the mean is
    ``mean + mean_lo`` beyond the accumulation dtype's precision; ``mean`` alone is its rounding);
    None otherwise. A reader that ignores it loses only that rounding.
    """

    count: int
    mean: torch.Tensor | None
    m2: torch.Tensor | None
    decay: float | None = None
    weight_sum: float | None = None
    weight_sq_sum: float | None = None
    mean_lo: torch.Tensor | None = None

    def as_dict(self) -> dict[str, Any]:
        """The :meth:`Welford.state_dict` / :meth:`EMA.state_dict` keys (tensors not copied)."""
        out: dict[str, Any] = {"count": self.count}
        if self.mean is not None:
            out["mean"] = self.mean
            if self.m2 is not None:
                out["m2"] = self.m2
            if self.mean_lo is not None:
                out["mean_lo"] = self.mean_lo
        if self.decay is not None:
            out.update(decay=self.decay, weight_sum=self.weight_sum, weight_sq_sum=self.weight_sq_sum)
        return out


class _Accumulator:
    """Shared plumbing: lazy shape, dtype/device handling, exports, the state API."""

    kind = "base"

    def __init__(self, shape=None, *, dtype: torch.dtype = torch.float64, device="cpu", store: MappedStore | None = None) -> None:
        if not dtype.is_floating_point:
            raise InvalidInputError(f"accumulation dtype must be a floating point dtype, got {dtype}")
        self.dtype = dtype
        self.device = torch.device(device)
        if store is not None and self.device.type != "cpu":
            raise InvalidInputError(f"disk-backed accumulators (store=...) live on the CPU, not on {self.device}")
        #: the :class:`MappedStore` whose files hold the state tensors (None: in memory)
        self.store = store
        self._home: dict[str, torch.Tensor] = {}
        self.shape = _as_shape(shape)
        self._n = 0
        self._mean: torch.Tensor | None = None
        self._m2: torch.Tensor | None = None
        if self.shape is not None:
            self._init_state(self.shape)

    def _init_state(self, shape: tuple[int, ...]) -> None:
        self.shape = shape
        self._mean = self._zeros("_mean", shape)
        self._m2 = self._zeros("_m2", shape)

    def _zeros(self, attr: str, shape: tuple[int, ...]) -> torch.Tensor:
        """A zero state tensor: in memory, or in a file of :attr:`store` (remembered as ``attr``'s home)."""
        if self.store is None:
            return torch.zeros(shape, dtype=self.dtype, device=self.device)
        t = self._home[attr] = self.store.zeros(shape, self.dtype)
        return t

    def _rehome(self) -> None:
        """Disk-backed: copy state tensors that an update replaced by new ones back into their files."""
        for attr, home in self._home.items():
            t = getattr(self, attr)
            if t is not None and t is not home:
                home.copy_(t)
                setattr(self, attr, home)
        self.release_pages()

    def release_pages(self) -> None:
        """Disk-backed: drop the state's pages from resident memory (:meth:`MappedStore.release`;
        the values stay, in the files). A no-op in memory."""
        if self.store is not None:
            self.store.release(*self._home.values())

    def _prepare_batch(self, batch: torch.Tensor) -> torch.Tensor:
        if not isinstance(batch, torch.Tensor):
            batch = torch.as_tensor(batch)
        if batch.dim() == 0:
            raise InvalidInputError(
                "update() expects a batch of samples shaped [b, *shape]; got a 0-d tensor. "
                "Use batch.unsqueeze(0) for a single sample."
            )
        if self.shape is not None and tuple(batch.shape[1:]) != self.shape:
            raise InvalidInputError(
                f"batch has per-sample shape {tuple(batch.shape[1:])}, but this accumulator "
                f"tracks shape {self.shape}; pass tensors shaped [b, *{self.shape}]."
            )
        return batch.detach().to(device=self.device, dtype=self.dtype)

    def _require_state(self) -> None:
        if self._mean is None:
            raise EmptyDataError(
                f"this {type(self).__name__} has seen no sample and was created without a shape, "
                "so it has no mean yet; call update() first or pass shape=..."
            )

    @property
    def count(self) -> int:
        """Number of samples accumulated."""
        return self._n

    @property
    def mean(self) -> torch.Tensor:
        """The running mean, in the accumulation dtype (zeros before any sample)."""
        self._require_state()
        return self._mean  # type: ignore[return-value]

    def mean_as(self, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
        """The mean converted to a storage ``dtype``/``device`` (a copy; accumulation is untouched)."""
        return self.mean.to(device=device if device is not None else self.device, dtype=dtype or self.dtype, copy=True)

    def variance(self, ddof: int = 1) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def variance_as(self, dtype: torch.dtype | None = None, device=None, *, ddof: int = 1) -> torch.Tensor:
        """The variance converted to a storage ``dtype``/``device``."""
        return self.variance(ddof).to(device=device if device is not None else self.device, dtype=dtype or self.dtype)

    @property
    def effective_count(self) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def stderr(self) -> torch.Tensor:
        """Standard error of the mean: ``sqrt(variance(ddof=1) / n_eff)`` (zeros when n_eff <= 1)."""
        var = self.variance(1)
        n_eff = self.effective_count
        if n_eff <= 0:
            return torch.zeros_like(var)
        return torch.sqrt(var / n_eff)

    def state(self) -> AccumulatorState:
        """The exact state (see :class:`AccumulatorState`), with the live tensors in the
        accumulation dtype and device: no copy, so read them before the next update and do not
        modify them; :meth:`from_state` copies."""
        return AccumulatorState(self._n, self._mean, self._m2)

    @classmethod
    def from_state(cls, state: AccumulatorState, *, dtype: torch.dtype = torch.float64, device="cpu", store: MappedStore | None = None):
        """A new accumulator holding ``state`` (tensors copied to ``dtype``/``device``, or into
        ``store``'s files, values checked as in :meth:`from_state_dict`)."""
        return cls.from_state_dict(state.as_dict(), dtype=dtype, device=device, store=store)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, count={self._n}, dtype={self.dtype}, device={self.device})"


class Welford(_Accumulator):
    """Exact streaming mean and centred second moment (Welford 1962; Chan, Golub & LeVeque 1979).

    State: ``n`` samples, mean ``μ`` and ``M2 = Σ_i (x_i − μ)²`` (elementwise).

    A batch ``x_1..x_b`` is first summarised by its own moments ``(b, μ_b, M2_b)`` with
    ``μ_b = (1/b) Σ x_k`` and ``M2_b = Σ (x_k − μ_b)²`` (computed around the batch's first sample
    as a shift, so constant input gives exactly ``M2 = 0``), then merged with Chan's formula::

        δ = μ_b − μ_a,  n = n_a + n_b
        μ  = μ_a + δ · n_b / n
        M2 = M2_a + M2_b + δ² · n_a · n_b / n

    Every term of ``M2`` is non-negative, so the variance can never come out negative. The
    result does not depend on the order of the samples nor on how they are split into batches
    (up to float64 rounding), and two accumulators merge exactly (:meth:`merge`), which is
    what cross-rank reduction and checkpoint resumption use.

    ``variance(ddof) = M2 / (n − ddof)`` (unbiased for ddof=1); when ``n <= ddof`` the variance
    is undefined and **zeros** are returned instead of NaN.

    **Compensated mean** (``compensated=None``: on for every dtype but float64). In a low
    precision (float32: unit roundoff ``u = 2⁻²⁴``) the mean is kept as an unevaluated sum
    ``μ = hi + lo`` of two tensors of that dtype (Kahan/Møller compensation, the Fast2Sum of
    Dekker 1971). A merge computes, all in the dtype::

        δ  = ((μ_b − hi) − lo)                          (the residual of μ_b, if any, added)
        y  = δ · n_b / n + lo
        s  = hi + y
        lo = y − (s − hi)                               (the rounding error of s, exact when |hi| >= |y|)
        hi = s
        M2 = M2 + M2_b + δ² · n_a · n_b / n             (plain, see below)

    Why: a plain low-precision running mean rounds ``μ += δ·n_b/n`` at every merge, an error of
    ``u|μ|`` that later merges shrink only by ``n_k/n``; after ``k`` merges the mean is off by
    up to ``~k·u|μ|/2`` (``~u|μ|·sqrt(k/3)`` for random rounding), i.e. ~1e-5 relative after
    10⁵ float32 batches. With ``lo`` that rounding is carried to the next merge instead of
    lost, and the error stays a few ``u`` whatever ``k`` (errors in ``δ`` itself never
    accumulate: each is damped by ``n_b/n`` and then by ``n_k/n``). ``hi`` is always the mean
    rounded to the dtype (``|lo| <= ulp(hi)/2``), so :attr:`mean` needs no extra work; exports to
    a wider dtype add ``lo`` (:meth:`mean_as`). tests/test_stats_compensated.py measures both.

    ``M2`` is *not* compensated, on purpose: every term added to it is ``>= 0``, so there is no
    cancellation and its relative error after ``k`` merges is at most ``k·u`` and in practice
    ``~sqrt(k)·u`` (2e-5 at 10⁵ float32 merges, measured in the test); ``M2`` only feeds the
    variance and standard error, whose own sampling error ``sqrt(2/(n−1))`` is larger
    by orders of magnitude (0.4% at ``n = 10⁵``). A second compensation tensor would cost
    4 more bytes per element and bring float32 back to float64's 16 bytes; compensated
    float32 holds ``hi``, ``lo``, ``M2``: 12 bytes per element.

    **Mean only** (``variance=False``): no ``M2`` at all, only ``n`` and the mean (``hi`` and
    ``lo`` when compensated): 8 bytes per element in float32 as in float64. The mean's merge is
    the one above without its ``M2`` line, so the mean is bit for bit the mean kept with
    ``variance=True``; :attr:`m2`, :meth:`variance` and :meth:`stderr` are refused
    (:class:`~hf_fisher.errors.UnsupportedError`), :meth:`state` has ``m2=None`` and
    :meth:`state_dict` no ``m2`` entry. The ``M2`` inputs of the updates are ignored (they may be
    None).

    The EMA is not compensated: its errors decay geometrically (by ``d`` per sample), so the
    rounding error of its mean stays below ``~u/(1 − d)`` relative at any length.
    """

    kind = "welford"

    def __init__(
        self, shape=None, *, dtype: torch.dtype = torch.float64, device="cpu", compensated: bool | None = None,
        store: MappedStore | None = None, variance: bool = True,
    ) -> None:
        if compensated not in (None, True, False):
            raise InvalidInputError(f"compensated must be None (on below float64), True or False; got {compensated!r}")
        if variance not in (True, False):
            raise InvalidInputError(f"variance must be True (keep M2) or False (the mean only); got {variance!r}")
        #: whether ``M2`` (and so the variance) is kept (see "Mean only" in the class docstring)
        self.has_variance = bool(variance)
        #: whether the mean carries a compensation term (see the class docstring)
        self.compensated = dtype != torch.float64 if compensated is None else bool(compensated)
        self._lo: torch.Tensor | None = None
        super().__init__(shape, dtype=dtype, device=device, store=store)

    def _init_state(self, shape: tuple[int, ...]) -> None:
        self.shape = shape
        self._mean = self._zeros("_mean", shape)
        self._m2 = self._zeros("_m2", shape) if self.has_variance else None
        self._lo = self._zeros("_lo", shape) if self.compensated else None

    def _refuse_no_variance(self, what: str) -> None:
        if not self.has_variance:
            raise UnsupportedError(
                f"{what}: this Welford accumulator keeps the mean only (variance=False), so it has no M2; "
                "accumulate with variance=True (the default) to get the variance"
            )

    def update(self, batch: torch.Tensor) -> Welford:
        """Add ``b`` samples given as a ``[b, *shape]`` tensor (``b == 0`` is a no-op)."""
        x = self._prepare_batch(batch)
        b = x.shape[0]
        if b == 0:
            if self.shape is None:
                self._init_state(tuple(x.shape[1:]))
            return self
        shift = x[0]
        d = x - shift
        md = d.mean(dim=0)
        m2_b = (d - md).square().sum(dim=0) if self.has_variance else None
        return self._merge_moments(b, shift, m2_b, md)

    def update_moments(
        self, n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor, *, inplace: bool = False, mean_lo: torch.Tensor | None = None
    ) -> Welford:
        """Merge precomputed moments of ``n_b`` samples: their mean and ``Σ (x − mean_b)²``
        (``m2_b`` ignored, and may be None, when the accumulator keeps the mean only).

        ``mean_lo`` (optional): a low-order part, the mean being ``mean_b + mean_lo`` (what a
        compensated accumulator's :meth:`state` gives). ``inplace=True`` is
        :meth:`update_shifted_` (the state tensors are updated in place).
        """
        if inplace:
            residual = None if mean_lo is None else torch.as_tensor(mean_lo) * _count_of(n_b)
            return self.update_shifted_(n_b, mean_b, m2_b, residual)
        n_b = _count_of(n_b)
        if n_b < 0:
            raise InvalidInputError(f"sample count must be >= 0, got {n_b}")
        if n_b == 0:
            return self
        mean_b = torch.as_tensor(mean_b).detach().to(device=self.device, dtype=self.dtype)
        if not self.has_variance:
            m2_b = mean_b  # not read: only its shape is checked
        elif m2_b is None:
            raise InvalidInputError("update_moments: m2_b is required by an accumulator that keeps the variance")
        m2_b = torch.as_tensor(m2_b).detach().to(device=self.device, dtype=self.dtype)
        if mean_b.shape != m2_b.shape or (mean_lo is not None and tuple(mean_lo.shape) != tuple(mean_b.shape)):
            raise InvalidInputError(f"mean shape {tuple(mean_b.shape)} != m2 shape {tuple(m2_b.shape)}")
        if self.shape is not None and tuple(mean_b.shape) != self.shape:
            raise InvalidInputError(
                f"moments have shape {tuple(mean_b.shape)}, but this accumulator tracks shape {self.shape}"
            )
        if mean_lo is not None:
            mean_lo = torch.as_tensor(mean_lo).detach().to(device=self.device, dtype=self.dtype)
        return self._merge_moments(n_b, mean_b, m2_b, mean_lo)

    def _merge_moments(self, n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor, lo_b: torch.Tensor | None = None) -> Welford:
        """Chan's merge of ``(n_b, mean_b + lo_b, m2_b)`` into new state tensors (the old ones are not modified)."""
        if self._mean is None:
            self._init_state(tuple(mean_b.shape))
        if lo_b is not None and not self.compensated:
            mean_b, lo_b = mean_b + lo_b, None
        n_a = self._n
        if n_a == 0:
            if self.compensated:
                self._mean, self._lo = _fast_two_sum(mean_b, lo_b) if lo_b is not None else (mean_b.clone(), torch.zeros_like(mean_b))
            else:
                self._mean = mean_b.clone()
            if self.has_variance:
                self._m2 = m2_b.clone()
            self._n = n_b
            self._rehome()
            return self
        n = n_a + n_b
        delta = mean_b - self._mean
        if self.compensated:
            delta = delta - self._lo
        if lo_b is not None:
            delta = delta + lo_b
        if self.compensated:
            self._mean, self._lo = _fast_two_sum(self._mean, delta * (n_b / n) + self._lo)
        else:
            self._mean = self._mean + delta * (n_b / n)
        if self.has_variance:
            self._m2 = self._m2 + m2_b + delta.square() * (n_a * n_b / n)
        self._n = n
        self._rehome()
        return self

    def update_shifted_(
        self,
        n_b: int,
        shift: torch.Tensor,
        m2_b: torch.Tensor,
        residual: torch.Tensor | None = None,
        *,
        workspace: Workspace | None = None,
    ) -> Welford:
        """Merge, **in place**, ``n_b`` samples with mean ``shift + residual / n_b`` and centred ``M2 = m2_b``.

        The summary :func:`shifted_moments_` returns (``residual=None``: the mean is ``shift``).
        Same Chan merge as :meth:`update_moments`, evaluated in the accumulation dtype::

            δ   = (shift − μ_a) + residual / n_b
            μ  += δ · n_b / n
            M2 += m2_b + δ² · n_a · n_b / n

        (compensated: ``μ_a = hi + lo`` and the mean's update is the class docstring's Fast2Sum)
        but the state tensors are updated in place and the temporaries come from ``workspace``
        (a temporary one when None): no allocation per call. Inputs of another dtype/device are
        first copied into workspace buffers (a vectorised conversion; mixed dtype arithmetic is
        several times slower on CPU). Tensors obtained earlier from :attr:`mean`/:attr:`m2` see
        the change; the inputs are not modified.

        Every step is elementwise, so it runs over slices of :data:`MERGE_CHUNK` elements of the
        flattened tensors (the same bits as one pass): the temporaries are bounded by the slice,
        not by the parameter (a 136M-element embedding would otherwise need two parameter-sized
        scratch buffers). ``m2_b`` may be :func:`zeros_like_free` (one sample: ``M2_b = 0``),
        which is never materialised. Mean only (``variance=False``): ``m2_b`` is ignored (None is
        accepted) and ``M2`` is neither read nor written.
        """
        n_b = _count_of(n_b)
        if n_b < 0:
            raise InvalidInputError(f"sample count must be >= 0, got {n_b}")
        shape = tuple(shift.shape)
        if not self.has_variance:
            m2_b = zeros_like_free(shift)  # never read
        elif m2_b is None:
            raise InvalidInputError("update_shifted_: m2_b is required by an accumulator that keeps the variance")
        if tuple(m2_b.shape) != shape or (residual is not None and tuple(residual.shape) != shape):
            raise InvalidInputError(f"shift, m2 and residual shapes differ: {shape}, {tuple(m2_b.shape)}, {None if residual is None else tuple(residual.shape)}")
        if self.shape is not None and shape != self.shape:
            raise InvalidInputError(f"moments have shape {shape}, but this accumulator tracks shape {self.shape}")
        if n_b == 0:
            return self
        if self._mean is None:
            self._init_state(shape)
        ws = workspace if workspace is not None else Workspace()
        state = [self._mean, self._m2, self._lo]
        inputs = [shift.detach(), m2_b.detach(), None if residual is None else residual.detach()]
        flat = [_flat_view(t) for t in state + inputs]
        numel = math.prod(shape)
        zero_m2 = is_zeros_free(inputs[1])
        if any(f is None for t, f in zip(state + inputs, flat) if t is not None):
            self._merge_shifted(n_b, *state, *inputs, zero_m2, ws)  # not flat-viewable: one pass over the whole tensors
        else:
            for a in range(0, numel, MERGE_CHUNK):
                sliced = [None if f is None else f[a:a + MERGE_CHUNK] for f in flat]
                self._merge_shifted(n_b, *sliced, zero_m2, ws)
                if self.store is not None:  # disk-backed: resident memory stays one slice
                    self.store.release(*sliced[:3])
        self._n += n_b
        return self

    def _merge_shifted(self, n_b, mean, m2, lo, shift, m2_b, residual, zero_m2: bool, ws: Workspace) -> None:
        """:meth:`update_shifted_` on corresponding slices of the state and the inputs (elementwise:
        any slicing gives the same bits); the temporaries are workspace views of the slices' size."""
        n_a = self._n
        n = n_a + n_b
        shape = tuple(shift.shape)
        if n_a == 0:
            mean.copy_(shift)
            if lo is not None:
                lo.zero_()
                if residual is not None:
                    y = ws.get("delta", shape, self.dtype, self.device).copy_(residual).div_(n_b)
                    _fast_two_sum_(mean, lo, y, ws)
            elif residual is not None:
                mean.add_(self._converted(residual, "residual", ws), alpha=1.0 / n_b)
            if m2 is None:
                return
            if zero_m2:
                m2.zero_()
            else:
                m2.copy_(m2_b)
            return
        delta = ws.get("delta", shape, self.dtype, self.device)
        delta.copy_(shift).sub_(mean)
        if lo is not None:
            delta.sub_(lo)
        if residual is not None:
            delta.add_(self._converted(residual, "residual", ws), alpha=1.0 / n_b)
        if m2 is not None:  # mean only: no M2
            if not zero_m2:  # adding M2_b = +0 leaves M2 (>= 0) bit for bit as it is
                m2.add_(self._converted(m2_b, "m2", ws))
            m2.addcmul_(delta, delta, value=n_a * n_b / n)
        if lo is None:
            mean.add_(delta, alpha=n_b / n)
        else:
            _fast_two_sum_(mean, lo, torch.add(lo, delta, alpha=n_b / n, out=delta), ws)

    def _converted(self, t: torch.Tensor, slot: str, ws: Workspace) -> torch.Tensor:
        t = t.detach()
        if t.dtype == self.dtype and t.device == self.device:
            return t
        return ws.get(slot, t.shape, self.dtype, self.device).copy_(t)

    def reset(self, *, zero: bool = True) -> Welford:
        """Forget every sample, keeping the state tensors (and shape) for reuse. ``zero=False``
        skips zeroing them, for a caller that merges new moments right away (the first merge
        overwrites the state)."""
        self._n = 0
        if zero and self._mean is not None:
            self._mean.zero_()
            if self._m2 is not None:
                self._m2.zero_()
            if self._lo is not None:
                self._lo.zero_()
        return self

    @classmethod
    def adopt(cls, n: int, mean: torch.Tensor, m2: torch.Tensor) -> Welford:
        """An uncompensated accumulator of ``n`` samples whose state **is** ``mean`` and ``m2``
        (no copy: later updates overwrite them in place), for a caller that owns them, e.g. the
        collector's first batch moments of a parameter that arrives in several chunks. They
        must share dtype, device and shape, and be contiguous."""
        if mean.dtype != m2.dtype or mean.device != m2.device or mean.shape != m2.shape or not (mean.is_contiguous() and m2.is_contiguous()):
            raise InvalidInputError("Welford.adopt needs contiguous mean and m2 of one dtype, device and shape")
        acc = cls(None, dtype=mean.dtype, device=mean.device, compensated=False)
        acc.shape = tuple(mean.shape)
        acc._mean, acc._m2, acc._n = mean, m2, _count_of(n)
        return acc

    def merge(self, other: Welford) -> Welford:
        """Fold ``other`` into ``self`` in place (exact: same result as one sequential pass)."""
        if not isinstance(other, Welford):
            raise InvalidInputError(f"can only merge a Welford accumulator with another Welford, got {type(other).__name__}")
        if other.count == 0:
            return self
        if self.has_variance and not other.has_variance:
            raise UnsupportedError(
                "cannot merge a mean-only Welford (variance=False) into one that keeps the variance: it has no M2; "
                "merge into a mean-only accumulator, or accumulate both with variance=True"
            )
        return self.update_moments(other.count, other.mean, other._m2, mean_lo=other._lo)

    def mean_as(self, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
        """The mean converted to a storage ``dtype``/``device`` (a copy; accumulation is untouched).
        Compensated, to a dtype wider than the accumulation dtype: ``hi + lo`` evaluated in it."""
        dtype = dtype or self.dtype
        if self._lo is None or dtype.itemsize <= self.dtype.itemsize:
            return super().mean_as(dtype, device)
        device = device if device is not None else self.device
        return self.mean.to(device=device, dtype=dtype, copy=True).add_(self._lo.to(device=device, dtype=dtype))

    @property
    def m2(self) -> torch.Tensor:
        """Centred sum of squares ``M2 = Σ_i (x_i − μ)²`` (refused for a mean-only accumulator)."""
        self._refuse_no_variance("m2")
        self._require_state()
        return self._m2  # type: ignore[return-value]

    @property
    def effective_count(self) -> float:
        return float(self._n)

    def variance(self, ddof: int = 1) -> torch.Tensor:
        """``M2 / (n − ddof)``; zeros (not NaN) while ``n <= ddof`` (refused for a mean-only accumulator)."""
        self._refuse_no_variance("variance()")
        self._require_state()
        if ddof < 0:
            raise InvalidInputError(f"ddof must be >= 0, got {ddof}")
        if self._n <= ddof:
            return torch.zeros_like(self._m2)
        return self._m2 / (self._n - ddof)

    def state(self) -> AccumulatorState:
        """The exact state (see :class:`AccumulatorState`; compensated: with ``mean_lo``; mean only:
        ``m2`` None), live tensors, no copy."""
        return AccumulatorState(self._n, self._mean, self._m2, mean_lo=self._lo)

    @classmethod
    def from_state(cls, state: AccumulatorState, *, dtype: torch.dtype = torch.float64, device="cpu", compensated: bool | None = None,
                   store: MappedStore | None = None, variance: bool | None = None):
        """A new accumulator holding ``state`` (copied, checked as in :meth:`from_state_dict`)."""
        return cls.from_state_dict(state.as_dict(), dtype=dtype, device=device, compensated=compensated, store=store, variance=variance)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain tensors (``count`` as a 0-d int64 tensor; compensated: also ``mean_lo``), storable
        with safetensors or torch.save; :meth:`from_state_dict` restores them bit for bit."""
        out = {"count": torch.tensor(self._n, dtype=torch.int64)}
        if self._mean is not None:
            out["mean"] = self._mean.detach().cpu().clone()
            if self._m2 is not None:
                out["m2"] = self._m2.detach().cpu().clone()
            if self._lo is not None:
                out["mean_lo"] = self._lo.detach().cpu().clone()
        return out

    @classmethod
    def from_state_dict(
        cls, state: dict[str, Any], *, dtype: torch.dtype = torch.float64, device="cpu", compensated: bool | None = None,
        store: MappedStore | None = None, variance: bool | None = None,
    ) -> Welford:
        """Rebuild an accumulator from :meth:`state_dict` (``count`` may be an int or a tensor).

        A ``mean_lo`` entry is kept as the compensation of a compensated accumulator, and added
        to the mean otherwise; without one a compensated accumulator starts with ``lo = 0``.
        ``variance``: None keeps the variance when the state has an ``m2`` (mean only without
        one); True or False must match the state (:class:`InvalidInputError` otherwise: a
        mean-only state cannot make an accumulator with a variance, and a state with ``M2`` is
        not silently cut down to its mean)."""
        has_m2 = state.get("m2") is not None
        if "mean" in state and variance is not None and bool(variance) != has_m2:
            raise InvalidInputError(
                "this accumulator state keeps the mean only (no 'm2'): it cannot resume an accumulator with "
                "variance=True; resume with variance=False" if variance else
                "this accumulator state keeps the variance ('m2'), but the accumulator asked for keeps the mean only "
                "(variance=False); resume with variance=True, or start the mean-only accumulation afresh"
            )
        acc = cls(None, dtype=dtype, device=device, compensated=compensated, store=store,
                  variance=has_m2 if variance is None and "mean" in state else (True if variance is None else variance))
        if "mean" in state:
            acc._init_state(tuple(state["mean"].shape))
            acc._mean = state["mean"].detach().to(device=acc.device, dtype=dtype).clone()
            if has_m2:
                acc._m2 = state["m2"].detach().to(device=acc.device, dtype=dtype).clone()
            lo = state.get("mean_lo")
            if lo is not None:
                if acc._lo is not None:
                    acc._lo = lo.detach().to(device=acc.device, dtype=dtype).clone()
                else:
                    acc._mean = state["mean"].detach().to(device=acc.device, dtype=dtype) + lo.detach().to(device=acc.device, dtype=dtype)
            acc._rehome()
            _check_state_values(cls.__name__, acc._mean, acc._m2)
            acc.release_pages()  # disk-backed: the check read them back in
        acc._n = _count_of(state["count"])
        if acc._n > 0 and acc._mean is None:
            raise InvalidInputError("state_dict has a positive count but no 'mean'/'m2' tensors")
        return acc

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + ("" if self.has_variance else ", variance=False") + ")"


#: elements per slice of :meth:`Welford.update_shifted_`: its temporaries (workspace views) are
#: at most this many elements per slot, whatever the parameter's size (2 MiB in float64). A
#: slice's working set (state, inputs, temporaries: ~10 MB) can stay in a CPU's last-level
#: cache across the merge's six passes, where slices of 1M elements (~40 MB) are streamed from
#: memory at every pass (measured: ~1-2% of a parameter-mode batch at hidden 256-1024, issue 24)
MERGE_CHUNK = 1 << 18


def _flat_view(t: torch.Tensor | None) -> torch.Tensor | None:
    """A 1-D view of all of ``t``'s elements in order (contiguous, or a broadcast scalar), else None."""
    if t is None:
        return None
    if t.is_contiguous():
        return t.view(-1)
    if all(st == 0 for st in t.stride()):
        return t.as_strided((t.numel(),), (0,))
    return None


def zeros_like_free(t: torch.Tensor) -> torch.Tensor:
    """Zeros of ``t``'s shape, dtype and device without their memory (a broadcast 0-d zero):
    a read-only stand-in for the ``M2 = 0`` of one sample."""
    return t.new_zeros(()).expand(t.shape)


def is_zeros_free(t: torch.Tensor) -> bool:
    """Whether ``t`` is a :func:`zeros_like_free` (a broadcast 0-d zero): nothing to add."""
    return t.dim() > 0 and t.numel() > 0 and all(st == 0 for st in t.stride()) and t.untyped_storage().nbytes() <= t.element_size() \
        and not bool(t.as_strided((), ()))


def _fast_two_sum(hi: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, e)`` with ``s = fl(hi + y)`` and ``e = y − (s − hi)`` (Dekker's Fast2Sum): ``s + e = hi + y``
    exactly when ``|hi| >= |y|``, else up to ``~u|s|``. New tensors."""
    s = hi + y
    return s, y - (s - hi)


def _fast_two_sum_(hi: torch.Tensor, lo: torch.Tensor, y: torch.Tensor, ws: Workspace) -> None:
    """:func:`_fast_two_sum` in place: ``hi, lo ← s, y − (s − hi)`` (``y`` is not kept; may be a workspace view)."""
    s = torch.add(hi, y, out=ws.get("sum", hi.shape, hi.dtype, hi.device))
    hi.sub_(s)  # hi − s = −(s − hi), exact under Fast2Sum's condition
    torch.add(y, hi, out=lo)
    hi.copy_(s)


class EMA(_Accumulator):
    """Exponential moving average with bias correction (order dependent, not mergeable).

    Per sample, in order: ``m ← d·m + (1 − d)·x``. After ``n`` samples sample ``k`` (1-based)
    has weight ``w_k = (1 − d) d^(n−k)``; the weights sum to ``W = 1 − dⁿ``, so the
    bias-corrected mean is ``μ = m / (1 − dⁿ) = Σ_k ŵ_k x_k`` with ``ŵ_k = w_k / W``.

    Variance (bias-corrected, "reliability weights" form)::

        V = Σ_k ŵ_k (x_k − μ)² / (1 − Σ_k ŵ_k²)

    which reduces to the usual unbiased sample variance when all weights are equal. It is
    tracked without cancellation as a weighted Welford/West recursion; ``m2`` is the biased
    weighted dispersion ``Σ ŵ_k (x_k − μ)²`` and ``effective_count = 1 / Σ ŵ_k²`` (Kish), so
    ``stderr = sqrt(V / effective_count)``. With one sample, ``V`` is zeros (not NaN).

    ``decay`` must lie in ``[0, 1)``; ``decay=0`` keeps only the last sample.
    """

    kind = "ema"

    def __init__(self, shape=None, *, decay: float, dtype: torch.dtype = torch.float64, device="cpu", store: MappedStore | None = None) -> None:
        decay = float(decay)
        if not (0.0 <= decay < 1.0):
            raise InvalidInputError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        # W = Σ w_k (= 1 − dⁿ) and W2 = Σ w_k², in Python floats (scalars shared by all elements).
        self._w = 0.0
        self._w2 = 0.0
        super().__init__(shape, dtype=dtype, device=device, store=store)

    def update(self, batch: torch.Tensor) -> EMA:
        """Add ``b`` samples (``[b, *shape]``), processed in order: the last one weighs most."""
        x = self._prepare_batch(batch)
        b = x.shape[0]
        if self._mean is None:
            self._init_state(tuple(x.shape[1:]))
        if b == 0:
            return self
        d = self.decay
        # Weights of the batch's samples after the batch: (1 − d) d^(b−1−k), k = 0..b−1.
        exps = torch.arange(b - 1, -1, -1, dtype=self.dtype, device=self.device)
        w = (1.0 - d) * torch.pow(torch.tensor(d, dtype=self.dtype, device=self.device), exps)
        w_b = float(w.sum())
        w2_b = float(w.square().sum())
        view = (b,) + (1,) * (x.dim() - 1)
        shift = x[0]
        dx = x - shift
        md = (w.reshape(view) * dx).sum(dim=0) / w_b
        s_b = (w.reshape(view) * (dx - md).square()).sum(dim=0)
        mean_b = shift + md
        # Old weights are scaled by d^b, then the batch is merged as a weighted chunk.
        scale = d**b
        w_a = self._w * scale
        s_a = self._m2 * scale  # type: ignore[operator]
        w_tot = w_a + w_b
        if self._n == 0 or w_a == 0.0:
            self._mean = mean_b
            self._m2 = s_b
        else:
            delta = mean_b - self._mean
            self._mean = self._mean + delta * (w_b / w_tot)
            self._m2 = s_a + s_b + delta.square() * (w_a * w_b / w_tot)
        self._w = w_tot
        self._w2 = self._w2 * scale * scale + w2_b
        self._n += b
        self._rehome()
        return self

    def update_moments(self, n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor) -> EMA:
        raise UnsupportedError(
            "an EMA depends on the order of the individual samples, so it cannot absorb precomputed "
            "batch moments; call update() with the per-sample tensors, or use Welford (ema_decay=None)."
        )

    def merge(self, other: Any) -> EMA:
        raise UnsupportedError(
            "two exponential moving averages cannot be merged exactly (the result depends on the "
            "interleaving of their samples); use Welford accumulators (ema_decay=None) for "
            "cross-rank or checkpoint merging."
        )

    @property
    def m2(self) -> torch.Tensor:
        """Biased weighted dispersion ``Σ ŵ_k (x_k − μ)²`` (normalised weights)."""
        self._require_state()
        if self._n == 0:
            return torch.zeros_like(self._m2)  # type: ignore[arg-type]
        return self._m2 / self._w  # type: ignore[operator]

    @property
    def effective_count(self) -> float:
        """Kish effective sample size ``1 / Σ ŵ_k² = W² / Σ w_k²``."""
        if self._n == 0:
            return 0.0
        return self._w * self._w / self._w2

    def variance(self, ddof: int = 1) -> torch.Tensor:
        """ddof=1: ``Σ ŵ (x−μ)² / (1 − Σ ŵ²)``; ddof=0: ``Σ ŵ (x−μ)²``. Zeros with one sample."""
        self._require_state()
        if ddof not in (0, 1):
            raise InvalidInputError(f"EMA.variance supports ddof=0 or 1, got {ddof}")
        if self._n <= ddof:
            return torch.zeros_like(self._m2)  # type: ignore[arg-type]
        biased = self.m2
        if ddof == 0:
            return biased
        denom = 1.0 - self._w2 / (self._w * self._w)
        if denom <= 0.0:
            return torch.zeros_like(biased)
        return biased / denom

    def state(self) -> AccumulatorState:
        """The exact state, with the EMA's decay and weight sums (see :meth:`_Accumulator.state`)."""
        return AccumulatorState(self._n, self._mean, self._m2, self.decay, self._w, self._w2)

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {
            "count": torch.tensor(self._n, dtype=torch.int64),
            "decay": torch.tensor(self.decay, dtype=torch.float64),
            "weight_sum": torch.tensor(self._w, dtype=torch.float64),
            "weight_sq_sum": torch.tensor(self._w2, dtype=torch.float64),
        }
        if self._mean is not None:
            out["mean"] = self._mean.detach().cpu().clone()
            out["m2"] = self._m2.detach().cpu().clone()  # type: ignore[union-attr]
        return out

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], *, dtype: torch.dtype = torch.float64, device="cpu",
                        store: MappedStore | None = None) -> EMA:
        acc = cls(None, decay=float(state["decay"]), dtype=dtype, device=device, store=store)
        if "mean" in state:
            acc._init_state(tuple(state["mean"].shape))
            acc._mean = state["mean"].detach().to(device=acc.device, dtype=dtype).clone()
            acc._m2 = state["m2"].detach().to(device=acc.device, dtype=dtype).clone()
            acc._rehome()
            _check_state_values(cls.__name__, acc._mean, acc._m2)
            acc.release_pages()  # disk-backed: the check read them back in
        acc._n = _count_of(state["count"])
        acc._w = float(state["weight_sum"])
        acc._w2 = float(state["weight_sq_sum"])
        if not (math.isfinite(acc._w) and math.isfinite(acc._w2) and acc._w >= 0 and acc._w2 >= 0):
            raise InvalidInputError(
                f"EMA.from_state_dict: weight_sum {acc._w!r} and weight_sq_sum {acc._w2!r} must be finite and >= 0"
            )
        return acc


def _check_state_values(cls_name: str, mean: torch.Tensor, m2: torch.Tensor | None) -> None:
    """A restored accumulator's ``mean`` must be finite and its ``M2`` (a sum of squared
    deviations) finite and >= 0: :class:`InvalidInputError` naming the tensor and the counts
    (the counting of :class:`hf_fisher.artifacts.fisher.ValueCheck`)."""
    from hf_fisher.artifacts.fisher import _value_problems

    for key, t, rule in (("mean", mean, "none"), ("m2", m2, "all")):
        if t is None:  # a mean-only Welford
            continue
        problems = _value_problems(t, rule, zero=False)
        if problems:
            counts = ", ".join(f"{n} {kind}" for kind, n in problems.items())
            raise InvalidInputError(
                f"{cls_name}.from_state_dict: '{key}' holds {counts} (of {t.numel()} values); the mean must be "
                "finite and M2 (a sum of squared deviations) finite and >= 0"
            )


def make_accumulator(
    shape=None, *, ema_decay: float | None = None, dtype: torch.dtype = torch.float64, device="cpu",
    compensated: bool | None = None, store: MappedStore | None = None, variance: bool = True,
) -> Welford | EMA:
    """A :class:`Welford` accumulator (``compensated``, ``variance``: see there), or an :class:`EMA`
    when ``ema_decay`` is given (which keeps its dispersion: ``variance=False`` is refused);
    ``store``: state tensors in its memory-mapped files."""
    if ema_decay is None:
        return Welford(shape, dtype=dtype, device=device, compensated=compensated, store=store, variance=variance)
    if not variance:
        raise InvalidInputError("variance=False (the mean only) is for Welford accumulators; an EMA (ema_decay) keeps its dispersion")
    return EMA(shape, decay=ema_decay, dtype=dtype, device=device, store=store)


def confidence_interval(mean, variance, count: float, level: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-sided Student-t confidence interval for a mean, elementwise.

    ``mean ± t_{(1+level)/2, n−1} · sqrt(variance / n)`` with ``variance`` the unbiased sample
    variance of the ``n = count`` samples (``count`` may be a non-integer effective sample size,
    e.g. an EMA's). With fewer than two samples there is no information about the spread and
    the interval is ``(−inf, +inf)``.
    """
    from scipy import stats as _sps

    if not (0.0 < float(level) < 1.0):
        raise InvalidInputError(f"confidence level must be in (0, 1), got {level}")
    mean = torch.as_tensor(mean)
    if not mean.dtype.is_floating_point:
        mean = mean.to(torch.float64)
    variance = torch.as_tensor(variance, dtype=mean.dtype, device=mean.device)
    n = float(count.item()) if isinstance(count, torch.Tensor) else float(count)
    if n < 2:
        inf = torch.full_like(mean, math.inf)
        return -inf, inf.clone()
    t = float(_sps.t.ppf(0.5 + float(level) / 2.0, df=n - 1))
    half = t * torch.sqrt(variance.clamp_min(0) / n)
    return mean - half, mean + half
