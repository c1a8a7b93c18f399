"""The plugin manager: built-in plugins, entry-point plugins, and the registries built from them.

Loading (lazy, once per process, on the first call of any function here):

1. the built-in plugin modules of :data:`BUILTIN_PLUGINS`, imported by dotted name and
   registered through the same hooks as third-party plugins;
2. every entry point of the group ``hf_fisher`` (``[project.entry-points.hf_fisher]``), unless
   ``HF_FISHER_DISABLE_PLUGIN_AUTOLOAD`` is true (``1``, ``true``, ``yes``, ``on``; ``0``,
   ``false``, ``no``, ``off`` or empty: false; any case; anything else is a
   :class:`~hf_fisher.errors.InvalidInputError` naming the variable).
   ``HF_FISHER_PLUGINS=name1,name2`` is an allow-list of entry-point names (set but empty: none).

A plugin whose import, registration or registry hook fails is reported once (a log record
naming the plugin, its distribution and the error; ERROR level for built-ins, WARNING for
third-party ones), listed by :func:`failed_plugins`, and skipped; everything else keeps working.

Conflicts. An entry-point plugin that registers an estimator or consumer name, or a grad rule's
module type, that is already taken is skipped as a whole (reported as above, stage
``"conflict"``): a built-in always wins over an entry-point plugin, and between two entry-point
plugins the one loaded first (entry-point order) wins. A plugin registered in code with
:func:`register` that clashes is an error instead (:class:`PluginError` naming both plugins,
raised by the registry that holds the clash): code that asks for a plugin gets it or an error.

Registries (:func:`estimators`, :func:`consumers`, :func:`grad_rules`) are built lazily from the
``hf_fisher_register_*`` hooks and cached; :func:`register` / :func:`unregister` /
:func:`reset` invalidate the caches. Layouts (:func:`model_layout`) are not cached.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from hf_fisher import hookspecs
from hf_fisher.errors import HfFisherError, InvalidInputError, PluginError
from hf_fisher.hookspecs import PROJECT_NAME, hookimpl
from hf_fisher.layout import ModelLayout, layer_of

__all__ = [
    "BUILTIN_DISTRIBUTION",
    "BUILTIN_PLUGINS",
    "ENTRY_POINT_GROUP",
    "consumers",
    "describe",
    "estimators",
    "failed_plugins",
    "get_plugin_manager",
    "grad_rule_for",
    "grad_rules",
    "hookimpl",
    "list_plugins",
    "model_layout",
    "register",
    "reset",
    "unregister",
]

logger = logging.getLogger(__name__)

BUILTIN_PLUGINS: tuple[str, ...] = (
    "hf_fisher.architectures.llama",
    "hf_fisher.architectures.gpt2",
    "hf_fisher.architectures.moe",
    "hf_fisher.architectures.encdec",
    "hf_fisher.architectures.vit",
    "hf_fisher.architectures.generic",
    "hf_fisher.engine.rules",
    "hf_fisher.engine.moe",
    "hf_fisher.estimators.empirical",
    "hf_fisher.estimators.true_fisher",
    "hf_fisher.estimators.kfac",
    "hf_fisher.analysis.importance",
    "hf_fisher.consumers.spectrum",
    "hf_fisher.consumers.natural_gradient",
    "hf_fisher.consumers.merge.api",
    "hf_fisher.consumers.merge.registry",
    "hf_fisher.consumers.compare_estimators",
    "hf_fisher.consumers.prune.core",
    "hf_fisher.consumers.prune.registry",
    "hf_fisher.consumers.overlap",
    "hf_fisher.consumers.perturb",
    "hf_fisher.consumers.report",
    "hf_fisher.consumers.circuits.head_behaviour",
    "hf_fisher.consumers.circuits.conflicts",
    "hf_fisher.consumers.circuits.qkov",
    "hf_fisher.consumers.analyze",
)
BUILTIN_DISTRIBUTION = "hf-fisher"
ENTRY_POINT_GROUP = PROJECT_NAME
ENV_DISABLE_AUTOLOAD = "HF_FISHER_DISABLE_PLUGIN_AUTOLOAD"
ENV_ALLOW_LIST = "HF_FISHER_PLUGINS"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


@dataclass(frozen=True)
class _PluginInfo:
    name: str
    distribution: str | None
    version: str | None
    builtin: bool
    explicit: bool = False  # registered in code with register(), not loaded from an entry point


@dataclass
class _State:
    pm: pluggy.PluginManager
    info: dict[str, _PluginInfo] = field(default_factory=dict)
    failed: list[dict[str, str | None]] = field(default_factory=list)
    reported: set[tuple[str, str]] = field(default_factory=set)
    cache: dict[str, Any] = field(default_factory=dict)


_lock = threading.RLock()
_state: _State | None = None


# --------------------------------------------------------------------------------------------
# loading


def _report(state: _State, name: str, distribution: str | None, stage: str, error: BaseException | str, *, builtin: bool) -> None:
    """Record a broken plugin and log it, once per (plugin, stage)."""
    key = (name, stage)
    if key in state.reported:
        return
    state.reported.add(key)
    err = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    state.failed.append({"name": name, "distribution": distribution, "error": err, "stage": stage})
    if builtin:
        logger.error(
            "built-in hf_fisher plugin %r failed (%s) and is skipped: %s -- this is a bug in hf_fisher, "
            "please report it", name, stage, err,
        )
    else:
        logger.warning(
            "hf_fisher plugin %r from distribution %r failed (%s) and is skipped: %s -- fix or "
            "uninstall it, or leave it out with %s / %s", name, distribution, stage, err,
            ENV_ALLOW_LIST, ENV_DISABLE_AUTOLOAD,
        )


def _unknown_hooks(pm: pluggy.PluginManager, plugin: Any) -> list[str]:
    """Hook implementations of ``plugin`` that match no hook specification (typos)."""
    bad = []
    for caller in pm.get_hookcallers(plugin) or []:
        if caller.has_spec():
            continue
        for impl in caller.get_hookimpls():
            if impl.plugin is plugin and not impl.optionalhook:
                bad.append(caller.name)
    return bad


def _register_checked(state: _State, plugin: Any, name: str, info: _PluginInfo) -> bool:
    """Register ``plugin`` under ``name``; report and return False on failure."""
    pm = state.pm
    if pm.has_plugin(name):
        other = state.info.get(name)
        _report(
            state, name, info.distribution, "register",
            f"a plugin named {name!r} is already registered"
            + (f" (from distribution {other.distribution!r})" if other else ""),
            builtin=info.builtin,
        )
        return False
    try:
        pm.register(plugin, name=name)
    except Exception as exc:  # pluggy's validation errors, "already registered" ValueError, ...
        _report(state, name, info.distribution, "register", exc, builtin=info.builtin)
        return False
    unknown = _unknown_hooks(pm, plugin)
    if unknown:
        pm.unregister(plugin=plugin)
        _report(
            state, name, info.distribution, "register",
            f"implements unknown hook(s) {', '.join(sorted(unknown))} (known hooks are in hf_fisher.hookspecs)",
            builtin=info.builtin,
        )
        return False
    state.info[name] = info
    return True


def _load_builtins(state: _State) -> None:
    for modname in BUILTIN_PLUGINS:
        info = _PluginInfo(modname, BUILTIN_DISTRIBUTION, _own_version(), True)
        try:
            module = importlib.import_module(modname)
        except Exception as exc:
            _report(state, modname, BUILTIN_DISTRIBUTION, "import", exc, builtin=True)
            continue
        _register_checked(state, module, modname, info)


def _own_version() -> str | None:
    try:
        return importlib.metadata.version(BUILTIN_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None


def _allow_list() -> set[str] | None:
    raw = os.environ.get(ENV_ALLOW_LIST)
    if raw is None:
        return None
    return {part.strip() for part in raw.split(",") if part.strip()}


def _autoload_disabled() -> bool:
    """``HF_FISHER_DISABLE_PLUGIN_AUTOLOAD`` read as a boolean; a value that is neither is refused."""
    raw = os.environ.get(ENV_DISABLE_AUTOLOAD, "")
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise InvalidInputError(
        f"the environment variable {ENV_DISABLE_AUTOLOAD}={raw!r} is not a boolean: set it to 1, true, yes or on "
        "to leave the installed plugins out, or to 0, false, no or off (or unset it) to load them"
    )


def _load_entry_points(state: _State) -> None:
    if _autoload_disabled():
        logger.debug("%s is set: entry-point plugins are not loaded", ENV_DISABLE_AUTOLOAD)
        return
    allowed = _allow_list()
    seen: set[str] = set()
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        seen.add(ep.name)
        if allowed is not None and ep.name not in allowed:
            continue
        dist = getattr(ep, "dist", None)
        dist_name = dist.metadata["Name"] if dist is not None else None
        version = dist.version if dist is not None else None
        info = _PluginInfo(ep.name, dist_name, version, False)
        try:
            plugin = ep.load()
        except Exception as exc:
            _report(state, ep.name, dist_name, "import", exc, builtin=False)
            continue
        if _register_checked(state, plugin, ep.name, info):
            logger.debug("loaded hf_fisher plugin %r from %s %s", ep.name, dist_name, version)
    if allowed:
        missing = sorted(allowed - seen)
        if missing:
            logger.warning(
                "%s names plugin(s) %s that no installed distribution provides (entry-point group %r)",
                ENV_ALLOW_LIST, ", ".join(missing), ENTRY_POINT_GROUP,
            )


def _get_state() -> _State:
    global _state
    state = _state
    if state is not None:
        return state
    with _lock:
        if _state is None:
            pm = pluggy.PluginManager(PROJECT_NAME)
            pm.add_hookspecs(hookspecs)
            new = _State(pm)
            _load_builtins(new)
            _load_entry_points(new)
            _drop_conflicting(new)
            _state = new
        return _state


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide ``pluggy.PluginManager`` with built-in and entry-point plugins loaded."""
    return _get_state().pm


def reset() -> None:
    """Forget the plugin manager and every cache; the next call loads everything again.

    Meant for tests (e.g. after changing ``HF_FISHER_PLUGINS``).
    """
    global _state
    with _lock:
        _state = None


def register(plugin: Any, name: str | None = None, *, distribution: str | None = None) -> str:
    """Register a plugin object (a module, class or instance with ``@hookimpl`` functions).

    Returns the name it is registered under. Raises :class:`PluginError` when the name is taken
    or the plugin is invalid (e.g. a misspelt hook name). Invalidates the registries.
    """
    state = _get_state()
    with _lock:
        pm = state.pm
        name = name or pm.get_canonical_name(plugin)
        if pm.has_plugin(name):
            raise PluginError(f"a plugin named {name!r} is already registered; unregister it first or pick another name")
        try:
            pm.register(plugin, name=name)
        except Exception as exc:
            raise PluginError(f"cannot register plugin {name!r}: {exc}") from exc
        unknown = _unknown_hooks(pm, plugin)
        if unknown:
            pm.unregister(plugin=plugin)
            raise PluginError(
                f"plugin {name!r} implements unknown hook(s) {', '.join(sorted(unknown))}; "
                "the known hooks are listed in hf_fisher.hookspecs"
            )
        state.info[name] = _PluginInfo(name, distribution, None, False, explicit=True)
        state.cache.clear()
        return name


def unregister(plugin_or_name: Any) -> None:
    """Unregister a plugin given as the object or its name; invalidates the registries."""
    state = _get_state()
    with _lock:
        pm = state.pm
        if isinstance(plugin_or_name, str):
            plugin = pm.get_plugin(plugin_or_name)
        else:
            plugin = plugin_or_name if pm.is_registered(plugin_or_name) else None
        if plugin is None:
            raise PluginError(f"no plugin {plugin_or_name!r} is registered")
        name = pm.get_name(plugin)
        pm.unregister(plugin=plugin)
        if name is not None:
            state.info.pop(name, None)
        state.cache.clear()


def failed_plugins() -> list[dict[str, str | None]]:
    """Plugins that failed and were skipped: dicts with ``name``, ``distribution``, ``error``
    (and ``stage``: "import", "register", or the hook that raised)."""
    return [dict(f) for f in _get_state().failed]


def list_plugins() -> list[dict[str, Any]]:
    """Registered plugins: dicts with ``name``, ``distribution``, ``version``, ``builtin``."""
    state = _get_state()
    with _lock:
        out = []
        for name, _plugin in state.pm.list_name_plugin():
            info = state.info.get(name) or _PluginInfo(name, None, None, False)
            out.append({"name": name, "distribution": info.distribution, "version": info.version, "builtin": info.builtin})
        return out


def _distribution(state: _State, plugin_name: str) -> str | None:
    info = state.info.get(plugin_name)
    return info.distribution if info else None


def _who(state: _State, plugin_name: str) -> str:
    dist = _distribution(state, plugin_name)
    return f"plugin {plugin_name!r} (distribution {dist!r})"


def _impls(state: _State, hook: str) -> list[pluggy.HookImpl]:
    """Implementations of ``hook`` in call order (tryfirst first, trylast last, as pluggy calls)."""
    caller = getattr(state.pm.hook, hook)
    return [i for i in reversed(caller.get_hookimpls()) if not (i.hookwrapper or i.wrapper)]


# --------------------------------------------------------------------------------------------
# registries


def _load_order(state: _State, impls: list[pluggy.HookImpl]) -> list[pluggy.HookImpl]:
    """``impls`` in the order their plugins were loaded (built-ins first, then entry points, then
    plugins registered in code): the order in which names are claimed."""
    order = {name: i for i, name in enumerate(state.info)}
    return sorted(impls, key=lambda impl: order.get(impl.plugin_name, len(order)))


def _staged(state: _State, impl: pluggy.HookImpl, hook: str, check_key: Callable[[Any], None]) -> list[tuple[Any, Any]] | None:
    """Call one implementation of a registry ``hook`` with a collecting ``register``; ``[(key,
    value)]``, or None when it raised (reported)."""
    staged: list[tuple[Any, Any]] = []

    def register_(key: Any, value: Any) -> None:
        check_key(key)
        staged.append((key, value))

    info = state.info.get(impl.plugin_name)
    try:
        impl.function(*[register_ for _ in impl.argnames])
    except Exception as exc:
        _report(
            state, impl.plugin_name, info.distribution if info else None, hook, exc,
            builtin=bool(info and info.builtin),
        )
        return None
    return staged


def _drop_conflicting(state: _State) -> None:
    """Skip (unregister and report) every entry-point plugin that registers a name or type already
    taken: by a built-in, by an entry-point plugin loaded before it, or twice by itself."""
    auto = [n for n, i in state.info.items() if not i.builtin and not i.explicit]
    if not auto:
        return
    pm = state.pm
    hooks = {c.name for n in auto for c in (pm.get_hookcallers(pm.get_plugin(n)) or [])}
    kinds = [(kind, hook, check, desc) for kind, (hook, check, desc) in _KINDS.items() if hook in hooks]
    if not kinds:
        return
    taken: dict[tuple[str, Any], str] = {}  # (kind, key) -> plugin that holds it
    claims: dict[str, list[tuple[str, Any, Callable[[Any], str]]]] = {}  # plugin -> [(kind, key, describe)]
    for kind, hook, check, desc in kinds:
        for impl in _load_order(state, _impls(state, hook)):
            staged = _staged(state, impl, hook, check)
            if staged is None:
                continue
            claims.setdefault(impl.plugin_name, []).extend((kind, key, desc) for key, _ in staged)
    for name in state.info.copy():
        info = state.info[name]
        mine: set[tuple[str, Any]] = set()
        clash = None
        for kind, key, desc in claims.get(name, []):
            if (kind, key) in mine:
                clash = f"registers {desc(key)} twice"
            elif (kind, key) in taken:
                holder = state.info.get(taken[kind, key])
                by = "the built-in " if holder and holder.builtin else ""
                clash = (f"registers {desc(key)}, which {by}{_who(state, taken[kind, key])} already provides "
                         f"({'a built-in always wins' if holder and holder.builtin else 'the plugin loaded first wins'})")
            if clash:
                break
            mine.add((kind, key))
        if clash and not info.builtin and not info.explicit:
            pm.unregister(name=name)
            del state.info[name]
            _report(state, name, info.distribution, "conflict",
                    f"{clash}; the whole plugin is skipped -- uninstall it or leave it out with {ENV_ALLOW_LIST}",
                    builtin=False)
            continue
        for kind, key, _ in claims.get(name, []):
            taken.setdefault((kind, key), name)
    state.cache.clear()


def _build_registry(
    state: _State, hook: str, check_key: Callable[[Any], None], describe_key: Callable[[Any], str]
) -> dict[Any, tuple[Any, str]]:
    """Call every implementation of ``hook`` (in load order) with its own ``register``; key ->
    (value, plugin). Clashes left after :func:`_drop_conflicting` (plugins registered in code,
    built-ins) raise :class:`PluginError` naming both plugins."""
    entries: dict[Any, tuple[Any, str]] = {}
    for impl in _load_order(state, _impls(state, hook)):
        staged = _staged(state, impl, hook, check_key)
        if staged is None:
            continue
        for key, value in staged:
            if key in entries:
                first = entries[key][1]
                raise PluginError(
                    f"{describe_key(key)} is registered by two plugins: {_who(state, first)} and "
                    f"{_who(state, impl.plugin_name)}; uninstall or unregister one of them "
                    f"(or leave one out with {ENV_ALLOW_LIST})"
                )
            entries[key] = (value, impl.plugin_name)
    return entries


def _check_name(key: Any) -> None:
    if not isinstance(key, str) or not key:
        raise PluginError(f"registered names must be non-empty strings, got {key!r}")


def _check_type(key: Any) -> None:
    if not isinstance(key, type):
        raise PluginError(f"grad rules must be registered for a module type (a class), got {key!r}")


def _type_name(t: type) -> str:
    return f"{t.__module__}.{t.__qualname__}"


_KINDS: dict[str, tuple[str, Callable[[Any], None], Callable[[Any], str]]] = {
    "estimator": ("hf_fisher_register_estimators", _check_name, lambda k: f"estimator {k!r}"),
    "consumer": ("hf_fisher_register_consumers", _check_name, lambda k: f"consumer {k!r}"),
    "grad_rule": ("hf_fisher_register_grad_rules", _check_type, lambda k: f"a grad rule for {_type_name(k)}"),
    "merge_method": ("hf_fisher_register_merge_methods", _check_name, lambda k: f"merge method {k!r}"),
    "prune_score": ("hf_fisher_register_prune_scores", _check_name, lambda k: f"prune score {k!r}"),
}


def _registry(kind: str) -> dict[Any, tuple[Any, str]]:
    state = _get_state()
    with _lock:
        if kind not in state.cache:
            hook, check, desc = _KINDS[kind]
            state.cache[kind] = _build_registry(state, hook, check, desc)
        return state.cache[kind]


def estimators() -> dict[str, Any]:
    """Estimator classes by name, from every ``hf_fisher_register_estimators`` implementation.

    Raises :class:`PluginError` naming both plugins when two register the same name.
    """
    return {k: v for k, (v, _) in _registry("estimator").items()}


def consumers() -> dict[str, Any]:
    """Consumer callables by name, from every ``hf_fisher_register_consumers`` implementation."""
    return {k: v for k, (v, _) in _registry("consumer").items()}


def merge_methods() -> dict[str, Any]:
    """Merge-method classes by name, from every ``hf_fisher_register_merge_methods`` implementation."""
    return {k: v for k, (v, _) in _registry("merge_method").items()}


def prune_scores() -> dict[str, Any]:
    """Prune-score classes by name, from every ``hf_fisher_register_prune_scores`` implementation."""
    return {k: v for k, (v, _) in _registry("prune_score").items()}


def grad_rules() -> dict[type, Any]:
    """Per-sample gradient rules by module type, from ``hf_fisher_register_grad_rules``."""
    return {k: v for k, (v, _) in _registry("grad_rule").items()}


def grad_rule_for(module: Any) -> Any | None:
    """The rule of the most specific registered type in ``type(module).__mro__``, else None."""
    rules = _registry("grad_rule")
    for cls in type(module).__mro__:
        if cls in rules:
            return rules[cls][0]
    return None


# --------------------------------------------------------------------------------------------
# layouts


def model_layout(model: Any) -> ModelLayout:
    """The :class:`ModelLayout` of ``model`` from the first adapter that recognises it.

    Adapters (``hf_fisher_model_layout``) are asked in pluggy order (``tryfirst`` first, the
    generic adapter last); the first non-None answer wins. An adapter raising an unexpected
    exception is reported once and skipped; :class:`~hf_fisher.errors.HfFisherError`\\ s
    propagate. The answer is checked against ``model.named_parameters()`` (a misfit raises
    :class:`PluginError` naming the adapter) and completed so that ``groups`` covers *every*
    parameter (generic rules, LoRA inheritance) and ``param_layers`` every parameter whose
    layer is known. Not cached: layouts are cheap and models change.
    """
    from hf_fisher.architectures.builder import complete_groups, validate_layout

    state = _get_state()
    layout = None
    who = None
    for impl in _impls(state, "hf_fisher_model_layout"):
        info = state.info.get(impl.plugin_name)
        try:
            layout = impl.function(*[model for _ in impl.argnames])
        except HfFisherError:
            raise
        except Exception as exc:
            _report(
                state, impl.plugin_name, info.distribution if info else None, "hf_fisher_model_layout", exc,
                builtin=bool(info and info.builtin),
            )
            continue
        if layout is not None:
            who = impl.plugin_name
            break
    if layout is None:
        raise PluginError(
            f"no architecture adapter returned a layout for {type(model).__name__}; the built-in "
            f"generic adapter (hf_fisher.architectures.generic) should always answer -- see failed_plugins()"
        )
    if not isinstance(layout, ModelLayout):
        raise PluginError(f"architecture adapter {who!r} returned {type(layout).__name__}, not a ModelLayout")
    validate_layout(model, layout, str(who))
    layout.groups = complete_groups(model, layout.groups)
    for name in layout.groups:
        if name not in layout.param_layers:
            idx = layer_of(name)
            if idx is not None:
                layout.param_layers[name] = idx
    return layout


# --------------------------------------------------------------------------------------------
# introspection


def _dist_version(dist: str | None) -> str | None:
    if dist is None:
        return None
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe() -> list[dict[str, Any]]:
    """Everything the plugins provide, for ``hf-fisher plugins``.

    One dict per adapter (each plugin implementing ``hf_fisher_model_layout``, in call order),
    estimator, consumer, grad rule, merge method and prune score, with keys ``kind`` ("adapter" |
    "estimator" | "consumer" | "grad_rule" | "merge_method" | "prune_score"), ``name``, ``plugin`` and ``distribution`` ("hf-fisher" for built-ins).
    Adapters also have ``version`` (of their distribution, when installed), ``model_types`` (the
    ``config.model_type`` values the plugin module claims in a ``MODEL_TYPES`` attribute, sorted;
    None when it does not say) and ``order`` ("tryfirst": overrides the others, "trylast": asked
    last, "normal").
    """
    state = _get_state()
    out: list[dict[str, Any]] = []
    for impl in _impls(state, "hf_fisher_model_layout"):
        dist = _distribution(state, impl.plugin_name)
        types = getattr(impl.plugin, "MODEL_TYPES", None)
        out.append(
            {"kind": "adapter", "name": impl.plugin_name, "plugin": impl.plugin_name, "distribution": dist,
             "version": _dist_version(dist), "model_types": sorted(types) if types is not None else None,
             "order": "tryfirst" if impl.tryfirst else "trylast" if impl.trylast else "normal"}
        )
    for kind in ("estimator", "consumer", "grad_rule", "merge_method", "prune_score"):
        for key, (_, plugin) in sorted(_registry(kind).items(), key=lambda kv: str(kv[0] if isinstance(kv[0], str) else _type_name(kv[0]))):
            out.append(
                {"kind": kind, "name": key if isinstance(key, str) else _type_name(key), "plugin": plugin,
                 "distribution": _distribution(state, plugin)}
            )
    return out
