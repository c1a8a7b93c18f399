"""Pruning by Fisher information and the published baselines: :func:`prune` and :class:`PruneResult`
(:mod:`.core`), the units a run removes (:mod:`.units`), budgets and selection (:mod:`.select`),
the scores as registered classes (:mod:`.base`, :mod:`.scores`, :mod:`.registry`; statistics they
read in :mod:`.statistics`), structured OBS (:mod:`.obs`), the least-squares rescale
(:mod:`.rescale`) and physical removal (:mod:`.physical`, extended by the hook
``hf_fisher_physical_pruner``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["PruneResult", "PruneScore", "ScoreInputs", "prune"]

_LAZY = {"prune": "core", "PruneResult": "core", "PruneScore": "base", "ScoreInputs": "base"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
