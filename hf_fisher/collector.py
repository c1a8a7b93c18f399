"""FisherCollector: accumulates per-sample contributions of one model over batches and tasks.

The collector owns the statistics (one Welford or EMA accumulator per parameter and task, in
float64 by default) and turns them into :class:`hf_fisher.Fisher` artifacts. The per-sample
work is the engine's (:mod:`hf_fisher.engine`); the accumulation is :mod:`hf_fisher.stats`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
import torch.nn as nn

from . import plugins
from .engine.losses import NORMALIZATIONS, task_type_of
from .engine.per_sample import BatchReport, ContributionSink, LossFn, PerSampleEngine, Target
from .errors import EmptyDataError, InvalidInputError, NoTrainableParametersError
from .fisher import Counts, Fisher, FisherMetadata
from .stats import Welford, make_accumulator

log = logging.getLogger("hf_fisher")

REDUCTIONS = ("param", "group")


def _check_choice(what: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise InvalidInputError(f"unknown {what} {value!r}; choose one of {', '.join(map(repr, choices))}")


class _MomentsSink(ContributionSink):
    """One batch-level :class:`~hf_fisher.stats.Welford` per parameter, fed chunk moments.

    Chunk moments are taken in the contributions' own precision (two-pass, centred), then merged in the accumulation dtype; :meth:`commit` merges the
    batch into the task's accumulators (Chan et al., exact).
    """

    accepts_moments = True

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.batch: dict[str, Welford] = {}

    def reset(self) -> None:
        self.batch = {}

    def add(self, name: str, contributions: torch.Tensor) -> None:
        mean_b = contributions.mean(0)
        # two-pass centred M2, in place on the tensor the engine handed over
        # (torch.var_mean over dim 0 is ~10x slower on CPU)
        centred = contributions.sub_(mean_b)
        self.add_moments(name, contributions.shape[0], mean_b, centred.mul_(centred).sum(0))

    def add_moments(self, name: str, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        if name not in self.batch:
            self.batch[name] = Welford(dtype=self.dtype, device=mean.device)
        self.batch[name].update_moments(n, mean, m2)

    def commit(self, accumulators: dict) -> None:
        for name, w in self.batch.items():
            accumulators[name].update_moments(w.count, w.mean, w.m2)


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


class FisherCollector:
    """Collects the empirical diagonal Fisher of ``model`` for one or several tasks.

    F = mean_i C_i with C_i = g_i ⊙ g_i, g_i the gradient of sample i's loss (normalisation
    "mean": mean CE over its label tokens; "sum"; "token": C_i = (d sum_t l_it/dθ)² / T_i).
    ``reduction="group"`` sums C_i within the adapter's groups (heads, kv-heads, channels,
    vocabulary rows) before accumulating. Accumulation is Welford/Chan in ``accumulation_dtype``
    (float64 default), or an EMA with bias correction when ``ema_decay`` is set.

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
    ):
        _check_choice("reduction", reduction, REDUCTIONS)
        _check_choice("normalization", normalization, NORMALIZATIONS)
        _check_choice("on_nonfinite", on_nonfinite, ("raise", "skip"))
        if ema_decay is not None and not (0.0 < float(ema_decay) < 1.0):
            raise InvalidInputError(f"ema_decay must be in (0, 1), got {ema_decay}")
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
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
        self.layout = plugins.model_layout(model)
        self.param_shapes = {n: tuple(p.shape) for n, p in named}
        self.groups = {n: self.layout.groups[n] for n, _ in named}
        targets = [Target(n, p, self.groups[n] if reduction == "group" else None) for n, p in named]
        self.engine = PerSampleEngine(
            model, targets, plugins.grad_rules(), task_type=self.task_type, normalization=normalization,
            loss_fn=loss_fn, memory_budget_mb=memory_budget_mb, on_nonfinite=on_nonfinite, verify=verify,
        )
        self.tasks: dict[str, _TaskState] = {}

    # ------------------------------------------------------------------ accumulation
    def _task(self, task: str) -> _TaskState:
        if task not in self.tasks:
            acc = {}
            for t in self.engine.targets:
                shape = (t.groups.num_groups,) if t.groups is not None else tuple(t.param.shape)
                acc[t.name] = make_accumulator(shape, ema_decay=self.ema_decay, dtype=self.accumulation_dtype, device=self.accumulation_device)
            self.tasks[task] = _TaskState(acc)
        return self.tasks[task]

    def update(self, batch: Mapping[str, Any], task: str = "default", *, limit: int | None = None) -> BatchReport:
        """Add the samples of one batch to ``task``. Returns what was used and skipped."""
        state = self._task(task)
        sink = _OrderedSink(self.accumulation_dtype) if self.ema_decay is not None else _MomentsSink(self.accumulation_dtype)
        was_training = self.model.training
        self.model.train(self.train_mode)
        try:
            report = self.engine.process(batch, sink, batch_index=state.batches, limit=limit)
        finally:
            self.model.train(was_training)
        sink.commit(state.accumulators)
        state.batches += 1
        state.samples += report.used
        state.tokens += report.tokens
        state.skipped += report.skipped
        state.nonfinite += report.nonfinite
        return report

    def collect(self, batches: Iterable[Mapping[str, Any]], task: str = "default", *, max_samples: int | None = None, progress: bool = True) -> None:
        """:meth:`update` over ``batches`` until they end or ``max_samples`` samples were used."""
        from tqdm.auto import tqdm

        if max_samples is not None and max_samples <= 0:
            raise InvalidInputError(f"max_samples must be positive, got {max_samples}")
        state = self._task(task)
        bar = tqdm(total=max_samples, desc=f"Fisher[{task}]", unit="sample", disable=not progress)
        try:
            for batch in batches:
                remaining = None if max_samples is None else max_samples - state.samples
                if remaining is not None and remaining <= 0:
                    break
                report = self.update(batch, task, limit=remaining)
                bar.update(report.used)
        finally:
            bar.close()

    # ------------------------------------------------------------------ results
    def fisher(self, task: str = "default", *, model_name_or_path: str | None = None, data_description: str | None = None) -> Fisher:
        """The Fisher artifact of ``task`` (mean, unbiased variance, counts, metadata)."""
        if task not in self.tasks or self.tasks[task].samples == 0:
            seen = self.tasks.get(task)
            detail = f" ({seen.batches} batches, {seen.skipped} samples without label tokens)" if seen else ""
            raise EmptyDataError(
                f"no usable sample for task {task!r}{detail}: pass non-empty batches whose samples have "
                "label tokens (labels != -100)"
            )
        state = self.tasks[task]
        dtype = self.storage_dtype or self.accumulation_dtype
        mean, var = {}, {}
        for name, acc in state.accumulators.items():
            mean[name] = acc.mean.to(device=self.storage_device, dtype=dtype)
            var[name] = acc.variance().to(device=self.storage_device, dtype=dtype)
        return Fisher(
            mean, var,
            reduction=self.reduction,
            groups=dict(self.groups),
            param_shapes=dict(self.param_shapes),
            counts=Counts(samples=state.samples, tokens=state.tokens, skipped=state.skipped, nonfinite=state.nonfinite),
            metadata=self._metadata(task, model_name_or_path, data_description, dtype),
            layout=self.layout,
        )

    def _metadata(self, task, model_name_or_path, data_description, storage_dtype) -> FisherMetadata:
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
            },
        )

    def close(self) -> None:
        """Detach the capture hooks from the model."""
        self.engine.capture.detach()
