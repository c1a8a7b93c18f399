"""Merge methods by name: the built-ins register here through ``hf_fisher_register_merge_methods``
(this module is a built-in plugin), plugins through the same hook; :func:`get` looks a name up.

Every caller (``merge_with_fisher``, LoRA merging, recipes, ``hf-fisher merge``) resolves names
here only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from hf_fisher.errors import InvalidInputError, PluginError
from hf_fisher.hookspecs import hookimpl

from .base import MergeMethod, Option

__all__ = ["available", "build", "get", "option_catalogue"]

logger = logging.getLogger(__name__)


@hookimpl
def hf_fisher_register_merge_methods(register) -> None:
    from .methods import BUILTINS

    for cls in BUILTINS:
        register(cls.name, cls)


def available() -> dict[str, type[MergeMethod]]:
    """Every registered merge method (built-ins and plugins) by name."""
    from hf_fisher import plugins

    methods = plugins.merge_methods()
    for name, cls in methods.items():
        if not (isinstance(cls, type) and issubclass(cls, MergeMethod)):
            raise PluginError(
                f"merge method {name!r} is registered as {cls!r}, not a subclass of "
                "hf_fisher.consumers.merge.base.MergeMethod"
            )
    return methods


def get(name: Any) -> type[MergeMethod]:
    """The merge-method class registered as ``name``; :class:`InvalidInputError` listing the
    known names otherwise."""
    methods = available()
    if not isinstance(name, str) or name not in methods:
        raise InvalidInputError(f"unknown method {name!r}: method must be one of {list(methods)}")
    return methods[name]


def option_catalogue() -> dict[str, Option]:
    """Every option name any registered method declares, with its first declaration (the built-ins
    share one declaration per option)."""
    out: dict[str, Option] = {}
    for cls in available().values():
        for o in cls.options:
            out.setdefault(o.name, o)
    return out


def build(method: str | MergeMethod, options: Mapping[str, Any]) -> MergeMethod:
    """The method instance for ``method`` (a name or an instance) with ``options``: each option is
    checked by its declaration (an option the method does not take is still checked, by the
    method that declares it, then ignored); an option no registered method takes is refused."""
    catalogue = option_catalogue()
    unknown = sorted(set(options) - set(catalogue))
    if unknown:
        raise InvalidInputError(f"unknown merge option(s) {unknown}; known: {sorted(catalogue)}")
    if isinstance(method, MergeMethod):
        cls = type(method)
        if available().get(cls.name) is not cls:  # its recipe must read back
            raise InvalidInputError(
                f"method {method!r} is not registered (as {cls.name!r}); register its class through the hook "
                "hf_fisher_register_merge_methods, or pass its name"
            )
        base = method.values()
    else:
        cls = get(method)
        base = {}
    own = {o.name for o in cls.options}
    for k, v in options.items():
        if k not in own and v is not None:
            catalogue[k].check(v)
            logger.debug("merge method %r does not use option %s=%r; ignored", cls.name, k, v)
    return cls(**{**base, **{k: v for k, v in options.items() if k in own}})
