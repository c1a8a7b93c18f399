"""Collection: from a model and data to accumulated per-sample statistics.

- :mod:`.collector` -- :class:`FisherCollector`, the empirical diagonal Fisher over batches and tasks;
- :mod:`.stats` -- Welford/Chan moments and the bias-corrected EMA (pure tensor math);
- :mod:`.distributed` -- exact merging of those statistics across ``torch.distributed`` ranks;
- :mod:`.gradients` -- per-sample gradients kept on disk (:class:`GradientStore`);
- :mod:`.activations` -- module inputs (token activations) captured over calibration data.

The estimators (:mod:`hf_fisher.estimators`) drive the collector; consumers call the public
entry point :func:`hf_fisher.collect` or read these modules' public classes.

``hf_fisher.collect`` is both this package and the entry point: calling it,
``hf_fisher.collect(model, batches, ...)``, runs :func:`hf_fisher.api.collect`.
"""

from __future__ import annotations

import sys
import types
from typing import Any


class _EntryPoint(types.ModuleType):
    """This package, callable as :func:`hf_fisher.api.collect` (so that ``hf_fisher.collect(...)``
    keeps working once ``hf_fisher.collect.collector`` and its siblings are imported)."""

    def __call__(self, *args: Any, **kwargs: Any):
        from ..api import collect

        return collect(*args, **kwargs)

    @property
    def __signature__(self):
        import inspect

        from ..api import collect

        return inspect.signature(collect)


sys.modules[__name__].__class__ = _EntryPoint
