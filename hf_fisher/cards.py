"""Deprecated: moved to :mod:`hf_fisher.artifacts.cards` (this alias is removed in the next release).

``import hf_fisher.cards`` still works: it warns (``DeprecationWarning``) and is the new module itself
(``sys.modules`` alias), so every name of it, private ones included, keeps working.
"""

import importlib
import sys
import warnings

warnings.warn(
    "hf_fisher.cards moved to hf_fisher.artifacts.cards; import it from there (hf_fisher.cards is removed in the next release)",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = importlib.import_module("hf_fisher.artifacts.cards")
