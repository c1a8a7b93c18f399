"""Deprecated: moved to :mod:`hf_fisher.collection.distributed`; this path keeps working for one release."""

import importlib
import sys
import warnings

warnings.warn("hf_fisher.integrations.distributed is deprecated; import hf_fisher.collection.distributed instead", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("hf_fisher.collection.distributed")
