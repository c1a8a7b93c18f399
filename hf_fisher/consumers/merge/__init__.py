"""Model merging with Fisher information: one :class:`~hf_fisher.consumers.merge.base.MergeMethod`
class per method, found by name in a registry that plugins extend.

- :mod:`.base`: the ``MergeMethod`` base class and its declared options (:class:`~.base.Option`);
- :mod:`.methods`: the built-in methods (average, task arithmetic, TIES, DARE, Fisher, RegMean,
  KFAC), each with its formula in its docstring;
- :mod:`.registry`: registers the built-ins through ``hf_fisher_register_merge_methods`` and
  looks methods up by name (:func:`~.registry.get`);
- :mod:`.api`: :func:`~.api.merge_with_fisher` (checks, streaming merge, validation tuning);
- :mod:`.recipe`: the mergekit-like recipe (read, validate, write);
- :mod:`.io` (tensor sources, sharded writer), :mod:`.lora` (PEFT adapters in delta-W space),
  :mod:`.kfac` (Kronecker-factored blocks), :mod:`.regmean` (input Grams), :mod:`.math`
  (the per-tensor formulas).
"""

from __future__ import annotations

from typing import Any

__all__ = ["MergeMethod", "Option", "TensorInputs", "merge_with_fisher"]


def __getattr__(name: str) -> Any:  # lazy: importing the package imports neither torch nor transformers
    if name == "merge_with_fisher":
        from .api import merge_with_fisher

        return merge_with_fisher
    if name in ("MergeMethod", "Option", "TensorInputs"):
        from . import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
