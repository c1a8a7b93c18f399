"""Deprecated: moved to :mod:`hf_fisher.artifacts.hub` (this alias is removed in the next release).

``import hf_fisher.integrations.hub`` still works: it warns (``DeprecationWarning``) and is the new module itself
(``sys.modules`` alias), so every name of it, private ones included, keeps working.
"""

import importlib
import sys
import warnings

warnings.warn(
    "hf_fisher.integrations.hub moved to hf_fisher.artifacts.hub; import it from there (hf_fisher.integrations.hub is removed in the next release)",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = importlib.import_module("hf_fisher.artifacts.hub")
