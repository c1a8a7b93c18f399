"""Issue 22, pruning: scores as registered :class:`PruneScore` classes, the ``hf_fisher.consumers.prune``
package, the physical-pruner hook and the deprecated module paths."""

from __future__ import annotations

import importlib
import sys
import warnings

import pytest
import torch

import hf_fisher
from hf_fisher import plugins
from hf_fisher.consumers.prune.base import PruneScore
from hf_fisher.consumers.prune.core import API_TERMS, CLI_TERMS, check_options, prune
from hf_fisher.consumers.prune.physical import LlamaPhysicalPruner
from hf_fisher.errors import InvalidInputError, PluginError, UnsupportedError
from hf_fisher.hookspecs import hookimpl

import tiny_models as tm

pytestmark = pytest.mark.usefixtures("one_thread")

BUILTIN = ["fisher", "kfac", "mask_fisher", "obd", "magnitude", "random", "wanda_sp", "flap", "taylor1", "taylor2"]


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setenv("HF_FISHER_DISABLE_PLUGIN_AUTOLOAD", "1")
    plugins.reset()
    yield
    plugins.reset()


def batches(n=2):
    return [tm.padded_batch((6, 5, 4), seed=i) for i in range(n)]


def options(**kw):
    base = dict(sparsity=0.3, structured=("heads", "channels"), score=None, scope="global", min_per_layer=1,
                confidence=None, physical=False, has_data=False, has_rescale_data=False, fisher=None)
    base.update(kw)
    return base


# ----------------------------------------------------------------------------- the registry
def test_builtin_scores_are_registered_classes_with_formulas(fresh):
    reg = plugins.prune_scores()
    assert list(reg) == BUILTIN
    for name, cls in reg.items():
        assert issubclass(cls, PruneScore) and cls.name == name
        assert cls.__doc__ and "``" in cls.__doc__, name  # the formula, in the docstring
    assert {d["name"] for d in plugins.describe() if d["kind"] == "prune_score"} == set(BUILTIN)
    # what check_options used to read from name sets, now from the classes
    assert {n for n, c in reg.items() if c.needs_fisher} == {"fisher", "obd"}
    assert {n for n, c in reg.items() if c.needs_data} == {"kfac", "mask_fisher", "wanda_sp", "flap", "taylor1", "taylor2"}
    assert {n for n, c in reg.items() if c.output_projection} == {"kfac", "mask_fisher", "wanda_sp", "flap"}
    assert {n for n, c in reg.items() if c.unstructured} == {"fisher", "obd", "magnitude", "random", "taylor1", "taylor2"}


def test_unknown_score_lists_the_registered_names_in_api_and_cli_terms(fresh):
    with pytest.raises(InvalidInputError, match=r"unknown score 'nope' \(score='nope'\); choose one of fisher, kfac, .*taylor2"):
        check_options(**options(score="nope"))
    with pytest.raises(InvalidInputError, match=r"unknown score 'nope' \(--score nope\)"):
        check_options(**options(score="nope"), terms=CLI_TERMS)


class Half(PruneScore):
    """``½ Σ_{S_u} F w²`` read from a Fisher of every weight; test score registered in code."""

    name = "half"
    needs_fisher = True
    fisher_reduction = "param"

    def score_units(self, model, units, inputs):
        from hf_fisher.consumers.prune.statistics import score_units

        return score_units(model, units, "obd", fisher=inputs.fisher, progress=False)[0]


class Plugin:
    @staticmethod
    @hookimpl
    def hf_fisher_register_prune_scores(register):
        register("half", Half)


def test_a_score_registered_in_code_is_checked_from_its_class_and_works(fresh):
    plugins.register(Plugin, "half_plugin")
    assert plugins.prune_scores()["half"] is Half
    with pytest.raises(InvalidInputError, match="score='half' reads a Fisher artifact: pass fisher="):
        check_options(**options(score="half"))
    model = tm.llama()
    b = batches()
    group = hf_fisher.collect(model, b, reduction="group", progress=False)
    with pytest.raises(InvalidInputError, match="needs the Fisher of every weight"):
        check_options(**options(score="half", fisher=group))
    with pytest.raises(InvalidInputError, match="structured units only"):
        check_options(**options(score="half", structured=None, fisher=group))
    fisher = hf_fisher.collect(model, b, reduction="param", progress=False)
    r1 = prune(model, fisher, sparsity=0.3, score="half", progress=False)
    r1.restore()
    r2 = prune(model, fisher, sparsity=0.3, score="obd", progress=False)
    assert r1.removed == r2.removed and r1.stats["score"] == "half"


def test_a_plugin_clashing_with_a_builtin_score_is_refused(fresh):
    class Clash:
        @staticmethod
        @hookimpl
        def hf_fisher_register_prune_scores(register):
            register("fisher", Half)

    plugins.register(Clash, "clash")
    with pytest.raises(PluginError, match="prune score 'fisher' is registered by two plugins"):
        plugins.prune_scores()


# ----------------------------------------------------------------------------- physical pruner hook
def test_builtin_llama_pruner_comes_through_the_hook(fresh):
    from hf_fisher.consumers.prune.physical import physical_pruner

    assert isinstance(physical_pruner(tm.llama().config), LlamaPhysicalPruner)
    assert physical_pruner(tm.gpt2().config) is None
    impls = plugins.get_plugin_manager().hook.hf_fisher_physical_pruner.get_hookimpls()
    assert [i.plugin_name for i in impls] == ["hf_fisher.consumers.prune.registry"]


def test_a_plugin_adds_physical_removal_for_another_architecture(fresh):
    model = tm.gpt2()
    with pytest.raises(UnsupportedError, match="hf_fisher_physical_pruner"):
        prune(model, sparsity=0.3, scope="layer", score="magnitude", physical=True, progress=False)
    calls = []

    class Gpt2Pruner:
        name = "gpt2_test"

        def check(self, config, kinds, scope, compensate, terms):
            calls.append(("check", config.model_type, tuple(kinds), scope))

        def build(self, model, units, removed):
            import copy

            calls.append(("build", len(units), len(removed)))
            return copy.deepcopy(model), None

    class GptPlugin:
        @staticmethod
        @hookimpl
        def hf_fisher_physical_pruner(config):
            return Gpt2Pruner() if config.model_type == "gpt2" else None

    plugins.register(GptPlugin, "gpt2_physical")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    r = prune(model, sparsity=0.3, scope="layer", score="magnitude", physical=True, progress=False)
    assert calls[0] == ("check", "gpt2", ("heads", "channels"), "layer")
    assert calls[1][0] == "build" and calls[1][2] == r.stats["removed_units"] > 0
    assert r.model is not model and all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # the pruner built its model from the masked one: removed slices are zero there
    params = dict(r.model.named_parameters())
    for name, mask in r.masks.items():
        assert bool((params[name][~mask] == 0).all())


def test_a_tryfirst_plugin_overrides_the_builtin_pruner_and_can_refuse(fresh):
    class Strict(LlamaPhysicalPruner):
        def check(self, config, kinds, scope, compensate, terms):
            raise UnsupportedError(f"strict pruner: no {terms['physical']} today")

    class StrictPlugin:
        @staticmethod
        @hookimpl(tryfirst=True)
        def hf_fisher_physical_pruner(config):
            return Strict()

    plugins.register(StrictPlugin, "strict")
    model = tm.llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(UnsupportedError, match=r"strict pruner: no physical=True today"):
        prune(model, sparsity=0.3, scope="layer", score="magnitude", physical=True, progress=False)
    with pytest.raises(UnsupportedError, match=r"strict pruner: no --physical today"):
        check_options(**options(score="magnitude", scope="layer", physical=True, config=model.config), terms=CLI_TERMS)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert API_TERMS["physical"] == "physical=True"


# ----------------------------------------------------------------------------- old paths
OLD = {
    "hf_fisher.consumers.pruning": "hf_fisher.consumers.prune.core",
    "hf_fisher.consumers.prune_units": "hf_fisher.consumers.prune.units",
    "hf_fisher.consumers.prune_scores": "hf_fisher.consumers.prune.statistics",
    "hf_fisher.consumers.prune_rescale": "hf_fisher.consumers.prune.rescale",
    "hf_fisher.consumers.prune_obs": "hf_fisher.consumers.prune.obs",
    "hf_fisher.consumers.prune_physical": "hf_fisher.consumers.prune.physical",
}


@pytest.mark.parametrize("old, new", sorted(OLD.items()))
def test_old_paths_warn_and_alias_the_new_module(old, new, monkeypatch):
    monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")) as rec:
        exec(compile(f"import {old}", __file__, "exec"), {})  # a plain import statement in this file
    assert rec[0].filename == __file__  # stacklevel=2: the warning points at the importing line
    assert sys.modules[old] is importlib.import_module(new)


def test_old_pruning_path_keeps_private_names_and_the_public_api_has_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from hf_fisher.consumers import pruning

    assert pruning.prune is prune and callable(pruning._select_layer) and pruning.CLI_TERMS is CLI_TERMS
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        assert hf_fisher.prune is prune and hf_fisher.PruneResult.__module__ == "hf_fisher.consumers.prune.core"
