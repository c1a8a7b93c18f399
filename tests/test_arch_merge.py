"""Merge methods as registered objects (issue 22): the registry, options declared and checked once
(full-model and LoRA merging alike), a third-party method everywhere a built-in works, no
dispatch on method names, and the deprecated module paths."""

from __future__ import annotations

import ast
import importlib
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hf_fisher import plugins
from hf_fisher.consumers.merge import registry
from hf_fisher.consumers.merge.api import merge_with_fisher
from hf_fisher.consumers.merge.base import MergeMethod, Option, TensorInputs
from hf_fisher.consumers.merge.lora import merge_lora_adapters
from hf_fisher.consumers.merge.recipe import load_recipe, recipe_to_kwargs
from hf_fisher.errors import InvalidInputError, PluginError, UnsupportedError
from hf_fisher.hookspecs import hookimpl

import tiny_models as tm

PACKAGE = Path(__file__).resolve().parents[1] / "hf_fisher" / "consumers" / "merge"
BUILTINS = ("fisher", "fisher_task_vector", "average", "task_arithmetic", "ties", "dare", "regmean", "fisher_regmean", "kfac")


class Lerp(MergeMethod):
    """``θ* = (1 − t) θ_1 + t θ_2`` (two models; ``t`` in [0, 1])."""

    name = "lerp_test"
    paper = "linear interpolation"
    formula = "θ* = (1 − t) θ_1 + t θ_2"
    linear = True
    options = (Option("t", 0.5, low=0, high=1, help="interpolation"),)

    def merge(self, t: TensorInputs):
        a, b = (x.to(torch.float64) for x in t.thetas)
        return (1 - self.t) * a + self.t * b


class _LerpPlugin:
    @staticmethod
    @hookimpl
    def hf_fisher_register_merge_methods(register):
        register(Lerp.name, Lerp)


class _NotAMethod:
    @staticmethod
    @hookimpl
    def hf_fisher_register_merge_methods(register):
        register("not_a_method", lambda *a: None)


@pytest.fixture
def lerp_plugin():
    plugins.register(_LerpPlugin(), "lerp-test")
    yield
    plugins.unregister("lerp-test")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    paths = []
    for seed in (1, 2):
        model = tm.llama(layers=1, seed=seed)
        model.save_pretrained(root / f"m{seed}")
        paths.append(root / f"m{seed}")
    return paths


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_builtins_are_registered_through_the_hook_with_formula_and_needs():
    from hf_fisher.consumers.merge import methods

    found = plugins.merge_methods()
    assert set(BUILTINS) <= set(found)
    for name in BUILTINS:
        cls = found[name]
        assert issubclass(cls, MergeMethod) and cls.name == name and cls in methods.BUILTINS
        assert cls.__doc__.lstrip().startswith(("``", "Fisher", "TIES", "DARE", "RegMean", "Model")), name
        assert "=" in cls.__doc__ and cls.paper and cls.formula, name
    rows = {d["name"]: d for d in plugins.describe() if d["kind"] == "merge_method"}
    assert {rows[n]["plugin"] for n in BUILTINS} == {"hf_fisher.consumers.merge.registry"}
    assert {rows[n]["distribution"] for n in BUILTINS} == {"hf-fisher"}
    # what each needs is declared on the class (and used by merge_with_fisher, recipes and LoRA merging)
    assert {n for n in BUILTINS if found[n].fishers == "diagonal"} == {"fisher", "fisher_task_vector", "fisher_regmean"}
    assert found["kfac"].fishers == "kfac"
    assert {n for n in BUILTINS if found[n].needs_base} == {"fisher_task_vector", "task_arithmetic", "ties", "dare"}
    assert {n for n in BUILTINS if found[n].needs_data} == {"regmean", "fisher_regmean"}


def test_unknown_name_is_refused_listing_every_registered_name(lerp_plugin):
    with pytest.raises(InvalidInputError, match="unknown method 'soup'") as e:
        registry.get("soup")
    for name in (*BUILTINS, "lerp_test"):
        assert repr(name) in str(e.value)


@pytest.mark.parametrize(
    "method, options, pattern",
    [
        ("ties", {"density": 0.0}, r"density must be in \(0, 1\], got 0.0"),
        ("ties", {"density": float("nan")}, r"density must be a finite number, got nan"),
        ("dare", {"drop_p": 1.0}, r"drop_p must be in \[0, 1\), got 1.0"),
        ("dare", {"dare_then": "linear"}, r"dare_then must be one of \['task_arithmetic', 'ties'\], got 'linear'"),
        ("dare", {"seed": 1.5}, r"seed must be an integer, got 1.5"),
        ("fisher", {"fisher_floor": 0.0}, r"fisher_floor must be a positive finite number, got 0.0"),
        ("fisher", {"no_fisher_rule": "zero"}, r"no_fisher_rule must be one of"),
        ("task_arithmetic", {"scaling": float("inf")}, r"scaling must be a finite number"),
    ],
)
def test_an_option_is_checked_once_with_one_message_for_full_models_and_lora(tmp_path, method, options, pattern):
    """The declaration on the class checks the option; merge_with_fisher and merge_lora_adapters
    both refuse with its message, before they read any input (the paths do not exist)."""
    with pytest.raises(InvalidInputError, match=pattern) as direct:
        registry.build(method, options)
    with pytest.raises(InvalidInputError) as full:
        merge_with_fisher([tmp_path / "a", tmp_path / "b"], [tmp_path / "fa", tmp_path / "fb"], method=method,
                          base_model=tmp_path / "base", output_dir=tmp_path / "out", progress=False, **options)
    with pytest.raises(InvalidInputError) as lora:
        merge_lora_adapters([tmp_path / "a", tmp_path / "b"], [tmp_path / "fa", tmp_path / "fb"], method=method, **options)
    assert str(full.value) == str(direct.value) == str(lora.value)
    assert not (tmp_path / "out").exists()


def test_lora_refusal_is_declared_on_the_class(tmp_path):
    for method in ("regmean", "fisher_regmean", "kfac"):
        with pytest.raises(UnsupportedError, match=f"method='{method}' "):
            merge_lora_adapters([tmp_path / "a", tmp_path / "b"], None, method=method)


def test_a_method_registered_in_code_works_in_the_api_and_recipes(lerp_plugin, pair, tmp_path):
    a, b = pair
    out = merge_with_fisher([a, b], method="lerp_test", t=0.25, dtype="float64", output_dir=tmp_path / "out",
                            progress=False)
    wa, wb, merged = _weights(a), _weights(b), _weights(out)
    assert merged.keys() == wa.keys()
    for k in wa:
        torch.testing.assert_close(merged[k], 0.75 * wa[k].double() + 0.25 * wb[k].double(), rtol=1e-15, atol=0)
    recipe = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert recipe["merge_method"] == "lerp_test" and recipe["parameters"] == {"t": 0.25}
    # the recipe it wrote reads back and reproduces the merge
    kwargs = recipe_to_kwargs(load_recipe(out / "mergekit_config.yml"))
    assert kwargs["method"] == "lerp_test" and kwargs["t"] == 0.25
    again = merge_with_fisher(output_dir=tmp_path / "again", progress=False, **kwargs)
    assert all(torch.equal(_weights(again)[k], merged[k]) for k in merged)
    # its option is checked by its declaration, in the API and in recipes
    with pytest.raises(InvalidInputError, match=r"t must be in \[0, 1\], got 2"):
        merge_with_fisher([a, b], method="lerp_test", t=2, output_dir=tmp_path / "bad", progress=False)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({**recipe, "parameters": {"t": "half"}}))
    with pytest.raises(InvalidInputError, match=r"parameters.t' must be of type float/int"):
        load_recipe(tmp_path / "r.yaml")
    assert not (tmp_path / "bad").exists()


def test_a_method_instance_is_accepted_when_its_class_is_registered(lerp_plugin, pair, tmp_path):
    a, b = pair
    out = merge_with_fisher([a, b], method=Lerp(t=0.25), dtype="float64", output_dir=tmp_path / "out", progress=False)
    ref = merge_with_fisher([a, b], method="lerp_test", t=0.25, dtype="float64", output_dir=tmp_path / "ref", progress=False)
    assert all(torch.equal(_weights(out)[k], v) for k, v in _weights(ref).items())
    plugins.unregister("lerp-test")
    try:
        with pytest.raises(InvalidInputError, match="is not registered"):
            merge_with_fisher([a, b], method=Lerp(t=0.25), output_dir=tmp_path / "o2", progress=False)
    finally:
        plugins.register(_LerpPlugin(), "lerp-test")
    assert not (tmp_path / "o2").exists()


def test_a_registration_that_is_not_a_merge_method_is_refused():
    plugins.register(_NotAMethod(), "not-a-method")
    try:
        with pytest.raises(PluginError, match="'not_a_method' .* not a subclass of .*MergeMethod"):
            registry.get("fisher")
    finally:
        plugins.unregister("not-a-method")


def test_method_objects_are_immutable_and_replace_checks_again():
    m = registry.build("ties", {"density": 0.5})
    with pytest.raises(AttributeError):
        m.density = 0.9
    assert m.replace(scaling=2.0).values() == {"scaling": 2.0, "density": 0.5, "convention": "mergekit", "normalize": None, "int8_mask": False}
    with pytest.raises(InvalidInputError, match="density"):
        m.replace(density=2)
    assert m.parameters() == {"scaling": 1.0, "density": 0.5, "convention": "mergekit", "int8_mask": False}
    assert registry.build("dare", {}).parameters() == {"scaling": 1.0, "drop_p": 0.9, "seed": 0, "dare_then": "task_arithmetic",
                                                       "convention": "mergekit"}


def _name_dispatch(path: Path) -> list[str]:
    """Tests of a method (an expression naming ``method``) against a built-in method's name, and
    tuples of three or more method names (the string era's name lists), in code."""
    source = path.read_text(encoding="utf-8")
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            text = " ".join(ast.get_source_segment(source, o) or "" for o in operands)
            if "method" not in text or ".fishers" in text:  # (a Fisher kind, "diagonal" / "kfac", is not a method)
                continue
            consts = []
            for c in operands:
                consts += [c] if isinstance(c, ast.Constant) else list(getattr(c, "elts", []))
            found += [f"{path.name}:{node.lineno} {text}" for c in consts
                      if isinstance(c, ast.Constant) and c.value in BUILTINS]
        elif isinstance(node, (ast.Tuple, ast.Set, ast.List)):
            names = [e.value for e in node.elts if isinstance(e, ast.Constant)]
            if sum(n in BUILTINS for n in names) >= 3:
                found.append(f"{path.name}:{node.lineno} {names}")
    return found


def test_no_dispatch_on_method_names_outside_the_method_classes():
    offenders = []
    for name in ("api.py", "lora.py", "recipe.py", "registry.py", "base.py"):
        offenders += _name_dispatch(PACKAGE / name)
    assert offenders == []


@pytest.mark.parametrize("old, new", [("merging", "api"), ("merge_io", "io"), ("merge_lora", "lora"),
                                      ("merge_kfac", "kfac"), ("merge_math", "math"), ("regmean", "regmean")])
def test_old_module_paths_warn_and_alias_the_new_module(monkeypatch, old, new):
    monkeypatch.delitem(sys.modules, f"hf_fisher.consumers.{old}", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mod = importlib.import_module(f"hf_fisher.consumers.{old}")
    assert mod is importlib.import_module(f"hf_fisher.consumers.merge.{new}")
    (w,) = [w for w in caught if issubclass(w.category, DeprecationWarning) and f"consumers.{old} " in str(w.message)]
    assert f"hf_fisher.consumers.merge.{new}" in str(w.message)


def test_old_names_still_work():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from hf_fisher.consumers import merge_lora, merging

    assert merging.METHODS[:len(BUILTINS)] == BUILTINS
    assert merging.PAPERS["ties"].startswith("Yadav et al. 2023")
    assert merging.NO_FISHER_RULES == ("average", "first", "base", "error")
    assert set(merge_lora.METHODS) >= {"fisher", "fisher_task_vector", "average", "task_arithmetic", "ties", "dare"}
    assert callable(merging._check_output) and callable(merging.real_number)


def test_the_merged_card_takes_formula_paper_and_tags_from_the_registered_class(lerp_plugin):
    from hf_fisher.consumers.merge.card import merged_card

    recipe = {"merge_method": "lerp_test", "models": [{"model": "a/b"}, {"model": "c/d"}], "parameters": {"t": 0.3}}
    card = merged_card(recipe)
    assert "`θ* = (1 − t) θ_1 + t θ_2`" in card.text and "linear interpolation" in card.text
    assert "fisher-merging" not in card.data.tags and "lerp-test" in card.data.tags
    fisher_card = merged_card({**recipe, "merge_method": "fisher"})
    assert "fisher-merging" in fisher_card.data.tags and "Matena & Raffel 2022" in fisher_card.text
    with pytest.warns(DeprecationWarning, match="consumers.merge.card"):
        from hf_fisher.artifacts.cards import merged_card as old
    assert old is merged_card
