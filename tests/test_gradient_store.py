"""The per-sample gradient store: exact signed gradients (brute-force reference), its Fisher equal
to collect's, the memory budget enforced (refuse with how many fit, or evict the oldest)."""

from __future__ import annotations

import pytest
import torch

import hf_fisher
from hf_fisher.collection.gradients import attention_params, store_gradients
from hf_fisher.errors import InvalidInputError
from hf_fisher.plugins import model_layout

import reference as ref
import tiny_models as tm

pytestmark = pytest.mark.usefixtures("one_thread")

BATCHES = [tm.padded_batch([7, 5, 6], seed=s) for s in range(2)]


def per_sample_reference(model, names):
    params = dict(model.named_parameters())
    out = []
    for b in BATCHES:
        for s in ref.split_batch(b):
            total, n = ref._token_losses(model(input_ids=s["input_ids"]).logits, s["labels"], "causal_lm")
            out.append(dict(zip(names, torch.autograd.grad(total / n, [params[x] for x in names]))))
    return out


def test_signed_gradients_equal_per_sample_autograd():
    m = tm.llama(kv_heads=2, layers=2)
    store = store_gradients(m, BATCHES, layers=[1], dtype=torch.float64, progress=False)
    names = attention_params(m, model_layout(m), [1])
    assert store.names == names and all(".layers.1." in n for n in names)
    assert store.num_samples == 6 and store.sample_ids == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    want = per_sample_reference(m, names)
    for n in names:
        torch.testing.assert_close(store.grads[n], torch.stack([w[n] for w in want]), rtol=1e-9, atol=1e-12)
    F = hf_fisher.collect(m, BATCHES, reduction="param", progress=False)
    for n, f in store.fisher().items():
        torch.testing.assert_close(f, F[n], rtol=1e-9, atol=1e-14)
    assert all(p.requires_grad for p in m.parameters())  # requires_grad flags restored


def test_budget_refuses_saying_how_many_fit():
    m = tm.llama(kv_heads=2, layers=2)
    names = attention_params(m, model_layout(m), None)
    per_sample_mb = sum(dict(m.named_parameters())[n].numel() for n in names) * 4 / 2**20
    with pytest.raises(InvalidInputError, match="holds 4 samples") as e:
        store_gradients(m, BATCHES, memory_budget_mb=per_sample_mb * 4.5, progress=False)
    assert "max_samples=4" in str(e.value)
    store = store_gradients(m, BATCHES, memory_budget_mb=per_sample_mb * 4.5, max_samples=4, progress=False)
    assert store.num_samples == 4 and store.nbytes() <= per_sample_mb * 4.5 * 2**20


def test_evict_keeps_the_most_recent_samples():
    m = tm.llama(kv_heads=2, layers=2)
    full = store_gradients(m, BATCHES, progress=False)
    per_sample_mb = full.nbytes() / full.num_samples / 2**20
    store = store_gradients(m, BATCHES, memory_budget_mb=per_sample_mb * 4.5, on_budget="evict", progress=False)
    assert store.evicted == 2 and store.sample_ids == full.sample_ids[2:]
    for n in store.names:
        assert torch.equal(store.grads[n], full.grads[n][2:])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"on_budget": "drop"}, "on_budget"),
        ({"memory_budget_mb": 0}, "memory_budget_mb"),
        ({"max_samples": 0}, "max_samples"),
        ({"layers": [7]}, "not attention layers"),
        ({"params": ["nope.weight"]}, "not parameters"),
        ({"dtype": torch.int32}, "dtype"),
    ],
)
def test_bad_input(kwargs, match):
    m = tm.llama(kv_heads=2, layers=2)
    with pytest.raises(InvalidInputError, match=match):
        store_gradients(m, BATCHES, progress=False, **kwargs)
