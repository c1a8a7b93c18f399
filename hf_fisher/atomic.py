"""Deprecated: moved to :mod:`hf_fisher.artifacts.atomic` (this alias is removed in the next release).

``import hf_fisher.atomic`` still works: it warns (``DeprecationWarning``) and is the new module itself
(``sys.modules`` alias), so every name of it, private ones included, keeps working.
"""

import importlib
import sys
import warnings

warnings.warn(
    "hf_fisher.atomic moved to hf_fisher.artifacts.atomic; import it from there (hf_fisher.atomic is removed in the next release)",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = importlib.import_module("hf_fisher.artifacts.atomic")
