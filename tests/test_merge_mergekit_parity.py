"""hf_fisher's merges against mergekit 0.1.5's on the same checkpoints, element by element.

The same mergekit YAML recipe is run by mergekit (its Python API ``run_merge``, what ``mergekit-yaml``
calls) and by ``hf-fisher merge``; every tensor of the two outputs must be equal to the last bit
(float32 checkpoints). Methods whose masks are random (``dare_ties``, ``dare_linear``, ``della``,
``della_linear``) are compared tensor by tensor against mergekit's own kernel with torch's global
generator seeded as hf_fisher seeds that tensor (mergekit's whole-model draws follow its execution
order: the one documented difference), and whole-model at density 1. mergekit is installed in the
test set-up (scripts/setup.sh); without it these tests are skipped.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hf_fisher import cli
from hf_fisher.consumers.merge import math as mm
from hf_fisher.consumers.merge.recipe import RECIPE_NAME

import tiny_models as tm

mergekit = pytest.importorskip("mergekit", reason="mergekit is not installed (scripts/setup.sh installs mergekit==0.1.5)")

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = 3
DENSITIES = (0.3, 0.5, 1.0)
WEIGHTS = ((1.0, 1.0), (0.7, 0.3))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A float32 base and two fine-tunes of it (base + small noise), as safetensors folders with one
    tokenizer."""
    from hf_fisher.demo import word_tokenizer

    root = tmp_path_factory.mktemp("mk")
    tok = word_tokenizer([f"w{i}" for i in range(tm.VOCAB - 4)])
    tm.llama(torch.float32, seed=3, layers=LAYERS).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    for i in range(2):
        m = tm.llama(torch.float32, seed=3, layers=LAYERS)
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
        m.save_pretrained(root / f"m{i}")
        tok.save_pretrained(root / f"m{i}")
    return root


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def run_mergekit(recipe: dict, out: Path) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(recipe), str(out),
              MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=0))
    return _tensors(out)


def run_hf_fisher(recipe: dict, folder: Path) -> dict[str, torch.Tensor]:
    folder.mkdir()
    path = folder / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    assert cli.main(["merge", str(path), "--out", str(folder / "out"), "--no-progress"]) == 0
    assert (folder / "out" / RECIPE_NAME).is_file()
    return _tensors(folder / "out")


def assert_identical(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    bad = {k: (ours[k] - theirs[k]).abs().max().item() for k in ours if not torch.equal(ours[k], theirs[k])}
    assert not bad, f"tensors differing from mergekit (max abs difference): {bad}"


def _recipe(ckpt: Path, method: str, weights, density=None, **parameters) -> dict:
    models = []
    for i, w in enumerate(weights):
        params = {"weight": w}
        if density is not None:
            params["density"] = density
        models.append({"model": str(ckpt / f"m{i}"), "parameters": params})
    recipe = {"merge_method": method, "models": models}
    if method != "linear":  # mergekit's linear would merge the base in as one more model
        recipe["base_model"] = str(ckpt / "base")
    if parameters:
        recipe["parameters"] = parameters
    return recipe


DETERMINISTIC = [("linear", None, w) for w in WEIGHTS] + [("task_arithmetic", None, w) for w in WEIGHTS] + [
    (m, d, w) for m in ("ties", "breadcrumbs", "breadcrumbs_ties") for d in DENSITIES for w in WEIGHTS
] + [(m, 1.0, w) for m in ("dare_ties", "dare_linear", "della", "della_linear") for w in WEIGHTS]


@pytest.mark.slow
@pytest.mark.parametrize("method, density, weights", DETERMINISTIC)
def test_whole_model_equals_mergekit(ckpt, tmp_path, method, density, weights):
    recipe = _recipe(ckpt, method, weights, density)
    assert_identical(run_hf_fisher(recipe, tmp_path / "ours"), run_mergekit(recipe, tmp_path / "mk"))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_random_masks_equal_mergekit_kernel_seeded_per_tensor(ckpt, tmp_path, method):
    """Every tensor of hf_fisher's merge equals mergekit's kernel run on that tensor with torch's
    generator seeded by hf_fisher's per-tensor seed (the mask drawn the same way)."""
    from mergekit.merge_methods import registry as mk_registry
    from mergekit.merge_methods.base import TensorGroup

    kernel = mk_registry.get(method)
    defaults = {p.name: p.default for p in kernel.spec.parameters}
    base, m0, m1 = (_tensors(ckpt / n) for n in ("base", "m0", "m1"))
    extra = {"epsilon": 0.1} if method.startswith("della") else {}
    for density in (0.3, 0.5):
        for weights in WEIGHTS:
            recipe = _recipe(ckpt, method, weights, density, **extra)
            ours = run_hf_fisher(recipe, tmp_path / f"ours-{density}-{weights[1]}")
            for name, b in base.items():
                group = TensorGroup.from_tensors([b, m0[name], m1[name]], ids=["base", "m0", "m1"], base_index=0, name=name)
                per = {"weight": dict(zip(["m0", "m1"], weights)), "density": {"m0": density, "m1": density}}
                if extra:
                    per["epsilon"] = {"m0": 0.1, "m1": 0.1}
                shared = {k: v for k, v in defaults.items() if k not in per and k not in ("gamma",)}
                torch.manual_seed(mm.tensor_generator(0, name, 0).initial_seed())
                theirs = kernel.merge_group(group, **shared, **per)
                assert torch.equal(ours[name], theirs), (method, density, weights, name)


@pytest.mark.slow
def test_mergekit_recipe_with_gradients_filters_and_options_runs_unchanged(ckpt, tmp_path, caplog):
    """A typical mergekit recipe (per-layer gradients of weight and density, a filter by module
    name, normalize, int8_mask, lambda, dtype, tokenizer_source, the base listed among the models)
    gives mergekit's model."""
    recipe = {
        "models": [
            {"model": str(ckpt / "base")},
            {"model": str(ckpt / "m0"), "parameters": {
                "density": [0.2, 0.6, 0.4], "weight": [{"filter": "self_attn", "value": [0.8, 0.3]}, {"value": 0.5}]}},
            {"model": str(ckpt / "m1"), "parameters": {"density": 0.5, "weight": 0.4}},
        ],
        "merge_method": "ties",
        "base_model": str(ckpt / "base"),
        "parameters": {"normalize": True, "int8_mask": True, "lambda": [1.0, 0.8]},
        "dtype": "float32",
        "tokenizer_source": "base",
    }
    with caplog.at_level(logging.WARNING):
        ours = run_hf_fisher(recipe, tmp_path / "ours")
    assert_identical(ours, run_mergekit(recipe, tmp_path / "mk"))
    # the gradient is read per layer: layer 0 and layer 2 of m0's attention got other weights than its MLP
    base, m0 = _tensors(ckpt / "base"), _tensors(ckpt / "m0")
    assert not torch.equal(ours["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    assert not any(torch.equal(ours[k], m0[k]) for k in ours)


@pytest.mark.slow
def test_slerp_recipe_with_t_gradient_and_filter(ckpt, tmp_path):
    recipe = {
        "slices": None,
        "models": [{"model": str(ckpt / "m0")}, {"model": str(ckpt / "m1")}],
        "merge_method": "slerp",
        "base_model": str(ckpt / "m0"),
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                             {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]},
        "dtype": "float32",
    }
    del recipe["slices"]
    assert_identical(run_hf_fisher(recipe, tmp_path / "ours"), run_mergekit(recipe, tmp_path / "mk"))


@pytest.mark.slow
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_plugin_equals_mergekit(ckpt, tmp_path, filter_wise):
    from hf_fisher import plugins

    if "model_stock" not in plugins.merge_methods():
        pytest.skip("the plugin hf_fisher_extra_methods is not installed (scripts/setup.sh installs it)")
    recipe = {"merge_method": "model_stock", "base_model": str(ckpt / "base"),
              "models": [{"model": str(ckpt / "base")}, {"model": str(ckpt / "m0")}, {"model": str(ckpt / "m1")}],
              "parameters": {"filter_wise": filter_wise}}
    assert_identical(run_hf_fisher(recipe, tmp_path / "ours"), run_mergekit(recipe, tmp_path / "mk"))


@pytest.mark.slow
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("options", [{}, {"nuslerp_flatten": False}, {"nuslerp_flatten": False, "nuslerp_row_wise": True}])
def test_nuslerp_equals_mergekit(ckpt, tmp_path, with_base, options):
    recipe = {"merge_method": "nuslerp",
              "models": [{"model": str(ckpt / "m0"), "parameters": {"weight": 0.7}},
                         {"model": str(ckpt / "m1"), "parameters": {"weight": 0.3}}]}
    if with_base:
        recipe["base_model"] = str(ckpt / "base")
    if options:
        recipe["parameters"] = options
    assert_identical(run_hf_fisher(recipe, tmp_path / "ours"), run_mergekit(recipe, tmp_path / "mk"))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ties", "dare_linear", "breadcrumbs_ties", "linear"])
def test_the_recipe_hf_fisher_writes_runs_in_mergekit_to_the_same_model(ckpt, tmp_path, method):
    from hf_fisher.consumers.merge.api import merge_with_fisher

    kw = {} if method == "linear" else {"base_model": ckpt / "base", "density": 0.5 if method != "dare_linear" else 1.0}
    out = merge_with_fisher([ckpt / "m0", ckpt / "m1"], method=method, weights=[0.7, 0.3], output_dir=tmp_path / "ours",
                            progress=False, **kw)
    recipe = yaml.safe_load((out / RECIPE_NAME).read_text())
    assert_identical(_tensors(out), run_mergekit(recipe, tmp_path / "mk"))
