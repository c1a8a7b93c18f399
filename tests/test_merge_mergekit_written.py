"""The recipe ``hf-fisher merge`` writes beside a merge (``mergekit_config.yml``) keeps what the
recipe it ran gave tensor by tensor (per-layer gradients, ``filter:`` conditions, per-model and
merge-wide settings, slices): mergekit's ``run_merge`` and ``hf-fisher merge`` both rerun it to the
same model, bit for bit."""

from __future__ import annotations

import pytest
import test_merge_mergekit_parity as parity
import yaml
from test_merge_mergekit_parity import _tensors, assert_identical, run_hf_fisher, run_mergekit

from hf_fisher import cli
from hf_fisher.consumers.merge.recipe import RECIPE_NAME

pytestmark = pytest.mark.usefixtures("one_thread")

ckpt = parity.ckpt  # the fixture: a float32 base and two fine-tunes of it

T = [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"filter": "mlp", "value": [1, 0.2]}, {"value": 0.5}]


def _recipes(ckpt):
    base, m0, m1 = (str(ckpt / n) for n in ("base", "m0", "m1"))
    return {
        "ties-gradients": {
            "models": [{"model": base},
                       {"model": m0, "parameters": {"density": [0.2, 0.6, 0.4],
                                                    "weight": [{"filter": "self_attn", "value": [0.8, 0.3]}, {"value": 0.5}]}},
                       {"model": m1, "parameters": {"density": 0.5, "weight": 0.4}}],
            "merge_method": "ties", "base_model": base,
            "parameters": {"normalize": True, "lambda": [1.0, 0.8]}, "dtype": "float32"},
        "top-level-weight-gradient": {
            "models": [{"model": m0, "parameters": {"weight": 0.3}}, {"model": m1}],
            "merge_method": "task_arithmetic", "base_model": base,
            "parameters": {"weight": [0.2, 0.9]}, "dtype": "float32"},
        "slerp-models": {
            "models": [{"model": m0}, {"model": m1}], "merge_method": "slerp", "base_model": m0,
            "parameters": {"t": T}, "dtype": "float32"},
        "slerp-slices": {
            "slices": [{"sources": [{"model": m0, "layer_range": [0, 2]}, {"model": m1, "layer_range": [0, 2]}]},
                       {"sources": [{"model": m0, "layer_range": [2, 3]}, {"model": m1, "layer_range": [2, 3]}],
                        "parameters": {"t": 0.9}}],
            "merge_method": "slerp", "base_model": m0, "parameters": {"t": T}, "dtype": "float32"},
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ties-gradients", "top-level-weight-gradient", "slerp-models", "slerp-slices"])
def test_written_recipe_reruns_to_the_same_model_in_both_tools(ckpt, tmp_path, name):
    recipe = _recipes(ckpt)[name]
    ours = run_hf_fisher(recipe, tmp_path / "ours")
    assert_identical(ours, run_mergekit(recipe, tmp_path / "mk"))
    written_path = tmp_path / "ours" / "out" / RECIPE_NAME
    written = yaml.safe_load(written_path.read_text())
    assert_identical(run_mergekit(written, tmp_path / "mk-written"), ours)
    assert cli.main(["merge", str(written_path), "--out", str(tmp_path / "again"), "--no-progress"]) == 0
    assert_identical(_tensors(tmp_path / "again"), ours)
