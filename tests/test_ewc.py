"""EWCPenalty and forgetting_risk: exact numbers on a real model, and EWC forgetting less."""

from __future__ import annotations

import pytest
import torch

import hf_fisher
from hf_fisher.errors import InvalidInputError

import tiny_models as tm


def _fisher(model, reduction="param"):
    return hf_fisher.collect(model, [tm.padded_batch([5, 3, 7], seed=1)], reduction=reduction, progress=False)


def test_penalty_is_the_fisher_weighted_square_distance():
    model = tm.llama(torch.float32)
    fisher = _fisher(model)
    ewc = hf_fisher.EWCPenalty(fisher, model, lam=0.5)
    assert float(ewc(model)) == 0.0
    torch.manual_seed(0)
    deltas = {n: 0.01 * torch.randn_like(p) for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.add_(deltas[n])
    expected = 0.5 * sum(float((fisher[n].double() * deltas[n].double() ** 2).sum()) for n in fisher.names())
    value = ewc(model)
    assert float(value) == pytest.approx(expected, rel=1e-4)
    value.backward()  # differentiable: d/dθ = 2 λ F Δθ
    name = "model.layers.0.mlp.down_proj.weight"
    p = dict(model.named_parameters())[name]
    torch.testing.assert_close(p.grad, (2 * 0.5 * fisher[name] * deltas[name]).float(), rtol=1e-4, atol=1e-12)


def test_group_fisher_is_spread_over_its_elements():
    model = tm.llama(torch.float32)
    fisher = _fisher(model, "group")
    ewc = hf_fisher.EWCPenalty(fisher, model, lam=1.0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    expected = sum(float(fisher[n].double().sum()) * 0.01 for n in fisher.names())  # spread sums back to the group mass
    assert float(ewc(model)) == pytest.approx(expected, rel=1e-4)


def test_online_consolidation():
    model = tm.llama(torch.float32)
    f1, f2 = _fisher(model), hf_fisher.collect(model, [tm.padded_batch([4, 6], seed=2)], progress=False)
    ewc = hf_fisher.EWCPenalty(f1, model, lam=1.0, online_decay=0.5)
    ewc.consolidate(f2, model)
    name = f1.names()[0]
    torch.testing.assert_close(ewc._fisher[name], (0.5 * f1[name] + f2[name]).float())
    with pytest.raises(InvalidInputError):
        hf_fisher.EWCPenalty(f1, model).consolidate(f2, model)


def test_forgetting_risk_numbers():
    before = tm.llama(torch.float32)
    fisher = _fisher(before)
    after = tm.llama(torch.float32)
    with torch.no_grad():
        for n, p in after.named_parameters():
            p.add_(0.02 if "layers.1." in n else 0.0)
    risk = hf_fisher.forgetting_risk(fisher, before, after)
    layer1 = sum(float(fisher[n].double().sum()) * 0.02**2 for n in fisher.names() if "layers.1." in n)
    assert risk["total"] == pytest.approx(layer1, rel=1e-4)
    assert risk["per_layer"][1] == pytest.approx(layer1, rel=1e-4)
    assert risk["per_layer"].get(0, 0.0) == 0.0
    assert risk["normalized"] > 0


def _train(model, batches, steps, penalty=None, lr=0.05):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for k in range(steps):
        b = batches[k % len(batches)]
        loss = model(**b).loss
        if penalty is not None:
            loss = loss + penalty(model)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _loss(model, batches):
    with torch.no_grad():
        return sum(float(model(**b).loss) for b in batches) / len(batches)


def test_ewc_forgets_task_a_less_than_plain_fine_tuning():
    """Task A: sequences over tokens 3..30; task B: tokens 31..60. After training B, task A's
    loss rises less with EWC (Fisher of A) than without (measured: +0.010 vs +0.072)."""
    def task(lo, hi, seed):
        ids = torch.randint(lo, hi, (8, 12), generator=torch.Generator().manual_seed(seed))
        return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}]

    a, b = task(3, 31, 1), task(31, 61, 2)
    base = tm.llama(torch.float32)
    _train(base, a, 60)
    loss_a0 = _loss(base, a)
    fisher_a = hf_fisher.collect(base, a, progress=False)
    plain, ewc_model = tm.llama(torch.float32), tm.llama(torch.float32)
    plain.load_state_dict(base.state_dict())
    ewc_model.load_state_dict(base.state_dict())
    _train(plain, b, 40)
    _train(ewc_model, b, 40, penalty=hf_fisher.EWCPenalty(fisher_a, base, lam=200.0))
    forget_plain = _loss(plain, a) - loss_a0
    forget_ewc = _loss(ewc_model, a) - loss_a0
    assert forget_plain > 0
    assert forget_ewc < 0.7 * forget_plain, (forget_plain, forget_ewc)
    risk_plain = hf_fisher.forgetting_risk(fisher_a, base, plain)["total"]
    risk_ewc = hf_fisher.forgetting_risk(fisher_a, base, ewc_model)["total"]
    assert risk_ewc < risk_plain


def test_penalty_precision_follows_the_parameters_at_least_float32():
    """float64 parameters: a float64 penalty (and anchor); bfloat16 parameters: float32."""
    model64 = tm.llama(torch.float64)
    fisher = _fisher(model64)
    ewc = hf_fisher.EWCPenalty(fisher, model64, lam=2.0)
    with torch.no_grad():
        for p in model64.parameters():
            p.add_(1e-9)  # below float32 resolution of the weights: a float32 anchor would lose it
    value = ewc(model64)
    assert value.dtype == torch.float64
    assert float(value) == pytest.approx(2.0 * fisher.total() * 1e-18, rel=1e-5)
    model16 = tm.llama(torch.float32)
    fisher16 = _fisher(model16)
    star = {n: p.detach().clone() for n, p in model16.named_parameters()}
    model16 = model16.to(torch.bfloat16)
    ewc16 = hf_fisher.EWCPenalty(fisher16, star, lam=1.0)
    value16 = ewc16(model16)
    assert value16.dtype == torch.float32
    params = dict(model16.named_parameters())
    expected = sum(float((fisher16[n].double() * (params[n].double() - star[n].double()) ** 2).sum()) for n in fisher16.names())
    assert float(value16) == pytest.approx(expected, rel=1e-4)


def test_risk_is_forgetting_risk_of_the_penalty_anchor():
    before = tm.llama(torch.float32)
    fisher = _fisher(before)
    ewc = hf_fisher.EWCPenalty(fisher, before, lam=3.0)
    after = tm.llama(torch.float32)
    after.load_state_dict(before.state_dict())
    torch.manual_seed(1)
    with torch.no_grad():
        for p in after.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ref = hf_fisher.forgetting_risk(fisher, before, after)
    got = ewc.risk(after)
    assert got["total"] == pytest.approx(ref["total"], rel=1e-5)
    assert got["normalized"] == pytest.approx(ref["normalized"], rel=1e-5)
    assert got["per_layer"] == pytest.approx(ref["per_layer"], rel=1e-5)
    assert float(ewc(after)) == pytest.approx(3.0 * ref["total"], rel=1e-5)
    ewc.set_anchor(after)
    assert ewc.risk(after)["total"] == 0.0 and ewc.risk(after)["normalized"] == 0.0


def test_validate_refuses_another_model():
    from hf_fisher.errors import ModelMismatchError

    fisher = _fisher(tm.llama(torch.float32))
    ewc = hf_fisher.EWCPenalty(fisher, lam=1.0)
    with pytest.raises(ModelMismatchError, match="does not match the model"):
        ewc.validate(tm.llama(torch.float32, layers=3))
    with pytest.raises(ModelMismatchError, match="are not parameters of the model"):
        ewc(tm.lora_llama(torch.float32))
