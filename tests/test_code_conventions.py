"""Conventions checked on the source: loggers by ``__name__``, the PEP 561 marker, the slow marker."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import hf_fisher

ROOT = Path(hf_fisher.__file__).resolve().parent.parent
SOURCES = sorted([*(ROOT / "hf_fisher").rglob("*.py"), *(ROOT / "plugins").glob("*/*/*.py")])

#: a library logger configured (not logged to) by name: the CLI sets up the package's root logger
CONFIGURES_PACKAGE_LOGGER = {("hf_fisher/cli/common.py", "hf_fisher")}


def _hand_typed_loggers(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "getLogger"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            out.append((node.lineno, node.args[0].value))
    return out


def test_every_module_logs_to_its_own_name():
    found = [
        f"{path.relative_to(ROOT)}:{line}: getLogger({name!r})"
        for path in SOURCES
        for line, name in _hand_typed_loggers(path)
        if (path.relative_to(ROOT).as_posix(), name) not in CONFIGURES_PACKAGE_LOGGER
    ]
    assert len(SOURCES) > 50
    assert not found, "use logging.getLogger(__name__):\n" + "\n".join(found)


def test_py_typed_ships_with_the_package():
    assert (ROOT / "hf_fisher" / "py.typed").is_file()
    tomllib = pytest.importorskip("tomllib") if sys.version_info >= (3, 11) else pytest.skip("tomllib: 3.11+")
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "py.typed" in meta["tool"]["setuptools"]["package-data"]["hf_fisher"]


def test_slow_marker_is_registered_and_ruff_is_configured():
    tomllib = pytest.importorskip("tomllib") if sys.version_info >= (3, 11) else pytest.skip("tomllib: 3.11+")
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert any(m.startswith("slow:") for m in meta["tool"]["pytest"]["ini_options"]["markers"])
    ruff = meta["tool"]["ruff"]
    assert ruff["target-version"] == "py310" and {"E", "F", "W", "I", "UP", "B"} <= set(ruff["lint"]["select"])


def test_the_code_passes_ruff():
    """The ruff configuration in pyproject.toml is one the code passes (the test extras install ruff)."""
    import shutil
    import subprocess

    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    proc = subprocess.run([ruff, "check", "--no-cache", "hf_fisher", "tests", "plugins", "benchmarks", "examples", "scripts"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
