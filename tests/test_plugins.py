"""The plugin manager: built-ins, real entry points from (fake) installed distributions, the
environment switches, broken plugins, conflicts, adapter precedence, register/unregister."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
from torch import nn

from hf_fisher import plugins
from hf_fisher.architectures.builder import LayoutBuilder
from hf_fisher.errors import PluginError
from hf_fisher.hookspecs import hookimpl
from hf_fisher.layout import ModelLayout, ParamGroups

import tiny_models as tm

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "plugins" / "hf_fisher_example"
BUILTIN_ADAPTERS = ["hf_fisher.architectures.llama", "hf_fisher.architectures.gpt2", "hf_fisher.architectures.generic"]


@pytest.fixture(autouse=True)
def fresh_manager(monkeypatch):
    monkeypatch.delenv("HF_FISHER_PLUGINS", raising=False)
    monkeypatch.delenv("HF_FISHER_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    plugins.reset()
    yield
    plugins.reset()


@pytest.fixture
def make_dist(tmp_path, monkeypatch):
    """Create an installed distribution on sys.path: ``<dist>-<ver>.dist-info`` + plugin modules.

    ``entry_points`` maps entry-point name -> module source; module names are made unique so
    tests do not see each other's imports. Returns {entry-point name: module name}.
    """
    monkeypatch.syspath_prepend(str(tmp_path))
    created: list[str] = []

    def make(dist: str, entry_points: dict[str, str], version: str = "1.0") -> dict[str, str]:
        info = tmp_path / f"{dist}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        modules = {ep: f"hf_fisher_test_{ep}_{uuid.uuid4().hex[:8]}" for ep in entry_points}
        lines = ["[hf_fisher]"] + [f"{ep} = {mod}" for ep, mod in modules.items()]
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
        for ep, src in entry_points.items():
            (tmp_path / f"{modules[ep]}.py").write_text(textwrap.dedent(src))
            created.append(modules[ep])
        importlib.invalidate_caches()
        return modules

    yield make
    for mod in created:
        sys.modules.pop(mod, None)


ESTIMATOR_PLUGIN = """
    from hf_fisher.hookspecs import hookimpl

    class {cls}:
        pass

    @hookimpl
    def hf_fisher_register_estimators(register):
        register("{name}", {cls})
"""


def _estimator_src(name: str, cls: str = "Est") -> str:
    return ESTIMATOR_PLUGIN.format(name=name, cls=cls)


def _kinds(kind: str) -> dict[str, dict]:
    return {d["name"]: d for d in plugins.describe() if d["kind"] == kind}


# ---------------------------------------------------------------------------------------------


def test_builtins_are_plugins_from_hf_fisher():
    adapters = [d for d in plugins.describe() if d["kind"] == "adapter"]
    assert [d["name"] for d in adapters if d["name"] in BUILTIN_ADAPTERS][-1] == "hf_fisher.architectures.generic"
    for name in BUILTIN_ADAPTERS:
        d = next(d for d in adapters if d["name"] == name)
        assert d["plugin"] == name and d["distribution"] == "hf-fisher"
    listed = {p["name"]: p for p in plugins.list_plugins()}
    for name in BUILTIN_ADAPTERS:
        assert listed[name]["builtin"] is True
    assert plugins.get_plugin_manager() is plugins.get_plugin_manager()
    assert plugins.hookimpl is hookimpl


def test_broken_builtin_is_reported_and_skipped(monkeypatch, caplog):
    monkeypatch.setattr(plugins, "BUILTIN_PLUGINS", plugins.BUILTIN_PLUGINS + ("hf_fisher.architectures.no_such_adapter",))
    with caplog.at_level(logging.ERROR, logger="hf_fisher"):
        plugins.get_plugin_manager()
        plugins.get_plugin_manager()
    failed = [f for f in plugins.failed_plugins() if f["name"] == "hf_fisher.architectures.no_such_adapter"]
    assert len(failed) == 1 and failed[0]["distribution"] == "hf-fisher"
    assert "No module named" in failed[0]["error"]
    recs = [r for r in caplog.records if "no_such_adapter" in r.getMessage()]
    assert len(recs) == 1 and recs[0].levelno == logging.ERROR
    assert plugins.model_layout(tm.llama()).adapter == "llama"


def test_entry_point_plugin_is_loaded_and_attributed(make_dist):
    make_dist("mydist", {"myplug": _estimator_src("my_estimator")}, version="1.0")
    est = plugins.estimators()
    assert "my_estimator" in est and est["my_estimator"].__name__ == "Est"
    d = _kinds("estimator")["my_estimator"]
    assert (d["plugin"], d["distribution"]) == ("myplug", "mydist")
    listed = {p["name"]: p for p in plugins.list_plugins()}
    assert listed["myplug"] == {"name": "myplug", "distribution": "mydist", "version": "1.0", "builtin": False}


def test_autoload_can_be_disabled(make_dist, monkeypatch):
    make_dist("mydist", {"myplug": _estimator_src("my_estimator")})
    monkeypatch.setenv("HF_FISHER_DISABLE_PLUGIN_AUTOLOAD", "1")
    plugins.reset()
    assert "my_estimator" not in plugins.estimators()
    assert set(BUILTIN_ADAPTERS) <= set(_kinds("adapter"))
    monkeypatch.setenv("HF_FISHER_DISABLE_PLUGIN_AUTOLOAD", "0")
    plugins.reset()
    assert "my_estimator" in plugins.estimators()


def test_allow_list(make_dist, monkeypatch, caplog):
    make_dist("mydist", {"plug_a": _estimator_src("est_a"), "plug_b": _estimator_src("est_b")})
    monkeypatch.setenv("HF_FISHER_PLUGINS", " plug_a , not_installed")
    plugins.reset()
    with caplog.at_level(logging.WARNING, logger="hf_fisher"):
        names = set(plugins.estimators())
    assert "est_a" in names and "est_b" not in names
    assert any("not_installed" in r.getMessage() for r in caplog.records)
    monkeypatch.setenv("HF_FISHER_PLUGINS", "")
    plugins.reset()
    assert not {"est_a", "est_b"} & set(plugins.estimators())
    assert set(BUILTIN_ADAPTERS) <= set(_kinds("adapter"))


def test_broken_plugin_is_reported_once_and_others_load(make_dist, caplog):
    make_dist(
        "brokendist",
        {"broken": "raise RuntimeError('boom at import')\n", "good": _estimator_src("good_estimator")},
    )
    with caplog.at_level(logging.WARNING, logger="hf_fisher"):
        assert "good_estimator" in plugins.estimators()
        plugins.consumers()
        plugins.get_plugin_manager()
        plugins.register(type("P", (), {}), name="unrelated")  # invalidates the caches
        plugins.estimators()
    failed = [f for f in plugins.failed_plugins() if f["name"] == "broken"]
    assert len(failed) == 1
    assert failed[0]["distribution"] == "brokendist" and "boom at import" in failed[0]["error"]
    recs = [r for r in caplog.records if "'broken'" in r.getMessage()]
    assert len(recs) == 1
    msg = recs[0].getMessage()
    assert recs[0].levelno == logging.WARNING and "brokendist" in msg and "boom at import" in msg


def test_failing_registration_hook_is_reported_once(caplog):
    class Bad:
        @hookimpl
        def hf_fisher_register_estimators(self, register):
            register("half_registered", object)
            raise ValueError("bad plugin state")

    class Good:
        @hookimpl
        def hf_fisher_register_estimators(self, register):
            register("fine", object)

    plugins.register(Bad(), name="bad", distribution="baddist")
    plugins.register(Good(), name="good")
    with caplog.at_level(logging.WARNING, logger="hf_fisher"):
        est = plugins.estimators()
        plugins.register(type("Q", (), {}), name="unrelated")
        plugins.estimators()
    assert "fine" in est and "half_registered" not in est
    failed = [f for f in plugins.failed_plugins() if f["name"] == "bad"]
    assert len(failed) == 1 and failed[0]["distribution"] == "baddist" and "bad plugin state" in failed[0]["error"]
    assert len([r for r in caplog.records if "bad plugin state" in r.getMessage()]) == 1


def test_misspelt_hook_is_rejected(make_dist):
    src = """
        from hf_fisher.hookspecs import hookimpl

        @hookimpl
        def hf_fisher_register_estimatorz(register):
            pass
    """
    make_dist("typodist", {"typo": src})
    failed = [f for f in plugins.failed_plugins() if f["name"] == "typo"]
    assert len(failed) == 1 and "hf_fisher_register_estimatorz" in failed[0]["error"]
    assert "typo" not in {p["name"] for p in plugins.list_plugins()}

    class Typo:
        @hookimpl
        def hf_fisher_model_layuot(self, model):
            return None

    with pytest.raises(PluginError, match="hf_fisher_model_layuot"):
        plugins.register(Typo(), name="typo2")
    assert "typo2" not in {p["name"] for p in plugins.list_plugins()}


def test_duplicate_names_name_both_plugins(make_dist):
    make_dist("mydist", {"myplug": _estimator_src("shared_name")})

    class Other:
        @hookimpl
        def hf_fisher_register_estimators(self, register):
            register("shared_name", object)

        @hookimpl
        def hf_fisher_register_consumers(self, register):
            register("c", print)
            register("c", len)

    plugins.register(Other(), name="other_plugin", distribution="otherdist")
    with pytest.raises(PluginError) as err:
        plugins.estimators()
    msg = str(err.value)
    for part in ("shared_name", "myplug", "mydist", "other_plugin", "otherdist"):
        assert part in msg
    with pytest.raises(PluginError, match="consumer 'c'.*other_plugin.*other_plugin"):
        plugins.consumers()
    plugins.unregister("other_plugin")
    assert "shared_name" in plugins.estimators()


def test_grad_rules_duplicates_and_mro():
    class Base(nn.Module):
        pass

    class Derived(Base):
        pass

    class Leaf(Derived):
        pass

    class Unrelated(nn.Module):
        pass

    base_rule, derived_rule = object(), object()

    class Rules:
        @hookimpl
        def hf_fisher_register_grad_rules(self, register):
            register(Base, base_rule)
            register(Derived, derived_rule)

    plugins.register(Rules(), name="rules")
    rules = plugins.grad_rules()
    assert rules[Base] is base_rule and rules[Derived] is derived_rule
    assert plugins.grad_rule_for(Base()) is base_rule
    assert plugins.grad_rule_for(Leaf()) is derived_rule
    assert plugins.grad_rule_for(Unrelated()) is rules.get(nn.Module)
    desc = {d["name"]: d for d in plugins.describe() if d["kind"] == "grad_rule"}
    assert desc[f"{Derived.__module__}.{Derived.__qualname__}"]["plugin"] == "rules"

    class Again:
        @hookimpl
        def hf_fisher_register_grad_rules(self, register):
            register(Derived, object())

    plugins.register(Again(), name="again")
    with pytest.raises(PluginError, match="Derived.*rules.*again|Derived.*again.*rules"):
        plugins.grad_rules()


def test_register_unregister_invalidate_caches():
    class P:
        @hookimpl
        def hf_fisher_register_consumers(self, register):
            register("my_consumer", len)

    assert "my_consumer" not in plugins.consumers()
    obj = P()
    assert plugins.register(obj, name="p") == "p"
    assert plugins.consumers()["my_consumer"] is len
    with pytest.raises(PluginError, match="already registered"):
        plugins.register(P(), name="p")
    plugins.unregister(obj)
    assert "my_consumer" not in plugins.consumers()
    plugins.register(obj, name="p")
    assert "my_consumer" in plugins.consumers()
    plugins.unregister("p")
    assert "my_consumer" not in plugins.consumers()
    with pytest.raises(PluginError, match="no plugin"):
        plugins.unregister("p")


def test_tryfirst_adapter_overrides_builtin():
    class Override:
        @hookimpl(tryfirst=True)
        def hf_fisher_model_layout(self, model):
            b = LayoutBuilder(model, adapter="custom")
            first = next(p for n, p in model.named_parameters() if n.endswith("q_proj.weight"))
            b.set_groups(first, ParamGroups.single(1, first.shape[1], "whole"))
            return b.build()

    model = tm.llama()
    assert plugins.model_layout(model).adapter == "llama"
    plugins.register(Override(), name="override", distribution="overdist")
    layout = plugins.model_layout(model)
    assert layout.adapter == "custom"
    assert layout.group_names("model.layers.0.self_attn.q_proj.weight") == ["whole"]
    assert layout.group_names("model.layers.1.self_attn.q_proj.weight")[:2] == ["channel_0", "channel_1"]
    adapters = [d for d in plugins.describe() if d["kind"] == "adapter"]
    assert adapters[0] == {"kind": "adapter", "name": "override", "plugin": "override", "distribution": "overdist",
                           "version": None, "model_types": None, "order": "tryfirst"}
    plugins.unregister("override")
    assert plugins.model_layout(model).adapter == "llama"


def test_partial_and_misfit_adapter_layouts():
    model = tm.gpt2()

    class Partial:
        @hookimpl(tryfirst=True)
        def hf_fisher_model_layout(self, model):
            return ModelLayout(
                adapter="partial", model_type="gpt2", num_layers=2,
                groups={"transformer.ln_f.weight": ParamGroups.per_index(0, 32, "dim_")},
            )

    plugins.register(Partial(), name="partial")
    layout = plugins.model_layout(model)
    assert layout.adapter == "partial"
    assert list(layout.groups) == [n for n, _ in model.named_parameters()]
    assert layout.group_names("transformer.ln_f.weight")[31] == "dim_31"
    # generic rule for Conv1D: one group per output column
    assert layout.groups["transformer.h.1.attn.c_attn.weight"] == ParamGroups.per_index(1, 96, "channel_")
    assert layout.param_layers["transformer.h.1.attn.c_attn.weight"] == 1
    plugins.unregister("partial")

    class Misfit:
        @hookimpl(tryfirst=True)
        def hf_fisher_model_layout(self, model):
            return ModelLayout(
                adapter="misfit", model_type="gpt2", num_layers=2,
                groups={"transformer.ln_f.weight": ParamGroups.per_index(0, 31, "dim_")},
            )

    plugins.register(Misfit(), name="misfit_plugin")
    with pytest.raises(PluginError, match="misfit_plugin.*transformer.ln_f.weight"):
        plugins.model_layout(model)


def test_raising_adapter_is_skipped_and_reported_once(caplog):
    class Crashes:
        @hookimpl(tryfirst=True)
        def hf_fisher_model_layout(self, model):
            raise KeyError("adapter bug")

    plugins.register(Crashes(), name="crashes", distribution="crashdist")
    with caplog.at_level(logging.WARNING, logger="hf_fisher"):
        assert plugins.model_layout(tm.llama()).adapter == "llama"
        assert plugins.model_layout(tm.gpt2()).adapter == "gpt2"
    failed = [f for f in plugins.failed_plugins() if f["name"] == "crashes"]
    assert len(failed) == 1 and failed[0]["distribution"] == "crashdist" and "adapter bug" in failed[0]["error"]
    assert len([r for r in caplog.records if "adapter bug" in r.getMessage()]) == 1


# --- the example third-party plugin package ---------------------------------------------------


def _load_example_module():
    path = EXAMPLE / "hf_fisher_example" / "sequential.py"
    spec = importlib.util.spec_from_file_location("hf_fisher_example_sequential_by_path", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_plugin_describes_sequential_mlps():
    module = _load_example_module()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    assert plugins.model_layout(model).adapter == "generic"
    plugins.register(module, name="example")
    layout = plugins.model_layout(model)
    assert layout.adapter == "example_sequential_mlp" and layout.num_layers == 3
    assert [(b.layer, b.num_channels) for b in layout.mlp] == [(0, 7), (2, 6)]
    assert plugins.model_layout(tm.llama()).adapter == "llama"  # not ours: falls through
    # hidden unit c of block 0 is row c of layer 0 (+ its bias) and column c of layer 2
    x = torch.randn(4, 5, dtype=torch.float64)
    params = dict(model.named_parameters())
    hidden = model[:2](x)
    c = 3
    with torch.no_grad():
        for s in layout.mlp[0].slices(c)[:2]:
            params[s.param][s.index()] += 1.0
    changed = (model[:2](x) - hidden).abs().amax(0)
    assert changed[c] > 0 and changed.sum() == changed[c]
    w_col = layout.mlp[0].slices(c)[2]
    assert (w_col.param, w_col.axis, w_col.start) == ("2.weight", 1, c)


def test_example_plugin_installs_through_its_entry_point(tmp_path, monkeypatch):
    tomllib = pytest.importorskip("tomllib")
    meta = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())
    project = meta["project"]
    eps = project["entry-points"]["hf_fisher"]
    assert eps == {"example_sequential_mlp": "hf_fisher_example.sequential"}
    # what `pip install plugins/hf_fisher_example` would leave in site-packages: the metadata
    info = tmp_path / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    (info / "entry_points.txt").write_text("[hf_fisher]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(EXAMPLE))
    for mod in [m for m in sys.modules if m.startswith("hf_fisher_example")]:
        monkeypatch.delitem(sys.modules, mod)
    try:
        adapters = _kinds("adapter")
        assert adapters["example_sequential_mlp"]["distribution"] == "hf-fisher-example"
        model = nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2))
        assert plugins.model_layout(model).adapter == "example_sequential_mlp"
    finally:
        for mod in [m for m in sys.modules if m.startswith("hf_fisher_example")]:
            sys.modules.pop(mod, None)


def test_adapters_list_their_model_types_order_and_version():
    rows = {d["name"]: d for d in plugins.describe() if d["kind"] == "adapter"}
    llama = rows["hf_fisher.architectures.llama"]
    assert llama["model_types"] == ["llama", "mistral", "qwen2", "qwen3"] and llama["order"] == "normal"
    assert llama["version"] == importlib.metadata.version("hf-fisher")
    assert rows["hf_fisher.architectures.generic"]["order"] == "trylast"
