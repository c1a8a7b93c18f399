"""Issue 22, collection layers: the ``hf_fisher.collection`` package (old paths kept with a
DeprecationWarning), public state/step APIs instead of private reach-ins, and the estimator
contract (:mod:`hf_fisher.estimators.base`): options validated once, declared per estimator,
an unused option refused naming its owner."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest
import torch

import hf_fisher
from hf_fisher import plugins
from hf_fisher.collection.stats import EMA, AccumulatorState, Welford, shifted_moments_
from hf_fisher.errors import InvalidInputError
from hf_fisher.estimators.base import CollectOptions, Estimator, estimator_options
from hf_fisher.estimators.empirical import EmpiricalEstimator
from hf_fisher.estimators.kfac import KFACEstimator
from hf_fisher.estimators.true_fisher import TrueFisherEstimator
from hf_fisher.hookspecs import hookimpl

import tiny_models as tm

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "hf_fisher"
MOVED = {
    "hf_fisher.collector": "hf_fisher.collection.collector",
    "hf_fisher.stats": "hf_fisher.collection.stats",
    "hf_fisher.integrations.distributed": "hf_fisher.collection.distributed",
    "hf_fisher.consumers.gradient_store": "hf_fisher.collection.gradients",
    "hf_fisher.consumers.module_inputs": "hf_fisher.collection.activations",
}


def _python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


# ---------------------------------------------------------------------------- the package and old paths
def test_old_paths_warn_and_alias_the_new_modules():
    code = f"""
import importlib, json, warnings
moved = {MOVED!r}
out = {{}}
for old, new in moved.items():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mod = importlib.import_module(old)
    msgs = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning) and old + " is deprecated" in str(w.message)]
    out[old] = [mod is importlib.import_module(new), msgs]
import hf_fisher.collector as c, hf_fisher.collection.collector as n
out["private"] = c._MomentsSink is n._MomentsSink
print(json.dumps(out))
"""
    got = json.loads(_python(code))
    assert got.pop("private") is True  # private names keep working through the alias
    for old, new in MOVED.items():
        same, msgs = got[old]
        assert same, old
        assert len(msgs) == 1 and new in msgs[0], (old, msgs)


def test_hf_fisher_collect_stays_the_entry_point_whatever_is_imported_first():
    code = """
import inspect, json
import hf_fisher.collection.collector as m      # the package loads first
import hf_fisher
from hf_fisher import collect
import tiny_models as tm
model = tm.llama(); batch = tm.padded_batch([4, 3], seed=1)
a = hf_fisher.collect(model, [batch], progress=False)
c = m.FisherCollector(model); c.update(batch); b = c.fisher()
print(json.dumps({"callable": callable(collect), "same": collect is hf_fisher.collect,
                  "params": list(inspect.signature(hf_fisher.collect).parameters)[:3],
                  "equal": all(torch.equal(a[n], b[n]) for n in a.names()), "collector": hf_fisher.FisherCollector is m.FisherCollector}))
""".replace("import inspect, json", "import inspect, json, torch")
    env_code = f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r})\n" + code
    got = json.loads(_python(env_code))
    assert got == {"callable": True, "same": True, "params": ["model", "batches", "estimator"], "equal": True, "collector": True}


# ---------------------------------------------------------------------------- no private reach-ins
def _private_attributes(path: Path, owners: set[str] | None = None) -> set[str]:
    """``x._name`` attribute reads in ``path`` on anything but ``self``/``cls`` (or only on ``owners``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            name = base.id if isinstance(base, ast.Name) else (base.attr if isinstance(base, ast.Attribute) else None)
            if name in ("self", "cls"):
                continue
            if owners is None or name in owners:
                found.add(f"{name}.{node.attr}")
    return found


def test_external_backward_uses_only_the_engines_public_api():
    assert _private_attributes(PKG / "engine" / "external.py", {"engine"}) == set()
    engine_api = ("begin_backward", "on_grad", "on_whole_gradient", "finish_backward", "discard_pending", "forward_params",
                  "position_pair")
    from hf_fisher.engine.per_sample import PerSampleEngine

    assert all(callable(getattr(PerSampleEngine, n, None)) for n in engine_api if n != "forward_params")


def test_accumulator_internals_are_read_only_by_their_class():
    state_attrs = {"_mean", "_m2", "_n", "_w", "_w2", "_forget", "_init_state"}
    for rel in ("collection/distributed.py", "collection/collector.py"):
        used = {a.split(".")[1] for a in _private_attributes(PKG / rel)}
        assert not used & state_attrs, (rel, used & state_attrs)


def test_state_round_trips_exactly():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, 2, generator=g, dtype=torch.float64)
    w = Welford((3, 2)).update(x)
    s = w.state()
    assert isinstance(s, AccumulatorState) and s.count == 7 and s.decay is None
    back = Welford.from_state(s)
    assert back.count == 7 and torch.equal(back.mean, w.mean) and torch.equal(back.m2, w.m2)
    assert back.mean.data_ptr() != w.mean.data_ptr()  # a copy
    e = EMA((3, 2), decay=0.8).update(x[:4]).update(x[4:])
    es = e.state()
    assert (es.count, es.decay) == (7, 0.8) and es.weight_sum > 0 and es.weight_sq_sum > 0
    eb = EMA.from_state(es)
    assert torch.equal(eb.variance(), e.variance()) and eb.effective_count == e.effective_count
    with pytest.raises(InvalidInputError, match="m2"):
        Welford.from_state(AccumulatorState(2, torch.zeros(2, dtype=torch.float64), -torch.ones(2, dtype=torch.float64)))


def test_reset_without_zeroing_then_merge_equals_a_fresh_accumulator():
    g = torch.Generator().manual_seed(1)
    old, new = torch.randn(5, 4, generator=g), torch.randn(6, 4, generator=g)
    reused = Welford((4,)).update(old.double())
    reused.reset(zero=False)
    fresh = Welford((4,))
    for acc in (reused, fresh):
        acc.update_shifted_(6, *shifted_moments_(new.double().clone(), corrected=False))
    assert reused.count == 6 and torch.equal(reused.mean, fresh.mean) and torch.equal(reused.m2, fresh.m2)


# ---------------------------------------------------------------------------- the estimator contract
def test_collect_options_are_validated_once_and_know_what_was_given():
    assert CollectOptions().given() == []
    opts = CollectOptions(reduction="group", storage_device=torch.device("cpu"), distributed=False, memory_budget_mb=8)
    assert opts.given() == ["reduction", "memory_budget_mb", "distributed"]
    for bad, match in (({"reduction": "grp"}, "unknown reduction 'grp'"), ({"on_nonfinite": "drop"}, "on_nonfinite"),
                       ({"ema_decay": 1.5}, "ema_decay"), ({"keep_sample_contributions": True}, "reduction='group'")):
        with pytest.raises(InvalidInputError, match=match):
            CollectOptions(**bad)
        with pytest.raises(InvalidInputError, match=match):  # the collector uses the same checks
            hf_fisher.FisherCollector(tm.llama(), **bad)


def test_builtin_estimators_follow_the_protocol():
    for est in (EmpiricalEstimator(), TrueFisherEstimator(), KFACEstimator()):
        assert isinstance(est, Estimator)
        assert est.collect_options <= set(CollectOptions.names())
    assert KFACEstimator.collect_options == {"normalization", "task_type", "train_mode", "accumulation_dtype", "distributed", "memory_budget_mb"}


@pytest.mark.parametrize("estimator, option, owners", [
    ("kfac", {"ema_decay": 0.9}, ["empirical", "true"]),   # memory_budget_mb was silently swallowed; KFAC now honours it
    ("kfac", {"on_nonfinite": "skip"}, ["empirical", "true"]),
    ("kfac", {"verify": False}, ["empirical", "true"]),
    ("kfac", {"temperature": 2.0}, ["true"]),
    ("empirical", {"fisher_type": "mc"}, ["kfac"]),
    ("empirical", {"mc_samples": 2}, ["kfac", "true"]),
])
def test_an_option_the_estimator_does_not_use_is_refused_naming_its_owner(estimator, option, owners):
    model = tm.llama()
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    (key,) = option
    with pytest.raises(InvalidInputError) as e:
        hf_fisher.collect(model, [tm.padded_batch([3, 2])], estimator=estimator, progress=False, **option)
    handle.remove()
    msg = str(e.value)
    assert f"estimator={estimator!r} has no option {key}" in msg
    assert all(f"estimator={o!r}" in msg for o in owners) and calls == []
    if estimator == "kfac":
        assert "to_diagonal()" in msg


def test_kfac_built_directly_refuses_diagonal_options():
    with pytest.raises(InvalidInputError, match="estimator='kfac' has no option ema_decay, reduction"):
        KFACEstimator(reduction="param", ema_decay=0.9)
    with pytest.raises(InvalidInputError, match="distributed must be None, True or False"):
        KFACEstimator(distributed="yes")
    # the factors are summed over torch.distributed ranks (tests/test_fsdp.py); True without a process group is refused
    with pytest.raises(InvalidInputError, match="distributed=True but torch.distributed is not initialised"):
        KFACEstimator(distributed=True).collect(tm.llama(), [tm.padded_batch([3, 2])], progress=False)


def test_options_at_their_defaults_and_declared_ones_reach_kfac():
    model = tm.llama()
    batch = tm.padded_batch([4, 3], seed=2)
    ref = KFACEstimator(normalization="token", train_mode=False).collect(model, [batch], progress=False)
    got = hf_fisher.collect(model, [batch], estimator="kfac", reduction="param", storage_device="cpu", distributed=False,
                            normalization="token", progress=False)
    for name in ref.layers:
        assert torch.equal(got.layers[name].A, ref.layers[name].A) and torch.equal(got.layers[name].G, ref.layers[name].G)


class _Declared:
    """F = 0 (a test estimator that declares its options)."""

    name: ClassVar[str] = "declared_test"
    collect_options: ClassVar[frozenset[str]] = frozenset({"reduction"})
    own_options: ClassVar[frozenset[str]] = frozenset({"knob"})
    built: ClassVar[list] = []

    def __init__(self, **options):
        type(self).built.append(options)

    def collect(self, model, batches, **kwargs):
        return "declared-result"


class _Legacy:
    """F = 0 (a test estimator that declares nothing)."""

    built: ClassVar[list] = []

    def __init__(self, **options):
        type(self).built.append(options)

    def collect(self, model, batches, **kwargs):
        return "legacy-result"


class _Plugin:
    @hookimpl
    def hf_fisher_register_estimators(self, register):
        register("declared_test", _Declared)
        register("legacy_test", _Legacy)


@pytest.fixture
def test_estimators():
    name = plugins.register(_Plugin(), "arch-collect-test")
    _Declared.built.clear()
    _Legacy.built.clear()
    yield
    plugins.unregister(name)


def test_a_plugin_estimator_gets_exactly_what_it_declares(test_estimators):
    model = tm.llama()
    batches = [tm.padded_batch([2, 2])]
    assert hf_fisher.collect(model, batches, estimator="declared_test", reduction="group", knob=3, progress=False) == "declared-result"
    assert _Declared.built == [{"reduction": "group", "knob": 3}]
    with pytest.raises(InvalidInputError, match="estimator='declared_test' has no option ema_decay.*estimator='empirical'"):
        hf_fisher.collect(model, batches, estimator="declared_test", ema_decay=0.9, progress=False)
    with pytest.raises(InvalidInputError, match="estimator='empirical' has no option knob.*estimator='declared_test'"):
        hf_fisher.collect(model, batches, knob=1, progress=False)
    # one that declares nothing is built as before: every shared option, and its own
    assert hf_fisher.collect(model, batches, estimator="legacy_test", knob=1, progress=False) == "legacy-result"
    (got,) = _Legacy.built
    assert set(got) == set(CollectOptions.names()) - {"distributed", "keep_sample_contributions"} | {"knob"}


def test_estimator_options_passes_every_field_the_estimator_declares():
    kwargs = estimator_options("kfac", KFACEstimator, CollectOptions(normalization="sum"), {"fisher_type": "mc"}, {})
    assert kwargs == {"accumulation_dtype": torch.float64, "distributed": None, "normalization": "sum", "task_type": None,
                      "train_mode": False, "fisher_type": "mc", "memory_budget_mb": None}


def test_the_path_is_straight():
    """api -> estimator -> collector: the API does not import the collector, nor an estimator the API."""
    def imports(rel: str) -> set[str]:
        out = set()
        for node in ast.walk(ast.parse((PKG / rel).read_text())):
            if isinstance(node, ast.ImportFrom):
                out.add(("." * node.level) + (node.module or ""))
        return out

    assert not any("collector" in m for m in imports("api.py"))
    for rel in ("estimators/empirical.py", "estimators/true_fisher.py", "estimators/kfac.py", "collection/collector.py"):
        assert not any(m.endswith("api") for m in imports(rel)), rel
