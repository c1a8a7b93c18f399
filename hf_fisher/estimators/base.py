"""The estimator contract: the options :func:`hf_fisher.collect` hands an estimator, and what an
estimator is.

:func:`hf_fisher.collect` builds one :class:`CollectOptions` (the options every estimator may
receive, validated once, here), resolves the estimator's name in the registry
(:func:`hf_fisher.plugins.estimators`), refuses every option the chosen estimator does not use
(:func:`estimator_options`, naming the estimators that do use it), builds the estimator from the
options it declares and calls its ``collect``. The estimator drives the collection
(:class:`hf_fisher.collection.collector.FisherCollector` for the diagonal estimators); nothing
calls back into the API.

An estimator declares what it takes with two class attributes:

- ``collect_options``: the :class:`CollectOptions` fields it uses (an option left at its default
  is never refused; one set to anything else is refused unless listed here);
- ``own_options``: the keyword options of its own (``mc_samples`` for the true Fisher,
  ``fisher_type`` for KFAC, ...).

A third-party estimator that declares neither is built as before, with every
:class:`CollectOptions` field as a keyword (``distributed`` and ``keep_sample_contributions``
only when set) and its own options, and checks them itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from ..artifacts.fisher import REDUCTIONS
from ..engine.losses import NORMALIZATIONS
from ..errors import InvalidInputError

__all__ = ["ON_NONFINITE", "REDUCTIONS", "CollectOptions", "Estimator", "build_estimator", "check_keep_sample_contributions", "estimator_options"]

#: what to do with a sample whose loss or gradient is not finite
ON_NONFINITE = ("raise", "skip")


def check_choice(what: str, value: Any, choices: tuple) -> None:
    """:class:`InvalidInputError` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise InvalidInputError(f"unknown {what} {value!r}; choose one of {', '.join(map(repr, choices))}")


@dataclass(frozen=True)
class CollectOptions:
    """The options :func:`hf_fisher.collect` hands every estimator (validated on construction).

    reduction: "param" (per element) | "group" (summed within the adapter's groups).
    normalization: the per-sample loss, "mean" | "sum" | "token" (:mod:`hf_fisher.engine.losses`).
    accumulation_dtype: dtype of the running statistics (float64 default).
    storage_dtype, storage_device: dtype (None: the accumulation dtype) and device of the result.
    ema_decay: an exponential moving average with bias correction instead of the plain mean.
    on_nonfinite: "raise" | "skip" a sample whose loss or gradient is not finite.
    memory_budget_mb: the per-sample engine's working memory (None: its default).
    train_mode: run the model in train mode (dropout on).
    task_type: "causal_lm" | "masked_lm" | "sequence_classification" (None: from the model).
    distributed: merge across ``torch.distributed`` ranks (None: when there are several).
    keep_sample_contributions: keep every sample's group contributions (``reduction="group"``).
    """

    reduction: str = "param"
    normalization: str = "mean"
    accumulation_dtype: torch.dtype = torch.float64
    storage_dtype: torch.dtype | None = None
    storage_device: str | torch.device = "cpu"
    ema_decay: float | None = None
    on_nonfinite: str = "raise"
    memory_budget_mb: float | None = None
    train_mode: bool = False
    task_type: str | None = None
    distributed: bool | None = None
    keep_sample_contributions: bool = False

    def __post_init__(self) -> None:
        check_choice("reduction", self.reduction, REDUCTIONS)
        check_keep_sample_contributions(self.keep_sample_contributions, self.reduction, self.ema_decay)
        if self.distributed not in (None, True, False):
            raise InvalidInputError(
                f"distributed must be None (merge when torch.distributed runs several processes), True or False; got {self.distributed!r}"
            )
        if self.distributed:
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()):
                raise InvalidInputError(
                    "distributed=True but torch.distributed is not initialised: launch with torchrun (or accelerate "
                    "launch) and call torch.distributed.init_process_group first, or pass distributed=None/False"
                )
        check_choice("normalization", self.normalization, NORMALIZATIONS)
        check_choice("on_nonfinite", self.on_nonfinite, ON_NONFINITE)
        if self.ema_decay is not None and not (0.0 < float(self.ema_decay) < 1.0):
            raise InvalidInputError(f"ema_decay must be in (0, 1), got {self.ema_decay}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def given(self) -> list[str]:
        """The options set to something other than their default, in field order."""
        out = []
        for f in dataclasses.fields(self):
            value, default = getattr(self, f.name), f.default
            if f.name == "storage_device":
                value, default = torch.device(value), torch.device(default)
            if value != default:
                out.append(f.name)
        return out

    def as_kwargs(self, names: Iterable[str] | None = None) -> dict[str, Any]:
        """``{name: value}`` of ``names`` (None: every option)."""
        return {n: getattr(self, n) for n in (self.names() if names is None else names)}


def check_keep_sample_contributions(keep: Any, reduction: str, ema_decay: float | None) -> None:
    """:class:`InvalidInputError` unless ``keep_sample_contributions=keep`` can be honoured (see
    :class:`~hf_fisher.collection.collector.FisherCollector`): a bool, ``reduction="group"``, no ``ema_decay``."""
    if not isinstance(keep, bool):
        raise InvalidInputError(f"keep_sample_contributions must be True or False, got {keep!r}")
    if not keep:
        return
    if reduction != "group":
        raise InvalidInputError(
            f"keep_sample_contributions=True needs reduction='group' (got reduction={reduction!r}): the per-sample "
            "contributions of a parameter-level Fisher are [n_samples, *param_shape] per parameter, n copies of the "
            "model, far too big to keep; pass reduction='group' to keep the per-sample group sums [n_samples, num_groups]"
        )
    if ema_decay is not None:
        raise InvalidInputError(
            "keep_sample_contributions=True cannot be combined with ema_decay: an EMA Fisher is a weighted mean "
            "that the plain mean of the kept per-sample contributions would not reproduce; drop ema_decay"
        )


@runtime_checkable
class Estimator(Protocol):
    """A Fisher estimator, registered by name through ``hf_fisher_register_estimators``.

    Built with the :class:`CollectOptions` fields it lists in ``collect_options`` and the options
    of its own it lists in ``own_options``, as keywords; ``collect`` returns the artifact: a
    :class:`hf_fisher.Fisher` (a diagonal), or an artifact of its own (KFAC factors) with
    ``save_pretrained``/``from_pretrained`` and ``to_diagonal()``. Its docstring states the
    quantity it returns, with the formula.
    """

    name: ClassVar[str]
    collect_options: ClassVar[frozenset[str]]
    own_options: ClassVar[frozenset[str]]

    def collect(
        self,
        model: torch.nn.Module,
        batches: Iterable[Mapping[str, Any]],
        *,
        task: str = "default",
        max_samples: int | None = None,
        progress: bool = True,
        model_name_or_path: str | None = None,
        data_description: str | None = None,
    ) -> Any: ...


def declares_options(cls: type) -> bool:
    """Whether estimator class ``cls`` lists the options it takes (see the module docstring)."""
    return isinstance(getattr(cls, "collect_options", None), frozenset) and isinstance(getattr(cls, "own_options", None), frozenset)


def estimator_options(name: str, cls: type, options: CollectOptions, own: Mapping[str, Any],
                      registry: Mapping[str, type] | None = None) -> dict[str, Any]:
    """The keyword options to build estimator ``cls`` (registered as ``name``) with.

    Refuses (:class:`InvalidInputError`, before any work) every option it does not use: a
    :class:`CollectOptions` field set away from its default and not in ``cls.collect_options``,
    or an option of its own not in ``cls.own_options``; the message names the estimators of
    ``registry`` (default: every registered one) that do take it. An estimator that declares
    neither list gets every option (as before) and checks them itself.
    """
    if not declares_options(cls):
        legacy = options.as_kwargs()
        for key in ("distributed", "keep_sample_contributions"):
            if key not in options.given():
                del legacy[key]
        return {**legacy, **own}
    unused = [k for k in options.given() if k not in cls.collect_options] + [k for k in own if k not in cls.own_options]
    if unused:
        raise refusal(name, cls, unused, registry)
    return {**options.as_kwargs(sorted(cls.collect_options)), **own}


def refusal(name: str, cls: type, keys: list[str], registry: Mapping[str, type] | None = None) -> InvalidInputError:
    """The error for options ``keys`` that estimator ``name`` does not take, naming their owners."""
    if registry is None:
        from .. import plugins

        registry = plugins.estimators()
    owners = sorted(
        other for other, c in registry.items()
        if other != name and declares_options(c) and any(k in c.collect_options or k in c.own_options for k in keys)
    )
    hint = getattr(cls, "refusal_hint", "")
    return InvalidInputError(
        f"estimator={name!r} has no option {', '.join(keys)}"
        + (f" (an option of {' / '.join(f'estimator={o!r}' for o in owners)}: pass estimator= to use it)" if owners else "")
        + (f"; {hint}" if hint else "")
    )


def build_estimator(name: str, options: CollectOptions, own: Mapping[str, Any]) -> Any:
    """The registered estimator ``name`` built for ``options`` and ``own`` (see :func:`estimator_options`)."""
    from .. import plugins

    available = plugins.estimators()
    if name not in available:
        raise InvalidInputError(f"unknown estimator {name!r}; available: {', '.join(sorted(available))}")
    cls = available[name]
    return cls(**estimator_options(name, cls, options, own, available))

