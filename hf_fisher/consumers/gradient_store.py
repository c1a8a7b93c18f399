"""Deprecated: moved to :mod:`hf_fisher.collection.gradients`; this path keeps working for one release."""

import importlib
import sys
import warnings

warnings.warn("hf_fisher.consumers.gradient_store is deprecated; import hf_fisher.collection.gradients instead", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("hf_fisher.collection.gradients")
