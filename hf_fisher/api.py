"""The Python API's entry points: :func:`collect`.

The path is straight: :func:`collect` checks the options once
(:class:`~hf_fisher.estimators.base.CollectOptions`), builds the registered estimator with the
options it declares (refusing the others, naming their owners) and returns what the estimator's
``collect`` returns; the estimator drives the collector.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from .artifacts.fisher import Fisher
from .errors import InvalidInputError


def collect(
    model,
    batches: Iterable[Mapping[str, Any]],
    *,
    estimator: str = "empirical",
    reduction: str = "param",
    task: str = "default",
    normalization: str = "mean",
    max_samples: int | None = None,
    progress: bool = True,
    accumulation_dtype: torch.dtype = torch.float64,
    storage_dtype: torch.dtype | None = None,
    storage_device: str | torch.device = "cpu",
    ema_decay: float | None = None,
    on_nonfinite: str = "raise",
    memory_budget_mb: float | None = None,
    train_mode: bool = False,
    task_type: str | None = None,
    data_description: str | None = None,
    model_name_or_path: str | None = None,
    distributed: bool | None = None,
    keep_sample_contributions: bool = False,
    **estimator_options: Any,
) -> Fisher:
    """Collect the Fisher information of ``model`` over ``batches`` and return the artifact.

    ``batches`` yields dicts with ``input_ids`` [B, T] and optionally ``attention_mask`` and
    ``labels`` (-100 = ignored; causal LMs default to ``input_ids``). With the default
    estimator the result is the empirical diagonal Fisher F = mean_i g_i ⊙ g_i with its
    unbiased variance; ``reduction="group"`` sums within heads / kv-heads / channels /
    vocabulary rows (square first, then reduce). See the README for the exact definitions.

    Inside a ``torch.distributed`` process group of several processes (torchrun, accelerate),
    every rank passes its own share of the data and every rank returns the Fisher of all
    ranks' samples, merged exactly (Chan's formula; counts summed; ``metadata.extra
    ["world_size"]``); it is a collective, so every rank must call it, and a rank may have no
    batch. ``max_samples`` applies per rank. ``distributed=False`` returns each rank's own
    Fisher; ``True`` requires an initialised process group.

    ``keep_sample_contributions=True`` (``reduction="group"`` only) also keeps every used
    sample's group contributions ``C_i,g = Σ_{j ∈ g} (g_i ⊙ g_i)_j`` as
    ``fisher.sample_contributions[name]`` (``[n, num_groups]``, in sample order, float32 on the
    CPU or ``storage_dtype``; ``mean_i C_i,g = F_g``), saved to
    ``sample_contributions.safetensors``; :func:`hf_fisher.analysis.uncertainty.unit_intervals` uses
    them for bootstrap intervals. With ``max_samples`` only the used samples are kept. Refused
    (:class:`InvalidInputError`, before any batch is read) with ``reduction="param"``, with
    ``ema_decay``, and when merging across ``torch.distributed`` ranks (see
    :class:`~hf_fisher.collection.collector.FisherCollector`).

    The diagonal estimators (``"empirical"``, ``"true"``) also take the collector's own options
    as keywords (``params``, ``verify``, ``loss_fn``, ``accumulation_device``, ``offload_dir``,
    ``atomic_batches``, ``variance``; see :class:`~hf_fisher.collection.collector.FisherCollector`), e.g.
    ``variance=False``: the mean only, no variance (accumulators of 8 bytes per value instead of
    12 in float32 and 16 in float64; the same mean, bit for bit; ``fisher.has_variance`` False), or
    ``atomic_batches=False``: each parameter's batch moments are merged into its accumulator as
    soon as they are complete instead of staged until the batch is (a lower peak; the same bits;
    a batch that fails after a merge raises :class:`~hf_fisher.errors.PartialBatchError`).
    """
    from .estimators.base import CollectOptions, build_estimator

    options = CollectOptions(
        reduction=reduction, normalization=normalization, accumulation_dtype=accumulation_dtype,
        storage_dtype=storage_dtype, storage_device=storage_device, ema_decay=ema_decay, on_nonfinite=on_nonfinite,
        memory_budget_mb=memory_budget_mb, train_mode=train_mode, task_type=task_type, distributed=distributed,
        keep_sample_contributions=keep_sample_contributions,
    )
    if keep_sample_contributions and _will_merge(distributed):
        raise InvalidInputError(
            "keep_sample_contributions=True is not supported when the Fisher is merged across torch.distributed "
            "ranks (the per-sample contributions are not gathered); pass distributed=False to get each rank's "
            "own Fisher with its own samples' contributions, or collect in a single process"
        )
    est = build_estimator(estimator, options, estimator_options)
    if not _will_merge(distributed):
        batches = _non_empty(batches)  # under several ranks one may have none: the merged result is checked
    elif batches is None:
        batches = ()
    return est.collect(
        model, batches, task=task, max_samples=max_samples, progress=progress,
        model_name_or_path=model_name_or_path, data_description=data_description,
    )


def _will_merge(distributed: bool | None) -> bool:
    from .collection.distributed import is_distributed

    if distributed is False:
        return False
    return is_distributed() or bool(distributed)


def _non_empty(batches):
    from .errors import EmptyDataError

    if batches is None:
        raise EmptyDataError("batches is None: pass an iterable of batch dicts")
    it = iter(batches)
    try:
        first = next(it)
    except StopIteration:
        raise EmptyDataError("no batches: the data is empty; pass at least one batch with input_ids") from None

    def chain():
        yield first
        yield from it

    return chain()
