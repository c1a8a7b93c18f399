"""The ``hf-fisher`` command line as a package (issue 22): one module per command with its parser
beside its handler, no hard-coded merge-method / prune-score lists, no import circle with the demo."""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import hf_fisher.cli as cli

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "hf_fisher"
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=os.pathsep.join(
    [str(REPO), os.environ.get("PYTHONPATH", "")]))
COMMANDS = ["collect", "show", "plugins", "demo", "merge", "compare-estimators", "prune", "report", "qkov", "conflicts",
            "analyze"]
# built-in merge methods and prune scores: none of them may be an argparse choice (they are registry names)
REGISTRY_NAMES = {"fisher", "fisher_task_vector", "average", "task_arithmetic", "ties", "dare", "regmean", "kfac",
                  "mask_fisher", "obd", "magnitude", "random", "wanda_sp", "flap", "taylor1", "taylor2"}


def entry_point() -> list[str]:
    script = Path(sys.executable).with_name("hf-fisher")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "hf_fisher.cli"]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_each_command_is_a_module_with_its_parser_beside_its_handler():
    subs = _subparsers(cli.build_parser())
    assert list(subs) == COMMANDS  # the order of `hf-fisher --help`
    assert [m.__name__ for m in cli.COMMANDS] == [f"hf_fisher.cli.{c.replace('-', '_')}" for c in COMMANDS]
    for module, (name, sub) in zip(cli.COMMANDS, subs.items()):
        assert sub.get_default("func") is module.run, name
        assert callable(module.add_parser)


def test_no_argparse_choices_hard_code_merge_methods_or_prune_scores():
    for name, sub in _subparsers(cli.build_parser()).items():
        for action in sub._actions:
            assert not set(action.choices or ()) & REGISTRY_NAMES, (name, action.option_strings, action.choices)


def test_unknown_prune_score_is_refused_before_the_model_is_loaded(tmp_path):
    """No argparse choices any more: the consumer's own check refuses the name, exit 2, nothing
    written, before the weights are read (the folder has a config but no weights: loading them
    would fail with another message)."""
    import transformers as tf

    model = tmp_path / "model"
    tf.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=2, architectures=["LlamaForCausalLM"]).save_pretrained(model)
    out = tmp_path / "out"
    proc = subprocess.run([*entry_point(), "prune", "--model", str(model), "--sparsity", "0.3", "--score", "nosuch",
                           "--out", str(out)], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("hf-fisher prune: error:") and "score 'nosuch'" in proc.stderr, proc.stderr
    assert "could not load model" not in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() and sorted(p.name for p in model.iterdir()) == ["config.json"]


def test_every_help_imports_no_torch():
    code = ("import sys, contextlib, io\n"
            "import hf_fisher.cli as c\n"
            f"cmds = {COMMANDS!r}\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    assert c.main(['--help']) == 0\n"
            "    for cmd in cmds:\n"
            "        assert c.main([cmd, '--help']) == 0, cmd\n"
            "heavy = [m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("module", ["hf_fisher.cli", "hf_fisher.demo"])
def test_python_dash_m_entry_points(module, tmp_path):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=tmp_path, env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: hf-fisher" + ("" if module == "hf_fisher.cli" else " demo"))


def _imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_the_cli_is_the_top_layer_nothing_imports_it():
    """No module of the library imports the command line, not even inside a function (the demo
    did: a cli <-> demo circle); only the ``python -m`` entry points do."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "cli" or rel.name == "__main__.py":
            continue
        bad = [n for n in _imports_of(path) if n == "hf_fisher.cli" or n.startswith("hf_fisher.cli.")]
        if bad:
            offenders.append((str(rel), bad))
    assert not offenders, offenders


def test_demo_and_tables_alone_do_not_load_the_cli():
    code = ("import sys, hf_fisher.demo, hf_fisher.tables\n"
            "assert not [m for m in sys.modules if m.startswith('hf_fisher.cli')]\n")
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_names_callers_hold_still_import_from_hf_fisher_cli():
    from hf_fisher.tables import format_report, format_table

    assert cli.format_table is format_table and cli.format_report is format_report
    for name in ("main", "build_parser", "check_output_folder", "estimate_artifact_bytes", "EXIT_ERROR",
                 "EXIT_BROKEN_PIPE", "_safetensors_shapes", "_position_limit"):
        assert getattr(cli, name) is not None, name
    assert json.loads(json.dumps(cli.__all__))  # the public list survived the split
