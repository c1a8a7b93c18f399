"""Validation tuning of the model weights with a held-out confirmation (issue 26 item 4).

The grid searches weights and options jointly on half of each task's validation batches
(``[0::2]``); the other half (``[1::2]``) decides how far the searched weights are kept, shrunk
toward the uniform weights by ``s`` in ``weight_shrink`` (first of equal losses, so uniform unless
the lean helps there too); the options are then chosen on all batches at those weights. Checked
against the whole procedure written out here with plain merges and losses computed independently;
``weight_shrink=()`` is the joint choice on all batches; with one batch per task: a WARNING."""

from __future__ import annotations

import logging

import pytest
import torch
import yaml
from test_merge_validation import _finetuned

from hf_fisher.consumers.merge.api import DEFAULT_GRID, RECIPE_NAME, merge_with_fisher

import tiny_models as tm

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = {"weight_lean": (0.0, 0.5), "scaling": (0.5, 1.0)}
WEIGHTS = ([1.0, 1.0], [1.5, 0.5], [0.5, 1.5])  # task arithmetic: uniform is 1 each; lean 0.5 toward a model, times n = 2
SCALINGS = (0.5, 1.0)
SHRINK = (0.0, 0.5, 1.0)


@pytest.fixture(scope="module")
def setup():
    base = tm.llama(seed=10)
    models = _finetuned(lambda: tm.llama(seed=10))
    # two batches per task: batch 0 searches, batch 1 confirms (seeds where the confirmation keeps half the lean)
    val = [[tm.padded_batch([5, 4], seed=16 + 2 * k + t) for k in range(2)] for t in (0, 1)]
    return base, models, val


class Plain:
    """Per-batch losses of plain merges (``weights=``, ``scaling=`` given), computed independently."""

    def __init__(self, base, models, val) -> None:
        self.base, self.models, self.val, self.cache = base, models, val, {}

    def __call__(self, w, scaling) -> list[list[float]]:
        key = (tuple(round(x, 12) for x in w), scaling)
        if key not in self.cache:
            m = merge_with_fisher(self.models, method="task_arithmetic", base_model=self.base, weights=list(w),
                                  scaling=scaling, progress=False)
            with torch.no_grad():
                self.cache[key] = [[float(m(**b).loss) for b in batches] for batches in self.val]
        return self.cache[key]


def crit(per, part=slice(None)) -> float:
    means = [sum(p[part]) / len(p[part]) for p in per]
    return sum(means) / len(means)


def test_weights_searched_on_one_half_and_kept_as_far_as_the_other_half_confirms(setup, tmp_path):
    base, models, val = setup
    out = merge_with_fisher(models, method="task_arithmetic", base_model=base, validation=val, validation_grid=GRID,
                            output_dir=tmp_path / "v", progress=False)
    rec = yaml.safe_load((out / RECIPE_NAME).read_text())["hf_fisher"]["validation"]
    plain = Plain(base, models, val)
    points = [(w, k) for w in WEIGHTS for k in SCALINGS]

    # every grid point's loss on all batches is recorded
    assert [(e["weights"], e["scaling"]) for e in rec["losses"]] == [(pytest.approx(w), k) for w, k in points]
    assert [e["loss"] for e in rec["losses"]] == pytest.approx([crit(plain(w, k)) for w, k in points], rel=1e-9)

    # 1. search on batches [0::2]: weights and scaling jointly
    w_a, k_a = min(points, key=lambda p: crit(plain(*p), slice(0, None, 2)))
    assert w_a != [1.0, 1.0], "the search kept uniform weights: this case does not test the confirmation"
    held = rec["weights_holdout"]
    assert (held["searched"]["weights"], held["searched"]["scaling"]) == (pytest.approx(w_a), k_a)
    # 2. confirm on batches [1::2]: shrink toward uniform, the first lowest loss
    shrunk = {s: [1.0 + s * (x - 1.0) for x in w_a] for s in SHRINK}
    confirm = {s: crit(plain(shrunk[s], k_a), slice(1, None, 2)) for s in SHRINK}
    assert len({round(x, 9) for x in confirm.values()}) == len(SHRINK)  # not a tie
    s_best = min(SHRINK, key=lambda s: (confirm[s], SHRINK.index(s)))
    assert [c["shrink"] for c in held["shrink"]] == list(SHRINK)
    assert [c["loss"] for c in held["shrink"]] == pytest.approx([confirm[s] for s in SHRINK], rel=1e-9)
    assert held["chosen_shrink"] == s_best
    assert 0.0 < s_best < 1.0, "the confirmation kept none or all of the lean: the off-grid point is not tested"
    # 3. the scaling on all batches at the confirmed weights
    w_best = shrunk[s_best]
    k_best = min(SCALINGS, key=lambda k: crit(plain(w_best, k)))
    chosen = rec["chosen"]
    assert (chosen["weights"], chosen["scaling"]) == (pytest.approx(w_best), k_best)
    assert chosen["loss"] == pytest.approx(crit(plain(w_best, k_best)), rel=1e-9)
    # not what the joint choice on all batches gives (the old procedure)
    assert min(points, key=lambda p: crit(plain(*p))) != (w_best, k_best)

    # the written model is that merge
    merged = type(models[0]).from_pretrained(out, dtype=torch.float64).eval()
    ref = merge_with_fisher(models, method="task_arithmetic", base_model=base, weights=w_best, scaling=k_best,
                            progress=False)
    for name, t in merged.state_dict().items():
        assert torch.allclose(t, ref.state_dict()[name].to(t.dtype), atol=1e-12, rtol=0), name
    assert DEFAULT_GRID["weight_shrink"] == SHRINK


def test_weight_shrink_empty_is_the_joint_choice_on_all_batches(setup):
    base, models, val = setup
    plain = Plain(base, models, val)
    model = merge_with_fisher(models, method="task_arithmetic", base_model=base, validation=val,
                              validation_grid={**GRID, "weight_shrink": ()}, progress=False)
    w, k = min([(w, k) for w in WEIGHTS for k in SCALINGS], key=lambda p: crit(plain(*p)))
    ref = merge_with_fisher(models, method="task_arithmetic", base_model=base, weights=w, scaling=k, progress=False)
    for name, t in model.state_dict().items():
        assert torch.equal(t, ref.state_dict()[name]), name


def test_one_validation_batch_per_task_cannot_confirm_the_weights_and_says_so(setup, tmp_path, caplog):
    base, models, _ = setup
    val = [[tm.padded_batch([5, 4], seed=s)] for s in (21, 22)]
    with caplog.at_level(logging.WARNING, logger="hf_fisher.consumers.merge.api"):
        out = merge_with_fisher(models, method="task_arithmetic", base_model=base, validation=val,
                                validation_grid=GRID, output_dir=tmp_path / "v", progress=False)
    assert "cannot be confirmed on held-out validation data" in caplog.text
    rec = yaml.safe_load((out / RECIPE_NAME).read_text())["hf_fisher"]["validation"]
    assert "weights_holdout" not in rec
    assert "cannot be confirmed on held-out validation data" in rec["weights_not_held_out"]  # recorded, not only logged
    best = min(rec["losses"], key=lambda e: e["loss"])
    assert (rec["chosen"]["weights"], rec["chosen"]["scaling"]) == (best["weights"], best["scaling"])


def test_weight_shrink_values_are_checked_before_any_work(setup):
    base, models, val = setup
    from hf_fisher.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match=r"weight_shrink.*in \[0, 1\]"):
        merge_with_fisher(models, method="task_arithmetic", base_model=base, validation=val,
                          validation_grid={"weight_shrink": (0.0, 1.5)}, progress=False)
