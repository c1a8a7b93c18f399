"""The hf-fisher-extra-methods plugin: Model Stock from the API, a recipe through the CLI, and
``hf-fisher plugins``, with the plugin found as an installed distribution (its entry point).

Self-contained (nothing from the repository's tests/ folder). When the distribution is not
installed (a checkout before scripts/setup.sh installed it), a real ``.dist-info`` with its
entry point is written to a temporary folder put on ``sys.path`` / ``PYTHONPATH``, next to the
plugin's source folder: the plugin is found exactly as an installed one is.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
import yaml
from safetensors.torch import load_file

import hf_fisher
from hf_fisher import plugins

HERE = Path(__file__).resolve().parent
PLUGIN_SRC = HERE.parent  # holds the package hf_fisher_extra_methods
REPO = HERE.parents[2]
DIST = "hf-fisher-extra-methods"
ENTRY = "extra_methods"


def _installed() -> bool:
    try:
        importlib.metadata.distribution(DIST)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> list[str]:
    """The folders to put on the path so that the plugin is an installed distribution."""
    if _installed():
        return []
    where = tmp_path_factory.mktemp("site")
    info = where / "hf_fisher_extra_methods-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {DIST}\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(f"[hf_fisher]\n{ENTRY} = hf_fisher_extra_methods.model_stock\n")
    return [str(where), str(PLUGIN_SRC)]


@pytest.fixture
def loaded(site, monkeypatch):
    for p in reversed(site):
        monkeypatch.syspath_prepend(p)
    importlib.invalidate_caches()
    monkeypatch.delenv("HF_FISHER_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("HF_FISHER_PLUGINS", raising=False)
    plugins.reset()
    yield
    plugins.reset()


def _cli(*args: str, cwd: Path, site: list[str]) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("hf-fisher")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "hf_fisher.cli"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO), *site, os.environ.get("PYTHONPATH", "")]))
    env.pop("HF_FISHER_DISABLE_PLUGIN_AUTOLOAD", None)
    env.pop("HF_FISHER_PLUGINS", None)
    return subprocess.run([*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


# ------------------------------------------------------------------ models and the reference
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A base and three fine-tunes ``θ_i = θ_base + a_i d + noise_i`` (a shared direction ``d``
    per tensor, so the task vectors are at angles strictly between 0 and 90 degrees)."""
    root = tmp_path_factory.mktemp("models")
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    base = tf.LlamaForCausalLM(cfg).eval()
    base.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(1)
    sd = base.state_dict()
    shared = {k: torch.randn(v.shape, generator=g) for k, v in sd.items()}
    paths = []
    for i, (a, noise) in enumerate([(0.02, 0.01), (0.03, 0.02), (0.01, 0.015)]):
        model = tf.LlamaForCausalLM(cfg).eval()
        model.load_state_dict({k: v + a * shared[k] + noise * torch.randn(v.shape, generator=g) for k, v in sd.items()})
        model.save_pretrained(root / f"ft{i}")
        paths.append(root / f"ft{i}")
    return root / "base", paths


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def reference(base: dict, fts: list[dict], weights: list[float]) -> dict[str, torch.Tensor]:
    """Model Stock written out again, in float64, one tensor at a time."""
    out = {}
    n = len(fts)
    for k, b in base.items():
        b = b.double()
        taus = [ft[k].double().flatten() - b.flatten() for ft in fts]
        cos = torch.stack([torch.nn.functional.cosine_similarity(taus[i], taus[j], dim=0)
                           for i in range(n) for j in range(i + 1, n)]).mean().clamp(0, 1).item()
        t = n * cos / (1 + (n - 1) * cos)
        avg = sum(w * ft[k].double() for w, ft in zip(weights, fts)) / sum(weights)
        out[k] = t * avg + (1 - t) * b
    return out


# ------------------------------------------------------------------ tests
def test_registered_from_the_entry_point(loaded):
    from hf_fisher_extra_methods.model_stock import ModelStock

    assert plugins.merge_methods()["model_stock"] is ModelStock
    (row,) = [d for d in plugins.describe() if d["kind"] == "merge_method" and d["name"] == "model_stock"]
    assert row["plugin"] == ENTRY and row["distribution"] == DIST


def test_api_merge_equals_the_formula(loaded, models, tmp_path):
    base, fts = models
    weights = [0.5, 0.3, 0.2]
    out = hf_fisher.merge_with_fisher(fts, method="model_stock", base_model=base, weights=weights, dtype="float64",
                                      convention="hf_fisher", output_dir=tmp_path / "out", progress=False)
    merged = _weights(out)
    ref = reference(_weights(base), [_weights(f) for f in fts], weights)
    assert merged.keys() == ref.keys()
    moved = 0
    for k in ref:
        torch.testing.assert_close(merged[k], ref[k], rtol=1e-12, atol=1e-14)
        avg = sum(w * _weights(f)[k].double() for w, f in zip(weights, fts)) / sum(weights)
        moved += not torch.allclose(merged[k], avg) and not torch.allclose(merged[k], _weights(base)[k].double())
    assert moved == len(ref)  # t strictly between 0 and 1 everywhere: neither the average nor the base
    recipe = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert recipe["merge_method"] == "model_stock" and recipe["base_model"] == str(base)
    assert "model_stock" in (out / "README.md").read_text()


def test_api_refusals(loaded, models, tmp_path):
    from hf_fisher.errors import InvalidInputError

    base, fts = models
    with pytest.raises(InvalidInputError, match="'model_stock' needs base_model"):
        hf_fisher.merge_with_fisher(fts, method="model_stock", output_dir=tmp_path / "o", progress=False)
    with pytest.raises(InvalidInputError, match="non-negative weights"):
        hf_fisher.merge_with_fisher(fts, method="model_stock", base_model=base, weights=[1, -1, 1],
                                    output_dir=tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_cli_recipe_merge_and_plugins_listing(site, models, tmp_path):
    base, fts = models
    recipe = {"merge_method": "model_stock", "base_model": str(base), "dtype": "float64",
              "models": [{"model": str(f)} for f in fts], "parameters": {"convention": "hf_fisher"}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    proc = _cli("merge", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "out"), "--no-progress",
                cwd=tmp_path, site=site)
    assert proc.returncode == 0, proc.stderr
    merged = _weights(tmp_path / "out")
    ref = reference(_weights(base), [_weights(f) for f in fts], [1.0, 1.0, 1.0])
    for k in ref:
        torch.testing.assert_close(merged[k], ref[k], rtol=1e-12, atol=1e-14)
    # the recipe the merge wrote reproduces it
    proc = _cli("merge", str(tmp_path / "out" / "mergekit_config.yml"), "--out", str(tmp_path / "again"),
                "--no-progress", cwd=tmp_path, site=site)
    assert proc.returncode == 0, proc.stderr
    again = _weights(tmp_path / "again")
    assert all(torch.equal(again[k], merged[k]) for k in merged)
    proc = _cli("plugins", cwd=tmp_path, site=site)
    assert proc.returncode == 0, proc.stderr
    (line,) = [ln for ln in proc.stdout.splitlines() if "model_stock" in ln]
    assert line.split()[:4] == ["merge_method", "model_stock", ENTRY, DIST], line


def test_cli_refuses_a_recipe_without_base_before_work(site, models, tmp_path):
    _, fts = models
    recipe = {"merge_method": "model_stock", "models": [{"model": str(f)} for f in fts]}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    proc = _cli("merge", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "out"), "--no-progress",
                cwd=tmp_path, site=site)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "needs base_model" in proc.stderr.strip().splitlines()[-1], proc.stderr
    assert not (tmp_path / "out").exists()
