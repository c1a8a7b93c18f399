"""The recipe hf_fisher writes beside a merge names its options as mergekit reads them: the task
vectors' scale is ``lambda`` (mergekit silently ignores a ``scaling`` key and merges at λ = 1), so
mergekit's ``run_merge`` on the written ``mergekit_config.yml`` gives the same model, and
``hf-fisher merge`` reads it back to the same model too."""

from __future__ import annotations

import pytest
import test_merge_mergekit_parity as parity
import yaml
from test_merge_mergekit_parity import _tensors, assert_identical, run_mergekit

from hf_fisher import cli
from hf_fisher.consumers.merge.recipe import RECIPE_NAME

ckpt = parity.ckpt  # the fixture: a float32 base and two fine-tunes of it

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
@pytest.mark.parametrize("method, options", [
    ("task_arithmetic", {}), ("ties", {"density": 0.5}), ("breadcrumbs_ties", {"density": 0.5, "gamma": 0.1}),
])
def test_written_recipe_keeps_the_scale_for_mergekit(ckpt, tmp_path, method, options):
    from hf_fisher.consumers.merge.api import merge_with_fisher

    out = merge_with_fisher([ckpt / "m0", ckpt / "m1"], method=method, weights=[0.7, 0.3], base_model=ckpt / "base",
                            scaling=0.5, output_dir=tmp_path / "ours", progress=False, **options)
    recipe = yaml.safe_load((out / RECIPE_NAME).read_text())
    assert recipe["parameters"]["lambda"] == 0.5 and "scaling" not in recipe["parameters"]
    ours = _tensors(out)
    assert_identical(ours, run_mergekit(recipe, tmp_path / "mk"))
    # and hf-fisher reads its own recipe back to the same model
    assert cli.main(["merge", str(out / RECIPE_NAME), "--out", str(tmp_path / "again"), "--no-progress"]) == 0
    assert_identical(_tensors(tmp_path / "again"), ours)
