"""The exception hierarchy: every error hf_fisher raises on purpose derives from HfFisherError.

Messages say what was wrong and what to do about it.
"""

from __future__ import annotations


class HfFisherError(Exception):
    """Root of every error raised by hf_fisher."""


class InvalidInputError(HfFisherError, ValueError):
    """A batch, a dataset or an argument is malformed (out-of-range token ids, empty data...)."""


class EmptyDataError(InvalidInputError):
    """The data yielded no usable sample (no batches, or every sample had no label token)."""


class NoTrainableParametersError(HfFisherError, ValueError):
    """The model has no parameter with requires_grad=True, so there is no Fisher to collect."""


class NonFiniteError(HfFisherError, FloatingPointError):
    """A loss or a per-sample gradient is NaN or Inf."""


class ModelMismatchError(HfFisherError, ValueError):
    """A Fisher artifact does not match the model it is used with (names or shapes differ)."""


class PluginError(HfFisherError, RuntimeError):
    """A plugin is broken or conflicts with another (e.g. two plugins register the same name)."""


class ArtifactError(HfFisherError, OSError):
    """A Fisher artifact folder is missing, incomplete or malformed."""


class UnsupportedError(HfFisherError, NotImplementedError):
    """The requested computation cannot be done exactly for this model/configuration."""


class PartialBatchError(HfFisherError, RuntimeError):
    """A batch failed after part of it had been merged into a collector's accumulators
    (``FisherCollector(atomic_batches=False)``), which cannot be undone exactly: the collector
    refuses every later use."""


class DistributedMismatchError(HfFisherError, ValueError):
    """The ranks of a process group do not hold the same accumulators (names, shapes, settings),
    so their Fisher cannot be merged."""


def regex_argument(name: str, value: str):
    """``re.compile(value)`` for the argument ``name`` (a parameter-name pattern), or an
    :class:`InvalidInputError` that names the argument and the regex error."""
    import re

    try:
        return re.compile(value)
    except re.error as e:
        raise InvalidInputError(f"{name}={value!r} is not a valid regular expression: {e}") from None
