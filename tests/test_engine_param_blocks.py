"""Parameter mode in cache-sized blocks of rows: on a CPU the engine forms each outer-product
parameter's per-sample gradients a block of rows at a time for all the batch's samples
(``PerSampleEngine.CACHE_BLOCK_ELEMS``), so the product and the sink's passes over it stay in
the cache. The blocks must give the same Fisher as the whole gradients, and the float64 brute
force: checked here with a block size small enough that every weight of a tiny model is split.
"""

from __future__ import annotations

import math

import pytest
import torch

from hf_fisher.collection.collector import FisherCollector, _MomentsSink
from hf_fisher.engine.per_sample import PerSampleEngine

import reference as R
import tiny_models as tm


def batches():
    b1 = tm.padded_batch([5, 3, 7], seed=11)
    b1["labels"][1] = -100  # no label token: the kept samples are not contiguous (a gather)
    b2 = tm.padded_batch([4, 6, 1, 8, 2], seed=12)
    return [b1, b2]


def collect(model, monkeypatch, block_elems):
    """param-mode Fisher over :func:`batches` with ``CACHE_BLOCK_ELEMS = block_elems``, and the
    ``rows=`` of every row block the sink received."""
    seen = []
    add = _MomentsSink.add_gradients

    def spy(self, name, gradients, *, owned=False, rows=None):
        if rows is not None:
            seen.append((name, rows, tuple(gradients.shape)))
        return add(self, name, gradients, owned=owned, rows=rows)

    monkeypatch.setattr(_MomentsSink, "add_gradients", spy)
    monkeypatch.setattr(PerSampleEngine, "CACHE_BLOCK_ELEMS", block_elems)
    col = FisherCollector(model, reduction="param")
    for b in batches():
        col.update(b)
    return col.fisher(), seen


@pytest.mark.parametrize("make", [tm.llama, tm.gpt2], ids=["llama", "gpt2-conv1d"])
def test_cache_blocks_equal_whole_gradients_and_brute_force(make, monkeypatch):
    blocked, rows = collect(make(), monkeypatch, 64)
    # every weight whose batch of per-sample gradients exceeds 64 elements came in blocks
    split = {name for name, (lo, hi, n), _ in rows if hi - lo < n}
    model = make()
    embeddings = {f"{m}.weight" for m, mod in model.named_modules() if isinstance(mod, torch.nn.Embedding)}
    outer = {n for n, p in model.named_parameters() if p.dim() == 2 and n not in embeddings}  # tables: sparse moments
    assert outer and outer <= split, f"not split into row blocks: {sorted(outer - split)}"
    for _, (lo, hi, _), shape in rows:  # a block holds at most 64 elements, or one row of every sample
        row = shape[0] * math.prod(shape[2:])
        assert shape[1] == hi - lo and row * (hi - lo) <= max(64, row)

    whole, rows_whole = collect(make(), monkeypatch, 2**40)
    assert not rows_whole  # nothing in blocks when the whole batch fits
    for n in whole.names():
        torch.testing.assert_close(blocked[n], whole[n], rtol=1e-12, atol=1e-300)
        torch.testing.assert_close(blocked.variances[n], whole.variances[n], rtol=1e-11, atol=1e-300)

    mean, var, n_used, _ = R.reference_fisher(make(), [s for b in batches() for s in R.split_batch(b)])
    assert blocked.counts.samples == n_used
    floor_m, floor_v = R.global_floor(mean), R.global_floor(var)
    for n in mean:
        R.assert_close(blocked[n], mean[n], rtol=1e-9, floor=floor_m, what=f"mean {n}")
        R.assert_close(blocked.variances[n], var[n], rtol=1e-9, floor=floor_v, what=f"variance {n}")
