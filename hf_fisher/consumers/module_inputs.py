"""Deprecated: moved to :mod:`hf_fisher.collection.activations`; this path keeps working for one release."""

import importlib
import sys
import warnings

warnings.warn("hf_fisher.consumers.module_inputs is deprecated; import hf_fisher.collection.activations instead", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("hf_fisher.collection.activations")
