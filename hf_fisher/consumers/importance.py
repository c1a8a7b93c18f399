"""Deprecated alias of :mod:`hf_fisher.analysis.importance`, where this module moved (this path goes in the next release)."""

import importlib
import sys
import warnings

warnings.warn(
    "hf_fisher.consumers.importance moved to hf_fisher.analysis.importance; import it from there (the old path is an alias that goes in the next release)",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = importlib.import_module("hf_fisher.analysis.importance")
