"""Typical published mergekit recipes, one per method users pick most (tests/mergekit_recipes/,
model ids replaced by tiny local checkpoints), run unchanged by ``hf-fisher merge --config`` and by
mergekit 0.1.5's ``run_merge``.

With ``dtype: float32`` the outputs are equal to the last bit (random-mask methods: every tensor
equals mergekit's kernel with torch's generator seeded as hf_fisher seeds that tensor). As
published (``dtype: bfloat16`` / ``float16``), mergekit reads the inputs in that dtype and computes
in it, while hf_fisher computes in float32 and rounds once: the outputs agree to the rounding of
that dtype (the one documented difference)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import yaml
from test_merge_mergekit_parity import _tensors, assert_identical, run_mergekit

from hf_fisher import cli
from hf_fisher.consumers.merge import math as mm

import tiny_models as tm

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPES = Path(__file__).parent / "mergekit_recipes"
LAYERS = 4
RANDOM = ("dare_ties", "della")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """A float32 base and three fine-tunes of it, with one tokenizer."""
    from hf_fisher.demo import word_tokenizer

    root = tmp_path_factory.mktemp("published")
    tok = word_tokenizer([f"w{i}" for i in range(tm.VOCAB - 4)])
    out = {}
    for i, name in enumerate(("BASE", "M0", "M1", "M2")):
        m = tm.llama(torch.float32, seed=3, layers=LAYERS)
        if i:
            g = torch.Generator().manual_seed(40 + i)
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.02)
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    return out


def _recipe(name: str, zoo: dict[str, Path], dtype: str | None = None) -> tuple[str, dict]:
    """The recipe's text with the model ids replaced (and ``dtype`` replaced when given)."""
    text = (RECIPES / f"{name}.yml").read_text()
    for key in sorted(zoo, key=len, reverse=True):
        text = text.replace(f" {key}\n", f" {zoo[key]}\n")
    if dtype is not None:
        text = "\n".join(f"dtype: {dtype}" if line.startswith("dtype:") else line for line in text.splitlines()) + "\n"
    return text, yaml.safe_load(text)


def _ours(text: str, folder: Path) -> dict[str, torch.Tensor]:
    folder.mkdir()
    (folder / "recipe.yml").write_text(text)
    assert cli.main(["merge", "--config", str(folder / "recipe.yml"), "--out", str(folder / "out"), "--no-progress"]) == 0
    return _tensors(folder / "out")


def _kernel_per_tensor(recipe: dict, zoo: dict[str, Path]) -> dict[str, torch.Tensor]:
    """mergekit's kernel on every tensor, torch's generator seeded by hf_fisher's per-tensor seed
    (the recipes' per-model settings are scalars; the base is not merged in)."""
    from mergekit.merge_methods import registry as mk_registry
    from mergekit.merge_methods.base import TensorGroup

    kernel = mk_registry.get(recipe["merge_method"])
    base_ref = recipe["base_model"]
    entries = [e for e in recipe["models"] if e["model"] != base_ref]
    ids = [f"m{i}" for i in range(len(entries))]
    top = recipe.get("parameters") or {}
    per = {p.name: {i: (e.get("parameters") or {}).get(p.name, top.get(p.name, p.default)) for i, e in zip(ids, entries)}
           for p in kernel.spec.input_parameters}
    shared = {p.name: top.get(p.name, p.default) for p in kernel.spec.shared_parameters}
    base = _tensors(Path(base_ref))
    models = [_tensors(Path(e["model"])) for e in entries]
    out = {}
    for name, b in base.items():
        group = TensorGroup.from_tensors([b] + [m[name] for m in models], ids=["base", *ids], base_index=0, name=name)
        torch.manual_seed(mm.tensor_generator(0, name, 0).initial_seed())
        out[name] = kernel.merge_group(group, **shared, **per)
    return out


METHODS = ["ties", "linear", "slerp", "dare_ties", "task_arithmetic", "model_stock", "della", "breadcrumbs"]


def _needs_plugin(name: str) -> None:
    from hf_fisher import plugins

    if name == "model_stock" and "model_stock" not in plugins.merge_methods():
        pytest.skip("the plugin hf_fisher_extra_methods is not installed (scripts/setup.sh installs it)")


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_published_recipe_in_float32_equals_mergekit_bit_for_bit(zoo, tmp_path, name):
    _needs_plugin(name)
    text, recipe = _recipe(name, zoo, dtype="float32")
    ours = _ours(text, tmp_path / "ours")
    theirs = _kernel_per_tensor(recipe, zoo) if recipe["merge_method"] in RANDOM else run_mergekit(recipe, tmp_path / "mk")
    assert_identical(ours, theirs)


@pytest.mark.slow
@pytest.mark.parametrize("name", [m for m in METHODS if m not in RANDOM])
def test_published_recipe_as_published_is_mergekits_float32_merge_rounded_once(zoo, tmp_path, name, caplog):
    """As published (a 16-bit ``dtype``) hf_fisher's output is mergekit's float32 merge rounded once
    to that dtype, bit for bit, and the difference from mergekit's 16-bit arithmetic is logged."""
    _needs_plugin(name)
    text, recipe = _recipe(name, zoo)
    with caplog.at_level(logging.WARNING, logger="hf_fisher"):
        ours = _ours(text, tmp_path / "ours")
    assert f"recipe dtype {recipe['dtype']}: mergekit reads the models in" in caplog.text
    dtype = getattr(torch, recipe["dtype"])
    theirs = run_mergekit(_recipe(name, zoo, dtype="float32")[1], tmp_path / "mk")
    assert {k: v.dtype for k, v in ours.items()} == dict.fromkeys(theirs, dtype)
    assert_identical(ours, {k: v.to(dtype) for k, v in theirs.items()})
