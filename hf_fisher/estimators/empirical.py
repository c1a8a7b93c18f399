"""The empirical Fisher estimator (built-in plugin).

Returns the empirical diagonal Fisher F = (1/N) sum_i g_i ⊙ g_i, with g_i the gradient of
sample i's loss on its dataset labels (normalisation "mean" | "sum" | "token", see
:mod:`hf_fisher.engine.losses`), its unbiased variance Var_i(g_i ⊙ g_i) and the counts, per
element (``reduction="param"``) or summed within the architecture adapter's groups
(``reduction="group"``). Exact: every g_i comes from one batched forward/backward.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from ..artifacts.fisher import Fisher
from ..collection.collector import COLLECTOR_OPTIONS, FisherCollector
from ..hookspecs import hookimpl
from .base import CollectOptions


class EmpiricalEstimator:
    """Empirical diagonal Fisher: F = mean_i (d l_i/dθ)², labels from the data.

    Takes every :class:`~hf_fisher.estimators.base.CollectOptions` field and the collector's
    own options (``params``, ``verify``, ``loss_fn``, ``accumulation_device``: see
    :class:`~hf_fisher.collection.collector.FisherCollector`).
    """

    name: ClassVar[str] = "empirical"
    collect_options: ClassVar[frozenset[str]] = frozenset(CollectOptions.names())
    own_options: ClassVar[frozenset[str]] = COLLECTOR_OPTIONS

    def __init__(self, **options: Any):
        self.options = options

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
        collector = FisherCollector(model, estimator=self.name, **self.options)
        try:
            collector.collect(batches, task, max_samples=max_samples, progress=progress)
            return collector.fisher(task, model_name_or_path=model_name_or_path, data_description=data_description, release=True)
        finally:
            collector.close()


@hookimpl
def hf_fisher_register_estimators(register):
    register("empirical", EmpiricalEstimator)
