"""The plugin contract: every hook a plugin can implement.

hf_fisher is built from plugins. The built-in architecture adapters, estimators, consumers and
per-sample gradient rules register through exactly these hooks, and so do third-party plugins,
which arrive through the entry-point group ``hf_fisher``::

    # pyproject.toml of a plugin distribution
    [project.entry-points.hf_fisher]
    my_plugin = "my_package.hf_fisher_plugin"

    # my_package/hf_fisher_plugin.py
    from hf_fisher import hookimpl

    @hookimpl
    def hf_fisher_register_consumers(register):
        register("my_report", my_report)

Set ``HF_FISHER_DISABLE_PLUGIN_AUTOLOAD=1`` to load only the built-ins, or
``HF_FISHER_PLUGINS=name1,name2`` to load only the listed entry points. A plugin whose import or
registration fails is reported once (plugin, distribution, error) and skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

PROJECT_NAME = "hf_fisher"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec(firstresult=True)
def hf_fisher_model_layout(model: Any) -> Any | None:
    """Describe ``model`` as an architecture-independent :class:`hf_fisher.layout.ModelLayout`.

    Return ``None`` when the model is not one this adapter knows; the first non-``None`` answer
    wins. The built-in generic adapter is ``trylast``; a third-party adapter can override a
    built-in one with ``@hookimpl(tryfirst=True)``. ``model`` may be wrapped by PEFT: parameter
    names in the layout are those of ``model.named_parameters()``.

    Example::

        @hookimpl
        def hf_fisher_model_layout(model):
            if getattr(model.config, "model_type", None) != "my_arch":
                return None
            builder = LayoutBuilder(model, adapter="my_arch")
            ...  # builder.add_attention(...), builder.add_mlp(...)
            return builder.build()
    """


@hookspec
def hf_fisher_register_estimators(register: Callable[[str, Any], None]) -> None:
    """Register Fisher estimators by name: ``register("empirical", EmpiricalEstimator)``.

    An estimator is a class following :class:`hf_fisher.estimators.base.Estimator`: it lists the
    :class:`~hf_fisher.estimators.base.CollectOptions` fields it uses (``collect_options``) and
    its own keyword options (``own_options``), is built as ``cls(**options)`` with exactly those,
    and exposes ``collect(model, batches, **kwargs)`` returning a :class:`hf_fisher.Fisher` (a
    diagonal), or an artifact type of its own (KFAC factors) with
    ``save_pretrained``/``from_pretrained`` and ``to_diagonal() -> Fisher``.
    :func:`hf_fisher.collect` refuses, before any work, an option the chosen estimator does not
    list, naming the estimators that take it (an estimator that lists nothing gets every option
    and checks them itself). Its docstring states the quantity it returns, with the formula.
    Names are unique across all plugins: an installed (entry-point) plugin that registers a
    taken name is reported and skipped (a built-in wins, else the plugin loaded first); one
    registered in code is a :class:`hf_fisher.errors.PluginError` naming both plugins.
    """


@hookspec
def hf_fisher_register_consumers(register: Callable[[str, Any], None]) -> None:
    """Register consumers of Fisher artifacts by name: ``register("importance", fn)``.

    A consumer is a callable that uses Fisher information: a :class:`hf_fisher.Fisher` artifact
    first where that is all it needs (importance, comparison, natural-gradient scaling), or the
    models/data and artifacts its job takes (``merge(models, fishers, ...)``,
    ``spectrum(model, batches, ...)``). Consumers read artifacts, call the public API
    (:func:`hf_fisher.collect`, which picks the estimator from the registry, and the public
    classes of :mod:`hf_fisher.collect`) and public engine methods only, never an estimator's or
    the collector's internals. Names are unique across all plugins.
    """


@hookspec
def hf_fisher_register_merge_methods(register: Callable[[str, Any], None]) -> None:
    """Register model-merging methods by name: ``register("fisher", FisherMerge)``.

    A merge method is a :class:`hf_fisher.consumers.merge.base.MergeMethod` subclass: its
    docstring states the formula, its class attributes say what it needs (Fisher artifacts, a base
    model, data) and which options it takes, and it merges one tensor (or one layer) at a time.
    ``merge_with_fisher``, LoRA merging, recipes and ``hf-fisher merge`` resolve method names
    through this registry only, so a plugin's method works everywhere a built-in does. Names are
    unique across all plugins (an installed plugin that registers a taken name is reported and
    skipped).
    """


@hookspec
def hf_fisher_register_prune_scores(register: Callable[[str, Any], None]) -> None:
    """Register pruning criteria by name: ``register("mask_fisher", MaskFisherScore)``.

    A prune score is a :class:`hf_fisher.consumers.prune.base.PruneScore` subclass: its
    docstring states the formula, its class attributes say what it needs (a Fisher artifact,
    calibration data, labels) and it scores every candidate unit (or weight). ``prune`` and
    ``hf-fisher prune --score`` resolve names through this registry only. Names are unique across
    all plugins.
    """


@hookspec(firstresult=True)
def hf_fisher_physical_pruner(config: Any) -> Any | None:
    """Return a physical pruner for models with this ``config`` (a ``transformers``
    ``PretrainedConfig``), or ``None`` when this plugin cannot shrink such a model.

    The pruner (:class:`hf_fisher.consumers.prune.physical.PhysicalPruner`) has
    ``check(config, kinds, scope, compensate, terms)``, which refuses from the config alone
    (before the model is loaded) what a smaller config of this architecture cannot describe, and
    ``build(model, units, removed) -> (smaller_model, vocab_map | None)``. Contract of ``build``:
    every parameter slice of every removed unit (``units[k].slices`` for ``k in removed``) is
    cut out, every other tensor is kept bitwise, the new config states the new sizes, and for
    every input ``x`` the smaller model's output equals the masked model's
    (``small(x) == masked(x)`` up to float rounding); ``vocab_map[old] = new`` (−1: removed) after
    vocabulary removal. The first non-``None`` answer wins (``@hookimpl(tryfirst=True)`` to
    override a built-in); the built-in one covers the LLaMA family. Used by
    ``prune(..., physical=True)`` and ``hf-fisher prune --physical``.
    """


@hookspec
def hf_fisher_register_grad_rules(register: Callable[[type, Any], None]) -> None:
    """Register per-sample gradient rules for module types: ``register(MyLayer, MyRule())``.

    A rule turns one recorded call of a module (its inputs and the gradient of the loss with
    respect to its output) into the exact per-sample gradients of the module's *own* trainable
    parameters; see :class:`hf_fisher.engine.rules.GradRule` for the interface. The most
    specific registered type in the module's MRO wins, but only for a subclass whose ``forward``
    the rule knows (``GradRule.applies_to``: by default the registered class's own forward), so
    a subclass that changes the computation never gets a rule written for its parent; modules
    with no applicable rule get the generic ``torch.func`` rule. A rule makes a custom layer
    exact and fast without touching the core.
    """
