"""Signed per-sample gradients of the parameters an analysis slices, kept within a memory budget.

The circuit analyses (QK-OV interference, cross-task sample conflicts) need every sample's
*signed* gradient ``g_i`` (not only ``C_i = g_i ⊙ g_i``), but only of a few parameters: by
default the attention projections (the layout's Q/K/V/O parameters) of the chosen layers. The
gradients come from the batched per-sample engine (one forward and one backward per batch, the
same exact ``g_i`` as ``hf_fisher.collect``: per-sample mean loss over its label tokens by
default) and are stored on the CPU in ``dtype``.

Budget: a sample costs ``Σ_params numel × element size`` bytes. Before any work the store
counts the samples of the batches; when they do not fit in ``memory_budget_mb``,
``on_budget="refuse"`` (default) raises, saying how many samples fit, and ``"evict"`` keeps the
most recent samples that fit (the oldest are dropped; ``evicted`` counts them).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from hf_fisher.engine.per_sample import ContributionSink
from hf_fisher.errors import EmptyDataError, InvalidInputError, regex_argument

__all__ = ["GradientStore", "attention_params", "store_gradients"]

logger = logging.getLogger(__name__)

ON_BUDGET = ("refuse", "evict")


@dataclass
class GradientStore:
    """Per-sample signed gradients ``grads[name]`` ``[n, *shape]`` (CPU, ``dtype``) of the
    stored parameters, for ``n`` samples in data order (``sample_ids[k] = (batch, row)``).

    ``fisher()`` is the empirical diagonal Fisher of the stored samples, ``mean_i g_i ⊙ g_i``
    (float64); ``contributions(name)`` is ``C_i = g_i ⊙ g_i`` ``[n, *shape]``.
    """

    grads: dict[str, torch.Tensor]
    sample_ids: list[tuple[int, int]]
    task: str = "default"
    normalization: str = "mean"
    dtype: torch.dtype = torch.float32
    evicted: int = 0
    budget_mb: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return len(self.sample_ids)

    @property
    def names(self) -> list[str]:
        return list(self.grads)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.grads.values())

    def contributions(self, name: str) -> torch.Tensor:
        g = self.grads[name].double()
        return g * g

    def fisher(self) -> dict[str, torch.Tensor]:
        """``F = mean_i g_i ⊙ g_i`` per stored parameter (float64; zeros when no sample)."""
        out = {}
        for n, g in self.grads.items():
            out[n] = (g.double() ** 2).mean(0) if g.shape[0] else torch.zeros(g.shape[1:], dtype=torch.float64)
        return out


@contextlib.contextmanager
def only_trainable(model: nn.Module, names: Sequence[str]) -> Iterator[None]:
    """Within the block, ``names`` are the model's only trainable parameters and the model is in
    eval mode; every ``requires_grad`` flag and the train/eval mode are restored afterwards."""
    params = dict(model.named_parameters())
    saved = [(p, p.requires_grad) for p in model.parameters()]
    was = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for n in names:
            params[n].requires_grad_(True)
        model.eval()
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
        model.train(was)


def attention_params(model: nn.Module, layout, layers: Iterable[int] | None = None) -> list[str]:
    """The parameters holding the Q/K/V/O slices of the layout's attention heads (of ``layers``)."""
    if not layout.attention:
        raise InvalidInputError(f"layout {layout.adapter!r} describes no attention heads; pass params= explicitly")
    wanted = None if layers is None else {int(x) for x in layers}
    known = {a.layer for a in layout.attention}
    if wanted is not None and not wanted <= known:
        raise InvalidInputError(f"layers {sorted(wanted - known)} are not attention layers of the model (it has {sorted(known)})")
    names: list[str] = []
    for att in layout.attention:
        if wanted is not None and att.layer not in wanted:
            continue
        for h in att.heads:
            for s in (*h.q, *h.k, *h.v, *h.o):
                if s.param not in names:
                    names.append(s.param)
    return names


class _StoreSink(ContributionSink):
    """Collects the engine's signed per-sample gradients of one batch (committed when it succeeds)."""

    accepts_gradients = True

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype):
        self.shapes = dict(shapes)
        self.dtype = dtype
        self.pending: dict[str, list[torch.Tensor]] = {}

    def reset(self) -> None:
        self.pending = {}

    def add(self, name: str, contributions: torch.Tensor) -> None:  # no gradient reached the parameter
        self.pending.setdefault(name, []).append(torch.zeros((contributions.shape[0], *self.shapes[name]), dtype=self.dtype))

    def add_gradients(self, name: str, gradients: torch.Tensor, *, owned: bool = False) -> list[int]:
        flat = gradients.reshape(gradients.shape[0], -1)
        bad = (~torch.isfinite(flat)).any(dim=1)
        if bool(bad.any()):
            return bad.nonzero().flatten().tolist()
        self.pending.setdefault(name, []).append(gradients.detach().to("cpu", self.dtype).clone())
        return []


def samples_that_fit(model: nn.Module, names: Sequence[str], dtype: torch.dtype, memory_budget_mb: float) -> tuple[int, int]:
    """``(samples the budget holds, bytes per sample)`` for stored gradients of ``names`` in ``dtype``:
    a sample costs ``Σ numel × element size``."""
    params = dict(model.named_parameters())
    per_sample = sum(params[n].numel() for n in names) * torch.empty((), dtype=dtype).element_size()
    return int(memory_budget_mb * 2**20 // max(per_sample, 1)), per_sample


def _count_samples(batches: Sequence[Mapping[str, Any]]) -> int:
    n = 0
    for i, b in enumerate(batches):
        if not isinstance(b, Mapping) or not isinstance(b.get("input_ids"), torch.Tensor) or b["input_ids"].dim() != 2:
            raise InvalidInputError(f"batch {i} must be a dict with input_ids [batch, seq_len]")
        n += int(b["input_ids"].shape[0])
    return n


def require_samples(model: nn.Module, task: Sequence[Mapping[str, Any]] | GradientStore, what: str) -> None:
    """Refuse (:class:`~hf_fisher.errors.EmptyDataError`), before any gradient is computed, a task
    that cannot give one per-sample gradient: a :class:`GradientStore` with no sample, no batch, or
    batches in which no sample has a label token (every label -100 or padding; counted by
    :func:`hf_fisher.engine.losses.label_counts`, the rule the engine applies). ``what`` names
    the task in the message (e.g. ``"task A"``). Batches are assumed well-formed (checked before)."""
    from hf_fisher.engine.losses import label_counts, task_type_of

    if isinstance(task, GradientStore):
        if task.num_samples == 0:
            raise EmptyDataError(f"{what}: the gradient store holds no sample; store gradients of at least one sample")
        return
    if len(task) == 0:
        raise EmptyDataError(f"{what} has no batch: pass at least one batch with a label token")
    task_type = task_type_of(model)
    if not any(bool((label_counts(b, task_type) > 0).any()) for b in task):
        n = _count_samples(task)
        raise EmptyDataError(
            f"{what}: none of its {n} sample(s) has a label token (every label is -100 or padding), so there is no "
            "gradient to compare; pass data with label tokens")


def store_gradients(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    params: str | Sequence[str] | None = None,
    layers: Iterable[int] | None = None,
    task: str = "default",
    dtype: torch.dtype = torch.float32,
    memory_budget_mb: float = 512.0,
    on_budget: str = "refuse",
    max_samples: int | None = None,
    normalization: str = "mean",
    progress: bool = True,
) -> GradientStore:
    """Signed per-sample gradients of ``params`` (a regular expression or a list of names;
    default: :func:`attention_params` of ``layers``) over ``batches`` (module docstring)."""
    from tqdm.auto import tqdm

    from hf_fisher import plugins
    from hf_fisher.engine.losses import task_type_of
    from hf_fisher.engine.per_sample import PerSampleEngine, Target

    if on_budget not in ON_BUDGET:
        raise InvalidInputError(f"on_budget={on_budget!r}: choose 'refuse' or 'evict'")
    if not isinstance(memory_budget_mb, (int, float)) or isinstance(memory_budget_mb, bool) or not memory_budget_mb > 0:
        raise InvalidInputError(f"memory_budget_mb must be a positive number of MB, got {memory_budget_mb!r}")
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1):
        raise InvalidInputError(f"max_samples must be a positive integer, got {max_samples!r}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise InvalidInputError(f"dtype must be a floating torch dtype (e.g. torch.float32), got {dtype!r}")
    if batches is None or isinstance(batches, Mapping):
        raise InvalidInputError("batches must be a list of batch dicts with input_ids")
    batches = list(batches)
    all_params = dict(model.named_parameters())
    if params is None:
        names = attention_params(model, plugins.model_layout(model), layers)
    elif isinstance(params, str):
        pattern = regex_argument("params", params)
        names = [n for n in all_params if pattern.search(n)]
    else:
        names = list(params)
    missing = [n for n in names if n not in all_params]
    if missing or not names:
        raise InvalidInputError(f"params: {missing[:3] or 'nothing'} {'is' if len(missing) == 1 else 'are'} not parameters of the model")
    fit, per_sample = samples_that_fit(model, names, dtype, memory_budget_mb)
    total = _count_samples(batches)
    wanted = total if max_samples is None else min(total, max_samples)
    if fit < 1 or (wanted > fit and on_budget == "refuse"):
        raise InvalidInputError(
            f"{wanted} samples x {per_sample / 2**20:.2f} MB of gradients ({len(names)} parameters in {dtype}) need "
            f"{wanted * per_sample / 2**20:.1f} MB; the budget of {memory_budget_mb:g} MB holds {fit} samples. Raise "
            f"memory_budget_mb, pass max_samples={max(fit, 1)}, slice fewer layers/parameters, use a smaller dtype, "
            "or on_budget='evict' (keeps the most recent samples that fit)"
        )
    shapes = {n: tuple(all_params[n].shape) for n in names}
    kept: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    ids: list[tuple[int, int]] = []
    evicted = 0
    sink = _StoreSink(shapes, dtype)
    with only_trainable(model, names):
        engine = PerSampleEngine(model, [Target(n, all_params[n], None) for n in names], plugins.grad_rules(),
                                 task_type=task_type_of(model), normalization=normalization)
        try:
            for i, batch in enumerate(tqdm(batches, desc=f"per-sample gradients ({task})", unit="batch", disable=not progress)):
                left = None if max_samples is None else max_samples - len(ids)
                if left == 0:
                    break
                report = engine.process(batch, sink, batch_index=i, limit=left)
                for n in names:
                    kept[n].extend(sink.pending.get(n, []))
                ids.extend((i, r) for r in report.used_index)
                sink.reset()
                if len(ids) > fit:  # evict the oldest: the store never holds more than the budget
                    drop = len(ids) - fit
                    for n in names:
                        kept[n] = [torch.cat(kept[n])[drop:]]
                    ids = ids[drop:]
                    evicted += drop
        finally:
            engine.capture.detach()
    grads = {n: (torch.cat(kept[n]) if kept[n] else torch.zeros((0, *shapes[n]), dtype=dtype)) for n in names}
    if evicted:
        logger.warning("gradient store (%s): the budget of %g MB holds %d samples; evicted the %d oldest",
                       task, memory_budget_mb, fit, evicted)
    return GradientStore(grads, ids, task=task, normalization=normalization, dtype=dtype, evicted=evicted,
                         budget_mb=float(memory_budget_mb))
