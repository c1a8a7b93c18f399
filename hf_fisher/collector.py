"""Deprecated: moved to :mod:`hf_fisher.collection.collector`; this path keeps working for one release."""

import importlib
import sys
import warnings

warnings.warn("hf_fisher.collector is deprecated; import hf_fisher.collection.collector instead", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("hf_fisher.collection.collector")
