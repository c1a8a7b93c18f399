"""The true Fisher estimator against brute-force expectations over the model's own predictions.

References are computed sample by sample (each sample alone, unpadded) with plain autograd:

- classification: ``C_i = Σ_c p(c|x_i) (∇ CE(x_i, c))²`` (exact class sum);
- causal LM, normalisation "mean" (``l_i = (1/n_i) Σ_t CE_t``): label positions draw their tokens
  independently, and ``E_y[∇ CE_t(y)] = 0``, so the cross terms vanish and
  ``E[g_i²] = (1/n_i²) Σ_t Σ_v p_t(v) (∇ CE_t(v))²`` — enumerated over the vocabulary.
"""

from __future__ import annotations

import pytest
import torch

import hf_fisher
from hf_fisher.errors import InvalidInputError, UnsupportedError

from tiny_models import bert_classifier, llama, padded_batch

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 13


def _params(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _classification_batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 61, (4, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    ids[1, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 2, 1])}


def _classification_reference(model, batch):
    params = _params(model)
    contributions = []
    for i in range(batch["input_ids"].shape[0]):
        keep = batch["attention_mask"][i].bool()
        logits = model(input_ids=batch["input_ids"][i, keep][None], attention_mask=batch["attention_mask"][i, keep][None]).logits[0]
        p = torch.softmax(logits, -1).detach()
        c_i = {n: torch.zeros_like(q) for n, q in params}
        for c in range(logits.shape[-1]):
            loss = torch.nn.functional.cross_entropy(logits[None], torch.tensor([c]))
            for (n, _), g in zip(params, torch.autograd.grad(loss, [q for _, q in params], retain_graph=True)):
                c_i[n] += p[c] * g**2
        contributions.append(c_i)
    return contributions


def _lm_reference(model, batch):
    """Exact E_y[g_i ⊙ g_i] per sample (vocabulary enumerated at every label position)."""
    params = _params(model)
    out = []
    for i in range(batch["input_ids"].shape[0]):
        keep = batch["attention_mask"][i].bool()
        ids = batch["input_ids"][i, keep][None]
        labels = batch["labels"][i, keep]
        logits = model(input_ids=ids).logits[0]
        positions = [t for t in range(1, ids.shape[1]) if labels[t] != -100]
        n = len(positions)
        c_i = {name: torch.zeros_like(q) for name, q in params}
        for t in positions:
            p = torch.softmax(logits[t - 1], -1).detach()
            for v in range(logits.shape[-1]):
                loss = torch.nn.functional.cross_entropy(logits[t - 1][None], torch.tensor([v])) / n
                for (name, _), g in zip(params, torch.autograd.grad(loss, [q for _, q in params], retain_graph=True)):
                    c_i[name] += p[v] * g**2
        out.append(c_i)
    return out


def _mean(contributions):
    return {n: torch.stack([c[n] for c in contributions]).mean(0) for n in contributions[0]}


def _rel_error(fisher, ref) -> float:
    """max |F − F_ref| over every element, relative to the largest reference value."""
    scale = max(float(r.abs().max()) for r in ref.values())
    return max(float((fisher[n].to(torch.float64) - ref[n]).abs().max()) for n in ref) / scale


def test_exact_classification_equals_the_class_sum():
    model = bert_classifier(num_labels=3)
    batch = _classification_batch()
    contributions = _classification_reference(model, batch)
    ref = _mean(contributions)
    fisher = hf_fisher.collect(model, [batch], estimator="true", exact=True, reduction="param", progress=False)
    assert _rel_error(fisher, ref) < 1e-10
    var_ref = {n: torch.stack([c[n] for c in contributions]).var(0, unbiased=True) for n in ref}
    scale = max(float(v.abs().max()) for v in var_ref.values())
    assert max(float((fisher.variances[n] - var_ref[n]).abs().max()) for n in ref) / scale < 1e-10
    assert fisher.metadata.estimator == "true"
    assert fisher.counts.samples == 4  # samples, not draws
    assert fisher.metadata.extra["true_fisher"] == {"mc_samples": None, "exact": True, "temperature": 1.0, "seed": 0}
    # the group view of the same estimator: group sums of the reference
    grouped = hf_fisher.collect(model, [batch], estimator="true", exact=True, reduction="group", progress=False)
    # structurally zero entries (the key bias) hold rounding noise: judged against the model's scale
    floor = 1e-20 * max(float(t.abs().max()) for t in ref.values())
    for name, values in grouped.items():
        want = grouped.groups[name].reduce(ref[name])
        assert torch.allclose(values, want, rtol=1e-9, atol=1e-12 * float(want.abs().max()) + floor), name


def test_exact_classification_does_not_depend_on_the_batches():
    model = bert_classifier(num_labels=3)
    batch = _classification_batch()
    whole = hf_fisher.collect(model, [batch], estimator="true", exact=True, progress=False)
    halves = [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]
    split = hf_fisher.collect(model, halves, estimator="true", exact=True, progress=False)
    assert _rel_error(split, whole.means) < 1e-10


def test_monte_carlo_converges_to_the_exact_lm_fisher_like_one_over_sqrt_draws():
    model = llama(vocab=VOCAB, layers=1)
    batch = padded_batch([5, 4, 3], vocab=VOCAB, seed=3)
    ref = _mean(_lm_reference(model, batch))

    def error(draws: int) -> float:
        f = hf_fisher.collect(model, [batch], estimator="true", mc_samples=draws, seed=1, progress=False)
        num = sum(float((f[n] - ref[n]).pow(2).sum()) for n in ref)
        return (num / sum(float(r.pow(2).sum()) for r in ref.values())) ** 0.5

    e_few, e_many = error(4), error(64)
    # 16x the draws: the error shrinks ~4x in expectation; allow for the noise of one seed
    assert e_many < e_few / 2.2, (e_few, e_many)
    assert e_many < 0.25, e_many


def test_draws_are_seeded_and_follow_the_temperature():
    model = llama(vocab=VOCAB, layers=1)
    batch = padded_batch([5, 4, 3], vocab=VOCAB, seed=3, side="left")
    a = hf_fisher.collect(model, [batch], estimator="true", mc_samples=3, seed=7, progress=False)
    b = hf_fisher.collect(model, [batch], estimator="true", mc_samples=3, seed=7, progress=False)
    c = hf_fisher.collect(model, [batch], estimator="true", mc_samples=3, seed=8, progress=False)
    for n in a.names():
        assert torch.equal(a[n], b[n])
    assert any(not torch.equal(a[n], c[n]) for n in a.names())
    assert a.counts.samples == 3 and a.counts.tokens == b.counts.tokens
    # a very low temperature makes the prediction (almost) deterministic: argmax labels, and the
    # Fisher of those labels is then that of the empirical estimator on argmax labels
    logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits
    argmax = torch.full_like(batch["labels"], -100)
    argmax[:, 1:] = logits[:, :-1].argmax(-1)
    argmax[batch["labels"] == -100] = -100
    argmax[:, 1:][batch["attention_mask"][:, :-1] == 0] = -100
    cold = hf_fisher.collect(model, [batch], estimator="true", temperature=1e-6, progress=False)
    emp = hf_fisher.collect(model, [{**batch, "labels": argmax}], progress=False)
    assert _rel_error(cold, emp.means) < 1e-9


@pytest.mark.parametrize(
    "options, error, words",
    [
        ({"mc_samples": 0}, InvalidInputError, "mc_samples"),
        ({"mc_samples": 2.5}, InvalidInputError, "mc_samples"),
        ({"temperature": 0.0}, InvalidInputError, "temperature"),
        ({"temperature": float("nan")}, InvalidInputError, "temperature"),
        ({"exact": True}, UnsupportedError, "sequence classification"),
    ],
)
def test_bad_options_are_refused_before_any_work(options, error, words):
    model = llama(vocab=VOCAB, layers=1)
    batches_seen = []

    def batches():
        batches_seen.append(1)
        yield padded_batch([4], vocab=VOCAB)

    with pytest.raises(error, match=words):
        hf_fisher.collect(model, batches(), estimator="true", progress=False, **options)
    assert len(batches_seen) <= 1  # api.collect peeks at the first batch only (empty-data check)


def test_regression_heads_are_refused():
    model = bert_classifier(num_labels=1)
    batch = {"input_ids": torch.tensor([[5, 6, 7]]), "labels": torch.tensor([0.5])}
    with pytest.raises(UnsupportedError, match="empirical"):
        hf_fisher.collect(model, [batch], estimator="true", progress=False)
