"""Fisher-targeted perturbations (percolation experiments) on a real tiny Llama (float64, GQA):
exact norm, only the selected slices change, bitwise restore, reproducibility, and that the
top-Fisher channels are the sensitive ones."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch

import hf_fisher
from hf_fisher.consumers import perturb as perturb_module
from hf_fisher.consumers.merge.api import validation_loss
from hf_fisher.consumers.overlap import count_of
from hf_fisher.consumers.perturb import perturb, perturbation_sweep
from hf_fisher.errors import InvalidInputError, ModelMismatchError

import tiny_models as tm

pytestmark = pytest.mark.usefixtures("one_thread")

BATCHES = [tm.padded_batch([7, 5, 6, 8], seed=s) for s in range(2)]


@pytest.fixture(scope="module")
def trained():
    """A tiny Llama fitted to BATCHES (gradient ≈ 0, so the loss change of a small perturbation is
    its quadratic term ½ δᵀHδ) and its Fisher on the same batches."""
    model = tm.llama()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(80):
        opt.zero_grad()
        loss = sum(model(**b).loss for b in BATCHES) / len(BATCHES)
        loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model, hf_fisher.collect(model, BATCHES, progress=False)


@pytest.fixture
def setup(trained):
    return copy.deepcopy(trained[0]), trained[1]


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def allowed_masks(model, fisher, unit, units):
    """Positions the selected units may change, built independently from the layout."""
    params = dict(model.named_parameters())
    out = {}
    for layer, u in units:
        if unit == "channels":
            block = next(b for b in fisher.layout.mlp if b.layer == layer)
            slices = block.slices(u)
        else:
            head = next(h for h in fisher.layout.heads() if (h.layer, h.head) == (layer, u))
            slices = head.q + head.o
        for s in slices:
            m = out.setdefault(s.param, torch.zeros(params[s.param].shape, dtype=torch.bool))
            m[s.index()] = True
    return out


@pytest.mark.parametrize("unit", ["channels", "heads"])
@pytest.mark.parametrize("target", ["top", "bottom", "random"])
def test_norm_is_exact_and_only_selected_slices_change(setup, unit, target):
    model, fisher = setup
    before = snapshot(model)
    p = perturb(model, fisher, concentration=0.3, epsilon=0.05, unit=unit, target=target, seed=3)
    n_units = 80 if unit == "channels" else 8
    assert len(p.units) == count_of(0.3, n_units) and len(set(p.units)) == len(p.units)
    assert abs(p.norm - 0.05) < 1e-9
    allowed = allowed_masks(model, fisher, unit, p.units)
    sq = 0.0
    for name, q in model.named_parameters():
        diff = q.detach() - before[name]
        sq += float((diff**2).sum())
        mask = allowed.get(name, torch.zeros(q.shape, dtype=torch.bool))
        assert torch.equal(q.detach()[~mask], before[name][~mask]), name  # bitwise outside the units
        assert bool((diff[mask] != 0).all()), name
        if unit == "heads" and ("k_proj" in name or "v_proj" in name):
            assert torch.equal(q.detach(), before[name])  # shared kv-heads are never touched
    assert abs(math.sqrt(sq) - 0.05) < 1e-9
    d = json.loads(json.dumps(p.to_dict()))
    assert d["units"] == [list(u) for u in p.units] and d["num_elements"] == sum(int(m.sum()) for m in allowed.values())
    p.restore()
    assert all(torch.equal(q.detach(), before[n]) for n, q in model.named_parameters())
    assert not p.active
    p.restore()  # idempotent


def test_overlapping_slices_count_once(setup):
    """A layout whose channels list their gate and down slices twice (a parameter in several
    roles): every position is drawn once, and the norm is still exact."""
    model, fisher = setup
    blocks = [dataclasses.replace(b, roles=(*b.roles, b.roles[0], b.roles[-1])) for b in fisher.layout.mlp]
    doubled = fisher._replace(layout=dataclasses.replace(fisher.layout, mlp=blocks))
    before = snapshot(model)
    with perturb(model, doubled, concentration=0.5, epsilon=0.3, seed=2) as p:
        assert abs(p.norm - 0.3) < 1e-9
        sq = sum(float(((q.detach() - before[n]) ** 2).sum()) for n, q in model.named_parameters())
        assert abs(math.sqrt(sq) - 0.3) < 1e-9
        for n, q in model.named_parameters():
            assert torch.equal(q.detach() != before[n], p.masks.get(n, torch.zeros(q.shape, dtype=torch.bool)))
        assert sum(int(m.sum()) for m in p.masks.values()) == len(p.units) * (32 * 3)  # gate row, up row, down col


def test_selection_follows_the_fisher(setup):
    model, fisher = setup
    ci = fisher.channel_importance()
    ranked = sorted(ci, key=lambda k: -ci[k])
    with perturb(model, fisher, concentration=0.1, epsilon=0.01, target="top", seed=0) as top:
        assert top.units == ranked[:8]
    with perturb(model, fisher, concentration=0.1, epsilon=0.01, target="bottom", seed=0) as bottom:
        assert bottom.units == ranked[::-1][:8]
    hi = fisher.head_importance()
    with perturb(model, fisher, concentration=0.01, epsilon=0.01, unit="heads", target="top", seed=0) as one:
        assert one.units == [max(hi, key=hi.get)]  # ceil(0.01 · 8) = 1
    with perturb(model, fisher, concentration=1.0, epsilon=0.01, unit="heads", seed=0) as every:
        assert sorted(every.units) == sorted(hi)


def test_context_manager_restores_bitwise_even_on_error(setup):
    model, fisher = setup
    before = snapshot(model)
    with pytest.raises(RuntimeError):
        with perturb(model, fisher, concentration=1.0, epsilon=0.5, unit="heads", seed=1) as p:
            assert p.active
            raise RuntimeError("boom")
    assert all(torch.equal(q.detach(), before[n]) for n, q in model.named_parameters())


def test_random_target_is_reproducible(setup):
    model, fisher = setup
    before = snapshot(model)

    def run(seed):
        with perturb(model, fisher, concentration=0.2, epsilon=0.1, target="random", seed=seed) as p:
            return p.units, snapshot(model)

    units1, w1 = run(7)
    units2, w2 = run(7)
    units3, _ = run(8)
    assert units1 == units2 and all(torch.equal(w1[n], w2[n]) for n in w1)
    assert units1 != units3
    assert any(not torch.equal(w1[n], before[n]) for n in w1)
    p = perturb(model, fisher, concentration=0.2, epsilon=0.1, target="random")  # no seed: one is drawn
    p.restore()
    assert run(p.seed)[0] == p.units


def test_group_fisher_selects_the_same_units(setup):
    model, fisher = setup
    group = hf_fisher.collect(model, BATCHES, reduction="group", progress=False)
    for unit in ("channels", "heads"):
        with perturb(model, fisher, concentration=0.25, epsilon=0.1, unit=unit, seed=0) as a:
            pass
        with perturb(model, group, concentration=0.25, epsilon=0.1, unit=unit, seed=0) as b:
            pass
        assert a.units == b.units


def test_top_fisher_channels_are_the_sensitive_ones(setup):
    model, fisher = setup
    ci = torch.tensor(list(fisher.channel_importance().values()))
    assert ci.max() > 10 * ci.min()  # importances are not flat
    base = validation_loss(model, [BATCHES])
    rise = {}
    for target in ("top", "random", "bottom"):
        deltas = []
        for seed in range(3):
            with perturb(model, fisher, concentration=0.1, epsilon=0.1, target=target, seed=seed):
                deltas.append(validation_loss(model, [BATCHES]) - base)
        rise[target] = sum(deltas) / len(deltas)
    assert rise["bottom"] > 0 and rise["top"] > 3 * rise["bottom"], rise
    assert rise["top"] > rise["random"] > rise["bottom"], rise  # random sits in between


def test_sweep_structure_and_restores(setup):
    model, fisher = setup
    before = snapshot(model)
    r = perturbation_sweep(
        model, fisher, BATCHES[:1], concentrations=(0.05, 0.5), epsilon=0.1, unit="heads", seeds=(0, 1), progress=False
    )
    assert all(torch.equal(q.detach(), before[n]) for n, q in model.named_parameters())
    assert r.base_loss == pytest.approx(validation_loss(model, [BATCHES[:1]]), abs=0, rel=0)
    assert [(p.target, p.concentration) for p in r.points] == [
        (t, c) for t in ("top", "bottom", "random") for c in (0.05, 0.5)
    ]
    for p in r.points:
        assert len(p.losses) == 2 and p.seeds == (0, 1) and p.num_units == count_of(p.concentration, 8)
        assert p.mean_loss == pytest.approx(sum(p.losses) / 2) and p.delta == pytest.approx(p.mean_loss - r.base_loss)
    assert r.curve("top") == [(0.05, r.point("top", 0.05).mean_loss), (0.5, r.point("top", 0.5).mean_loss)]
    # a sweep point is the loss under perturb() with the same arguments
    with perturb(model, fisher, concentration=0.5, epsilon=0.1, unit="heads", target="bottom", seed=1):
        assert validation_loss(model, [BATCHES[:1]]) == r.point("bottom", 0.5).losses[1]
    d = json.loads(json.dumps(r.to_dict()))
    assert d["unit"] == "heads" and len(d["points"]) == 6 and d["points"][0]["seeds"] == [0, 1]


def test_bad_input_raises_before_touching_the_model(setup):
    model, fisher = setup
    before = snapshot(model)
    kw = dict(concentration=0.1, epsilon=0.1)
    bad = [
        (dict(kw, concentration=0), "concentration"),
        (dict(kw, concentration=1.2), "concentration"),
        (dict(kw, concentration=float("nan")), "concentration"),
        (dict(kw, epsilon=0), "epsilon"),
        (dict(kw, epsilon=-1.0), "epsilon"),
        (dict(kw, epsilon=float("inf")), "epsilon"),
        (dict(kw, unit="experts"), "unit"),
        (dict(kw, target="middle"), "target"),
        (dict(kw, seed=1.5), "seed"),
    ]
    for args, word in bad:
        with pytest.raises(InvalidInputError, match=word):
            perturb(model, fisher, **args)
    with pytest.raises(InvalidInputError, match="layout"):
        perturb(model, fisher._replace(layout=None, groups={}), **kw)
    with pytest.raises(ModelMismatchError):
        perturb(tm.llama(layers=1), fisher, **kw)
    sweep_bad = [
        dict(concentrations=(0.1, 2.0)), dict(targets=("top", "side")), dict(seeds=(0, None)), dict(seeds=()),
        dict(epsilon=0.0),
    ]
    for args in sweep_bad:
        with pytest.raises(InvalidInputError):
            perturbation_sweep(model, fisher, BATCHES, **{"epsilon": 0.1, "progress": False, **args})
    with pytest.raises(InvalidInputError, match="batches"):
        perturbation_sweep(model, fisher, [], epsilon=0.1, progress=False)
    assert all(torch.equal(q.detach(), before[n]) for n, q in model.named_parameters())


def test_registers_both_consumers():
    seen = {}
    perturb_module.hf_fisher_register_consumers(lambda name, fn: seen.setdefault(name, fn))
    assert seen == {"perturb": perturb, "perturbation_sweep": perturbation_sweep}
