"""Merging two seq2seq models (same layout) with their collected Fishers, and what pruning does
with an encoder-decoder: head / channel pruning refused by name (the encdec layout describes
groups, not attention or MLP blocks), unstructured pruning masks elements."""

from __future__ import annotations

import pytest
import seq2seq_models as sm
import torch

from hf_fisher import collect
from hf_fisher.consumers.merge.api import merge_with_fisher
from hf_fisher.consumers.prune.core import prune
from hf_fisher.errors import InvalidInputError

FLOOR = 1e-6


@pytest.mark.parametrize("factory", [sm.t5, sm.bart], ids=["t5", "bart"])
def test_fisher_merge_of_two_seq2seq_models(factory):
    a, b = factory(seed=0), factory(seed=7)
    data = [sm.batch(a, [5, 3, 7], [4, 2, 6], seed=1)]
    fa, fb = collect(a, data, progress=False), collect(b, data, progress=False)
    merged = merge_with_fisher([a, b], [fa, fb], weights=[0.3, 0.7], fisher_floor=FLOOR, progress=False)
    assert type(merged) is type(a)
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    for name, p in merged.named_parameters():
        wa, wb = 0.3 * fa[name].clamp_min(FLOOR), 0.7 * fb[name].clamp_min(FLOOR)
        want = (wa * pa[name].detach() + wb * pb[name].detach()) / (wa + wb)
        torch.testing.assert_close(p.detach().double(), want, rtol=1e-9, atol=1e-12, msg=name)
    # the merged model runs as a seq2seq model
    assert torch.isfinite(merged(**data[0], use_cache=False).loss)


def test_structured_pruning_of_seq2seq_refused_by_name():
    model = sm.t5()
    fisher = collect(model, [sm.batch(model, [5, 3], [4, 2], seed=1)], progress=False, reduction="group")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(InvalidInputError, match="describes no attention heads"):
        prune(model, fisher, sparsity=0.3)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


def test_unstructured_pruning_of_seq2seq():
    model = sm.t5()
    fisher = collect(model, [sm.batch(model, [5, 3], [4, 2], seed=1)], progress=False)
    result = prune(model, fisher, sparsity=0.3, structured=None)
    total = sum(p.numel() for p in model.parameters())
    zeros = sum(int((p == 0).sum()) for p in model.parameters())
    assert 0.25 * total <= zeros <= 0.35 * total, (zeros, total)
    assert result.masks
