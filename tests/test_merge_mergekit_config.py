"""mergekit's MergeConfiguration keys, each run by ``hf-fisher merge`` and by mergekit 0.1.5's
``run_merge`` on the same float32 checkpoints: ``parameters:`` at the top level against a model's own
(the model's wins), ``dtype`` (the arithmetic) with ``out_dtype`` (the output), ``tokenizer_source``
(``base`` or a named model: the output's tokenizer), ``passthrough`` on one whole model with
``scale``."""

from __future__ import annotations

import logging
import shutil

import pytest
import test_merge_mergekit_parity as parity
import torch
import transformers
from test_merge_mergekit_parity import _tensors, assert_identical, run_hf_fisher, run_mergekit

pytestmark = pytest.mark.usefixtures("one_thread")

ckpt = parity.ckpt  # the fixture: a float32 base and two fine-tunes of it


@pytest.mark.slow
def test_top_level_parameters_yield_to_a_models_own(ckpt, tmp_path):
    recipe = {
        "models": [{"model": str(ckpt / "m0"), "parameters": {"density": [0.9, 0.2]}},
                   {"model": str(ckpt / "m1")}],
        "merge_method": "ties",
        "base_model": str(ckpt / "base"),
        "parameters": {"weight": 0.6, "density": 0.4, "normalize": False},
        "dtype": "float32",
    }
    ours = run_hf_fisher(recipe, tmp_path / "ours")
    assert_identical(ours, run_mergekit(recipe, tmp_path / "mk"))
    # the top-level density is not m0's: with m0's own density replaced by it, the model differs
    other = {**recipe, "models": [{"model": str(ckpt / "m0")}, {"model": str(ckpt / "m1")}]}
    assert not all(torch.equal(ours[k], v) for k, v in run_hf_fisher(other, tmp_path / "other").items())


@pytest.mark.slow
def test_out_dtype_is_the_output_and_dtype_the_arithmetic(ckpt, tmp_path, caplog):
    recipe = {"models": [{"model": str(ckpt / "m0"), "parameters": {"weight": 0.7}},
                         {"model": str(ckpt / "m1"), "parameters": {"weight": 0.3}}],
              "merge_method": "task_arithmetic", "base_model": str(ckpt / "base"),
              "dtype": "float32", "out_dtype": "bfloat16"}
    with caplog.at_level(logging.WARNING, logger="hf_fisher"):
        ours = run_hf_fisher(recipe, tmp_path / "ours")
    assert "mergekit reads the models in" not in caplog.text  # float32 arithmetic in both tools
    theirs = run_mergekit(recipe, tmp_path / "mk")
    assert {v.dtype for v in ours.values()} == {torch.bfloat16}
    assert_identical(ours, theirs)


@pytest.mark.slow
@pytest.mark.parametrize("source", ["base", "m1"])
def test_tokenizer_source_gives_that_models_tokenizer(ckpt, tmp_path, source):
    """The inputs share one vocabulary; the chosen source's tokenizer (here: its own chat template)
    is the output's, in both tools."""
    root = tmp_path / "in"
    for name in ("base", "m0", "m1"):
        shutil.copytree(ckpt / name, root / name)
    tok = transformers.AutoTokenizer.from_pretrained(root / source)
    tok.chat_template = "{% for m in messages %}<" + source + ">{{ m['content'] }}{% endfor %}"
    tok.save_pretrained(root / source)
    recipe = {"models": [{"model": str(root / "m0"), "parameters": {"weight": 0.5}},
                         {"model": str(root / "m1"), "parameters": {"weight": 0.5}}],
              "merge_method": "task_arithmetic", "base_model": str(root / "base"),
              "tokenizer_source": "base" if source == "base" else str(root / source), "dtype": "float32"}
    ours = run_hf_fisher(recipe, tmp_path / "ours")
    assert_identical(ours, run_mergekit(recipe, tmp_path / "mk"))
    got, theirs = (transformers.AutoTokenizer.from_pretrained(d) for d in (tmp_path / "ours" / "out", tmp_path / "mk"))
    assert got.chat_template == theirs.chat_template == tok.chat_template
    assert got.get_vocab() == theirs.get_vocab() == tok.get_vocab()


@pytest.mark.slow
def test_passthrough_of_one_whole_model_with_scale(ckpt, tmp_path):
    recipe = {"models": [{"model": str(ckpt / "m0"), "parameters": {"scale": [{"filter": "mlp", "value": 0.5},
                                                                              {"value": 1.0}]}}],
              "merge_method": "passthrough", "dtype": "float32"}
    ours = run_hf_fisher(recipe, tmp_path / "ours")
    assert_identical(ours, run_mergekit(recipe, tmp_path / "mk"))
    m0 = _tensors(ckpt / "m0")
    assert torch.equal(ours["model.layers.1.mlp.up_proj.weight"], m0["model.layers.1.mlp.up_proj.weight"] * 0.5)
    assert torch.equal(ours["model.embed_tokens.weight"], m0["model.embed_tokens.weight"])


@pytest.mark.parametrize("args", [[], ["r.yml", "--config", "r.yml"]])
def test_the_recipe_is_given_once(tmp_path, capsys, args):
    from hf_fisher import cli

    (tmp_path / "r.yml").write_text("merge_method: linear\n")
    args = [str(tmp_path / a) if a.endswith(".yml") else a for a in args]
    assert cli.main(["merge", *args, "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "give the recipe YAML once" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
