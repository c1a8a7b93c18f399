"""Issue 23 item 5: a proportionate first batch that still fails closed.

The first batch's checks: every parameter's summed per-sample gradients against autograd's batch
gradient from the SAME backward (seen through a few fixed Gaussian directions, each parameter on
its own rounding scale), and the padding check on ONE sample, the batch's shortest, run alone:
one extra forward and backward of that sample, none where the sample alone is the batch itself.
These tests show what the cheaper checks cost in forwards, and that they still catch a wrong rule
on one parameter (also one whose gradient is tiny next to the rest), a model that depends on left
padding, and one that mixes samples.
"""

from __future__ import annotations

import logging

import pytest
import torch
import transformers as tf
from test_architectures import check_exact, make_batches, path_of
from test_hardening_engine import DoubledRule, MissingRule, RuledLinear, _tiny_gradient_llama
from torch import nn

import hf_fisher
from hf_fisher import plugins
from hf_fisher.hookspecs import hookimpl

import reference as R
import tiny_models as tm

pytestmark = pytest.mark.usefixtures("one_thread")


class _Forwards:
    """Records the sequence length of every call of ``model``'s forward."""

    def __init__(self, model):
        self.lengths: list[int] = []
        self.handle = model.register_forward_pre_hook(self._pre, with_kwargs=True)

    def _pre(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.lengths.append(int(ids.shape[1]))


def _collect_counting(model, batches, **kw):
    counter = _Forwards(model)
    try:
        fisher = hf_fisher.collect(model, batches, progress=False, **kw)
    finally:
        counter.handle.remove()
    return fisher, counter.lengths


@pytest.mark.parametrize("reduction", ["param", "group"])
def test_padding_check_costs_one_forward_of_the_shortest_sample(reduction):
    """First batch [7, 3, 5] right-padded: the batched forward plus ONE forward of the shortest
    sample (3 tokens) alone; the next batch of the same padding kind: its forward only. A batch
    of one unpadded sample is its own 'alone' run: no second forward at all."""
    model = tm.llama(torch.float64)
    first = tm.padded_batch([7, 3, 5], seed=1)
    second = tm.padded_batch([4, 6, 2], seed=2)
    fisher, lengths = _collect_counting(model, [first, second], reduction=reduction)
    assert lengths == [7, 3, 6], lengths
    assert path_of(fisher) == "batched"
    if reduction == "param":
        check_exact(fisher, model, "causal_lm", R.split_batch(first) + R.split_batch(second))

    single = tm.padded_batch([9], seed=3)
    assert single["attention_mask"].bool().all()
    fisher, lengths = _collect_counting(model, [single], reduction=reduction)
    assert lengths == [9], lengths
    assert path_of(fisher) == "batched"


class _MixSamples(nn.Module):
    """The final norm, plus a tenth of the batch mean of its input: each sample's output depends
    on the other samples of the batch (alone it is 1.1 x its own input)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, x):
        return self.norm(x) + 0.1 * x.mean(dim=0, keepdim=True)


def test_a_model_mixing_samples_is_caught_after_a_first_batch_of_one():
    """A first batch of one unpadded sample checks nothing about padding or the other samples
    (the sample alone IS the batch); the padding check must still run on the next batch of that
    padding kind, catch the mixing and use the per-sample path: the Fisher of each sample alone."""
    model = tm.llama(torch.float64)
    model.model.norm = _MixSamples(model.model.norm)
    one = tm.padded_batch([6], seed=4)
    two = {k: v[:, :5] for k, v in tm.padded_batch([5, 5], seed=5).items()}
    assert one["attention_mask"].bool().all() and two["attention_mask"].bool().all()
    fisher = hf_fisher.collect(model, [one, two], reduction="param", progress=False)
    assert path_of(fisher) == "loop"
    assert "alone, without padding" in fisher.metadata.extra["loop_reason"]
    check_exact(fisher, model, "causal_lm", R.split_batch(one) + R.split_batch(two))


class NoPositionsGPT2(tf.GPT2LMHeadModel):
    """GPT-2 whose forward takes no ``position_ids``: it numbers positions 0, 1, ... whatever the
    padding, so left padding moves every real token of a padded sample to other positions."""

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def _no_positions_gpt2():
    reference = tm.gpt2(torch.float64)
    model = NoPositionsGPT2(reference.config).to(torch.float64)
    model.load_state_dict(reference.state_dict())
    return model.eval()


@pytest.mark.parametrize("side", ["left", "right"])
def test_left_padding_mismatch_is_caught(side, caplog):
    """Left padding shifts the learned positions of the padded samples: the padding check (the
    shortest sample, alone) catches it and the batch takes the per-sample path; right padding
    leaves every real token where it is alone and stays batched. Exact either way."""
    model = _no_positions_gpt2()
    batches = make_batches(model, "causal_lm", side)
    with caplog.at_level(logging.WARNING, logger="hf_fisher.engine"):
        fisher = hf_fisher.collect(model, batches, reduction="param", task_type="causal_lm", progress=False)
    if side == "left":
        assert path_of(fisher) == "loop"
        assert "alone, without padding" in fisher.metadata.extra["loop_reason"]
    else:
        assert path_of(fisher) == "batched", fisher.metadata.extra.get("loop_reason")
    check_exact(fisher, model, "causal_lm", [s for b in batches for s in R.split_batch(b)])


def _with_rule(rule, fn):
    class Plugin:
        @hookimpl
        def hf_fisher_register_grad_rules(self, register):
            register(RuledLinear, rule)

    plugins.register(Plugin(), name="wrong-rule")
    try:
        return fn()
    finally:
        plugins.unregister("wrong-rule")


def _ruled(model, module_path: str):
    parent, _, leaf = module_path.rpartition(".")
    owner = model.get_submodule(parent)
    old = getattr(owner, leaf)
    new = RuledLinear(old.in_features, old.out_features, bias=old.bias is not None).to(old.weight.dtype)
    new.load_state_dict(old.state_dict())
    setattr(owner, leaf, new)
    return model


@pytest.mark.parametrize("reduction", ["param", "group"])
@pytest.mark.parametrize("rule", [MissingRule(), DoubledRule()], ids=["missing", "doubled"])
def test_wrong_rule_on_one_parameter_is_caught(rule, reduction):
    """A wrong rule on one ordinary parameter (layer 1's down_proj): caught by the first batch's
    check through the directions, moved alone to the vector-Jacobian path, exact."""
    model = _ruled(tm.llama(torch.float64), "model.layers.1.mlp.down_proj")
    name = "model.layers.1.mlp.down_proj.weight"
    batches = make_batches(model, "causal_lm", "right")
    fisher = _with_rule(rule, lambda: hf_fisher.collect(model, batches, reduction=reduction, progress=False))
    assert path_of(fisher) == "batched"
    assert set(fisher.metadata.extra.get("vjp_params") or {}) == {name}
    reference = hf_fisher.collect(model, batches, reduction="param", progress=False)
    assert not reference.metadata.extra.get("vjp_params")  # without the wrong rule: hooks
    for pname in fisher.names():
        R.assert_close(fisher[pname], reference[pname] if reduction == "param" else fisher.groups[pname].reduce(reference[pname]),
                       rtol=1e-9, atol_rel=1e-9, what=pname)


@pytest.mark.parametrize("rule", [MissingRule(), DoubledRule()], ids=["missing", "doubled"])
def test_tiny_gradient_with_a_wrong_rule_is_caught_in_group_reduction(rule):
    """The float32 LLaMA whose o_proj gradient is ~1e-4 of the median parameter's (see
    tests/test_hardening_engine.py), group reduction: judged on its own scale, caught."""
    model = _tiny_gradient_llama()
    name = "model.layers.0.self_attn.o_proj.weight"
    batches = make_batches(model, "causal_lm", "right")
    fisher = _with_rule(rule, lambda: hf_fisher.collect(model, batches, reduction="group", progress=False))
    assert path_of(fisher) == "batched"
    assert set(fisher.metadata.extra.get("vjp_params") or {}) == {name}
    samples = [s for b in batches for s in R.split_batch(b)]
    mean, _, _, _ = R.reference_fisher(model, samples, task_type="causal_lm")
    expected = fisher.groups[name].reduce(mean[name])
    R.assert_close(fisher[name], expected, rtol=1e-3, atol_rel=1e-4, what=name)
