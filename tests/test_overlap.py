"""Mask overlap (Jaccard, bands, region masks) on hand-built masks, and task overlap of real
Fishers collected on a tiny Llama."""

from __future__ import annotations

import json
import math

import pytest
import torch

import hf_fisher
from hf_fisher.consumers import overlap
from hf_fisher.consumers.overlap import band, count_of, mask_overlap, task_overlap
from hf_fisher.errors import InvalidInputError
from hf_fisher.layout import ModelLayout

import tiny_models as tm

pytestmark = pytest.mark.usefixtures("one_thread")

L0, L1 = "model.layers.0.mlp.w", "model.layers.1.mlp.w"


def bools(*values):
    return torch.tensor(values, dtype=torch.bool)


def test_identical_and_disjoint_masks():
    a = {L0: bools(1, 0, 1, 1), "lm_head.weight": torch.ones(2, 3, dtype=torch.bool)}
    same = mask_overlap(a, {k: v.clone() for k, v in a.items()})
    assert same.jaccard == 1.0 and same.band == "high" and same.only_a == same.only_b == 0 and same.shared == 9
    b = {k: ~v for k, v in a.items()}
    dis = mask_overlap(a, b)
    assert dis.jaccard == 0.0 and dis.band == "low" and dis.shared == 0
    assert (dis.only_a, dis.only_b) == (9, 1)
    assert dis.recommendation == overlap.RECOMMENDATIONS["low"]


def test_per_layer_and_per_param_by_hand():
    a = {L0: bools(1, 1, 0, 0), L1: bools(1, 0, 1, 0, 1), "lm_head.weight": bools(1, 1)}
    b = {L0: bools(1, 0, 1, 0), L1: bools(1, 0, 1, 0, 1), "lm_head.weight": bools(0, 0)}
    r = mask_overlap(a, b)
    # layer 0: shared 1, only_a 1, only_b 1 -> 1/3; layer 1: 3/3; outside (None): 0/2
    assert list(r.per_layer) == [0, 1, None]
    assert r.per_layer[0].jaccard == pytest.approx(1 / 3) and (r.per_layer[0].only_a, r.per_layer[0].only_b) == (1, 1)
    assert r.per_layer[1].jaccard == 1.0
    assert r.per_layer[None].jaccard == 0.0 and r.per_layer[None].only_a == 2
    assert r.per_param[L1].shared == 3
    assert (r.shared, r.only_a, r.only_b) == (4, 3, 1) and r.jaccard == pytest.approx(4 / 8)
    assert r.band == "medium"
    # a layout's param_layers take precedence over the name
    layout = ModelLayout(adapter="test", model_type=None, num_layers=2, param_layers={"lm_head.weight": 1})
    r2 = mask_overlap(a, b, layout=layout)
    assert list(r2.per_layer) == [0, 1] and r2.per_layer[1].jaccard == pytest.approx(3 / 5)
    d = json.loads(json.dumps(r.to_dict()))
    assert d["jaccard"] == 0.5 and d["band"] == "medium" and d["per_layer"][2]["layer"] is None
    assert d["per_param"][L0]["union"] == 3 and d["size_a"] == 7 and d["size_b"] == 5


@pytest.mark.parametrize(
    "shared, union, expected",
    [(7, 10, "medium"), (71, 100, "high"), (4, 10, "medium"), (39, 100, "low"), (1, 2, "medium")],
)
def test_bands_at_and_around_boundaries(shared, union, expected):
    a = torch.zeros(union, dtype=torch.bool)
    b = torch.zeros(union, dtype=torch.bool)
    a[:shared] = True
    b[:] = True  # A ⊂ B, so J = shared / union
    r = mask_overlap({"w": a}, {"w": b})
    assert r.jaccard == shared / union and r.band == expected


def test_band_function_boundaries():
    assert band(0.7) == "medium" and band(math.nextafter(0.7, 1)) == "high"
    assert band(0.4) == "medium" and band(math.nextafter(0.4, 0)) == "low"
    assert band(1.0) == "high" and band(0.0) == "low"


def test_region_masks_partition_the_union():
    g = torch.Generator().manual_seed(0)
    a = {n: torch.rand(5, 7, generator=g) > 0.5 for n in (L0, L1)}
    b = {n: torch.rand(5, 7, generator=g) > 0.6 for n in (L0, L1)}
    r = mask_overlap(a, b)
    shared = r.shared_masks()
    only_a, only_b = r.unique_masks()
    for n in a:
        assert torch.equal(shared[n] | only_a[n] | only_b[n], a[n] | b[n])
        for x, y in ((shared, only_a), (shared, only_b), (only_a, only_b)):
            assert not (x[n] & y[n]).any()
    assert sum(int(m.sum()) for m in shared.values()) == r.shared
    assert sum(int(m.sum()) for m in only_a.values()) == r.only_a
    assert sum(int(m.sum()) for m in only_b.values()) == r.only_b


def test_empty_union_is_identical():
    z = {L0: torch.zeros(3, dtype=torch.bool)}
    r = mask_overlap(z, {L0: torch.zeros(3, dtype=torch.bool)})
    assert r.jaccard == 1.0 and r.band == "high" and r.per_layer[0].jaccard == 1.0
    assert mask_overlap({}, {}).jaccard == 1.0


def test_bad_masks_raise_naming_the_parameter():
    a = {L0: bools(1, 0), L1: bools(1)}
    with pytest.raises(InvalidInputError, match="only in masks_a.*layers.1"):
        mask_overlap(a, {L0: bools(1, 0)})
    with pytest.raises(InvalidInputError, match=r"layers\.1.*different shapes"):
        mask_overlap(a, {L0: bools(1, 0), L1: bools(1, 1)})
    with pytest.raises(InvalidInputError, match=r"masks_b\['model\.layers\.0\.mlp\.w'\].*torch.bool"):
        mask_overlap(a, {L0: torch.tensor([1.0, 0.0]), L1: bools(1)})
    with pytest.raises(InvalidInputError, match="torch.bool"):
        mask_overlap({L0: [True]}, {L0: bools(1)})
    with pytest.raises(InvalidInputError, match="dict"):
        mask_overlap([bools(1)], {L0: bools(1)})


def test_count_of_rounds_float_products():
    assert count_of(0.1, 30) == 3 and count_of(0.2, 10) == 2 and count_of(0.01, 10) == 1 and count_of(1.0, 7) == 7
    assert count_of(0.25, 10) == 3


# ---------------------------------------------------------------------------- from Fishers
@pytest.fixture(scope="module")
def fishers():
    model = tm.llama()
    a = hf_fisher.collect(model, [tm.padded_batch([6, 4, 7], seed=1)], progress=False)
    b = hf_fisher.collect(model, [tm.padded_batch([5, 8, 3], seed=2)], progress=False)
    g = hf_fisher.collect(model, [tm.padded_batch([6, 4, 7], seed=1)], reduction="group", progress=False)
    return a, b, g


@pytest.mark.parametrize("unit", ["params", "heads", "channels"])
def test_task_overlap_with_itself_is_one(fishers, unit):
    a = fishers[0]
    r = task_overlap(a, a, keep=0.2, unit=unit)
    assert r.jaccard == 1.0 and r.band == "high" and r.unit == unit and r.keep == 0.2
    json.dumps(r.to_dict())


def test_task_overlap_keeps_the_top_fraction(fishers):
    a, b, _ = fishers
    r = task_overlap(a, b, keep=0.1, unit="params")
    n = sum(a[name].numel() for name in a.names())
    assert sum(int(m.sum()) for m in r.masks_a.values()) == count_of(0.1, n)
    assert 0.0 < r.jaccard < 1.0
    # the kept positions are the largest values: every kept value >= every dropped one
    flat = torch.cat([a[name].reshape(-1) for name in a.names()])
    kept = torch.cat([r.masks_a[name].reshape(-1) for name in a.names()])
    assert flat[kept].min() >= flat[~kept].max()
    assert set(r.per_layer) == {0, 1, None}

    heads = task_overlap(a, b, keep=0.25, unit="heads")
    assert set(heads.masks_a) == {"layers.0.heads", "layers.1.heads"}
    assert heads.masks_a["layers.0.heads"].shape == (4,) and sum(int(m.sum()) for m in heads.masks_a.values()) == 2
    imp = a.head_importance()
    top = sorted(imp, key=lambda k: -imp[k])[:2]
    assert all(bool(heads.masks_a[f"layers.{lay}.heads"][h]) for lay, h in top)
    assert set(heads.per_layer) == {0, 1}
    ch = task_overlap(a, b, keep=0.1, unit="channels")
    assert ch.masks_a["layers.1.channels"].shape == (40,) and sum(int(m.sum()) for m in ch.masks_a.values()) == 8


def test_task_overlap_group_fisher_and_bad_input(fishers):
    a, _, g = fishers
    r = task_overlap(g, g, keep=0.3)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert r.jaccard == 1.0 and r.masks_a[name].shape == (g.groups[name].num_groups,)
    # heads and channels agree between the param and the group Fisher of the same data
    assert task_overlap(a, g, unit="channels", keep=0.1).jaccard == pytest.approx(1.0)
    with pytest.raises(InvalidInputError, match="different reductions"):
        task_overlap(a, g)
    for keep in (0, 1.5, float("nan"), True, "0.2"):
        with pytest.raises(InvalidInputError, match="keep"):
            task_overlap(a, a, keep=keep)
    with pytest.raises(InvalidInputError, match="unit"):
        task_overlap(a, a, unit="experts")
    other = hf_fisher.collect(tm.llama(layers=1), [tm.padded_batch([4], seed=0)], progress=False)
    with pytest.raises(InvalidInputError, match="different parameters"):
        task_overlap(a, other)
    with pytest.raises(InvalidInputError, match="different heads"):
        task_overlap(a, other, unit="heads")
    bare = a._replace(layout=None, groups={})
    with pytest.raises(InvalidInputError, match="fisher_b: cannot rank channels"):
        task_overlap(a, bare, unit="channels")


def test_registers_both_consumers():
    seen = {}
    overlap.hf_fisher_register_consumers(lambda name, fn: seen.setdefault(name, fn))
    assert seen == {"mask_overlap": mask_overlap, "task_overlap": task_overlap}
