"""hf_fisher.testing: the public brute-force reference (per_sample_fisher, assert_fisher_close)."""

from __future__ import annotations

import pytest
import torch

import hf_fisher
from hf_fisher import plugins
from hf_fisher.testing import (
    RTOL,
    assert_fisher_close,
    mean_and_variance,
    per_sample_contributions,
    per_sample_fisher,
    split_batch,
)

import tiny_models as tm

pytestmark = pytest.mark.usefixtures("one_thread")


def _batches(side="right"):
    return [tm.padded_batch([5, 3, 7], seed=1, side=side), tm.padded_batch([6, 4, 2], seed=2, side=side)]


def test_one_sample_is_the_squared_gradient_of_the_models_own_loss():
    """Written independently of the reference's loss code (transformers' own ``.loss`` is computed in
    float32, so the shifted mean cross-entropy is spelled out here in float64)."""
    model = tm.llama()
    batch = tm.padded_batch([6], seed=3)
    ref = per_sample_fisher(model, [batch])
    logits = model(input_ids=batch["input_ids"]).logits[0, :-1].double()
    loss = torch.nn.functional.cross_entropy(logits, batch["labels"][0, 1:], ignore_index=-100)
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    grads = torch.autograd.grad(loss, params)
    assert ref.samples == 1 and ref.skipped == 0
    for n, g in zip(names, grads):
        torch.testing.assert_close(ref.mean[n], g.double() ** 2, rtol=1e-10, atol=1e-30)
        assert torch.isnan(ref.variance[n]).all()  # one sample: no unbiased variance


def test_padding_side_and_batching_do_not_change_the_reference():
    model = tm.llama()
    right, left = per_sample_fisher(model, _batches("right")), per_sample_fisher(model, _batches("left"))
    singles = [s for b in _batches() for s in split_batch(b)]  # regrouped: one sample per batch
    alone = per_sample_fisher(model, singles)
    assert right.samples == left.samples == alone.samples == 6
    for n in right.mean:
        torch.testing.assert_close(right.mean[n], left.mean[n], rtol=1e-12, atol=0)
        torch.testing.assert_close(right.variance[n], alone.variance[n], rtol=1e-12, atol=0)


def test_streaming_moments_equal_the_two_pass_moments_and_skips_are_counted():
    model = tm.llama()
    batches = _batches()
    batches[1]["labels"][2] = -100  # the third sample of batch 2 has no label token left
    ref = per_sample_fisher(model, batches, keep_contributions=True)
    mean, var, n, skipped = mean_and_variance(
        per_sample_contributions(model, [s for b in batches for s in split_batch(b)])
    )
    assert (ref.samples, ref.skipped, len(ref.contributions)) == (n, skipped, n) == (5, 1, 5)
    for k in mean:
        torch.testing.assert_close(ref.mean[k], mean[k], rtol=1e-12, atol=0)
        torch.testing.assert_close(ref.variance[k], var[k], rtol=1e-10, atol=1e-300)


@pytest.mark.parametrize("reduction", ["param", "group"])
def test_collect_matches_and_a_perturbed_fisher_fails(reduction):
    model = tm.llama()
    batches = _batches("left")
    layout = plugins.model_layout(model)
    ref = per_sample_fisher(model, batches, groups=layout.groups)
    fisher = hf_fisher.collect(model, batches, reduction=reduction, task_type="causal_lm", progress=False)
    assert_fisher_close(fisher, ref)  # reduction taken from the artifact

    name = next(iter(ref.mean))
    fisher[name].mul_(1 + 10 * RTOL)  # a relative error ten times the stated tolerance
    with pytest.raises(AssertionError, match=f"{reduction} mean {name}"):
        assert_fisher_close(fisher, ref)


def test_group_moments_need_groups_and_bad_options_are_refused():
    model = tm.llama()
    ref = per_sample_fisher(model, _batches()[:1])
    with pytest.raises(ValueError, match="groups="):
        ref.moments("group")
    with pytest.raises(ValueError, match="normalization"):
        per_sample_fisher(model, _batches(), normalization="avg")
    with pytest.raises(ValueError, match="task_type"):
        per_sample_fisher(model, _batches(), task_type="translation")


def test_reference_covers_the_engines_choices():
    """The reference keeps its own lists (it shares no code with the engine) but must cover them."""
    from hf_fisher.engine import losses
    from hf_fisher.testing import NORMALIZATIONS, TASK_TYPES

    assert set(losses.NORMALIZATIONS) == set(NORMALIZATIONS)
    assert set(losses.TASK_TYPES) <= set(TASK_TYPES)


def test_sequence_classification_is_the_engines_name_for_classification():
    model = tm.bert_classifier()
    batch = {"input_ids": torch.randint(3, 50, (3, 6)), "attention_mask": torch.ones(3, 6, dtype=torch.long),
             "labels": torch.tensor([0, 2, 1])}
    batch["attention_mask"][1, 4:] = 0
    a = per_sample_fisher(model, [batch], task_type="classification")
    b = per_sample_fisher(model, [batch], task_type="sequence_classification")
    assert a.samples == b.samples == 3
    for n in a.mean:
        torch.testing.assert_close(a.mean[n], b.mean[n], rtol=0, atol=0)
    fisher = hf_fisher.collect(model, [batch], reduction="param", task_type="sequence_classification", progress=False)
    assert_fisher_close(fisher, b)
