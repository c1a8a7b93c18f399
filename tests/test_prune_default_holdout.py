"""``validation="holdout"`` (issue 26 item 3): with at least ``HOLDOUT_MIN_BATCHES`` calibration
batches the criterion is chosen on the last quarter of them, held out, the candidates pruning with
the rest; deterministic and recorded in the result's stats (pruning.json). Fewer batches are
refused; the default without ``validation=`` stays KFAC-OBS."""

from __future__ import annotations

import json

import pytest
import torch

from hf_fisher.consumers.merge.api import validation_loss
from hf_fisher.consumers.prune.core import HOLDOUT_MIN_BATCHES, VALIDATION_SCORES, prune

import tiny_models as tm

pytestmark = pytest.mark.usefixtures("one_thread")

CALIB = [tm.padded_batch([7, 5, 6], seed=s) for s in range(4)]


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.slow
def test_default_chooses_on_held_out_calibration_batches_deterministically(tmp_path):
    m = tm.llama(torch.float64, kv_heads=2, layers=2, seed=3)
    before = _weights(m)
    runs = []
    for _ in range(2):
        r = prune(m, None, sparsity=0.5, scope="layer", rescale_batches=CALIB, validation="holdout", progress=False)
        runs.append((r.stats["validation"], r.removed, _weights(m)))
        if not runs[1:]:
            r.save_pretrained(tmp_path / "out")
        r.restore()
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())
    (rec, removed, weights), (rec2, removed2, weights2) = runs
    # deterministic: the same candidates' losses, the same choice, the same pruned model
    assert rec["candidates"] == rec2["candidates"] and rec["chosen"] == rec2["chosen"] and removed == removed2
    assert all(torch.equal(weights[n], weights2[n]) for n in weights)
    # recorded: where the choice was made, every candidate, the lowest chosen; saved in pruning.json
    assert rec["source"] == "held-out calibration batches" and rec["held_out"] == [3] and rec["of"] == 4
    assert rec["batches"] == 1
    assert len(rec["candidates"]) == 2 * len(VALIDATION_SCORES)
    losses = [c["validation_loss"] for c in rec["candidates"]]
    assert rec["chosen"] == rec["candidates"][losses.index(min(losses))]
    saved = json.loads((tmp_path / "out" / "pruning.json").read_text())["stats"]["validation"]
    assert saved["chosen"] == json.loads(json.dumps(rec["chosen"]))
    # each candidate pruned with the first three batches, scored on the fourth
    kfac = next(c for c in rec["candidates"] if c["score"] == "kfac" and not c["compensate"])
    r = prune(m, None, sparsity=0.5, scope="layer", score="kfac", compensate=False, rescale_batches=CALIB[:3],
              progress=False)
    assert validation_loss(m, [CALIB[3:]]) == kfac["validation_loss"]
    r.restore()
    # the chosen criterion then prunes with all four batches: the default's model is exactly that
    c = rec["chosen"]
    r = prune(m, None, sparsity=0.5, scope="layer", score=c["score"], compensate=c["compensate"], rescale=c["rescale"],
              rescale_batches=CALIB, progress=False)
    assert r.removed == removed and all(torch.equal(p, weights[n]) for n, p in m.named_parameters())
    r.restore()


def test_default_stays_kfac_obs_and_holdout_needs_enough_batches():
    from hf_fisher.errors import InvalidInputError

    m = tm.llama(torch.float64, kv_heads=2, layers=2, seed=3)
    r = prune(m, None, sparsity=0.5, scope="layer", rescale_batches=CALIB, progress=False)
    r.restore()
    assert r.stats["score"] == "kfac" and "validation" not in r.stats
    with pytest.raises(InvalidInputError, match=f"needs at least {HOLDOUT_MIN_BATCHES}"):
        prune(m, None, sparsity=0.5, scope="layer", rescale_batches=CALIB[: HOLDOUT_MIN_BATCHES - 1],
              validation="holdout", progress=False)
    with pytest.raises(InvalidInputError, match="leave score=None"):
        prune(m, None, sparsity=0.5, scope="layer", score="kfac", rescale_batches=CALIB, validation="holdout",
              progress=False)
    with pytest.raises(InvalidInputError, match="held-out batches or 'holdout'"):
        prune(m, None, sparsity=0.5, scope="layer", rescale_batches=CALIB, validation="calibration", progress=False)


def test_bad_options_are_refused_in_their_own_terms_before_the_selection():
    from hf_fisher.errors import InvalidInputError

    m = tm.llama(torch.float64, kv_heads=2, layers=2, seed=3)
    before = _weights(m)
    with pytest.raises(InvalidInputError, match=r"sparsity must be a number in \[0, 1\)"):
        prune(m, None, sparsity=1.5, scope="layer", rescale_batches=CALIB, validation="holdout", progress=False)
    with pytest.raises(InvalidInputError, match=r"rescale_batches\[2\]: token id"):
        prune(m, None, sparsity=0.5, scope="layer", progress=False, validation="holdout",
              rescale_batches=CALIB[:2] + [{"input_ids": torch.full((1, 4), 10_000)}] + CALIB[3:])
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())
