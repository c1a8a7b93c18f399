"""Fisher collection on a model sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Under FSDP2 a parameter lives between passes as a ``DTensor`` sharded over dim 0 (each rank
holds a block of rows); during a module's forward and backward FSDP all-gathers it into an
ordinary *unsharded* parameter, a leaf that autograd differentiates and that FSDP keeps (its
storage is freed and refilled, the tensor object stays). The engine's capture hooks therefore see
the whole parameter on every rank, and each rank computes the exact per-sample contributions
``C_i = g_i ⊙ g_i`` of the whole parameter for **its own** samples.

What each rank keeps is only the Fisher of a block of rows: the accumulator of a parameter (or
of its groups, ``reduction="group"``) is split over its dim 0 as FSDP2 splits ``Shard(0)``
(``torch.chunk``: blocks of ``c = ceil(d / K)`` rows, the last ones shorter or empty), so the
accumulators of a rank hold about ``1/K`` of the whole. After every batch the ranks' batch
moments meet on the owner of each block (one ``all_to_all`` per parameter, each rank sending
each owner the rows it owns; transient memory: the moments of one parameter) and the owner
merges them, in rank order, with Chan's formula::

    n = n_a + n_s,  δ = μ_s − μ_a,  μ = μ_a + δ n_s / n,  M2 = M2_a + M2_s + δ² n_a n_s / n

which is the state of one accumulator that saw every rank's samples of the batch: the result
equals one process over the same samples up to float rounding.
Mean-only accumulators (``variance=False``) send and merge the mean only (no ``M2`` line), and
the sharded artifact then has no variance tensors.

Every forward of an FSDP2 model is a collective, so every rank must run the same number of
passes: the collector checks before each batch that every rank has one (a rank without a
batch while another has one is refused on every rank at once), and the first-batch checks of
the engine decide together (a check one rank needs runs on every rank). What cannot run in
step on every rank is refused before any work: the per-sample loop fallback, EMA accumulators
(order dependent), kept per-sample contributions and ``distributed=False``.

KFAC (:mod:`hf_fisher.estimators.kfac`) keeps whole per-layer factors on every rank and sums them
at the end; its passes stay in step through :meth:`FSDPSharding.replay_step` (a rank without a
counted sample runs the others' passes counting nothing), :meth:`FSDPSharding.settle` (a check
failing on one rank stops every rank) and :meth:`FSDPSharding.max_over_ranks`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping

import torch
import torch.nn as nn

from ..errors import DistributedMismatchError, InvalidInputError, UnsupportedError

log = logging.getLogger(__name__)

__all__ = ["FSDPSharding", "fsdp_modules", "is_fsdp", "row_range"]


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` wrapped by FSDP2's ``fully_shard`` (empty when none)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_fsdp(model: nn.Module) -> bool:
    """True when some module of ``model`` is sharded with FSDP2 (``fully_shard``)."""
    return bool(fsdp_modules(model))


def row_range(rows: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of dim 0 that ``rank`` of ``world`` owns, as FSDP2 shards ``Shard(0)``
    (``torch.chunk``): blocks of ``c = ceil(rows / world)`` rows, ``lo = min(rank c, rows)``,
    ``hi = min(lo + c, rows)`` (trailing ranks may own fewer rows or none)."""
    c = math.ceil(rows / world) if rows else 0
    lo = min(rank * c, rows)
    return lo, min(lo + c, rows)


class FSDPSharding:
    """How a collector works on an FSDP2 model: the unsharded parameters, which rows of every
    accumulator this rank owns, and the collectives that keep the ranks in step."""

    def __init__(self, model: nn.Module, group=None):
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise InvalidInputError("the model is sharded with FSDP2 but torch.distributed is not initialised")
        self.model = model
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.modules = fsdp_modules(model)
        self._check_placements()

    def _check_placements(self) -> None:
        """FSDP2 parameters are DTensors on a 1-D mesh of this group's ranks (HSDP's 2-D mesh is
        refused: its replicas would count their samples once per replica group)."""
        for name, p in self.model.named_parameters():
            mesh = getattr(p, "device_mesh", None)
            if mesh is None:
                continue
            if mesh.ndim != 1 or mesh.size() != self.world:
                raise UnsupportedError(
                    f"parameter {name} is sharded over a device mesh of shape {tuple(mesh.shape)}; hf_fisher supports "
                    f"FSDP2 over one 1-D mesh of all {self.world} ranks (fully_shard without HSDP)"
                )

    @contextlib.contextmanager
    def unsharded(self) -> Iterator[None]:
        """Every FSDP2 module unsharded (its parameters registered as the unsharded tensors the
        forward and backward use) for the duration of the block; a collective."""
        for m in self.modules:
            m.unshard()
        try:
            yield
        finally:
            for m in self.modules:
                m.reshard()

    # ------------------------------------------------------------------ ownership
    def local_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of this rank's block of an accumulator of global ``shape``."""
        if not shape:
            raise UnsupportedError("a 0-d accumulator cannot be sharded over ranks")
        lo, hi = row_range(shape[0], self.rank, self.world)
        return (hi - lo, *shape[1:])

    def own_rows(self, whole: torch.Tensor) -> torch.Tensor:
        """This rank's block of rows of a whole accumulator-shaped tensor (a copy)."""
        lo, hi = row_range(whole.shape[0], self.rank, self.world)
        return whole[lo:hi].clone()

    # ------------------------------------------------------------------ collectives
    def _all_gather_ints(self, values: list[int]) -> list[list[int]]:
        from .distributed import all_gather_tensor

        t = torch.tensor(values, dtype=torch.int64)
        return [x.tolist() for x in all_gather_tensor(t, self.group)]

    def agree(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (a collective)."""
        return any(v[0] for v in self._all_gather_ints([int(bool(flag))]))

    def check_in_step(self, has_batch: bool, index: int, error: BaseException | None = None) -> bool:
        """Whether every rank has a next batch (False when none has); a rank without a batch
        while another has one is refused on every rank (FSDP2 forwards are collectives).

        ``error`` is this rank's refusal of its batch (bad input found before any pass): the
        ranks learn of it together, the refusing rank raises its own error and every other rank
        a :class:`DistributedMismatchError` naming it, so no rank is left waiting in a collective
        that the refusing rank never joins, and nothing of the batch is added anywhere."""
        every = self._all_gather_ints([int(bool(has_batch)), int(error is not None)])
        refused = [r for r, v in enumerate(every) if v[1]]
        if error is not None:
            raise error
        if refused:
            raise DistributedMismatchError(
                f"batch {index}: rank(s) {refused} refused their batch before any pass (their error says "
                "why); under FSDP2 every rank stops with it, and nothing of this batch was added on any rank"
            )
        flags = [v[0] for v in every]
        if all(flags):
            return True
        if not any(flags):
            return False
        missing = [r for r, f in enumerate(flags) if not f]
        raise DistributedMismatchError(
            f"batch {index}: rank(s) {missing} have no batch while others do; under FSDP2 every forward is a "
            "collective, so every rank must pass the same number of batches (split the data evenly, e.g. "
            "with a DistributedSampler and drop_last=True)"
        )

    def max_over_ranks(self, value: int) -> int:
        """The largest of the ranks' ``value`` (a collective)."""
        return max(v[0] for v in self._all_gather_ints([int(value)]))

    def failed_ranks(self, failed: bool) -> list[int]:
        """The ranks on which ``failed`` is true (the same list on every rank; a collective)."""
        return [r for r, v in enumerate(self._all_gather_ints([int(bool(failed))])) if v[0]]

    def settle(self, ok: bool, error: BaseException, index: int, what: str) -> None:
        """Raise on every rank when ``ok`` is false on any (a collective): this rank ``error`` when
        its own ``ok`` is false, a :class:`DistributedMismatchError` naming the failing ranks
        otherwise, so that no rank goes on into a pass the failing ones never join."""
        bad = self.failed_ranks(not ok)
        if not ok:
            raise error
        if bad:
            raise DistributedMismatchError(
                f"batch {index}: {what} failed on rank(s) {bad} (their error says why); under FSDP2 every rank stops with it"
            )

    def replay_step(self, index: int, *, has_batch: bool, counted: bool, error: BaseException | None,
                    can_replay: bool) -> bool | None:
        """The ranks' joint decision before one batch of a pass-by-pass collection that replays
        (KFAC): ``None`` when no rank has a batch left (stop), ``False`` when no rank's batch
        counts a sample (skip it: no pass anywhere), ``True`` when every rank runs the batch's
        passes, a rank without a batch (out of data, or past its ``max_samples``) on a replay of
        its last batch that counts nothing. A collective.

        Refused on every rank: a batch one rank finds bad (see :meth:`check_in_step`), and a rank
        that would have to replay before it ever had a batch (``can_replay`` false)."""
        every = self._all_gather_ints([int(has_batch), int(counted), int(error is not None), int(can_replay)])
        refused = [r for r, v in enumerate(every) if v[2]]
        if error is not None:
            raise error
        if refused:
            raise DistributedMismatchError(
                f"batch {index}: rank(s) {refused} refused their batch before any pass (their error says why); under "
                "FSDP2 every rank stops with it, and nothing of this batch was added on any rank"
            )
        if not any(v[0] for v in every):
            return None
        if not any(v[1] for v in every):
            return False
        stranded = [r for r, v in enumerate(every) if not v[0] and not v[3]]
        if stranded:
            raise DistributedMismatchError(
                f"batch {index}: rank(s) {stranded} have no batch at all while others do; under FSDP2 every forward is "
                "a collective, so every rank needs at least one batch (split the data evenly, e.g. with a "
                "DistributedSampler)"
            )
        return True

    def commit(self, sink, accumulators: Mapping[str, object], names: list[str]) -> None:
        """Merge this batch's moments of every rank into the owners' accumulators.

        ``sink`` is the collector's moments sink holding this rank's batch moments of the whole
        parameters; for each parameter (in ``names`` order, the same on every rank) every rank
        sends each owner the rows it owns (``all_to_all_single``, blocks padded to ``c`` rows)
        and the owner folds the ranks' ``(n_s, μ_s, M2_s)`` in rank order with Chan's formula
        (mean-only accumulators, ``variance=False``: ``(n_s, μ_s)``, no M2 is sent)."""
        import torch.distributed as dist

        counts = self._all_gather_ints([_local_count(sink, n) for n in names])
        k = self.world
        for j, name in enumerate(names):
            ns = [counts[s][j] for s in range(k)]
            if not any(ns):
                continue
            acc = accumulators[name]
            n, mean, m2 = _local_moments(sink, name)
            sink.pending.pop(name, None)  # this parameter's batch moments are freed once sent
            shape = _global_shape(acc, self, name, mean)
            rows = shape[0]
            c = math.ceil(rows / k)
            keep_m2 = acc.has_variance
            send = torch.zeros((k, 1 + keep_m2, c, *shape[1:]), dtype=acc.dtype)
            if n:
                for d in range(k):
                    lo, hi = row_range(rows, d, k)
                    send[d, 0, : hi - lo] = mean[lo:hi]
                    if keep_m2:
                        send[d, 1, : hi - lo] = m2[lo:hi]
            recv = torch.empty_like(send)
            dist.all_to_all_single(recv, send, group=self.group)
            mine = acc.shape[0]
            for s in range(k):
                if ns[s]:
                    acc.update_shifted_(ns[s], recv[s, 0, :mine], recv[s, 1, :mine] if keep_m2 else None)
        sink.reset()

    def register_global_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """The global (unsharded) shape of every accumulator, by name."""
        self.global_shapes = dict(shapes)

    def sum_counters(self, counters: Mapping[str, int]) -> dict[str, int]:
        """``counters`` summed over ranks."""
        keys = sorted(counters)
        every = self._all_gather_ints([int(counters[k]) for k in keys])
        return {k: sum(v[i] for v in every) for i, k in enumerate(keys)}

    def gather_accumulators(self, accumulators: Mapping[str, object]) -> dict:
        """Whole Welford accumulators (every rank's rows, ``all_gather``) on every rank: what
        :meth:`FisherCollector.fisher` returns under FSDP2 (the whole Fisher on every rank; write
        it without gathering with :meth:`FisherCollector.save_fisher`)."""
        from .stats import AccumulatorState, Welford

        out = {}
        for name in sorted(accumulators):
            acc = accumulators[name]
            rows = self.global_shapes[name][0]
            s = acc.state()
            mean = self.gather_rows(s.mean, rows)
            m2 = self.gather_rows(s.m2, rows) if acc.has_variance else None
            out[name] = Welford.from_state(AccumulatorState(acc.count, mean, m2), dtype=acc.dtype, device=acc.device,
                                           variance=acc.has_variance)
        return out

    def collect_in_step(self, collector, batches, task: str, state, max_samples: int | None, bar) -> None:
        """:meth:`FisherCollector.collect` with the ranks in step: before each batch every rank
        says whether it has one (see :meth:`check_in_step`) and whether it still wants samples;
        the ranks stop together when none has a batch or none wants more (a rank that has
        enough runs the others' passes with ``limit=0``, adding nothing)."""
        it = iter(batches)
        index = 0
        while True:
            batch = next(it, None)
            error = None
            if batch is not None:
                try:  # the batch's own checks before any collective pass (see check_in_step)
                    collector.engine.prepare(batch, state.batches)
                except Exception as e:  # re-raised on this rank by check_in_step
                    error = e
            if not self.check_in_step(batch is not None, index, error):
                return
            remaining = None if max_samples is None else max(0, max_samples - state.samples)
            if not self.agree(remaining is None or remaining > 0):
                return
            report = collector.update(batch, task, limit=remaining)
            bar.update(report.used)
            index += 1

    def gather_rows(self, block: torch.Tensor, rows: int, dst: int | None = None) -> torch.Tensor | None:
        """The whole tensor of ``rows`` rows from every rank's ``block`` (a collective): on every
        rank (``dst`` None, ``all_gather``) or on rank ``dst`` only (None elsewhere, ``gather``)."""
        import torch.distributed as dist

        k = self.world
        c = math.ceil(rows / k)
        padded = torch.zeros((c, *block.shape[1:]), dtype=block.dtype)
        padded[: block.shape[0]] = block.detach().cpu()
        if dst is None:
            out = [torch.empty_like(padded) for _ in range(k)]
            dist.all_gather(out, padded, group=self.group)
        else:
            out = [torch.empty_like(padded) for _ in range(k)] if self.rank == dst else None
            dist.gather(padded, out, dst=dist.get_global_rank(self.group, dst) if self.group is not None else dst, group=self.group)
            if out is None:
                return None
        return torch.cat([o[: hi - lo] for o, (lo, hi) in zip(out, (row_range(rows, r, k) for r in range(k)))])


def _global_shape(acc, sharding: FSDPSharding, name: str, mean) -> tuple[int, ...]:
    shapes = getattr(sharding, "global_shapes", None)
    if shapes is not None and name in shapes:
        return tuple(shapes[name])
    return tuple(mean.shape)  # pragma: no cover - shapes are always registered


def _local_count(sink, name: str) -> int:
    """Samples of ``name`` in this rank's batch (0 when none)."""
    if name in sink.batch:
        return sink.batch[name].count
    return int(sink.pending[name][0]) if name in sink.pending else 0


def _local_moments(sink, name: str) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
    """``(n, μ, M2)`` of ``name`` in this rank's batch (the moments sink's summary, converted to
    float64), or ``(0, None, None)`` when the rank had no sample for it."""
    if name in sink.batch:
        w = sink.batch[name]
        return w.count, w.mean.to(torch.float64), w.m2.to(torch.float64)
    if name in sink.pending:
        n, shift, m2, residual = sink.pending[name]
        mean = shift.to(torch.float64)
        if residual is not None:
            mean = mean + residual.to(torch.float64) / n
        return int(n), mean, m2.to(torch.float64)
    return 0, None, None


def refuse_options(*, ema_decay, keep_sample_contributions: bool, distributed, train_mode=None) -> None:
    """What a collector cannot honour on an FSDP2 model, refused before any work."""
    if ema_decay is not None:
        raise UnsupportedError(
            "ema_decay is not supported on an FSDP2-sharded model (an EMA depends on the order of the samples "
            "across ranks); use the default Welford accumulation (ema_decay=None)"
        )
    if keep_sample_contributions:
        raise UnsupportedError(
            "keep_sample_contributions=True is not supported on an FSDP2-sharded model (the per-sample "
            "contributions would be kept whole on every rank); collect without it"
        )
    if distributed is False:
        raise UnsupportedError(
            "distributed=False is not supported on an FSDP2-sharded model: each rank keeps only its rows of the "
            "Fisher, which is the Fisher of every rank's samples; drop distributed=False"
        )


def save_sharded(collector, directory, task: str, *, model_name_or_path=None, data_description=None, extra=None,
                 dtype: torch.dtype | None = None):
    """Write ``task``'s Fisher as one sharded artifact without gathering it on one rank (a
    collective; every rank must see ``directory``, e.g. one machine or a shared file system).

    Parameters are assigned to ranks whole (greedily by size, in name order); each writer gathers
    the row blocks of one tensor at a time (``gather``: transient memory one tensor) and writes
    ``fisher-0000k-of-0000N.safetensors`` with the ``mean.<param>`` / ``variance.<param>`` keys of
    :meth:`hf_fisher.Fisher.save_pretrained`; rank 0 writes ``fisher.safetensors.index.json``
    and ``fisher_config.json``, so :meth:`hf_fisher.Fisher.from_pretrained` loads it as any
    sharded artifact. Atomic as ``save_pretrained``: the files go to a temporary folder beside
    the target (created by rank 0) that replaces it when every rank has written. Rank 0 writes the
    model card from memory-mapped views of the written shards.

    Returns the artifact's path on every rank."""
    from types import SimpleNamespace

    from safetensors.torch import save_file

    from ..artifacts.atomic import atomic_folder, check_target
    from ..artifacts.fisher import Counts, Fisher
    from ..artifacts.format import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_INDEX_NAME, is_artifact_file, write_json
    from ..errors import EmptyDataError
    from .distributed import _gather_bytes

    sharding: FSDPSharding = collector._fsdp
    state = collector._task(task)
    counters = sharding.sum_counters({k: getattr(state, k) for k in ("samples", "tokens", "skipped", "nonfinite", "batches")})
    if counters["samples"] == 0:
        raise EmptyDataError(f"no usable sample for task {task!r} on any of the {sharding.world} ranks: nothing to save")
    dtype = dtype or collector.storage_dtype or collector.accumulation_dtype
    names = sorted(state.accumulators)
    shapes = sharding.global_shapes
    # whole tensors to writers, greedily by size
    load = [0] * sharding.world
    writer = {}
    for name in sorted(names, key=lambda n: (-int(torch.Size(shapes[n]).numel()), n)):
        w = min(range(sharding.world), key=lambda r: (load[r], r))
        writer[name] = w
        load[w] += int(torch.Size(shapes[name]).numel())
    writers = sorted(set(writer.values()))
    files = {w: f"fisher-{i + 1:05d}-of-{len(writers):05d}.safetensors" for i, w in enumerate(writers)}

    # rank 0 checks the target and opens the temporary folder; its path (or its refusal) goes to every rank
    ctx, tmp, refusal = None, None, None
    if sharding.rank == 0:
        try:
            ctx = atomic_folder(check_target(directory, allowed=is_artifact_file, what="Fisher artifact"))
            tmp = ctx.__enter__()
        except Exception as e:
            refusal, ctx = e, None
    message = (b"!" + (str(refusal) or type(refusal).__name__).encode()) if refusal is not None else str(tmp or "").encode()
    shared = _gather_bytes(message, sharding.group)[0]
    if refusal is not None:
        raise refusal
    if shared.startswith(b"!"):
        raise InvalidInputError(f"cannot save the sharded Fisher artifact (refused on rank 0): {shared[1:].decode()}")
    try:
        tmp_path = shared.decode()
        mine: dict[str, torch.Tensor] = {}
        kinds = ("mean", "variance") if collector.keeps_variance else ("mean",)  # variance=False: the mean only
        for name in names:
            acc = state.accumulators[name]
            rows = shapes[name][0]
            for kind in kinds:
                block = acc.mean_as(dtype, "cpu") if kind == "mean" else acc.variance().to("cpu", dtype)
                whole = sharding.gather_rows(block, rows, dst=writer[name])
                if whole is not None:
                    mine[f"{kind}.{name}"] = whole.contiguous()
        meta = {
            "format": "pt", "task": str(task), "reduction": collector.reduction, "estimator": str(collector.estimator),
            "hf_fisher_format_version": str(FORMAT_VERSION),
        }
        if sharding.rank in files:
            save_file(mine, f"{tmp_path}/{files[sharding.rank]}", metadata=meta)
        del mine
        import torch.distributed as dist

        dist.barrier(group=sharding.group)
        if sharding.rank == 0:
            from pathlib import Path

            itemsize = torch.empty((), dtype=dtype).element_size()
            weight_map = {f"{kind}.{n}": files[writer[n]] for n in names for kind in kinds}
            total = len(kinds) * itemsize * sum(int(torch.Size(shapes[n]).numel()) for n in names)
            write_json(Path(tmp_path) / WEIGHTS_INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
            info = {"world_size": sharding.world, "fsdp": True, **dict(extra or {})}
            view = SimpleNamespace(
                reduction=collector.reduction, metadata=collector._metadata(task, model_name_or_path, data_description, dtype, info, None),
                counts=Counts(samples=counters["samples"], tokens=counters["tokens"], skipped=counters["skipped"], nonfinite=counters["nonfinite"]),
                param_shapes=dict(collector.param_shapes), groups=dict(collector.groups),
                layout=collector.layout, _variance=collector.keeps_variance, sample_contributions=None, names=lambda: names,
            )
            write_json(Path(tmp_path) / CONFIG_NAME, Fisher._config(view, sorted(files.values()), True))
            _write_card(Path(tmp_path), view, names, sorted(files.values()))
            ctx.__exit__(None, None, None)
            ctx = None
        dist.barrier(group=sharding.group)
    except BaseException as e:
        if ctx is not None:
            ctx.__exit__(type(e), e, e.__traceback__)
        raise
    from pathlib import Path

    return Path(directory).absolute()


def _write_card(folder, view, names: list[str], files: list[str]) -> None:
    """The artifact's model card (``README.md``), as :meth:`hf_fisher.Fisher.save_pretrained`
    writes it, computed by rank 0 from memory-mapped views of the shards every rank has just
    written (the pages are the files', nothing is gathered into process memory)."""
    from ..artifacts import cards
    from ..artifacts.fisher import Fisher
    from ..artifacts.format import CARD_NAME, mapped_safetensors

    mapped: dict[str, torch.Tensor] = {}
    for filename in files:
        mapped.update(mapped_safetensors(folder / filename))
    shown = Fisher(
        {n: mapped[f"mean.{n}"] for n in names}, {n: mapped[f"variance.{n}"] for n in names} if view._variance else None,
        reduction=view.reduction, groups=view.groups or None, param_shapes=view.param_shapes, counts=view.counts,
        metadata=view.metadata, layout=view.layout,
    )
    cards.render_card(shown).save(folder / CARD_NAME)


def restore_sharded(collector, task: str, folder) -> None:
    """Continue ``task`` from the Fisher artifact in ``folder`` (e.g. a checkpoint written by
    :func:`save_sharded`), every rank reading only what it owns: one tensor at a time through
    :class:`~hf_fisher.artifacts.reader.FisherReader` (checked as ``from_pretrained`` checks it),
    keeping its block of rows (Welford: ``M2 = var (n − 1)``); the counters go to rank 0, since
    they are summed over ranks. Exact up to the artifact's dtype (the callback's checkpoints
    keep the accumulation dtype)."""
    import dataclasses

    from ..artifacts.reader import FisherReader
    from .stats import AccumulatorState, Welford

    sharding: FSDPSharding = collector._fsdp
    reader = FisherReader(folder)
    names = sorted(t.name for t in collector.engine.targets)
    if reader.reduction != collector.reduction or reader.names() != names:
        raise InvalidInputError(
            f"cannot resume task {task!r} from {folder}: it holds a {reader.reduction} Fisher of {len(reader.names())} "
            f"parameters, this collector a {collector.reduction} Fisher of {len(names)}"
        )
    collector._check_resumable_variance(task, bool(reader.config["has_variance"]))
    counts = reader.counts
    n = counts.samples
    dtype = collector.accumulation_dtype
    acc = {}
    for name in names:
        mean = sharding.own_rows(reader.get(name, "mean").to(dtype))
        m2 = sharding.own_rows(reader.get(name, "variance").to(dtype)) * max(0, n - 1) if collector.keeps_variance else None
        acc[name] = Welford.from_state(AccumulatorState(n, mean, m2), dtype=dtype, device=collector.accumulation_device,
                                       variance=collector.keeps_variance)
    mine = counts if sharding.rank == 0 else None
    collector.tasks[task] = dataclasses.replace(
        collector._empty_state(), accumulators=acc, samples=mine.samples if mine else 0, tokens=mine.tokens if mine else 0,
        skipped=mine.skipped if mine else 0, nonfinite=mine.nonfinite if mine else 0,
    )
