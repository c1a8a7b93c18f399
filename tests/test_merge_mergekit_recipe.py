"""mergekit recipes with ``hf-fisher merge`` without mergekit installed: per-layer gradients and
``filter:`` conditions resolved as mergekit resolves them (checked against the formulas by hand),
mergekit's keys hf_fisher does not carry out refused naming the key (exit 2, nothing written), and
the recipe written beside a merge named ``mergekit_config.yml``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hf_fisher import cli
from hf_fisher.consumers.merge import math as mm
from hf_fisher.consumers.merge.parameters import evaluate, layer_position

import tiny_models as tm

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mkr")
    tm.llama(torch.float32, seed=3, layers=3).save_pretrained(root / "base")
    for i in range(2):
        m = tm.llama(torch.float32, seed=3, layers=3)
        g = torch.Generator().manual_seed(20 + i)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
        m.save_pretrained(root / f"m{i}")
    return root


def _run(tmp_path: Path, recipe: dict | str, capsys=None) -> tuple[int, Path]:
    path = tmp_path / "recipe.yml"
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False))
    out = tmp_path / "out"
    return cli.main(["merge", str(path), "--out", str(out), "--no-progress"]), out


def test_gradient_and_filter_resolution_follows_mergekit():
    # t = layer / (L - 1); outside the layers t = 0
    assert [layer_position(f"model.layers.{i}.mlp.up_proj.weight", 3) for i in range(3)] == [0.0, 0.5, 1.0]
    assert layer_position("model.embed_tokens.weight", 3) == 0.0 and layer_position("model.layers.0.x.weight", 1) == 1.0
    # a list of numbers: piecewise-linear over the layers
    assert evaluate([0.2, 0.6, 0.4], "model.layers.1.a", 0.25) == pytest.approx(0.4)
    assert evaluate([0.2, 0.6], "x", 0.5) == pytest.approx(0.4)
    # the first matching filter wins; no filter or "*" matches everything; none matching: None
    conds = [{"filter": "self_attn", "value": 0.1}, {"filter": "mlp", "value": [0.0, 1.0]}]
    assert evaluate(conds, "model.layers.2.self_attn.q_proj.weight", 1.0) == 0.1
    assert evaluate(conds, "model.layers.2.mlp.up_proj.weight", 0.5) == pytest.approx(0.5)
    assert evaluate(conds, "model.norm.weight", 0.0) is None
    assert evaluate([*conds, {"value": 7}], "model.norm.weight", 0.0) == 7


def test_per_model_gradients_give_the_formula_tensor_by_tensor(ckpt, tmp_path):
    recipe = {
        "merge_method": "ties",
        "base_model": str(ckpt / "base"),
        "models": [
            {"model": str(ckpt / "base")},  # the base listed among the models, as mergekit recipes do
            {"model": str(ckpt / "m0"), "parameters": {"weight": [1.0, 0.5], "density": [0.2, 0.6]}},
            {"model": str(ckpt / "m1"), "parameters": {"weight": 0.3, "density": 0.5}},
        ],
        "parameters": {"lambda": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}], "int8_mask": True},
        "dtype": "float32",
    }
    code, out = _run(tmp_path, recipe)
    assert code == 0
    got = load_file(str(out / "model.safetensors"))
    base, m0, m1 = (load_file(str(ckpt / n / "model.safetensors")) for n in ("base", "m0", "m1"))
    for name in ("model.layers.1.mlp.up_proj.weight", "model.layers.2.self_attn.k_proj.weight", "model.embed_tokens.weight"):
        t = layer_position(name, 3)
        ref = mm.generalized_task_arithmetic(
            base[name], [m0[name], m1[name]], [1.0 - 0.5 * t, 0.3], sparsification="magnitude", consensus="sum",
            densities=[0.2 + 0.4 * t, 0.5], normalize=True, scaling=0.5 if ".mlp." in name else 1.0)
        assert torch.equal(got[name], ref), name
    written = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert written["merge_method"] == "ties" and not (out / "merge_recipe.yaml").exists()


@pytest.mark.parametrize("text, key", [
    ("slices:\n  - sources: [{model: a, layer_range: [0, 2]}]\n    residual_weight: 0.5\nmerge_method: passthrough\n",
     "slices[0].residual_weight"),  # slices are carried out now (test_merge_mergekit_slices.py); this key is not
    ("modules: {}\nmerge_method: linear\nmodels: [{model: a}, {model: b}]\n", "modules"),
    ("merge_method: linear\nmodels: [{model: a}, {model: b}]\ntokenizer: {source: union}\n", "tokenizer"),
    ("merge_method: linear\nmodels: [{model: a}, {model: b}]\ntokenizer_source: union\n", "tokenizer_source"),
    ("merge_method: linear\nmodels: [{model: a}, {model: b}]\nchat_template: chatml\n", "chat_template"),
    ("merge_method: linear\nmodels: [{model: a}, {model: b}]\nfrobnicate: 1\n", "frobnicate"),
    ("merge_method: ties\nmodels: [{model: a, parameters: {weight: 1, densty: 0.5}}, {model: b}]\n",
     "models[0].parameters.densty"),
    ("merge_method: ties\nmodels: [{model: a}, {model: b}]\nparameters: {weight: [{filtr: mlp, value: 1}]}\n",
     "parameters.weight[0]"),
    ("merge_method: ties\nmodels: [{model: a}, {model: b}]\nparameters: {lambda: 0.5, scaling: 0.5}\n", "parameters.lambda"),
    ("merge_method: ties\nmodels: [{model: a}, {model: b}]\nparameters: {normalise: true}\n", "parameters.normalise"),
])
def test_mergekit_keys_not_carried_out_are_refused_naming_the_key(tmp_path, capsys, text, key):
    code, out = _run(tmp_path, text)
    err = capsys.readouterr().err
    assert code == 2 and f"'{key}'" in err, err
    assert not out.exists()


def test_a_setting_out_of_range_at_some_tensor_is_refused_before_anything_is_written(ckpt, tmp_path, capsys):
    recipe = {"merge_method": "ties", "base_model": str(ckpt / "base"),
              "models": [{"model": str(ckpt / "m0"), "parameters": {"weight": 1.0, "density": [0.5, 1.5]}},
                         {"model": str(ckpt / "m1"), "parameters": {"weight": 1.0}}]}
    code, out = _run(tmp_path, recipe)
    assert code == 2 and "density" in capsys.readouterr().err
    assert not out.exists()


def test_conventions_differ_where_the_issue_says(ckpt):
    """At density < 1 with weights the two conventions give different models (trim count, zero sign
    sum, weighted divisor); the hf_fisher convention stays available by name."""
    from hf_fisher.consumers.merge import registry
    from hf_fisher.consumers.merge.base import TensorInputs

    base, m0, m1 = (load_file(str(ckpt / n / "model.safetensors")) for n in ("base", "m0", "m1"))
    name = "model.layers.1.mlp.up_proj.weight"
    t = TensorInputs(name, [m0[name], m1[name]], [0.7, 0.3], base[name])
    mk_ties = registry.build("ties", {"density": 0.5}).merge(t)
    hf_ties = registry.build("ties", {"density": 0.5, "convention": "hf_fisher"}).merge(t)
    assert not torch.equal(mk_ties, hf_ties)
    torch.testing.assert_close(hf_ties, mm.ties(base[name], [m0[name], m1[name]], [0.7, 0.3], density=0.5, scaling=1.0))


def test_dare_under_the_mergekit_convention_is_dare_linear_and_dare_ties(ckpt):
    """``dare`` (drop probability p) is mergekit's dare_linear / dare_ties at density 1 − p with the
    same per-tensor mask; the hf_fisher convention rescales the kept entries by 1/(1 − p) instead of
    to the L1 norm."""
    from hf_fisher.consumers.merge import registry
    from hf_fisher.consumers.merge.base import TensorInputs

    base, m0, m1 = (load_file(str(ckpt / n / "model.safetensors")) for n in ("base", "m0", "m1"))
    name = "model.layers.0.self_attn.v_proj.weight"
    t = TensorInputs(name, [m0[name], m1[name]], [0.7, 0.3], base[name])
    dare = registry.build("dare", {"drop_p": 0.75, "seed": 4}).merge(t)
    assert torch.equal(dare, registry.build("dare_linear", {"density": 0.25, "seed": 4}).merge(t))
    g = mm.tensor_generator(4, name, 0)
    taus = [m[name] - base[name] for m in (m0, m1)]
    masks = [torch.bernoulli(torch.full_like(tau, 0.25), generator=g) for tau in taus]
    ref = base[name] + sum(w * tau * m * (tau.abs().sum() / (tau * m).abs().sum())
                           for w, tau, m in zip([0.7, 0.3], taus, masks))
    torch.testing.assert_close(dare, ref, rtol=1e-6, atol=1e-7)
    ties = registry.build("dare", {"drop_p": 0.75, "seed": 4, "dare_then": "ties", "density": 1.0}).merge(t)
    assert torch.equal(ties, registry.build("dare_ties", {"density": 0.25, "seed": 4, "normalize": True}).merge(t))
    old = registry.build("dare", {"drop_p": 0.75, "seed": 4, "convention": "hf_fisher"}).merge(t)
    kept = (old - base[name]) != 0
    assert not torch.equal(old, dare) and kept.any()
