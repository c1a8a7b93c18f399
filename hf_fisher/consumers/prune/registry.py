"""The prune-score registry: built-in scores and the LLaMA-family physical pruner, registered
through the same hooks as plugins (this module is listed in ``hf_fisher.plugins.BUILTIN_PLUGINS``).

:func:`get_score` resolves a name through :func:`hf_fisher.plugins.prune_scores` only, so a
plugin's score works wherever a built-in one does (``prune(score=...)``, ``hf-fisher prune
--score``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hf_fisher.errors import InvalidInputError
from hf_fisher.hookspecs import hookimpl

__all__ = ["get_score", "hf_fisher_physical_pruner", "hf_fisher_register_prune_scores", "score_names"]


@hookimpl
def hf_fisher_register_prune_scores(register: Callable[[str, Any], None]) -> None:
    from hf_fisher.consumers.prune.scores import BUILTIN_SCORES

    for cls in BUILTIN_SCORES:
        register(cls.name, cls)


@hookimpl(trylast=True)
def hf_fisher_physical_pruner(config: Any) -> Any | None:
    from hf_fisher.architectures.llama import MODEL_TYPES
    from hf_fisher.consumers.prune.physical import LlamaPhysicalPruner

    return LlamaPhysicalPruner() if getattr(config, "model_type", None) in MODEL_TYPES else None


def score_names() -> list[str]:
    """Every registered score name (built-ins first, in registration order)."""
    from hf_fisher import plugins

    return list(plugins.prune_scores())


def get_score(name: str, *, terms: str = "score={!r}"):
    """The :class:`~hf_fisher.consumers.prune.base.PruneScore` subclass registered as ``name``;
    an unknown name is an :class:`~hf_fisher.errors.InvalidInputError` listing the known ones."""
    from hf_fisher import plugins
    from hf_fisher.consumers.prune.base import PruneScore

    registry = plugins.prune_scores()
    cls = registry.get(name) if isinstance(name, str) else None
    if cls is None:
        raise InvalidInputError(
            f"unknown score {name!r} ({terms.format(name)}); choose one of {', '.join(registry)} "
            "(plugins add more: hf-fisher plugins lists them)"
        )
    if not (isinstance(cls, type) and issubclass(cls, PruneScore)):
        raise InvalidInputError(f"prune score {name!r} is registered as {cls!r}, not a PruneScore subclass")
    return cls
