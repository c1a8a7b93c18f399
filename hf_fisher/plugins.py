"""The plugin manager: built-in plugins, entry-point plugins, and the registries built from them.

Loading (lazy, once per process, on the first call of any function here):

1. the built-in plugin modules of :data:`BUILTIN_PLUGINS`, imported by dotted name and
   registered through the same hooks as third-party plugins;
2. every entry point of the group ``hf_fisher`` (``[project.entry-points.hf_fisher]``), unless
   ``HF_FISHER_DISABLE_PLUGIN_AUTOLOAD`` is set to a true value (``1``, ``true``, ``yes``, ``on``).
   ``HF_FISHER_PLUGINS=name1,name2`` is an allow-list of entry-point names (set but empty: none).

A plugin whose import, registration or registry hook fails is reported once (a log record
naming the plugin, its distribution and the error; ERROR level for built-ins, WARNING for
third-party ones), listed by :func:`failed_plugins`, and skipped; everything else keeps working.

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
from dataclasses import dataclass, field
from typing import Any, Callable

import pluggy

from hf_fisher import hookspecs
from hf_fisher.errors import HfFisherError, PluginError
from hf_fisher.hookspecs import PROJECT_NAME, hookimpl
from hf_fisher.layout import ModelLayout, layer_of

__all__ = [
    "BUILTIN_PLUGINS",
    "BUILTIN_DISTRIBUTION",
    "ENTRY_POINT_GROUP",
    "hookimpl",
    "get_plugin_manager",
    "register",
    "unregister",
    "reset",
    "failed_plugins",
    "list_plugins",
    "estimators",
    "consumers",
    "grad_rules",
    "grad_rule_for",
    "model_layout",
    "describe",
]

logger = logging.getLogger("hf_fisher.plugins")

BUILTIN_PLUGINS: tuple[str, ...] = (
    "hf_fisher.architectures.llama",
    "hf_fisher.architectures.gpt2",
    "hf_fisher.architectures.moe",
    "hf_fisher.architectures.generic",
    "hf_fisher.engine.rules",
    "hf_fisher.engine.moe",
    "hf_fisher.estimators.empirical",
    "hf_fisher.estimators.true_fisher",
    "hf_fisher.estimators.kfac",
    "hf_fisher.consumers.importance",
    "hf_fisher.estimators.spectrum",
    "hf_fisher.consumers.natural_gradient",
    "hf_fisher.consumers.merging",
    "hf_fisher.consumers.compare_estimators",
    "hf_fisher.consumers.pruning",
    "hf_fisher.consumers.overlap",
    "hf_fisher.consumers.perturb",
    "hf_fisher.consumers.report",
    "hf_fisher.consumers.head_behaviour",
    "hf_fisher.consumers.conflicts",
    "hf_fisher.consumers.qkov",
    "hf_fisher.consumers.analyze",
)
BUILTIN_DISTRIBUTION = "hf-fisher"
ENTRY_POINT_GROUP = PROJECT_NAME
ENV_DISABLE_AUTOLOAD = "HF_FISHER_DISABLE_PLUGIN_AUTOLOAD"
ENV_ALLOW_LIST = "HF_FISHER_PLUGINS"

_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class _PluginInfo:
    name: str
    distribution: str | None
    version: str | None
    builtin: bool


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


def _load_entry_points(state: _State) -> None:
    if os.environ.get(ENV_DISABLE_AUTOLOAD, "").strip().lower() in _TRUE:
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
        state.info[name] = _PluginInfo(name, distribution, None, False)
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


def _build_registry(
    state: _State, hook: str, check_key: Callable[[Any], None], describe_key: Callable[[Any], str]
) -> dict[Any, tuple[Any, str]]:
    """Call every implementation of ``hook`` with its own ``register``; key -> (value, plugin)."""
    entries: dict[Any, tuple[Any, str]] = {}
    for impl in _impls(state, hook):
        staged: list[tuple[Any, Any]] = []

        def register_(key: Any, value: Any, _staged: list = staged) -> None:
            check_key(key)
            _staged.append((key, value))

        info = state.info.get(impl.plugin_name)
        try:
            impl.function(*[register_ for _ in impl.argnames])
        except Exception as exc:
            _report(
                state, impl.plugin_name, info.distribution if info else None, hook, exc,
                builtin=bool(info and info.builtin),
            )
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
    estimator, consumer and grad rule, with keys ``kind`` ("adapter" | "estimator" | "consumer"
    | "grad_rule"), ``name``, ``plugin`` and ``distribution`` ("hf-fisher" for built-ins).
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
    for kind in ("estimator", "consumer", "grad_rule"):
        for key, (_, plugin) in sorted(_registry(kind).items(), key=lambda kv: str(kv[0] if isinstance(kv[0], str) else _type_name(kv[0]))):
            out.append(
                {"kind": kind, "name": key if isinstance(key, str) else _type_name(key), "plugin": plugin,
                 "distribution": _distribution(state, plugin)}
            )
    return out
