"""Deprecated: moved to :mod:`hf_fisher.consumers.merge.lora` (this alias goes in the next release)."""

import importlib
import sys
import warnings

warnings.warn(
    "hf_fisher.consumers.merge_lora moved to hf_fisher.consumers.merge.lora; import it from there",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = importlib.import_module("hf_fisher.consumers.merge.lora")
