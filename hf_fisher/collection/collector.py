"""FisherCollector: accumulates per-sample contributions of one model over batches and tasks.

The collector owns the statistics (one Welford or EMA accumulator per parameter and task, in
float64 by default) and turns them into :class:`hf_fisher.Fisher` artifacts. The per-sample
work is the engine's (:mod:`hf_fisher.engine`); the accumulation is :mod:`hf_fisher.collection.stats`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .. import plugins
from ..artifacts.fisher import Counts, Fisher, FisherMetadata
from ..artifacts.format import DEFAULT_MAX_SHARD_SIZE
from ..engine.losses import task_type_of
from ..engine.per_sample import BatchReport, ContributionSink, LossFn, PerSampleEngine, Target
from ..errors import (
    EmptyDataError,
    InvalidInputError,
    NoTrainableParametersError,
    PartialBatchError,
    UnsupportedError,
    regex_argument,
)
from ..estimators.base import REDUCTIONS, CollectOptions, check_keep_sample_contributions  # noqa: F401 (re-exported)
from .stats import (
    EMA,
    AccumulatorState,
    MappedStore,
    Welford,
    Workspace,
    is_zeros_free,
    make_accumulator,
    sample_sum,
    shifted_moments_,
    zeros_like_free,
)

log = logging.getLogger(__name__)

#: the estimator a FisherCollector computes itself
EMPIRICAL = "empirical"
#: the collector's own options besides the shared :class:`~hf_fisher.estimators.base.CollectOptions`
#: (the diagonal estimators take them too)
COLLECTOR_OPTIONS = frozenset({"params", "verify", "loss_fn", "accumulation_device", "offload_dir", "atomic_batches", "variance"})


class _MomentsSink(ContributionSink):
    """Batch moments of every parameter's contributions, merged into the task at :meth:`commit`.

    Each chunk of per-sample contributions is summarised in its own precision, in place, by
    :func:`~hf_fisher.collection.stats.shifted_moments_` (two-pass around the rounded chunk mean, without
    the residual correction: the contributions are themselves rounded in that precision, which
    dominates the correction's effect -- see there; no ``[b, *shape]`` temporary). A parameter
    whose batch arrives in one chunk (all but the largest) keeps that summary, two tensors of
    the parameter's shape (one for a chunk of one sample, whose ``M2 = 0`` is a broadcast zero
    that takes no memory), until :meth:`commit` Chan-merges it straight into the task's
    accumulator, in place, in the accumulation dtype (float64): one merge per parameter and
    batch, with float64 temporaries from a reused :class:`~hf_fisher.collection.stats.Workspace`. A
    parameter that arrives in several chunks folds them into a batch-level
    :class:`~hf_fisher.collection.stats.Welford` first, so memory stays one pair per parameter:
    made of its first chunk's moments themselves when they are in the accumulation dtype
    (:meth:`~hf_fisher.collection.stats.Welford.adopt`), else a float64 one kept for the next batch.

    Atomic batches (the default): nothing touches the task's accumulators before :meth:`commit`,
    so a batch that fails half-way leaves them as they were, bit for bit. The price is the
    staging: at the end of the backward every parameter's batch moments are alive at once, on
    top of the accumulators (4 bytes per value for a one-sample float32 batch, 8 for more; the
    exact undo of a merge, a copy of the parameter's state, would cost 12-16: Chan's merge
    cannot be undone in floating point, ``fl(a + d) − d`` is not ``a``).

    Streaming (``atomic=False``, :meth:`begin` with the task's accumulators): the engine calls
    :meth:`complete` once a parameter's contributions of the pass are all in (the batched path,
    row blocks and sample chunks included), and its batch moments are merged into its
    accumulator right then (the same merge, on the same tensors, as :meth:`commit` would do:
    the same bits) and freed. The peak then holds one parameter's moments instead of the whole
    model's. A batch that fails after a merge cannot be taken back: when the engine starts the
    batch again (:meth:`reset`: a redo after the first-batch check, a fallback to the per-sample
    loop) the merged accumulators are zeroed again if they were empty before the batch (an
    exact undo: a task's first batch), else :class:`_Lost` is raised; :meth:`abandon` says
    whether a failed batch stays partly merged (the collector then refuses every later use).
    The per-sample loop never calls :meth:`complete`: its moments are staged until :meth:`commit`.

    The collector keeps one sink for its life (:meth:`reset` per batch), and with it the
    scratch buffers.

    :meth:`add_gradients` is the fused entry point: it takes the signed per-sample gradients,
    squares them in place itself, and reads non-finite samples off the chunk's column sums
    instead of a separate finiteness pass over the contributions.
    """

    accepts_moments = True
    #: whether :meth:`add_gradients` is available (contributions C_i = g_i ⊙ g_i from g_i)
    accepts_gradients = True
    #: whether :meth:`add_gradients` takes row blocks (``rows=``): their moments are staged into
    #: parameter-shaped buffers until the last block of the samples arrives
    accepts_row_blocks = True

    def __init__(self, dtype: torch.dtype, keep_dtype: torch.dtype | None = None, *, atomic: bool = True):
        self.dtype = dtype
        #: False: merge each parameter's batch moments at :meth:`complete` (see the class docstring)
        self.atomic = atomic
        #: streaming: the task's accumulators this batch merges into (None between batches)
        self.target: dict | None = None
        #: streaming: name -> whether its accumulator was empty before this batch merged into it
        self.merged: dict[str, bool] = {}
        #: dtype of the per-sample contributions kept on the CPU (None: none kept; see
        #: ``FisherCollector(keep_sample_contributions=True)``)
        self.keep_dtype = keep_dtype
        # name -> this batch's kept contributions [b, num_groups], chunks in sample order
        self.kept: dict[str, list[torch.Tensor]] = {}
        self.workspace = Workspace()
        # name -> (n, shift, m2, residual) of the batch's only chunk so far
        self.pending: dict[str, tuple] = {}
        # name -> batch-level Welford, for parameters that came in several chunks
        self.batch: dict[str, Welford] = {}
        # the batch-level Welfords of earlier batches, reused
        self.spare: dict[str, Welford] = {}
        # name -> (shift, m2) of the samples whose row blocks are arriving (see add_gradients)
        self.staged: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        # names whose moments came from add_moments (not the sink's own tensors)
        self.foreign: set[str] = set()

    def begin(self, accumulators: dict) -> None:
        """A batch into ``accumulators`` starts: a streaming sink merges into them at :meth:`complete`."""
        self.merged = {}
        self.target = None if self.atomic else accumulators

    def reset(self) -> None:
        """The batch starts (again): drop what it staged. Streaming, after a merge: take the merged
        parameters out (exact when their accumulators were empty before the batch), else raise
        :class:`_Lost` (the batch cannot be started again)."""
        if self.merged and not self._undo():
            raise _Lost(
                "the engine started the batch again, after its first-batch check moved parameters to the "
                "vector-Jacobian path or to take the per-sample path"
            )
        self._clear()

    def abandon(self) -> bool:
        """Drop a failed batch; True when part of it stays merged in the accumulators (streaming:
        a merge into an accumulator that was not empty)."""
        lost = bool(self.merged) and not self._undo()
        self.merged, self.target = {}, None
        self._clear()
        return lost

    def _undo(self) -> bool:
        """Zero again the accumulators this batch merged into, when every one of them was empty
        before it (the exact undo); False (nothing changed) otherwise."""
        if not all(self.merged.values()):
            return False
        for name in self.merged:
            acc = self.target[name]
            acc.reset()
            acc.release_pages()
        self.merged = {}
        return True

    def _clear(self) -> None:
        self.foreign = set()
        self.pending = {}
        self.batch = {}
        self.kept = {}
        self.staged = {}

    def take_kept(self) -> dict[str, list[torch.Tensor]]:
        """This batch's kept per-sample contributions (call before :meth:`commit`, which resets)."""
        kept, self.kept = self.kept, {}
        return kept

    def add(self, name: str, contributions: torch.Tensor) -> None:
        """Per-sample contributions ``[b, ...]``, already checked finite; modified in place."""
        if self.keep_dtype is not None:  # a copy, before shifted_moments_ overwrites them
            self.kept.setdefault(name, []).append(contributions.detach().to("cpu", self.keep_dtype, copy=True))
        self._push(name, contributions.shape[0], *shifted_moments_(contributions, corrected=False))

    def add_gradients(self, name: str, gradients: torch.Tensor, *, owned: bool = False, rows: tuple[int, int, int] | None = None) -> list[int]:
        """Per-sample gradients ``g`` ``[b, ...]`` of the next samples: adds ``C_i = g_i ⊙ g_i``.

        ``rows=(lo, hi, n)``: ``g`` holds rows ``lo:hi`` (of ``n``, dim 0) of the samples'
        gradients (the engine's blocks when one sample exceeds its memory budget); each block's
        moments go to rows ``lo:hi`` of parameter-shaped buffers, added once ``hi == n``.

        ``owned=True`` lets the sink square ``g`` in place (the caller will not read it again);
        otherwise the squares go to a new tensor. Returns the rows (0-based, in this chunk) whose
        contribution is not finite, and then adds nothing; an empty list when all was added.
        Finiteness is read off the chunk's per-element sums, which are finite exactly when
        every contribution is (unless a float32 sum overflows: then the chunk is redone in
        float64, which cannot overflow).
        """
        b = gradients.shape[0]
        if b == 0:
            return []
        if gradients.dtype not in (torch.float32, torch.float64):
            x = gradients.to(torch.float32).square_()
        else:
            x = gradients.square_() if owned else gradients.square()
        staged = out = None
        if rows is not None:
            lo, hi, n = rows
            staged = self.staged.get(name)
            if staged is None or lo == 0:  # one sample (b == 1): M2 = 0, nothing to stage for it
                staged = self.staged[name] = (x.new_empty((n, *x.shape[2:])), None if b == 1 else x.new_empty((n, *x.shape[2:])))
            if staged[0].dtype == x.dtype:  # the block's sums go straight to its rows (no copy)
                out = (staged[0][lo:hi], None if staged[1] is None else staged[1][lo:hi])
        total = sample_sum(x, out=None if out is None else out[0])
        # N-sized checks: the column sums are non-finite iff a contribution is (or a sum overflows)
        if not bool(torch.isfinite(total.sum())) and not bool(torch.isfinite(total).all()):
            bad = (~torch.isfinite(x.reshape(b, -1))).any(dim=1).nonzero().flatten().tolist()
            if bad:
                return bad
            x = x.to(torch.float64)  # finite contributions whose float32 sums overflow
            total, out = x.sum(0), None
        shift, m2, residual = shifted_moments_(x, total=total, corrected=False, m2_out=None if out is None else out[1])
        if rows is None:
            self._push(name, b, shift, m2, residual)
            return []
        if out is None:  # the block or an earlier one redone in float64: the staged rows in float64
            if staged[0].dtype != torch.float64:
                staged = self.staged[name] = (staged[0].to(torch.float64), None if staged[1] is None else staged[1].to(torch.float64))
            staged[0][lo:hi] = shift
            if staged[1] is not None:
                staged[1][lo:hi] = m2
        if hi == n:
            del self.staged[name]
            self._push(name, b, staged[0], zeros_like_free(staged[0]) if staged[1] is None else staged[1], None)
        return []

    def add_moments(self, name: str, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        self.foreign.add(name)  # the caller's tensors: read, never updated in place
        self._push(name, int(n), mean, m2, None)

    def _push(self, name: str, n: int, shift: torch.Tensor, m2: torch.Tensor, residual: torch.Tensor | None) -> None:
        if n == 0:
            return
        if name in self.batch:
            self.batch[name].update_shifted_(n, shift, m2, residual, workspace=self.workspace)
        elif name in self.pending:
            w = self._adopted(name)
            if w is None:  # a batch-level Welford kept from an earlier batch (same shape and device): no allocation
                w = self.spare.get(name)
                if w is None or w.device != shift.device or w.shape != tuple(shift.shape):
                    w = self.spare[name] = Welford(tuple(shift.shape), dtype=self.dtype, device=shift.device, compensated=False)
                w.reset(zero=False)
                w.update_shifted_(*self.pending.pop(name), workspace=self.workspace)
            w.update_shifted_(n, shift, m2, residual, workspace=self.workspace)
            self.batch[name] = w
        else:
            self.pending[name] = (n, shift, m2, residual)

    def _adopted(self, name: str) -> Welford | None:
        """The batch-level Welford of ``name`` made of its first chunk's moments themselves, when
        the sink owns them (not an engine's :meth:`add_moments`) in the accumulation dtype: the
        same bits as copying them into a Welford, without a second pair of parameter-sized
        tensors (nor one kept between batches). None otherwise."""
        n, shift, m2, residual = self.pending[name]
        if name in self.foreign or residual is not None or shift.dtype != self.dtype or not shift.is_contiguous():
            return None
        if is_zeros_free(m2):  # one sample: M2 = 0, now a tensor of its own to update in place
            m2 = torch.zeros_like(shift)
        elif m2.dtype != self.dtype or not m2.is_contiguous():
            return None
        del self.pending[name]
        return Welford.adopt(n, shift, m2)

    def complete(self, name: str) -> None:
        """Streaming: merge ``name``'s batch moments into its accumulator now and free them
        (atomic: a no-op, they wait for :meth:`commit`)."""
        if self.target is None:
            return
        acc = self.target[name]
        empty = acc.count == 0
        if self._merge(name, acc):
            self.merged[name] = empty

    def _merge(self, name: str, acc) -> bool:
        """Chan-merge ``name``'s batch moments (its only chunk, or its batch-level Welford) into
        ``acc`` in place and drop them; False when there are none."""
        if name in self.pending:
            n, shift, m2, residual = self.pending.pop(name)
            acc.update_shifted_(n, shift, m2, residual, workspace=self.workspace)
        elif name in self.batch:
            w = self.batch.pop(name)
            acc.update_shifted_(w.count, w.mean, w.m2, workspace=self.workspace)
            if not self.atomic:  # streaming keeps nothing parameter-sized between batches
                self.spare.pop(name, None)
        else:
            return False
        return True

    def commit(self, accumulators: dict) -> None:
        for name in list(self.pending) + list(self.batch):
            self._merge(name, accumulators[name])
        self.merged, self.target = {}, None
        self._clear()


class _Lost(Exception):
    """Raised by a streaming :class:`_MomentsSink` when a batch is started again after part of it
    was merged for good; the collector turns it into a :class:`PartialBatchError` (its cause: the
    engine's failure being handled, when there is one)."""


class _OrderedSink(ContributionSink):
    """Keeps per-sample contributions in order (for EMA, whose result depends on the order)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.rows: dict[str, list[torch.Tensor]] = {}

    def reset(self) -> None:
        self.rows = {}

    def add(self, name: str, contributions: torch.Tensor) -> None:
        self.rows.setdefault(name, []).append(contributions.to(self.dtype))

    def commit(self, accumulators: dict) -> None:
        for name, chunks in self.rows.items():
            accumulators[name].update(torch.cat(chunks).to(accumulators[name].device))


@dataclass
class _TaskState:
    accumulators: dict
    samples: int = 0
    tokens: int = 0
    skipped: int = 0
    nonfinite: int = 0
    batches: int = 0
    #: name -> kept per-sample contributions (chunks of [b, num_groups], in sample order), or
    #: None when the collector does not keep them
    rows: dict | None = None


def select_parameters(model: nn.Module, params: str | Iterable[str] | None) -> list[tuple[str, torch.Tensor]]:
    """The trainable ``(name, parameter)`` pairs to collect: all of them (``None``), those whose
    name matches a regular expression (``re.search``), or those named in a list (every name
    must exist and be trainable)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if params is None:
        return named
    if isinstance(params, str):
        pattern = regex_argument("params", params)
        chosen = [(n, p) for n, p in named if pattern.search(n)]
        if not chosen:
            raise InvalidInputError(f"params={params!r} matches no trainable parameter (e.g. {named[0][0] if named else 'none'!r})")
        return chosen
    wanted = list(params)
    by_name = dict(named)
    missing = [n for n in wanted if n not in by_name]
    if missing:
        all_names = {n for n, _ in model.named_parameters()}
        frozen = [n for n in missing if n in all_names]
        raise InvalidInputError(
            f"params: {', '.join(missing[:3])} {'is' if len(missing) == 1 else 'are'} "
            + ("frozen (requires_grad=False)" if frozen and len(frozen) == len(missing) else "not a trainable parameter of the model")
        )
    return [(n, by_name[n]) for n in dict.fromkeys(wanted)]


class FisherCollector:
    """Collects the empirical diagonal Fisher of ``model`` for one or several tasks.

    F = mean_i C_i with C_i = g_i ⊙ g_i, g_i the gradient of sample i's loss (normalisation
    "mean": mean CE over its label tokens; "sum"; "token": C_i = (d sum_t l_it/dθ)² / T_i).
    ``reduction="group"`` sums C_i within the adapter's groups (heads, kv-heads, channels,
    vocabulary rows) before accumulating. Accumulation is Welford/Chan in ``accumulation_dtype``
    (float64 default), or an EMA with bias correction when ``ema_decay`` is set.

    Memory of the accumulators, per Fisher value: float64 mean + M2, 16 bytes;
    ``accumulation_dtype=torch.float32``, 12 bytes (mean compensated, within ~1e-7 relative of
    float64 at any number of batches: :class:`~hf_fisher.collection.stats.Welford`); they live on
    ``accumulation_device``, or, with ``offload_dir=PATH``, in memory-mapped files under PATH
    (:class:`~hf_fisher.collection.stats.MappedStore`: bit for bit the in-memory results, for
    Fishers larger than RAM; :meth:`close` removes the files). :meth:`save_fisher` writes the
    artifact from them shard by shard in ``storage_dtype``, without a second full copy in memory.
    Besides them a batch stages, by default, every parameter's batch moments until the whole batch
    succeeded (atomic batches: a batch that fails leaves the accumulators bit for bit as they
    were): at the end of the backward they are all alive at once, 4 bytes per value for a
    one-sample batch in float32, 8 for more. ``atomic_batches=False`` (streaming commit) merges
    each parameter's batch moments into its accumulator as soon as the backward has produced
    them all (row blocks included) and frees them: the peak holds one parameter's moments, not
    the model's (e.g. 1.24G-parameter Llama-3.2-1B, float32 accumulation: model 4.9 GB +
    accumulators 14.8 GB, without the 4.9 GB staged). The accumulators are the same bits on
    every batch that succeeds. A batch that fails after a merge cannot be taken back exactly:
    in a task's first batch (its accumulators were empty) the merges are undone and the batch
    is handled as with atomic batches (an error raised, or the engine's redo after its first-
    batch checks); in a later one the collector raises :class:`~hf_fisher.errors.PartialBatchError`
    naming the batch, and refuses every later use (update, fisher, save_fisher, ...). Refused,
    before any work: with ``ema_decay``, ``on_nonfinite="skip"`` (its redo without the sample),
    on an FSDP2-sharded model and for :meth:`attach_training`.

    ``variance=False`` keeps the mean only: no ``M2`` accumulator (the mean-only
    :class:`~hf_fisher.collection.stats.Welford`), so 8 bytes per Fisher value in float32
    (``hi`` + ``lo``) and 8 in float64 instead of 12 and 16 (Llama-3.2-1B in float32: 9.9 GB
    instead of 14.8 GB); the mean is bit for bit the one kept with the variance. The artifacts
    then have no variance (:attr:`Fisher.has_variance` False, ``metadata.extra["variance"]``
    False), and what needs it refuses them (e.g. :mod:`hf_fisher.analysis.uncertainty`'s
    intervals from the variance). Refused with ``ema_decay`` (an EMA keeps its dispersion); a
    checkpoint collected with the other setting is refused by :meth:`restore`.

    Inside a ``torch.distributed`` process group (torchrun, ``accelerate launch``) each rank
    accumulates the samples it is given and :meth:`fisher` returns, on every rank, the Fisher
    of all ranks' samples, merged exactly (Chan's formula, see
    :mod:`hf_fisher.collection.distributed`); :meth:`fisher` is then a collective that every
    rank must call. ``distributed=None`` (default) merges when the group has more than one
    process, ``False`` keeps each rank's own Fisher, ``True`` requires an initialised group.

    On a model sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``) each rank computes
    its own samples' contributions over the whole parameters (unsharded during the passes) and
    keeps only its block of rows of every accumulator (dim 0 split as FSDP2 splits ``Shard(0)``:
    about 1/K of the whole per rank); after each batch the ranks' batch moments are merged on
    the owners exactly (:mod:`hf_fisher.collection.fsdp`). Every rank must then pass the same
    number of batches (checked before each one); :meth:`save_fisher` writes one sharded artifact
    from all ranks without gathering it, :meth:`fisher` gathers the whole Fisher on every rank.
    Refused there, before any work: ``ema_decay``, ``keep_sample_contributions``,
    ``distributed=False`` and a model that needs the per-sample loop.

    ``keep_sample_contributions=True`` (``reduction="group"`` only) also keeps every used
    sample's group contributions ``C_i,g = Σ_{j ∈ g} C_ij``, one ``[n, num_groups]`` tensor per
    parameter, in sample order (batches in the order given, samples within a batch in order),
    on the CPU in ``storage_dtype`` (float32 when it is None): :attr:`Fisher.sample_contributions`,
    whose mean over samples is the Fisher (``mean_i C_i,g = F_g``) and from which
    :mod:`hf_fisher.analysis.uncertainty` draws bootstrap intervals. Memory: ``4 n Σ num_groups`` bytes
    in float32. Refused (:class:`InvalidInputError`) with ``reduction="param"`` (``[n, *shape]``
    per parameter would be n copies of the model), with ``ema_decay`` (the EMA is a weighted
    mean, which the plain mean of the kept values would not reproduce) and when the Fisher is
    merged across ``torch.distributed`` ranks (they are not gathered: pass ``distributed=False``
    for each rank's own Fisher and samples).

    ``estimator`` names what the collector computes, which is the empirical Fisher: any other
    name is refused (:class:`InvalidInputError`; the true Fisher and KFAC are
    ``hf_fisher.collect(model, batches, estimator="true" | "kfac", ...)``). An estimator that
    computes its own contributions and adds them with :meth:`add_contributions` builds its
    collector with :meth:`for_estimator`, which labels the artifacts with its name.

    Example::

        collector = FisherCollector(model, reduction="group")
        for batch in math_batches:
            collector.update(batch, task="math")
        fisher = collector.fisher("math")
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        reduction: str = "param",
        normalization: str = "mean",
        task_type: str | None = None,
        accumulation_dtype: torch.dtype = torch.float64,
        storage_dtype: torch.dtype | None = None,
        storage_device: str | torch.device = "cpu",
        accumulation_device: str | torch.device = "cpu",
        ema_decay: float | None = None,
        on_nonfinite: str = "raise",
        memory_budget_mb: float | None = None,
        train_mode: bool = False,
        loss_fn: LossFn | None = None,
        estimator: str = "empirical",
        verify: bool = True,
        params: str | Iterable[str] | None = None,
        distributed: bool | None = None,
        keep_sample_contributions: bool = False,
        offload_dir: str | os.PathLike | None = None,
        atomic_batches: bool = True,
        variance: bool = True,
    ):
        if estimator != EMPIRICAL:
            raise InvalidInputError(
                f"FisherCollector computes the empirical Fisher (the data's labels), not estimator={estimator!r}. "
                "For the true Fisher (labels drawn from the model) or KFAC use hf_fisher.collect(model, batches, "
                "estimator='true', mc_samples=..., seed=...) or estimator='kfac'; drop estimator= (or pass "
                "'empirical') for the empirical Fisher"
            )
        # the shared options, checked in one place (the same checks hf_fisher.collect makes)
        CollectOptions(
            reduction=reduction, normalization=normalization, accumulation_dtype=accumulation_dtype,
            storage_dtype=storage_dtype, storage_device=storage_device, ema_decay=ema_decay, on_nonfinite=on_nonfinite,
            memory_budget_mb=memory_budget_mb, train_mode=train_mode, task_type=task_type, distributed=distributed,
            keep_sample_contributions=keep_sample_contributions,
        )
        _check_atomic_batches(atomic_batches, ema_decay=ema_decay, on_nonfinite=on_nonfinite)
        _check_variance(variance, ema_decay=ema_decay)
        if offload_dir is not None and torch.device(accumulation_device).type != "cpu":
            raise InvalidInputError(
                f"offload_dir keeps the accumulators in memory-mapped files on the CPU; it cannot be combined with "
                f"accumulation_device={str(accumulation_device)!r}: drop one of them"
            )
        from .fsdp import FSDPSharding, is_fsdp, refuse_options

        #: how this collector works on an FSDP2-sharded model (see hf_fisher.collection.fsdp); None otherwise
        self._fsdp: FSDPSharding | None = None
        if is_fsdp(model):
            if not atomic_batches:
                raise UnsupportedError(
                    "atomic_batches=False is not supported on an FSDP2-sharded model: there the ranks' batch moments "
                    "are merged on the owners of their rows after the whole batch (a collective), not parameter by "
                    "parameter during the backward; drop atomic_batches=False (each rank already holds only its rows)"
                )
            refuse_options(ema_decay=ema_decay, keep_sample_contributions=keep_sample_contributions, distributed=distributed)
            self._fsdp = FSDPSharding(model)
            with self._fsdp.unsharded():  # the engine works on the unsharded parameters FSDP2 computes with
                self._build(model, reduction, normalization, task_type, accumulation_dtype, storage_dtype, storage_device,
                            accumulation_device, ema_decay, train_mode, estimator, distributed, keep_sample_contributions,
                            params, loss_fn, memory_budget_mb, on_nonfinite, verify)
            self.engine.agree = self._fsdp.agree
            if self.engine.loop_mode:
                raise UnsupportedError(f"this FSDP2-sharded model needs the per-sample loop, which is not supported under FSDP2: {self.engine.loop_reason}")
            self._fsdp.register_global_shapes(
                {t.name: ((t.groups.num_groups,) if t.groups is not None else tuple(t.param.shape)) for t in self.engine.targets}
            )
        else:
            self._build(model, reduction, normalization, task_type, accumulation_dtype, storage_dtype, storage_device,
                        accumulation_device, ema_decay, train_mode, estimator, distributed, keep_sample_contributions,
                        params, loss_fn, memory_budget_mb, on_nonfinite, verify)
        self.tasks: dict[str, _TaskState] = {}
        #: False: the accumulators keep the mean only, no M2 (see the class docstring)
        self.keeps_variance = variance
        #: False: each parameter's batch moments are merged as soon as they are complete (see the class docstring)
        self.atomic_batches = atomic_batches
        #: why the collector refuses every use (a streaming batch failed after a merge), or None
        self._broken: str | None = None
        self._moments_sink: _MomentsSink | None = None
        #: the memory-mapped files of the accumulators (``offload_dir``), or None (in memory)
        self.store = MappedStore(offload_dir) if offload_dir is not None else None

    def _build(self, model, reduction, normalization, task_type, accumulation_dtype, storage_dtype, storage_device,
               accumulation_device, ema_decay, train_mode, estimator, distributed, keep_sample_contributions,
               params, loss_fn, memory_budget_mb, on_nonfinite, verify) -> None:
        named = select_parameters(model, params)
        if not named:
            raise NoTrainableParametersError(
                f"{type(model).__name__} has no trainable parameter (requires_grad=True); unfreeze the "
                "parameters whose Fisher you want (e.g. model.requires_grad_(True) or a PEFT adapter)"
            )
        self.model = model
        self.reduction = reduction
        self.normalization = normalization
        self.task_type = task_type or task_type_of(model)
        self.accumulation_dtype = accumulation_dtype
        self.storage_dtype = storage_dtype
        self.storage_device = torch.device(storage_device)
        self.accumulation_device = torch.device(accumulation_device)
        self.ema_decay = ema_decay
        self.train_mode = train_mode
        self.estimator = estimator
        self.distributed = distributed
        self.keep_sample_contributions = keep_sample_contributions
        #: dtype of the kept per-sample contributions (None: not kept)
        self.keep_dtype = (storage_dtype or torch.float32) if keep_sample_contributions else None
        self._refuse_merging_kept(None)
        self.layout = plugins.model_layout(model)
        self.param_shapes = {n: tuple(p.shape) for n, p in named}
        self.groups = {n: self.layout.groups[n] for n, _ in named}
        targets = [Target(n, p, self.groups[n] if reduction == "group" else None) for n, p in named]
        self.engine = PerSampleEngine(
            model, targets, plugins.grad_rules(), task_type=self.task_type, normalization=normalization,
            loss_fn=loss_fn, memory_budget_mb=memory_budget_mb, on_nonfinite=on_nonfinite, verify=verify,
        )

    @classmethod
    def for_estimator(cls, estimator: str, model: nn.Module, **options: Any) -> FisherCollector:
        """A collector for an estimator that computes its own per-sample contributions (e.g. the
        true Fisher's label draws) and adds them with :meth:`add_contributions`: its artifacts
        say ``estimator``. Its :meth:`update`, :meth:`collect` and :meth:`attach_training`, which
        compute the empirical Fisher, are refused (they would add empirical contributions under
        that name)."""
        collector = cls(model, **options)
        collector.estimator = estimator
        return collector

    def _refuse_other_estimator(self, what: str) -> None:
        if self.estimator != EMPIRICAL:
            raise InvalidInputError(
                f"{what} computes the empirical Fisher, but this collector is labelled estimator={self.estimator!r}: "
                f"add that estimator's contributions with add_contributions(), or use a FisherCollector of its own"
            )

    # ------------------------------------------------------------------ accumulation
    def _task(self, task: str) -> _TaskState:
        if task not in self.tasks:
            self.tasks[task] = self._empty_state()
        return self.tasks[task]

    def _empty_state(self) -> _TaskState:
        acc = {}
        for t in self.engine.targets:
            shape = (t.groups.num_groups,) if t.groups is not None else tuple(t.param.shape)
            if self._fsdp is not None:  # this rank's rows only
                shape = self._fsdp.local_shape(shape)
            acc[t.name] = make_accumulator(
                shape, ema_decay=self.ema_decay, dtype=self.accumulation_dtype, device=self.accumulation_device, store=self.store,
                variance=self.keeps_variance,
            )
        return _TaskState(acc, rows={name: [] for name in acc} if self.keep_dtype is not None else None)

    def _refuse_merging_kept(self, distributed: bool | None) -> None:
        if self.keep_sample_contributions and self._merging(distributed):
            raise InvalidInputError(
                "keep_sample_contributions=True is not supported when the Fisher is merged across torch.distributed "
                "ranks (the per-sample contributions are not gathered); pass distributed=False to get each rank's "
                "own Fisher with its own samples' contributions, or collect in a single process"
            )

    def _commit(self, sink: ContributionSink, state: _TaskState) -> None:
        """``sink.commit`` into ``state``, appending the batch's kept per-sample contributions."""
        kept = sink.take_kept() if state.rows is not None else {}
        if self._fsdp is not None:  # a collective: the ranks' batch moments meet on each row block's owner
            self._fsdp.commit(sink, state.accumulators, [t.name for t in self.engine.targets])
        else:
            sink.commit(state.accumulators)
        for name, chunks in kept.items():
            state.rows[name].extend(chunks)

    def _merging(self, distributed: bool | None = None) -> bool:
        """Whether :meth:`fisher` merges across ranks now (``distributed`` overrides the collector's setting)."""
        from .distributed import is_distributed

        choice = self.distributed if distributed is None else distributed
        if choice is False:
            return False
        if choice is True:
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()):
                raise InvalidInputError("distributed=True but torch.distributed is not initialised (any more)")
            return True
        return is_distributed()

    def merged_state(self, task: str) -> _TaskState:
        """``task``'s state merged over every rank of the default process group: a new
        :class:`_TaskState` (this rank's accumulators are left as they are, so merging again
        later never counts a sample twice). A collective: every rank must call it, for the same
        task. A rank that has not seen ``task`` takes part with an empty state."""
        from .distributed import merge_accumulators

        self._usable()
        local = self.tasks.get(task) or self._empty_state()
        counters = {k: getattr(local, k) for k in ("samples", "tokens", "skipped", "nonfinite", "batches")}
        if self._fsdp is not None:
            return _TaskState(self._fsdp.gather_accumulators(local.accumulators), **self._fsdp.sum_counters(counters))
        context = {
            "task": task, "reduction": self.reduction, "normalization": self.normalization, "estimator": self.estimator,
            "ema_decay": self.ema_decay, "accumulation_dtype": str(self.accumulation_dtype), "task_type": self.task_type,
            "variance": self.keeps_variance,
        }
        acc, counts = merge_accumulators(local.accumulators, counters, context=context)
        return _TaskState(acc, **counts)

    def _new_sink(self) -> ContributionSink:
        if self.ema_decay is not None:
            return _OrderedSink(self.accumulation_dtype)
        # one moments sink for the collector's life: its float64 scratch buffers are reused
        if self._moments_sink is None:
            self._moments_sink = _MomentsSink(self.accumulation_dtype, self.keep_dtype, atomic=self.atomic_batches)
        return self._moments_sink

    def _usable(self) -> None:
        """:class:`PartialBatchError` once a streaming batch failed with part of it merged."""
        if self._broken is not None:
            raise PartialBatchError(f"this FisherCollector cannot be used any more: {self._broken}")

    def _batch(self, task: str, state: _TaskState, sink: ContributionSink, fill: Callable[[], Any]) -> Any:
        """One batch of ``task``: ``fill()`` hands its contributions to ``sink``, then they are
        committed into ``state``; returns what ``fill`` returns.

        A batch that fails is dropped (atomic: the accumulators are as before, bit for bit). A
        streaming one (``atomic_batches=False``) may already have merged some parameters: the
        accumulators are zeroed again if they were empty before it (exact), else the collector
        refuses every later use and the error is a :class:`PartialBatchError` (from the failure)."""
        streaming = isinstance(sink, _MomentsSink) and not sink.atomic
        if streaming:
            sink.begin(state.accumulators)
        try:
            result = fill()
        except BaseException as e:
            merged = len(sink.merged) if streaming else 0
            if not (sink.abandon() if streaming else sink.reset()):  # reset(): None
                raise
            cause = e.__context__ if isinstance(e, _Lost) and e.__context__ is not None else e
            self._broken = (
                f"batch {state.batches} of task {task!r} failed ({_describe(cause)}) after the batch moments of {merged} of "
                f"{len(state.accumulators)} parameters had been merged into the accumulators (atomic_batches=False merges "
                "each parameter as soon as its moments are complete, and a merge cannot be taken back exactly). Start "
                "a new collector (or restore a checkpoint saved before this batch into one), with atomic batches (the "
                "default, atomic_batches=True) to keep going after a failing batch"
            )
            if isinstance(e, Exception):
                raise PartialBatchError(self._broken) from cause
            raise  # KeyboardInterrupt, SystemExit: as they are (the collector is marked all the same)
        self._commit(sink, state)
        return result

    def _record(self, state: _TaskState, report: BatchReport) -> None:
        state.batches += 1
        state.samples += report.used
        state.tokens += report.tokens
        state.skipped += report.skipped
        state.nonfinite += report.nonfinite

    def attach_training(self, task: str = "train", *, max_samples: int | None = None):
        """Collect ``task`` from the backward passes someone else runs on the model (a Trainer):
        returns the attached :class:`~hf_fisher.engine.external.ExternalBackward`; call its
        ``finish()`` after each backward (before the optimizer step) and ``detach()`` at the end.

        A micro-batch the free path cannot take exactly (see ``ExternalBackward``: e.g. a Trainer
        loss that counts the first real token after left padding, which the Fisher of the sample
        alone does not) is redone with the engine's own pass, on the same parameters, with the
        random streams left untouched; one WARNING per reason, and the counts are kept in
        :attr:`fallback_batches` and :attr:`fallback_reasons` (``{reason: micro-batches}``).
        """
        from ..engine.external import ExternalBackward

        self._usable()
        self._refuse_other_estimator("attach_training()")
        if not self.atomic_batches:
            raise InvalidInputError(
                "attach_training() needs atomic batches: a training micro-batch the free path cannot take is redone "
                "with the engine's own pass, which needs its moments held back until it is complete; build the "
                "collector with atomic_batches=True (the default)"
            )
        state = self._task(task)

        def remaining():
            return None if max_samples is None else max(0, max_samples - state.samples)

        def done(micro):
            if self._fsdp is not None and self._fsdp.agree(micro.failed is not None) and micro.failed is None:
                # FSDP2: the extra pass is a collective, so every rank redoes its micro-batch with it
                micro.failed = "another rank's micro-batch needs the engine's own pass (under FSDP2 every rank runs it)"
            if micro.failed is None:
                self._commit(micro.sink, state)
                self._record(state, micro.report)
                return
            if micro.failed not in self.fallback_reasons:
                log.warning("hf_fisher: a training micro-batch is computed with an extra pass (exact): %s", micro.failed)
            self.fallback_reasons[micro.failed] = self.fallback_reasons.get(micro.failed, 0) + 1
            self.fallback_batches += 1
            limit = remaining()
            if limit == 0 and self._fsdp is None:  # FSDP2: the pass runs on every rank, adding nothing here
                return
            with ext.paused_capture(), preserved_rng(self.model):
                self.update(micro.batch, task, limit=limit)

        ext = ExternalBackward(self.engine, self._new_sink, done, remaining)
        #: micro-batches computed with the engine's own pass, and how many for each reason
        self.fallback_batches = 0
        self.fallback_reasons: dict[str, int] = {}
        return ext.attach()

    def add_contributions(self, task: str, contributions: Mapping[str, torch.Tensor], report: BatchReport) -> None:
        """Add one batch's per-sample contributions ``{name: [b, ...]}`` (already combined, e.g.
        averaged over the true Fisher's label draws) to ``task``, with the batch's ``report``
        (samples used, tokens). Same accumulation as :meth:`update` (``atomic_batches=False``:
        each parameter merged as soon as it is added)."""
        self._usable()
        state = self._task(task)
        sink = self._new_sink()
        sink.reset()

        def fill() -> None:
            for name, c in contributions.items():
                sink.add(name, c)
                sink.complete(name)

        self._batch(task, state, sink, fill)
        self._record(state, report)

    def batches_seen(self, task: str) -> int:
        """Batches added to ``task`` so far (the index of the next batch in error messages)."""
        return self._task(task).batches

    def samples_seen(self, task: str) -> int:
        """Samples added to ``task`` so far (this process only)."""
        return self._task(task).samples

    def update(self, batch: Mapping[str, Any], task: str = "default", *, limit: int | None = None) -> BatchReport:
        """Add the samples of one batch to ``task``. Returns what was used and skipped."""
        self._usable()
        self._refuse_other_estimator("update()")
        state = self._task(task)
        sink = self._new_sink()

        def fill() -> BatchReport:
            was_training = self.model.training
            self.model.train(self.train_mode)
            try:
                return self.engine.process(batch, sink, batch_index=state.batches, limit=limit)
            finally:
                self.model.train(was_training)

        report = self._batch(task, state, sink, fill)  # a failed batch is dropped now rather than at the next update
        self._record(state, report)
        return report

    def collect(self, batches: Iterable[Mapping[str, Any]], task: str = "default", *, max_samples: int | None = None, progress: bool = True) -> None:
        """:meth:`update` over ``batches`` until they end or ``max_samples`` samples were used."""
        from tqdm.auto import tqdm

        self._usable()
        self._refuse_other_estimator("collect()")
        if max_samples is not None and max_samples <= 0:
            raise InvalidInputError(f"max_samples must be positive, got {max_samples}")
        state = self._task(task)
        bar = tqdm(total=max_samples, desc=f"Fisher[{task}]", unit="sample", disable=not progress)
        try:
            if self._fsdp is not None:  # every rank runs every pass: the ranks stop together
                self._fsdp.collect_in_step(self, batches, task, state, max_samples, bar)
                return
            for batch in batches:
                remaining = None if max_samples is None else max_samples - state.samples
                if remaining is not None and remaining <= 0:
                    break
                report = self.update(batch, task, limit=remaining)
                bar.update(report.used)
        finally:
            bar.close()

    # ------------------------------------------------------------------ results
    def fisher(
        self, task: str = "default", *, model_name_or_path: str | None = None, data_description: str | None = None,
        extra: Mapping[str, Any] | None = None, dtype: torch.dtype | None = None, distributed: bool | None = None,
        release: bool = False,
    ) -> Fisher:
        """The Fisher artifact of ``task`` (mean, unbiased variance, counts, metadata); to write it
        without holding it in memory, :meth:`save_fisher`.

        ``release=True`` consumes the task (for a collector that is finished with it): each
        parameter's accumulator is dropped as soon as its tensors are exported, and a Welford
        accumulator already in the storage dtype and device (not disk-backed) hands over its own
        tensors (``mean``; ``M2`` divided in place by ``n − 1``) instead of copies. The peak is
        then the accumulators plus one parameter's export, not two full copies. The task is
        removed from the collector afterwards (resume it with :meth:`restore`).

        ``extra`` is merged into ``metadata.extra``; ``dtype`` overrides the storage dtype (a
        checkpoint keeps the accumulation dtype so that :meth:`restore` is exact). Inside a
        process group of K > 1 ranks (see the class docstring; ``distributed`` overrides the
        collector's setting for this call) the result holds every rank's samples, identical on
        every rank, and ``metadata.extra["world_size"]`` is K; this rank's own accumulators are
        not changed, so calling it again (after more updates) still counts each sample once."""
        self._usable()
        if release not in (True, False):
            raise InvalidInputError(f"release must be True or False, got {release!r}")
        state, info = self._exported(task, distributed)
        self._release_scratch()
        dtype = dtype or self.storage_dtype or self.accumulation_dtype
        samples = self._samples(state)  # both before release empties state.accumulators
        metadata = self._metadata(task, model_name_or_path, data_description, dtype, {**info, **dict(extra or {})}, state)
        mean, var = {}, {}
        for name in list(state.accumulators):
            acc = state.accumulators.pop(name) if release else state.accumulators[name]
            mean[name], var[name] = _export(acc, dtype, self.storage_device, release)
            acc.release_pages()  # disk-backed: what the export read leaves resident memory
            del acc
        if release:
            self.tasks.pop(task, None)
        return self._artifact(state, mean, var if self.keeps_variance else None, metadata, samples)

    def _exported(self, task: str, distributed: bool | None) -> tuple[_TaskState, dict[str, Any]]:
        """``task``'s state to export (merged over the ranks when :meth:`_merging`) and the
        ``world_size``/``rank`` info for the metadata; :class:`EmptyDataError` when it has no sample."""
        info: dict[str, Any] = {}
        self._refuse_merging_kept(distributed)
        if self._merging(distributed):
            from .distributed import world_size

            seen = self.merged_state(task)
            merged = {task: seen}
            info["world_size"] = world_size()
            if self._fsdp is not None:
                info["fsdp"] = True
        else:
            from .distributed import is_distributed, rank

            seen = self.tasks.get(task)
            merged = self.tasks
            if is_distributed():
                info.update(world_size=1, rank=rank())
        if seen is not None and seen.samples == 0 and seen.nonfinite > 0:
            raise EmptyDataError(
                f"no usable sample for task {task!r}: all {seen.nonfinite} samples with label tokens were dropped "
                f"because their loss or gradient is not finite (on_nonfinite='skip'; {seen.skipped} more had no "
                "label token); check the model's weights and dtype (e.g. fp16 overflow) and the data"
            )
        if task not in merged or merged[task].samples == 0:
            detail = f" ({seen.batches} batches, {seen.skipped} samples without label tokens)" if seen else ""
            where = f" on any of the {info['world_size']} ranks" if info.get("world_size", 1) > 1 else ""
            raise EmptyDataError(
                f"no usable sample for task {task!r}{where}{detail}: pass non-empty batches whose samples have "
                "label tokens (labels != -100)"
            )
        return merged[task], info

    def _artifact(self, state: _TaskState, mean: dict, var: dict, metadata: FisherMetadata, samples: dict | None) -> Fisher:
        return Fisher(
            mean, var,
            reduction=self.reduction,
            groups=dict(self.groups),
            param_shapes=dict(self.param_shapes),
            counts=Counts(samples=state.samples, tokens=state.tokens, skipped=state.skipped, nonfinite=state.nonfinite),
            metadata=metadata,
            layout=self.layout,
            sample_contributions=samples,
        )

    def _samples(self, state: _TaskState) -> dict | None:
        """The kept per-sample contributions of ``state`` (``keep_sample_contributions``), or None."""
        if state.rows is None:
            return None
        return {name: _concat_rows(state.rows[name], acc.shape, self.keep_dtype) for name, acc in state.accumulators.items()}

    def save_fisher(
        self, task: str, save_directory, *, model_name_or_path: str | None = None, data_description: str | None = None,
        extra: Mapping[str, Any] | None = None, dtype: torch.dtype | None = None, distributed: bool | None = None,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    ):
        """Write ``task``'s Fisher artifact straight from the accumulators, shard by shard; returns its path.

        The same artifact as ``fisher(task, ...).save_pretrained(save_directory, max_shard_size=...)``
        (same arguments, same files and values), without the in-memory :class:`Fisher`: each
        tensor is converted from its accumulator (``mean_as`` / ``variance_as``) when its shard
        is written, so besides the accumulators at most one shard of export tensors
        (``max_shard_size``, or one larger tensor) is held at a time
        (:meth:`Fisher.save_streaming`; atomic: the target holds the old artifact or the
        complete new one). Under several ranks it is a collective like :meth:`fisher`; every
        rank writes (give each its own folder, or call it with ``distributed=False``).

        On an FSDP2-sharded model a collective that never gathers the whole Fisher on one rank:
        every rank writes the parameters assigned to it into one sharded artifact with an index
        (:func:`hf_fisher.collection.fsdp.save_sharded`; ``max_shard_size`` does not apply, one
        file per writing rank)."""
        self._usable()
        if self._fsdp is not None:
            from .fsdp import save_sharded

            return save_sharded(self, save_directory, task, model_name_or_path=model_name_or_path,
                                data_description=data_description, extra=extra, dtype=dtype)
        state, info = self._exported(task, distributed)
        self._release_scratch()
        dtype = dtype or self.storage_dtype or self.accumulation_dtype
        plan = {name: torch.empty(acc.shape, dtype=dtype, device="meta") for name, acc in state.accumulators.items()}
        metadata = self._metadata(task, model_name_or_path, data_description, dtype, {**info, **dict(extra or {})}, state)
        artifact = self._artifact(state, plan, dict(plan) if self.keeps_variance else None, metadata, self._samples(state))

        def produce(kind: str, name: str) -> torch.Tensor:
            acc = state.accumulators[name]
            out = acc.mean_as(dtype, "cpu") if kind == "mean" else acc.variance_as(dtype, "cpu")
            acc.release_pages()  # disk-backed: what the export read leaves resident memory
            return out

        return Fisher.save_streaming(artifact, save_directory, produce, max_shard_size=max_shard_size)

    def restore(self, task: str, fisher: Fisher) -> None:
        """Continue ``task`` from an artifact this collector (or one like it) wrote: the
        accumulators are rebuilt from its mean, variance and counts (Welford: ``M2 = var (n-1)``;
        EMA: with the weight sums kept in ``metadata.extra["ema_state"]``), exactly up to the
        artifact's dtype.

        Under several ranks, restore on one rank only (the trainer callback uses rank 0) and
        start the others empty: a merge would otherwise count the restored samples once per rank.
        On an FSDP2-sharded model every rank restores, keeping the rows it owns (the sample,
        token... counters on rank 0, since they are summed over ranks)."""
        self._usable()
        if fisher.reduction != self.reduction or sorted(fisher.names()) != sorted(t.name for t in self.engine.targets):
            raise InvalidInputError(
                f"cannot resume task {task!r} from this artifact: it holds a {fisher.reduction} Fisher of "
                f"{len(fisher)} parameters, this collector a {self.reduction} Fisher of {len(self.engine.targets)}"
            )
        self._check_resumable_variance(task, fisher.has_variance)
        n = fisher.counts.samples
        ema = (fisher.metadata.extra or {}).get("ema_state")
        acc = {}
        for t in self.engine.targets:
            mean = fisher[t.name].to(self.accumulation_dtype)
            var = fisher.variances[t.name].to(self.accumulation_dtype) if fisher.has_variance else None
            if self._fsdp is not None:  # FSDP2: every rank restores the rows it owns (and the whole count)
                mean, var = self._fsdp.own_rows(mean), None if var is None else self._fsdp.own_rows(var)
            if self.ema_decay is None:
                acc[t.name] = Welford.from_state(
                    AccumulatorState(n, mean, None if var is None else var * max(0, n - 1)), dtype=self.accumulation_dtype,
                    device=self.accumulation_device, store=self.store, variance=self.keeps_variance,
                )
            else:
                if not ema:
                    raise InvalidInputError("this artifact has no EMA state (metadata.extra['ema_state']): it cannot resume an EMA")
                w, w2 = float(ema["weight_sum"]), float(ema["weight_sq_sum"])
                denom = 1.0 - w2 / (w * w) if n > 1 else 1.0
                acc[t.name] = EMA.from_state(
                    AccumulatorState(n, mean, var * denom * w, self.ema_decay, w, w2),
                    dtype=self.accumulation_dtype, device=self.accumulation_device, store=self.store,
                )
        rows = None
        if self.keep_dtype is not None:
            if fisher.sample_contributions is None:
                raise InvalidInputError(
                    f"cannot resume task {task!r} with keep_sample_contributions=True: the artifact has no per-sample "
                    "contributions (it was collected without keep_sample_contributions)"
                )
            rows = {t.name: [fisher.sample_contributions[t.name].to("cpu", self.keep_dtype, copy=True)] for t in self.engine.targets}
        c = fisher.counts
        if self._fsdp is not None and self._fsdp.rank != 0:  # the counters are summed over ranks: rank 0 holds them
            c = Counts(samples=0, tokens=0, skipped=0, nonfinite=0)
        self.tasks[task] = _TaskState(acc, samples=c.samples, tokens=c.tokens, skipped=c.skipped, nonfinite=c.nonfinite, rows=rows)

    def _check_resumable_variance(self, task: str, has_variance: bool) -> None:
        """:class:`InvalidInputError` when a checkpoint's variance does not match ``variance=``:
        without a variance it cannot give a collector that keeps one its ``M2`` (a zero ``M2``
        would be a wrong variance), and one with a variance is not silently cut to its mean."""
        if has_variance == self.keeps_variance:
            return
        if self.keeps_variance:
            raise InvalidInputError(
                f"cannot resume task {task!r} from this artifact: it has no variance (collected with variance=False), "
                "and this collector keeps the variance (variance=True), whose M2 it cannot rebuild; resume it with "
                "variance=False (the mean only), or collect the task afresh"
            )
        raise InvalidInputError(
            f"cannot resume task {task!r} from this artifact: it was collected with the variance, and this collector "
            "keeps the mean only (variance=False); resume it with variance=True, or collect the task afresh"
        )

    def _metadata(self, task, model_name_or_path, data_description, storage_dtype, extra=None, state=None) -> FisherMetadata:
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        config = getattr(base, "config", None)
        name = model_name_or_path or getattr(config, "_name_or_path", None) or None
        return FisherMetadata(
            task=task,
            estimator=self.estimator,
            reduction=self.reduction,
            normalization=self.normalization,
            model_name_or_path=name or None,
            revision=getattr(config, "_commit_hash", None),
            model_type=getattr(config, "model_type", None),
            mode="train" if self.train_mode else "eval",
            accumulation_dtype=str(self.accumulation_dtype).replace("torch.", ""),
            storage_dtype=str(storage_dtype).replace("torch.", ""),
            data_description=data_description,
            ema_decay=self.ema_decay,
            extra={
                "task_type": self.task_type,
                "per_sample_path": "loop" if self.engine.loop_mode else "batched",
                **({"loop_reason": self.engine.loop_reason} if self.engine.loop_mode else {}),
                **({"vjp_params": dict(self.engine.vjp_reasons)} if self.engine.vjp_reasons and not self.engine.loop_mode else {}),
                **(_ema_state(state) if state is not None and self.ema_decay is not None else {}),
                **({} if self.keeps_variance else {"variance": False}),
                **dict(extra or {}),
            },
        )

    def close(self) -> None:
        """Detach the capture hooks from the model and release the scratch buffers; with
        ``offload_dir``, remove the accumulators' files (their mappings stay readable until dropped)."""
        self.engine.capture.detach()
        if self.store is not None:
            self.store.close()
        self._release_scratch()

    def _release_scratch(self) -> None:
        """Free the moments sink's reusable buffers (workspace, batch-level Welfords kept for the
        next batch): before an export, whose peak is then the accumulators plus the export, and
        at :meth:`close`. A later :meth:`update` allocates them again."""
        if self._moments_sink is not None:
            self._moments_sink.workspace.clear()
            self._moments_sink.spare = {}


def _check_atomic_batches(atomic_batches: Any, *, ema_decay: float | None, on_nonfinite: str) -> None:
    """:class:`InvalidInputError` unless ``atomic_batches`` is a bool that can be honoured with
    these options (streaming merges Welford moments and cannot redo a batch without a sample)."""
    if atomic_batches not in (True, False):
        raise InvalidInputError(f"atomic_batches must be True or False, got {atomic_batches!r}")
    if atomic_batches:
        return
    if ema_decay is not None:
        raise InvalidInputError(
            "atomic_batches=False cannot be combined with ema_decay: it streams the batch moments of the Welford "
            "accumulators, and an EMA takes each batch's contributions in order at the commit; drop one of them"
        )
    if on_nonfinite != "raise":
        raise InvalidInputError(
            "atomic_batches=False cannot be combined with on_nonfinite='skip': skipping a sample whose gradient is "
            "not finite redoes the batch without it, and with streaming the other parameters' moments would already "
            "be merged for good; pass on_nonfinite='raise', or keep atomic batches (the default) to skip such samples"
        )


def _check_variance(variance: Any, *, ema_decay: float | None) -> None:
    """:class:`InvalidInputError` unless ``variance`` is a bool that can be honoured (the mean
    only is a Welford without ``M2``; an EMA keeps its dispersion)."""
    if variance not in (True, False):
        raise InvalidInputError(f"variance must be True (keep the variance) or False (the mean only), got {variance!r}")
    if not variance and ema_decay is not None:
        raise InvalidInputError(
            "variance=False cannot be combined with ema_decay: the mean-only accumulator is a Welford one without M2, "
            "and an EMA keeps its dispersion; drop one of them"
        )


def _describe(e: BaseException) -> str:
    """A failure in words for an error message (the engine's internal signals without their class name)."""
    name = type(e).__name__
    text = str(e) or name
    samples = getattr(e, "samples", None)
    if samples:
        text = f"non-finite {text} for sample(s) {sorted(samples)}"
    return text if name.startswith("_") else f"{name}: {text}"


def _export(acc, dtype: torch.dtype, device: torch.device, release: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(mean, unbiased variance)`` of one accumulator in ``dtype`` on ``device``: copies (the
    accumulator goes on), or, with ``release`` and a Welford already in that dtype/device and in
    memory, its own tensors (``M2 / (n − 1)`` in place; the accumulator must not be used again).
    A mean-only Welford: ``(mean, None)``."""
    if isinstance(acc, Welford) and not acc.has_variance:
        if release and acc.store is None and acc.dtype == dtype and acc.device == torch.device(device):
            return acc.state().mean, None
        return acc.mean_as(dtype, device), None
    if release and isinstance(acc, Welford) and acc.store is None and acc.dtype == dtype and acc.device == torch.device(device):
        state = acc.state()
        m2 = state.m2.div_(state.count - 1) if state.count > 1 else state.m2.zero_()
        return state.mean, m2
    return acc.mean_as(dtype, device), acc.variance_as(dtype, device)


def _concat_rows(chunks: list[torch.Tensor], shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """The kept chunks of one parameter as one ``[n, num_groups]`` tensor (``[0, num_groups]`` if none)."""
    if not chunks:
        return torch.zeros((0, *shape), dtype=dtype)
    return torch.cat(chunks) if len(chunks) > 1 else chunks[0].clone()


def _ema_state(state: _TaskState) -> dict:
    """The EMA's weight sums (shared by every accumulator of a task), for :meth:`FisherCollector.restore`."""
    acc = next(iter(state.accumulators.values()), None)
    if not isinstance(acc, EMA):
        return {}
    s = acc.state()
    return {"ema_state": {"weight_sum": float(s.weight_sum), "weight_sq_sum": float(s.weight_sq_sum)}}


def preserved_rng(model: nn.Module):
    """``torch.random.fork_rng`` over the CPU and the model's CUDA device: an extra pass inside
    training (dropout) leaves the random streams training uses as they were."""
    devices = [p.device for p in model.parameters()][:1]
    cuda = [d.index or 0 for d in devices if d.type == "cuda"]
    return torch.random.fork_rng(devices=cuda)


_preserved_rng = preserved_rng  # the name hf_fisher.integrations.trainer imports
