"""Issue 22, analysis and consumers by use: the ``hf_fisher.analysis`` package (views, importance,
uncertainty, summary), ``hf_fisher.consumers.circuits``, the spectrum consumer split from its
curvature operators, and the deprecated aliases at the old paths.

Import-state checks run in a fresh interpreter (``sys.modules`` of this one is shared by all tests).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# old path -> new module (a plain alias: the old name is the very same module object)
ALIASES = {
    "hf_fisher.uncertainty": "hf_fisher.analysis.uncertainty",
    "hf_fisher.consumers.importance": "hf_fisher.analysis.importance",
    "hf_fisher.consumers.qkov": "hf_fisher.consumers.circuits.qkov",
    "hf_fisher.consumers.conflicts": "hf_fisher.consumers.circuits.conflicts",
    "hf_fisher.consumers.conflict_defaults": "hf_fisher.consumers.circuits.conflict_defaults",
    "hf_fisher.consumers.head_behaviour": "hf_fisher.consumers.circuits.head_behaviour",
}
# consumer name -> the module that registers it now
REGISTERED_IN = {
    "importance": "hf_fisher.analysis.importance",
    "compare": "hf_fisher.analysis.importance",
    "qkov_interference": "hf_fisher.consumers.circuits.qkov",
    "sample_conflicts": "hf_fisher.consumers.circuits.conflicts",
    "head_categories": "hf_fisher.consumers.circuits.head_behaviour",
    "aggregate_by_category": "hf_fisher.consumers.circuits.head_behaviour",
    "spectrum": "hf_fisher.consumers.spectrum",
}


def _run(code: str) -> dict:
    """Run ``code`` in a fresh interpreter with this checkout first on the path; its last stdout
    line is JSON."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               HF_FISHER_DISABLE_PLUGIN_AUTOLOAD="1")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_analysis_does_not_import_consumers():
    out = _run("""
        import json, sys
        import hf_fisher.analysis
        import hf_fisher.analysis.views, hf_fisher.analysis.importance
        import hf_fisher.analysis.uncertainty, hf_fisher.analysis.summary
        import hf_fisher.estimators.curvature
        print(json.dumps(sorted(m for m in sys.modules if m.startswith(("hf_fisher.consumers", "hf_fisher.cli")))))
    """)
    assert out == []


def test_circuits_defaults_stay_torch_free():
    out = _run("""
        import json, sys
        from hf_fisher.consumers.circuits.conflict_defaults import DEFAULT_ALPHA, DEFAULT_MIN_EFFECT_SIZE
        print(json.dumps({"torch": "torch" in sys.modules, "alpha": DEFAULT_ALPHA, "floor": DEFAULT_MIN_EFFECT_SIZE}))
    """)
    assert out == {"torch": False, "alpha": 0.05, "floor": 0.05}


def test_analysis_package_keeps_every_name_of_the_old_module():
    from hf_fisher import analysis
    from hf_fisher.analysis import views

    assert sorted(analysis.__all__) == sorted(views.__all__) and len(views.__all__) == 21
    for name in views.__all__:
        assert getattr(analysis, name) is getattr(views, name), name
    assert analysis._flat_groups is views._flat_groups  # private helpers as before
    assert analysis.uncertainty.unit_intervals.__module__ == "hf_fisher.analysis.uncertainty"
    assert analysis.summary.summary_markdown.__module__ == "hf_fisher.analysis.summary"
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        analysis.no_such_name


def test_card_and_report_share_one_summary():
    from hf_fisher.analysis import summary
    from hf_fisher.consumers import report

    assert report.summary_markdown is summary.summary_markdown
    assert report._rule_text is summary.rule_text and report._e is summary.fmt


def test_old_paths_are_aliases_with_a_deprecation_warning():
    out = _run(f"""
        import importlib, json, sys, warnings
        res = {{}}
        for old, new in {ALIASES!r}.items():
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                mod = importlib.import_module(old)
            msgs = [str(x.message) for x in w if issubclass(x.category, DeprecationWarning) and old in str(x.message)]
            res[old] = {{"same": mod is sys.modules[new] and sys.modules[old] is mod, "msgs": msgs}}
        from hf_fisher.consumers import qkov, conflicts
        res["private"] = [qkov._check_store is sys.modules["hf_fisher.consumers.circuits.qkov"]._check_store,
                          conflicts.fdr_bh.__module__]
        print(json.dumps(res))
    """)
    for old, new in ALIASES.items():
        assert out[old]["same"], old
        assert len(out[old]["msgs"]) == 1 and new in out[old]["msgs"][0], out[old]
    assert out["private"] == [True, "hf_fisher.consumers.circuits.conflicts"]


def test_spectrum_is_a_consumer_of_the_curvature_operators():
    out = _run("""
        import json, warnings
        from hf_fisher.consumers import spectrum as consumer
        from hf_fisher.estimators import curvature
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            from hf_fisher.estimators import spectrum as old
        msgs = [str(x.message) for x in w if issubclass(x.category, DeprecationWarning)]
        names = ["spectrum", "SpectrumResult", "BlockSpectrum", "capacity_metrics", "lanczos", "hutchinson_trace",
                 "slq_density", "_measure", "_jsonable", "_check_int"]
        ops = ["EmpiricalFisherOperator", "GGNOperator", "block_definitions", "_Problem", "_Operator", "_GradientSink",
               "_eval_mode", "_forward_ad", "CURVATURES", "BLOCK_KINDS"]
        print(json.dumps({
            "consumer": [getattr(old, n) is getattr(consumer, n) for n in names],
            "operators": [getattr(old, n) is getattr(curvature, n) for n in ops],
            "hook_in_old": hasattr(old, "hf_fisher_register_consumers"),
            "hook_in_curvature": hasattr(curvature, "hf_fisher_register_consumers"),
            "all": sorted(old.__all__), "msgs": msgs,
        }))
    """)
    assert all(out["consumer"]) and all(out["operators"])
    assert not out["hook_in_old"] and not out["hook_in_curvature"]
    assert "spectrum" in out["all"] and "GGNOperator" in out["all"] and "hf_fisher_register_consumers" not in out["all"]
    assert len(out["msgs"]) == 1 and "hf_fisher.consumers.spectrum" in out["msgs"][0] and "hf_fisher.estimators.curvature" in out["msgs"][0]


def test_registry_holds_the_moved_consumers_and_no_old_path_is_loaded():
    out = _run(f"""
        import json, sys
        from hf_fisher import plugins
        consumers = plugins.consumers()
        print(json.dumps({{
            "where": {{n: consumers[n].__module__ for n in {sorted(REGISTERED_IN)!r}}},
            "builtins": list(plugins.BUILTIN_PLUGINS),
            "loaded_old": sorted(m for m in {sorted(ALIASES) + ["hf_fisher.estimators.spectrum"]!r} if m in sys.modules),
            "failed": plugins.failed_plugins(),
        }}))
    """)
    assert out["where"] == REGISTERED_IN
    assert out["failed"] == [] and out["loaded_old"] == []
    assert not set(out["builtins"]) & (set(ALIASES) | {"hf_fisher.estimators.spectrum"})
