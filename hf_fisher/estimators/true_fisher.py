"""The true Fisher estimator (built-in plugin ``"true"``).

The empirical Fisher squares gradients of the *dataset's* labels; the true Fisher takes the
expectation over labels drawn from the *model's own* predictive distribution
``p_θ(y | x) = softmax(z / temperature)``:

    F = mean_i E_{y ~ p_θ(·|x_i)} [ g_i(y) ⊙ g_i(y) ],   g_i(y) = d l_i(x_i, y) / dθ

with l_i the per-sample loss of the normalisation in use ("mean" over the sample's label
positions by default, see :mod:`hf_fisher.engine.losses`). For a language model every label
position t draws its own token, independently: ``y_t ~ p_θ(· | x_<t)`` (causal LM; the masked
positions of a masked LM).

- **Monte Carlo** (default): ``mc_samples = M`` independent draws of every label position;
  ``C_i = (1/M) Σ_m g_i(y^(m)) ⊙ g_i(y^(m))``, an unbiased estimate of the expectation whose
  error shrinks like 1/sqrt(M). Draws come from a ``torch.Generator`` seeded with ``seed``: the
  same seed, data and batches give the same Fisher.
- **Exact** (``exact=True``, single-label sequence classification): the expectation is the
  finite sum ``C_i = Σ_c p_θ(c | x_i) g_i(c) ⊙ g_i(c)`` over the ``K`` classes (K passes).

Each draw is one pass of the same batched per-sample engine with the drawn labels in place of
the dataset's (their probabilities come from one extra forward without gradients), so the
reductions ("param" / "group"), the exactness checks, the padding handling and the Welford
variance are those of the empirical estimator: the variance is ``Var_i(C_i)`` of the
draw-averaged contributions and ``counts.samples`` counts samples, not draws. No double
backward through the softmax is ever taken. Cost: one forward plus M (or K) forward/backward
passes per batch. Memory: one batch of per-sample contributions is kept across the draws
(``[B, *param shape]`` for ``reduction="param"``, ``[B, groups]`` for "group").

The Fisher of a regression or multi-label head is not a categorical expectation: those heads
are refused (:class:`~hf_fisher.errors.UnsupportedError`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch

from ..artifacts.fisher import Fisher
from ..collection.collector import COLLECTOR_OPTIONS, FisherCollector
from ..collection.distributed import rank_seed
from ..engine.losses import CLASSIFICATION_TASKS, IGNORE_INDEX, token_labels
from ..engine.per_sample import ContributionSink
from ..errors import InvalidInputError, NonFiniteError, UnsupportedError
from ..hookspecs import hookimpl
from .base import CollectOptions

__all__ = ["LabelSampler", "TrueFisherEstimator"]


class _DrawBuffer(ContributionSink):
    """Keeps one draw's per-sample contributions (``add`` only: no fused paths)."""

    def __init__(self) -> None:
        self.rows: dict[str, list[torch.Tensor]] = {}

    def reset(self) -> None:
        self.rows = {}

    def add(self, name: str, contributions: torch.Tensor) -> None:
        self.rows.setdefault(name, []).append(contributions)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: (v[0] if len(v) == 1 else torch.cat(v)) for k, v in self.rows.items()}


class LabelSampler:
    """Draws the labels of the true Fisher for one batch: a list of ``(labels, weights)``, one per
    draw, where ``labels`` has the batch's label shape (-100 where no label counts) and
    ``weights[i]`` is draw's weight for sample i (``1/M`` for Monte Carlo, ``p(c | x_i)`` for
    the exact class sum; the weights of a sample sum to 1)."""

    def __init__(self, engine, *, mc_samples: int, temperature: float, exact: bool, seed: int):
        self.engine = engine
        self.mc_samples = mc_samples
        self.temperature = temperature
        self.exact = exact
        # rank 0 (and one process) draws from ``seed``; other ranks from their own stream
        self.generator = torch.Generator().manual_seed(rank_seed(seed))

    def _logits(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            out = self.engine.model(**self.engine.model_inputs(batch))
        logits = out.logits if hasattr(out, "logits") else out[0]
        return logits.detach().to(torch.float64) / self.temperature

    def draws(self, batch: Mapping[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        task = self.engine.task_type
        logits = self._logits(batch)
        B = logits.shape[0]
        if task in CLASSIFICATION_TASKS:
            labels = batch.get("labels")
            valid = torch.ones(B, dtype=torch.bool) if labels is None else (labels.view(B) != IGNORE_INDEX).cpu()
            probs = torch.softmax(logits.view(B, -1), dim=-1).cpu()
            if self.exact:
                out = []
                for c in range(probs.shape[1]):
                    lab = torch.full((B,), IGNORE_INDEX, dtype=torch.long)
                    lab[valid] = c
                    out.append((lab.to(logits.device), probs[:, c].clone()))
                return out
            picks = torch.multinomial(probs, self.mc_samples, replacement=True, generator=self.generator)
            w = torch.full((B,), 1.0 / self.mc_samples, dtype=torch.float64)
            out = []
            for m in range(self.mc_samples):
                lab = torch.where(valid, picks[:, m], torch.full_like(picks[:, m], IGNORE_INDEX))
                out.append((lab.to(logits.device), w))
            return out
        base = token_labels(batch, task).cpu()  # -100 wherever no label counts
        if task == "causal_lm":
            # position t + 1's label is drawn from the prediction at position t
            where = torch.zeros_like(base, dtype=torch.bool)
            where[:, 1:] = base[:, 1:] != IGNORE_INDEX
            source = torch.zeros_like(where)
            source[:, :-1] = where[:, 1:]
        else:
            where = base != IGNORE_INDEX
            source = where
        probs = torch.softmax(logits[source.to(logits.device)], dim=-1).cpu()
        n = probs.shape[0]
        picks = (
            torch.multinomial(probs, self.mc_samples, replacement=True, generator=self.generator)
            if n else torch.zeros((0, self.mc_samples), dtype=torch.long)
        )
        w = torch.full((B,), 1.0 / self.mc_samples, dtype=torch.float64)
        out = []
        for m in range(self.mc_samples):
            lab = torch.full_like(base, IGNORE_INDEX)
            lab[where] = picks[:, m]
            out.append((lab.to(logits.device), w))
        return out


class TrueFisherEstimator:
    """True Fisher: ``F = mean_i E_{y ~ p_θ}[g_i(y) ⊙ g_i(y)]`` (see the module docstring).

    Options (besides every :class:`~hf_fisher.estimators.base.CollectOptions` field and the
    collector's own, as for the empirical Fisher):
        mc_samples: Monte Carlo draws per label position (>= 1; default 1).
        temperature: the predictive distribution is ``softmax(z / temperature)`` (> 0; default 1).
        exact: sum over all classes instead of sampling (single-label sequence classification).
        seed: seed of the label draws.
    """

    name: ClassVar[str] = "true"
    collect_options: ClassVar[frozenset[str]] = frozenset(CollectOptions.names())
    own_options: ClassVar[frozenset[str]] = COLLECTOR_OPTIONS | {"mc_samples", "temperature", "exact", "seed"}

    def __init__(self, *, mc_samples: int = 1, temperature: float = 1.0, exact: bool = False, seed: int = 0, **options: Any):
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise InvalidInputError(f"mc_samples must be an integer >= 1, got {mc_samples!r}")
        if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
            raise InvalidInputError(f"temperature must be a positive finite number, got {temperature!r}")
        if not isinstance(exact, bool):
            raise InvalidInputError(f"exact must be True or False, got {exact!r}")
        self.mc_samples = mc_samples
        self.temperature = float(temperature)
        self.exact = exact
        self.seed = int(seed)
        self.options = options

    def check_model(self, model, task_type: str) -> None:
        """:class:`UnsupportedError` when this estimator cannot give the true Fisher of ``model``
        (a ``task_type`` model): regression and multi-label heads, ``exact`` beyond classifiers."""
        task = task_type
        config = getattr(model.get_base_model() if hasattr(model, "get_base_model") else model, "config", None)
        problem = getattr(config, "problem_type", None)
        if task in CLASSIFICATION_TASKS and problem in ("regression", "multi_label_classification"):
            raise UnsupportedError(
                f"the true Fisher is an expectation over a categorical prediction; this head's problem_type is "
                f"{problem!r}. Use estimator='empirical' for it"
            )
        if task in CLASSIFICATION_TASKS and getattr(config, "num_labels", 2) == 1:
            raise UnsupportedError("the true Fisher of a one-output (regression) head is not defined here; use estimator='empirical'")
        if self.exact and task not in CLASSIFICATION_TASKS:
            raise UnsupportedError(
                f"exact=True sums over every class, which is only tractable for classifiers (sequence classification, image / audio classification); this is a "
                f"{task} model (a vocabulary per token). Use Monte Carlo draws: exact=False, mc_samples=M"
            )

    def collect(
        self,
        model,
        batches: Iterable[Mapping[str, Any]],
        *,
        task: str = "default",
        max_samples: int | None = None,
        progress: bool = True,
        model_name_or_path: str | None = None,
        data_description: str | None = None,
    ) -> Fisher:
        from tqdm.auto import tqdm

        if max_samples is not None and max_samples <= 0:
            raise InvalidInputError(f"max_samples must be positive, got {max_samples}")
        collector = FisherCollector.for_estimator(self.name, model, **self.options)
        try:
            self.check_model(collector.model, collector.task_type)
            sampler = LabelSampler(
                collector.engine, mc_samples=self.mc_samples, temperature=self.temperature, exact=self.exact, seed=self.seed
            )
            bar = tqdm(total=max_samples, desc=f"true Fisher[{task}]", unit="sample", disable=not progress)
            try:
                for batch in batches:
                    remaining = None if max_samples is None else max_samples - collector.samples_seen(task)
                    if remaining is not None and remaining <= 0:
                        break
                    bar.update(_update(collector, sampler, batch, task, remaining))
            finally:
                bar.close()
            extra = {"true_fisher": {"mc_samples": None if self.exact else self.mc_samples, "exact": self.exact,
                                     "temperature": self.temperature, "seed": self.seed}}
            return collector.fisher(task, model_name_or_path=model_name_or_path, data_description=data_description, extra=extra,
                                    release=True)
        finally:
            collector.close()


def _update(collector: FisherCollector, sampler: LabelSampler, batch, task: str, limit: int | None) -> int:
    """One batch: every draw through the engine, contributions combined per sample with the
    draws' weights, then added to the task's accumulators. Returns the samples used."""
    engine = collector.engine
    index = collector.batches_seen(task)
    model = collector.model
    was_training = model.training
    model.train(collector.train_mode)
    try:
        prepared = engine.prepare(batch, index)
        total: dict[str, torch.Tensor] = {}
        first = None
        for labels, weights in sampler.draws(prepared):
            buf = _DrawBuffer()
            report = engine.process({**prepared, "labels": labels}, buf, batch_index=index, limit=limit)
            if first is None:
                first = report
            elif report.used_index != first.used_index:
                raise NonFiniteError(
                    f"batch {index}: the true Fisher's draws used different samples ({first.used_index} vs "
                    f"{report.used_index}): a drawn label gives a non-finite gradient; check the model's weights and dtype"
                )
            rows = weights[report.used_index] if report.used_index else weights[:0]
            for name, c in buf.tensors().items():
                scaled = c * rows.to(device=c.device, dtype=c.dtype).view(-1, *([1] * (c.dim() - 1)))
                if name in total:
                    total[name].add_(scaled)
                else:
                    total[name] = scaled
    finally:
        model.train(was_training)
    assert first is not None
    collector.add_contributions(task, total, first)
    return first.used


@hookimpl
def hf_fisher_register_estimators(register):
    register("true", TrueFisherEstimator)
