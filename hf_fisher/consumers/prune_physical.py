"""Deprecated: moved to :mod:`hf_fisher.consumers.prune.physical` (this alias goes in the next release)."""

import importlib
import sys
import warnings

warnings.warn(
    "hf_fisher.consumers.prune_physical moved to hf_fisher.consumers.prune.physical; import it from there "
    "(this alias is removed in the next release)",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = importlib.import_module("hf_fisher.consumers.prune.physical")
