"""Issue 22, the artifacts package: ``hf_fisher.artifacts`` is one layer (no import of the analysis
or consumer layers, no private names across its modules), every artifact gets save / load / push
from one mixin (``KFACFisher`` now publishes to and loads from the Hub like ``Fisher``), and the
old module paths keep working for one release with a ``DeprecationWarning``.

The Hub is the local Hub-compatible server of tests/hub_server.py (no mocks, no network).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_fisher
from hf_fisher.artifacts import DEFAULT_MAX_SHARD_SIZE, ArtifactHubMixin
from hf_fisher.artifacts.fisher import Fisher
from hf_fisher.artifacts.kfac import KFACFisher
from hf_fisher.errors import ArtifactError, InvalidInputError, ModelMismatchError

import tiny_models as tm

pytest_plugins = ["hub_server"]  # the hub_server fixture
pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hf_fisher" / "artifacts"
MODULES = sorted(f"hf_fisher.artifacts.{p.stem}" for p in PACKAGE.glob("*.py") if p.stem != "__init__")
KFAC_FILES = {"kfac.safetensors", "kfac_config.json", "README.md"}
OLD_PATHS = {
    "hf_fisher.fisher": "hf_fisher.artifacts.fisher",
    "hf_fisher.kfac": "hf_fisher.artifacts.kfac",
    "hf_fisher.cards": "hf_fisher.artifacts.cards",
    "hf_fisher.atomic": "hf_fisher.artifacts.atomic",
    "hf_fisher.integrations.hub": "hf_fisher.artifacts.hub",
}


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


# ---------------------------------------------------------------------------- one layer
def test_package_lists_its_modules():
    assert {"hf_fisher.artifacts." + m for m in ("base", "format", "fisher", "reader", "kfac", "cards", "hub",
                                                 "atomic", "values", "metadata")} <= set(MODULES)


@pytest.mark.parametrize("module", ["hf_fisher.artifacts", *MODULES])
def test_importing_the_artifact_layer_imports_no_analysis_or_consumer(module):
    """Each module alone, in a fresh interpreter: the artifact layer sits below analysis and the
    consumers (they import it, never the reverse at import time)."""
    loaded = json.loads(_run(
        f"import sys, json, {module}, hf_fisher.artifacts as a\n"
        "[getattr(a, n) for n in a.__all__]\n"  # every public name of the package, resolved
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('hf_fisher'))))"
    ))
    assert module in loaded and "hf_fisher.artifacts.kfac" in loaded
    above = [m for m in loaded if m.startswith(("hf_fisher.consumers", "hf_fisher.analysis", "hf_fisher.cli",
                                                "hf_fisher.collector", "hf_fisher.api", "hf_fisher.estimators"))]
    assert above == []


def test_no_private_names_across_the_package():
    """``from hf_fisher.artifacts.X import _y`` nowhere inside the package: modules share public names."""
    crossings = []
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hf_fisher.artifacts"):
                crossings += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hf_fisher.") and \
                    not node.module.startswith(("hf_fisher.artifacts", "hf_fisher.errors", "hf_fisher.layout")) and \
                    node.col_offset == 0:
                crossings.append(f"{path.name}: module-level import of {node.module}")
    assert crossings == []


def test_every_artifact_uses_the_one_mixin():
    for cls in (Fisher, KFACFisher):
        assert issubclass(cls, ArtifactHubMixin)
        for name in ("save_pretrained", "from_pretrained", "push_to_hub", "check_values"):
            assert hasattr(cls, name)
    # one default shard size
    assert inspect.signature(Fisher.save_pretrained).parameters["max_shard_size"].default == DEFAULT_MAX_SHARD_SIZE
    assert hf_fisher.Fisher is Fisher and hf_fisher.KFACFisher is KFACFisher


# ---------------------------------------------------------------------------- deprecated paths
def test_old_paths_warn_and_are_the_new_modules():
    code = (
        "import importlib, json, sys, warnings\n"
        "out = {}\n"
        f"for old, new in {OLD_PATHS!r}.items():\n"
        "    with warnings.catch_warnings(record=True) as w:\n"
        "        warnings.simplefilter('always')\n"
        "        mod = importlib.import_module(old)\n"
        "    dep = [str(x.message) for x in w if issubclass(x.category, DeprecationWarning)]\n"
        "    out[old] = [mod is sys.modules[new], dep]\n"
        "import hf_fisher.fisher, hf_fisher.integrations\n"
        "from hf_fisher.integrations import hub\n"
        "out['private'] = [hf_fisher.fisher._value_problems.__module__, hf_fisher.fisher._library_version() != '',\n"
        "                  hub is sys.modules['hf_fisher.artifacts.hub'], hub._check_repo_path('a/b', 'x')]\n"
        "print(json.dumps(out))\n"
    )
    out = json.loads(_run(code))
    for old, new in OLD_PATHS.items():
        same, messages = out[old]
        assert same, old
        assert any(old in m and new in m for m in messages), (old, messages)
    assert out["private"] == ["hf_fisher.artifacts.values", True, True, "a/b"]


# ---------------------------------------------------------------------------- KFAC on the Hub
@pytest.fixture(scope="module")
def gpt2():
    return tm.gpt2(seed=4)


@pytest.fixture(scope="module")
def kfac(gpt2):
    batch = tm.padded_batch([6, 5, 4], seed=0, vocab=gpt2.config.vocab_size)
    return hf_fisher.collect(gpt2, [batch], estimator="kfac", progress=False)


def _same_kfac(a: KFACFisher, b: KFACFisher) -> None:
    assert set(a.layers) == set(b.layers) and a.param_shapes == b.param_shapes
    assert a.counts == b.counts and a.settings == b.settings and a.uncovered == b.uncovered
    for n, L in a.layers.items():
        M = b.layers[n]
        assert (L.kind, L.weight, L.bias, L.a_diagonal, L.g_diagonal) == (M.kind, M.weight, M.bias, M.a_diagonal, M.g_diagonal)
        assert torch.equal(L.A, M.A) and torch.equal(L.G, M.G)


def test_kfac_push_to_hub_and_from_pretrained(hub_server, kfac, gpt2, tmp_path):
    url = kfac.push_to_hub("user/kfac-math", token=hub_server.token)
    history = hub_server.commits("user/kfac-math")
    assert len(history) == 2  # the repository's creation, then ONE commit with every file
    push = history[0]
    assert url == f"{hub_server.endpoint}/user/kfac-math/commit/{push.oid}"
    assert set(push.added) == KFAC_FILES and "KFAC artifact" in push.title and f"{len(kfac)} layers" in push.title
    assert push.tree["kfac.safetensors"].is_lfs
    local = kfac.save_pretrained(tmp_path / "local")
    assert hub_server.files("user/kfac-math")["kfac_config.json"] == (local / "kfac_config.json").read_bytes()

    back = KFACFisher.from_pretrained("user/kfac-math", model=gpt2, cache_dir=tmp_path / "cache")
    _same_kfac(kfac, back)
    assert "load_problems" not in back.metadata.extra
    back.check_values()  # loaded valid: nothing to refuse
    # the folder alone (what a consumer checks before loading, e.g. merging's "is it a KFAC?")
    folder = KFACFisher.resolve_folder("user/kfac-math", cache_dir=tmp_path / "cache")
    assert {p.name for p in folder.iterdir()} >= KFAC_FILES and folder.is_relative_to(tmp_path / "cache")
    assert KFACFisher.resolve_folder(local) == local

    # under a subfolder of a model repository, "repo:subfolder" and subfolder= alike
    kfac.push_to_hub("user/tiny-gpt2", path_in_repo="kfac", token=hub_server.token)
    assert set(hub_server.commits("user/tiny-gpt2")[0].added) == {f"kfac/{n}" for n in KFAC_FILES}
    _same_kfac(kfac, KFACFisher.from_pretrained("user/tiny-gpt2:kfac", cache_dir=tmp_path / "cache"))
    _same_kfac(kfac, KFACFisher.from_pretrained("user/tiny-gpt2", subfolder="kfac", cache_dir=tmp_path / "cache"))

    # a revision pins the artifact
    sha = push.oid
    other = KFACFisher.from_pretrained(local)
    other.metadata = dataclasses.replace(other.metadata, task="other")
    other.push_to_hub("user/kfac-math", token=hub_server.token, commit_message="again")
    assert hub_server.commits("user/kfac-math")[0].title == "again"
    assert KFACFisher.from_pretrained("user/kfac-math", cache_dir=tmp_path / "cache").metadata.task == "other"
    pinned = KFACFisher.from_pretrained("user/kfac-math", revision=sha, cache_dir=tmp_path / "cache")
    _same_kfac(kfac, pinned)
    assert pinned.metadata.task == kfac.metadata.task != "other"


def test_kfac_hub_load_checks_like_a_local_load(hub_server, kfac, tmp_path):
    """The downloaded folder goes through the local checks: the model match and the values."""
    kfac.push_to_hub("user/kfac-check", token=hub_server.token)
    with pytest.raises(ModelMismatchError):
        KFACFisher.from_pretrained("user/kfac-check", model=tm.llama(), cache_dir=tmp_path / "c")
    name = sorted(kfac.layers)[0]
    bad = KFACFisher.from_pretrained(kfac.save_pretrained(tmp_path / "bad"))
    bad.layers[name].A[0, 0] = float("nan")
    bad._values_ok = False
    bad.push_to_hub("user/kfac-bad", token=hub_server.token)
    with pytest.raises(ArtifactError, match=rf"'A\.{name}' has 1 NaN"):
        KFACFisher.from_pretrained("user/kfac-bad", cache_dir=tmp_path / "c")
    loose = KFACFisher.from_pretrained("user/kfac-bad", cache_dir=tmp_path / "c", strict=False)
    assert "1 NaN" in loose.metadata.extra["load_problems"][0]
    with pytest.raises(ArtifactError, match="1 NaN"):  # consumers still refuse it
        loose.check_values()


def test_kfac_push_refuses_bad_input_before_any_request(hub_server, kfac):
    before = len(hub_server.requests)
    with pytest.raises(InvalidInputError, match="repo"):
        kfac.push_to_hub("not a repo id", token=hub_server.token)
    with pytest.raises(InvalidInputError, match="path_in_repo"):
        kfac.push_to_hub("user/x", path_in_repo="../up", token=hub_server.token)
    assert len(hub_server.requests) == before


def test_kfac_from_pretrained_local_keeps_its_refusals(kfac, tmp_path):
    folder = kfac.save_pretrained(tmp_path / "k")
    with pytest.raises(InvalidInputError, match="revision"):
        KFACFisher.from_pretrained(folder, revision="main")
    with pytest.raises(InvalidInputError, match="strict"):
        KFACFisher.from_pretrained(folder, strict="no")
    with pytest.raises(ArtifactError, match="not a KFAC artifact"):
        KFACFisher.from_pretrained(tmp_path)
    # the one overwrite policy: a KFAC save never replaces a folder holding something else
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError):
        kfac.save_pretrained(tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
