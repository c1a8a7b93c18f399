"""Validation tuning of the merges (issue 26 item 4).

The per-layer refinement (``validation_grid={"layer_lean": ...}``) holds data out: the coordinate sweep chooses on half of each task's validation batches (``[0::2]``) and the other
half (``[1::2]``) decides how far the searched per-layer weights are kept, shrunk toward the
grid's choice. Checked against the whole procedure written out here with plain merges (each
layer's tensors from a merge with that layer's weights, losses computed independently); with one
batch per task there is nothing to hold out: a WARNING, recorded. KFAC's damping grid reaches from
KFAC to nearly the weighted average."""

from __future__ import annotations

import copy
import itertools
import logging

import pytest
import torch
import yaml
from test_merge_validation import _data, _finetuned, independent_loss

import hf_fisher
from hf_fisher.consumers.merge.api import DEFAULT_GRID, LAYER_SHRINK, RECIPE_NAME, layer_group, merge_with_fisher

import tiny_models as tm

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = {"weight_lean": (0.0,), "alpha": (0.9,), "layer_lean": (0.5, 1.0)}
LAYERS = ("model.layers.0", "model.layers.1")


@pytest.fixture(scope="module")
def llamas():
    return _finetuned(lambda: tm.llama(seed=10))


@pytest.fixture(scope="module")
def data():
    return [_data(s) for s in (0, 1)]


class Assembled:
    """A merged model for any per-layer weights, written out: each numbered layer's tensors from a
    plain ``regmean`` merge with that layer's weights, every other tensor from the uniform merge."""

    def __init__(self, models, data) -> None:
        self.models, self.data, self.plain = models, data, {}

    def _merge(self, w):
        key = tuple(round(x, 12) for x in w)
        if key not in self.plain:
            self.plain[key] = merge_with_fisher(self.models, method="regmean", data=self.data, alpha=0.9,
                                                weights=list(w), progress=False)
        return self.plain[key]

    def __call__(self, layer_weights: dict):
        uniform = self._merge([0.5, 0.5])
        model = copy.deepcopy(uniform).eval()
        sd = {n: (self._merge(layer_weights[g]) if (g := layer_group(n)) in layer_weights else uniform).state_dict()[n]
              for n in uniform.state_dict()}
        model.load_state_dict(sd)
        return model


def test_layer_weights_searched_on_one_half_and_kept_as_far_as_the_other_half_confirms(llamas, data, tmp_path):
    # three batches per task: the sweep sees batches 0 and 2, batch 1 is held out
    val = [[tm.padded_batch([5, 4], seed=s) for s in seeds] for seeds in ((21, 23, 25), (22, 24, 26))]
    search, held = [b[0::2] for b in val], [b[1::2] for b in val]
    out = merge_with_fisher(llamas, method="regmean", data=data, validation=val, validation_grid=GRID,
                            output_dir=tmp_path / "v", progress=False)
    rec = yaml.safe_load((out / RECIPE_NAME).read_text())["hf_fisher"]["validation"]
    chosen, layers = rec["chosen"], rec["layers"]
    build = Assembled(llamas, data)

    # the sweep, written out, on the search half only
    lw, loss, trials = {}, independent_loss(build({}), search), []
    for g in LAYERS:
        for t in (0.5, 1.0):
            for w in ([0.5 + t / 2, 0.5 - t / 2], [0.5 - t / 2, 0.5 + t / 2]):
                if w == lw.get(g, [0.5, 0.5]):
                    continue
                trial = independent_loss(build({**lw, g: w}), search)
                trials.append((g, w, trial))
                if trial < loss:
                    loss, lw = trial, {**lw, g: w}
    assert lw, "the sweep kept no layer weights: this case does not test the held-out half"
    assert [(e["layer"], e["weights"]) for e in layers["losses"]] == [(g, pytest.approx(w)) for g, w, _ in trials]
    assert [e["loss"] for e in layers["losses"]] == pytest.approx([x for _, _, x in trials], rel=1e-9)
    assert layers["search_loss"] == pytest.approx(loss, rel=1e-9)

    # the held-out half: shrink toward the grid's choice, the first lowest loss wins
    shrunk = {s: {g: [0.5 + s * (x - 0.5) for x in w] for g, w in lw.items()} if s else {} for s in LAYER_SHRINK}
    held_loss = {s: independent_loss(build(v), held) for s, v in shrunk.items()}
    assert len({round(x, 9) for x in held_loss.values()}) == len(LAYER_SHRINK)  # not a tie
    best = min(LAYER_SHRINK, key=lambda s: (held_loss[s], LAYER_SHRINK.index(s)))
    assert [c["shrink"] for c in layers["holdout"]["shrink"]] == list(LAYER_SHRINK)
    assert [c["loss"] for c in layers["holdout"]["shrink"]] == pytest.approx([held_loss[s] for s in LAYER_SHRINK], rel=1e-9)
    assert layers["holdout"]["chosen_shrink"] == best
    assert held_loss[best] <= held_loss[0.0]  # never worse than the grid's choice on data the sweep did not see
    assert {g: pytest.approx(w) for g, w in shrunk[best].items()} == (chosen.get("layer_weights") or {})

    # the written model is that one; its recorded loss is over the whole validation set
    merged = type(llamas[0]).from_pretrained(out, dtype=torch.float64).eval()
    ref = build(shrunk[best])
    for name, t in merged.state_dict().items():
        assert torch.allclose(t, ref.state_dict()[name], atol=1e-12, rtol=0), name
    assert chosen["loss"] == pytest.approx(independent_loss(ref, val), rel=1e-9)
    assert chosen["grid_loss"] == pytest.approx(independent_loss(build({}), val), rel=1e-9)


def test_one_validation_batch_per_task_cannot_be_held_out_and_says_so(llamas, data, tmp_path, caplog):
    val = [[tm.padded_batch([5, 4], seed=s)] for s in (21, 22)]
    with caplog.at_level(logging.WARNING, logger="hf_fisher.consumers.merge.api"):
        out = merge_with_fisher(llamas, method="regmean", data=data, validation=val, validation_grid=GRID,
                                output_dir=tmp_path / "v", progress=False)
    assert "cannot hold out validation data" in caplog.text
    rec = yaml.safe_load((out / RECIPE_NAME).read_text())["hf_fisher"]["validation"]
    assert rec["layers"]["holdout"] is None


def test_default_kfac_damping_grid_runs_from_kfac_to_nearly_the_average():
    """KFAC's merge tends to the λ-weighted average as the damping grows; the validation grid must
    reach close to it (on GPT-2 pairs the well-damped merges are the good ones): along the default
    grid the merged Linear weights move monotonically toward the average, the last point within a
    fifth of the first point's distance."""
    models = _finetuned(lambda: tm.gpt2(seed=4))
    vocab = models[0].config.vocab_size
    data = [_data(s, vocab) for s in (0, 1)]
    fishers = [hf_fisher.collect(m, d, estimator="kfac", progress=False) for m, d in zip(models, data)]
    avg = merge_with_fisher(models, method="average", progress=False).state_dict()
    linear = [n for n in avg if n.endswith(("c_attn.weight", "c_fc.weight", "c_proj.weight"))]
    dist = []
    for c in DEFAULT_GRID["kfac_damping"]:
        m = merge_with_fisher(models, fishers, method="kfac", kfac_damping=c, progress=False).state_dict()
        dist.append(sum(float((m[n] - avg[n]).norm() ** 2) for n in linear) ** 0.5)
    assert all(a > b for a, b in itertools.pairwise(dist)), dist
    assert dist[-1] < 0.2 * dist[0], dist
