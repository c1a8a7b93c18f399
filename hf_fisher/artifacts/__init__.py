"""The artifact layer: what ``collect`` produces and every consumer reads.

- :mod:`~hf_fisher.artifacts.base`: :class:`ArtifactHubMixin`, the one ``save_pretrained`` /
  ``from_pretrained`` / ``push_to_hub`` of every artifact (atomic write, one overwrite policy,
  validation on load, Hub download and upload), modelled on huggingface_hub's ``ModelHubMixin``;
- :mod:`~hf_fisher.artifacts.format`: file names, the checked config schema, JSON and safetensors
  I/O, safe file paths, the default shard size;
- :mod:`~hf_fisher.artifacts.metadata`: :class:`Counts`, :class:`FisherMetadata`;
- :mod:`~hf_fisher.artifacts.values`: :class:`ValueCheck` and the other checks on load;
- :mod:`~hf_fisher.artifacts.fisher`: :class:`Fisher`, the diagonal Fisher artifact;
- :mod:`~hf_fisher.artifacts.reader`: :class:`FisherReader`, :func:`open_tensor` (lazy reading);
- :mod:`~hf_fisher.artifacts.kfac`: :class:`KFACFisher`, the Kronecker-factored artifact;
- :mod:`~hf_fisher.artifacts.cards`: model cards; :mod:`~hf_fisher.artifacts.hub`: the Hub;
  :mod:`~hf_fisher.artifacts.atomic`: crash-safe folder writes.

This layer imports nothing from :mod:`hf_fisher.analysis` or :mod:`hf_fisher.consumers` at import
time (the analysis shortcuts of :class:`Fisher` and the model card import them when called).
Names are imported lazily (PEP 562), so ``import hf_fisher.artifacts.atomic`` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "ArtifactHubMixin": "base",
    "Counts": "metadata",
    "FisherMetadata": "metadata",
    "Fisher": "fisher",
    "FisherReader": "reader",
    "open_tensor": "reader",
    "KFACFisher": "kfac",
    "KFACLayer": "kfac",
    "ValueCheck": "values",
    "LOAD_PROBLEMS_KEY": "values",
    "DEFAULT_MAX_SHARD_SIZE": "format",
    "is_artifact_file": "format",
    "is_kfac_artifact_file": "format",
}

__all__ = [
    "DEFAULT_MAX_SHARD_SIZE",
    "LOAD_PROBLEMS_KEY",
    "ArtifactHubMixin",
    "Counts",
    "Fisher",
    "FisherMetadata",
    "FisherReader",
    "KFACFisher",
    "KFACLayer",
    "ValueCheck",
    "is_artifact_file",
    "is_kfac_artifact_file",
    "open_tensor",
]

if TYPE_CHECKING:
    from .base import ArtifactHubMixin
    from .fisher import Fisher
    from .format import DEFAULT_MAX_SHARD_SIZE, is_artifact_file, is_kfac_artifact_file
    from .kfac import KFACFisher, KFACLayer
    from .metadata import Counts, FisherMetadata
    from .reader import FisherReader, open_tensor
    from .values import LOAD_PROBLEMS_KEY, ValueCheck


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
