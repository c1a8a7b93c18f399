"""mergekit's ``slices:`` recipes (layer ranges of several models; ``passthrough`` frankenmerges)
run by ``hf-fisher merge`` and by mergekit 0.1.5's ``run_merge`` on the same float32 checkpoints:
every tensor equal to the last bit, the output config's ``num_hidden_layers`` the sum of the slice
lengths, the merged folder loading in transformers; what cannot be honoured refused before anything
is written (exit 2)."""

from __future__ import annotations

import json

import pytest
import test_merge_mergekit_parity as parity
import torch
import transformers
import yaml
from test_merge_mergekit_parity import LAYERS, _tensors, assert_identical, run_hf_fisher, run_mergekit

from hf_fisher import cli
from hf_fisher.consumers.merge.recipe import RECIPE_NAME

ckpt = parity.ckpt  # the fixture: a float32 base and two fine-tunes of it

pytestmark = pytest.mark.usefixtures("one_thread")


def _src(ckpt, name, lo, hi, **params):
    out = {"model": str(ckpt / name), "layer_range": [lo, hi]}
    if params:
        out["parameters"] = params
    return out


@pytest.mark.slow
def test_passthrough_frankenmerge_equals_mergekit(ckpt, tmp_path):
    """Layers 0-1 of m0, then layers 1-2 of m1 (scaled 0.5 in its attention output), then layer 2
    of the base: a 5-layer model from three 3-layer ones."""
    recipe = {
        "slices": [
            {"sources": [_src(ckpt, "m0", 0, 2)]},
            {"sources": [_src(ckpt, "m1", 1, 3, scale=[{"filter": "o_proj", "value": 0.5}, {"value": 1.0}])]},
            {"sources": [_src(ckpt, "base", 2, 3)]},
        ],
        "merge_method": "passthrough",
        "dtype": "float32",
    }
    ours = run_hf_fisher(recipe, tmp_path / "ours")
    assert_identical(ours, run_mergekit(recipe, tmp_path / "mk"))
    m0, m1, base = (_tensors(ckpt / n) for n in ("m0", "m1", "base"))
    k = ".self_attn.o_proj.weight"
    assert torch.equal(ours[f"model.layers.3{k}"], m1[f"model.layers.2{k}"] * 0.5)
    assert torch.equal(ours["model.layers.4.mlp.up_proj.weight"], base["model.layers.2.mlp.up_proj.weight"])
    assert torch.equal(ours["model.embed_tokens.weight"], m0["model.embed_tokens.weight"])  # from the first slice
    assert torch.equal(ours["model.norm.weight"], base["model.norm.weight"])  # from the last slice
    out = tmp_path / "ours" / "out"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 5
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 5
    written = yaml.safe_load((out / RECIPE_NAME).read_text())
    assert written["merge_method"] == "passthrough" and len(written["slices"]) == 3 and "models" not in written
    # the written recipe reproduces the merge, in hf-fisher and in mergekit
    assert cli.main(["merge", str(out / RECIPE_NAME), "--out", str(tmp_path / "again"), "--no-progress"]) == 0
    assert_identical(_tensors(tmp_path / "again"), ours)
    assert_identical(run_mergekit(written, tmp_path / "mk2"), ours)


@pytest.mark.slow
def test_slerp_over_slices_with_gradients_equals_mergekit(ckpt, tmp_path):
    """The form published slerp recipes take: both models over a layer range, ``t`` gradients by
    module; here two slices, so each gradient is read across its own slice."""
    t = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]}, {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
         {"value": 0.5}]
    recipe = {
        "slices": [{"sources": [_src(ckpt, "m0", 0, 2), _src(ckpt, "m1", 0, 2)]},
                   {"sources": [_src(ckpt, "m0", 1, LAYERS), _src(ckpt, "m1", 1, LAYERS)], "parameters": {"t": 0.25}}],
        "merge_method": "slerp",
        "base_model": str(ckpt / "m0"),
        "parameters": {"t": t},
        "dtype": "float32",
    }
    assert_identical(run_hf_fisher(recipe, tmp_path / "ours"), run_mergekit(recipe, tmp_path / "mk"))


@pytest.mark.slow
def test_ties_over_slices_with_per_source_parameters_equals_mergekit(ckpt, tmp_path):
    """A task-vector method over slices: the base among every slice's sources, per-source
    weight/density gradients, a slice's own parameters over the recipe's."""
    recipe = {
        "slices": [
            {"sources": [_src(ckpt, "base", 0, 2), _src(ckpt, "m0", 0, 2, weight=[1.0, 0.4], density=0.5),
                         _src(ckpt, "m1", 0, 2, weight=0.6, density=[0.3, 0.9])]},
            {"sources": [_src(ckpt, "base", 2, 3), _src(ckpt, "m0", 2, 3, weight=0.5), _src(ckpt, "m1", 2, 3, weight=0.5)],
             "parameters": {"density": 0.7, "lambda": 0.8}},
        ],
        "merge_method": "ties",
        "base_model": str(ckpt / "base"),
        "parameters": {"normalize": True, "density": 0.4},
        "dtype": "float32",
    }
    assert_identical(run_hf_fisher(recipe, tmp_path / "ours"), run_mergekit(recipe, tmp_path / "mk"))


@pytest.mark.parametrize("slices, method, message", [
    ([{"sources": [{"model": "M0", "layer_range": [0, 2]}]}, {"sources": [{"model": "M0", "layer_range": [2, 5]}]}],
     "passthrough", "past its 3 layers"),
    ([{"sources": [{"model": "M0", "layer_range": [0, 2]}, {"model": "M1", "layer_range": [0, 3]}]}],
     "linear", "'slices[0].sources' have layer ranges of different lengths"),
    ([{"sources": [{"model": "M0", "layer_range": [0, 2]}, {"model": "M1", "layer_range": [0, 2]}]}],
     "passthrough", "takes one model per tensor"),
    ([{"sources": [{"model": "M0", "layer_range": [0, 2]}, {"model": "M1", "layer_range": [0, 2]}]},
      {"sources": [{"model": "M0", "layer_range": [2, 3]}]}], "linear", "same number of models in every slice"),
    ([{"sources": [{"model": "M0", "layer_range": [0, 2]}, {"model": "M1", "layer_range": [0, 2]}]}],
     "ties", "needs its base_model"),
    ([{"sources": [{"model": "M0", "layer_range": [2, 1]}]}], "passthrough", "'slices[0].sources[0].layer_range'"),
    ([{"sources": [{"model": "M0", "layer_range": [0, 1]}], "residual_weight": 0.5}], "passthrough",
     "'slices[0].residual_weight'"),
    ([{"sources": [{"model": "M0", "layer_range": [0, 1], "parameters": {"sclae": 1}}]}], "passthrough",
     "'slices[0].sources[0].parameters.sclae'"),
])
def test_slices_that_cannot_be_honoured_are_refused_before_anything_is_written(ckpt, tmp_path, capsys, slices, method,
                                                                               message):
    text = yaml.safe_dump({"slices": slices, "merge_method": method}).replace("M0", str(ckpt / "m0")).replace(
        "M1", str(ckpt / "m1"))
    path = tmp_path / "recipe.yml"
    path.write_text(text)
    out = tmp_path / "out"
    code = cli.main(["merge", str(path), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not out.exists()


def test_slices_and_models_together_are_refused(tmp_path, capsys):
    path = tmp_path / "recipe.yml"
    path.write_text("merge_method: linear\nmodels: [{model: a}, {model: b}]\n"
                    "slices: [{sources: [{model: a, layer_range: [0, 1]}]}]\n")
    assert cli.main(["merge", str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "'slices' and models are both given" in capsys.readouterr().err


def test_slices_of_models_of_another_architecture_are_refused(ckpt, tmp_path, capsys):
    import tiny_models as tm

    tm.llama(torch.float32, seed=3, layers=LAYERS, kv_heads=4).save_pretrained(tmp_path / "wide")
    recipe = {"slices": [{"sources": [_src(ckpt, "m0", 0, 2)]}, {"sources": [{"model": str(tmp_path / "wide"),
                                                                               "layer_range": [2, 3]}]}],
              "merge_method": "passthrough"}
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe))
    assert cli.main(["merge", str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "has another architecture" in err and "num_key_value_heads: 4 vs 2" in err, err
    assert not (tmp_path / "out").exists()


def test_slices_of_models_with_another_vocabulary_are_refused(ckpt, tmp_path, capsys):
    import shutil

    from hf_fisher.demo import word_tokenizer

    shutil.copytree(ckpt / "m1", tmp_path / "other")
    word_tokenizer([f"v{i}" for i in range(8)]).save_pretrained(tmp_path / "other")
    recipe = {"slices": [{"sources": [_src(ckpt, "m0", 0, 2)]},
                         {"sources": [{"model": str(tmp_path / "other"), "layer_range": [2, 3]}]}],
              "merge_method": "passthrough"}
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe))
    assert cli.main(["merge", str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "tokenizer vocabulary" in err and "other" in err, err
    assert not (tmp_path / "out").exists()
