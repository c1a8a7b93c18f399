"""hf_fisher: exact, fast Fisher information of Hugging Face transformers models.

Public API::

    import hf_fisher
    fisher = hf_fisher.collect(model, batches, reduction="group", task="math")
    fisher.save_pretrained("fisher-math")
    fisher = hf_fisher.Fisher.from_pretrained("fisher-math", model=model)
"""

from __future__ import annotations

__version__ = "0.1.0"

from .api import collect
from .collector import FisherCollector
from .errors import HfFisherError
from .fisher import Fisher
from .hookspecs import hookimpl
from .layout import ModelLayout, ParamGroups

__all__ = ["collect", "Fisher", "FisherCollector", "HfFisherError", "hookimpl", "ModelLayout", "ParamGroups", "__version__"]
