"""hf-fisher-gated-rule: GatedLinear's rule is registered, used (not the generic fallback), exact,
and only applied to GatedLinear's own forward.

Self-contained: a tiny LLaMA (from a config, no downloads) whose MLP projections are GatedLinear
layers, and the shared brute-force one-sample-at-a-time reference ``hf_fisher.testing`` (plain
autograd, float64).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
import transformers as tf

import hf_fisher
import hf_fisher.plugins as plugins
from hf_fisher.engine import rules as RU
from hf_fisher.testing import IGNORE, assert_close, per_sample_fisher
from hf_fisher_gated_rule import GatedLinear, GatedLinearRule

VOCAB = 61
RTOL, ATOL_REL = 1e-6, 1e-9


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class DoubledGatedLinear(GatedLinear):
    """Overrides forward: GatedLinearRule would be off by a factor of 2."""

    def forward(self, x):
        return 2 * super().forward(x)


class PlainGatedLinear(GatedLinear):
    """Keeps GatedLinear's forward."""


def gated_llama(seed=50, down_cls=GatedLinear):
    """A tiny LLaMA whose gate/up/down projections are GatedLinear layers (float64)."""
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False,
    )
    model = tf.LlamaForCausalLM(cfg)
    for layer in model.model.layers:
        mlp = layer.mlp
        for attr in ("gate_proj", "up_proj", "down_proj"):
            lin = getattr(mlp, attr)
            cls = down_cls if attr == "down_proj" else GatedLinear
            new = cls(lin.in_features, lin.out_features)
            with torch.no_grad():
                new.weight.copy_(lin.weight)
            setattr(mlp, attr, new)
    torch.manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.05 * torch.randn_like(p))
    return model.double().eval()


def gated_modules(model):
    return [m for m in model.modules() if isinstance(m, GatedLinear)]


# --------------------------------------------------------------------------- batches + reference


def padded_batch(lengths, *, seed, side="right", pad_id=0):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(lengths), T), dtype=torch.long)
    labels = torch.full((len(lengths), T), IGNORE, dtype=torch.long)
    for i, n in enumerate(lengths):
        seq = torch.randint(3, VOCAB, (n,), generator=g)
        sl = slice(0, n) if side == "right" else slice(T - n, T)
        ids[i, sl], mask[i, sl] = seq, 1
        lab = seq.clone()
        if n > 3:
            lab[1] = IGNORE
        labels[i, sl] = lab
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batches_for(side):
    return [padded_batch([5, 3, 7], seed=1, side=side), padded_batch([6, 4, 2], seed=2, side=side)]


def brute_force(model, batches):
    """Per-sample C_i = g_i² (mean-normalised causal-LM loss), one unpadded sample at a time."""
    return per_sample_fisher(model, batches, keep_contributions=True).contributions


def close(actual, expected, what, floor):
    assert_close(actual, expected, rtol=RTOL, atol_rel=ATOL_REL, floor=floor, what=what)


@pytest.fixture
def generic_calls(monkeypatch):
    """Module types the generic torch.func rule is asked about during the test."""
    seen = []
    original = RU.FuncRule.parts

    def spy(self, call):
        seen.append(type(call.module))
        return original(self, call)

    monkeypatch.setattr(RU.FuncRule, "parts", spy)
    return seen


def check_exact(model, batches, reduction):
    contribs = brute_force(model, batches)
    stack = {n: torch.stack([c[n] for c in contribs]) for n in contribs[0]}
    fisher = hf_fisher.collect(model, batches, reduction=reduction, task_type="causal_lm", progress=False)
    assert fisher.metadata.extra["per_sample_path"] == "batched", fisher.metadata.extra.get("loop_reason")
    assert not fisher.metadata.extra.get("vjp_params")
    assert fisher.counts.samples == len(contribs)
    assert sorted(fisher.names()) == sorted(stack)
    if reduction == "group":
        stack = {n: fisher.groups[n].reduce(s, batch_dims=1) for n, s in stack.items()}
    mean = {n: s.mean(0) for n, s in stack.items()}
    var = {n: s.var(0, unbiased=True) for n, s in stack.items()}
    floor_m = 1e-20 * max(float(t.abs().max()) for t in mean.values())
    floor_v = 1e-20 * max(float(t.abs().max()) for t in var.values())
    for n in mean:
        close(fisher[n], mean[n], f"{reduction} mean {n}", floor_m)
        close(fisher.variances[n], var[n], f"{reduction} variance {n}", floor_v)
    return fisher


# --------------------------------------------------------------------------- registration


def test_rule_is_registered_and_described():
    rules = plugins.grad_rules()
    assert isinstance(rules[GatedLinear], GatedLinearRule)
    rows = [r for r in plugins.describe() if r["kind"] == "grad_rule" and r["name"].endswith("GatedLinear")]
    assert rows == [
        {"kind": "grad_rule", "name": "hf_fisher_gated_rule.layers.GatedLinear", "plugin": "gated_linear_rule",
         "distribution": "hf-fisher-gated-rule"}
    ]


def test_rule_applies_to_the_exact_forward_only():
    rules = plugins.grad_rules()
    mine = rules[GatedLinear]
    assert RU.rule_for(GatedLinear(3, 2), rules) is mine
    assert RU.rule_for(PlainGatedLinear(3, 2), rules) is mine  # same forward: same computation
    overriding = RU.rule_for(DoubledGatedLinear(3, 2), rules)
    assert type(overriding) is RU.FuncRule and overriding is not mine
    assert not mine.applies_to(DoubledGatedLinear, GatedLinear)


# --------------------------------------------------------------------------- the rule itself


@pytest.mark.parametrize("flat", [False, True], ids=["batched", "token_flattened"])
def test_parts_match_autograd_per_sample(flat):
    """The parts of one call equal autograd's per-sample gradients, scale included."""
    torch.manual_seed(0)
    B, T, n_in, n_out = 3, 4, 5, 6
    m = GatedLinear(n_in, n_out).double()
    x = torch.randn(B, T, n_in, dtype=torch.float64)
    gy = torch.randn(B, T, n_out, dtype=torch.float64)
    scale = torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64)
    xin, g = (x.reshape(B * T, n_in), gy.reshape(B * T, n_out)) if flat else (x, gy)
    call = RU.ModuleCall(
        module=m, args=(xin,), kwargs={}, output=m(xin).detach(), grad_output=g, batch_size=B,
        compute_dtype=torch.float64, scale=scale, seq_len=T,
    )
    parts = GatedLinearRule().parts(call)
    assert set(parts) == {"weight", "gate"}
    assert isinstance(parts["weight"], RU.OuterProductPart) and isinstance(parts["gate"], RU.DensePart)
    every = torch.arange(B)
    for i in range(B):
        gw, gg = torch.autograd.grad((m(x[i]) * gy[i]).sum(), [m.weight, m.gate])
        torch.testing.assert_close(parts["weight"].materialize(every)[i], scale[i] * gw)
        torch.testing.assert_close(parts["gate"].materialize(every)[i], scale[i] * gg)
    # the Gram / materialised per-index squared sums agree with the dense per-sample gradients
    dense = parts["weight"].materialize(every)
    for axis in (0, 1):
        expected = (dense**2).sum(dim=2 - axis)
        torch.testing.assert_close(parts["weight"].per_index_sq(axis, every, 10**6), expected)
    # unscaled totals: the batch gradient
    gw, gg = torch.autograd.grad((m(x) * gy).sum(), [m.weight, m.gate])
    torch.testing.assert_close(parts["weight"].total(), gw)
    torch.testing.assert_close(parts["gate"].total(), gg)


# --------------------------------------------------------------------------- a model using it


@pytest.mark.parametrize("side", ["right", "left"])
def test_fisher_exact_with_the_rule(side, generic_calls):
    model = gated_llama()
    rule = plugins.grad_rules()[GatedLinear]
    mods = gated_modules(model)
    assert len(mods) == 6 and all(RU.rule_for(m, plugins.grad_rules()) is rule for m in mods)
    before = rule.calls
    for reduction in ("param", "group"):
        check_exact(model, batches_for(side), reduction)
    # used for every GatedLinear call of every batch (at least), never the generic rule
    assert rule.calls - before >= 2 * 2 * len(mods)
    assert GatedLinear not in generic_calls and not any(issubclass(t, GatedLinear) for t in generic_calls)


def test_overriding_subclass_gets_the_generic_rule_and_stays_exact(generic_calls):
    model = gated_llama(seed=51, down_cls=DoubledGatedLinear)
    rule = plugins.grad_rules()[GatedLinear]
    before = rule.calls
    check_exact(model, batches_for("right"), "param")
    assert DoubledGatedLinear in generic_calls  # the subclass went to torch.func ...
    assert GatedLinear not in generic_calls  # ... the plain GatedLinear layers did not
    assert rule.calls - before >= 2 * 4  # 4 plain GatedLinear per batch
