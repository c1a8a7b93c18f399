"""Cross-task sample conflicts: cosines and unit-vector L2 effect sizes against a brute-force
per-sample autograd reference, p-values on constructed cases (opposite gradients give
small p, identical ones p >= 0.5), the BH adjustment, seeding, clusters, claims, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from scipy.stats import false_discovery_control

import hf_fisher
from hf_fisher.collection.gradients import GradientStore, attention_params, store_gradients
from hf_fisher.consumers.circuits import conflicts as cf
from hf_fisher.consumers.circuits.conflicts import conflict_pvalues, fdr_bh, format_p, sample_conflicts
from hf_fisher.errors import EmptyDataError, InvalidInputError
from hf_fisher.plugins import model_layout

import reference as ref
import tiny_models as tm

pytestmark = pytest.mark.usefixtures("one_thread")

BATCHES_A = [tm.padded_batch([7, 5, 6], seed=s) for s in range(2)]
BATCHES_B = [tm.padded_batch([6, 8, 4, 5], seed=10)]


@pytest.fixture(scope="module")
def model():
    return tm.llama(kv_heads=2, layers=2)


def brute_gradients(model, batches, names):
    """Per-sample gradients, one unpadded sample at a time, plain autograd (mean loss per label token)."""
    params = dict(model.named_parameters())
    out = []
    for b in batches:
        for s in ref.split_batch(b):
            total, n = ref._token_losses(model(input_ids=s["input_ids"]).logits, s["labels"], "causal_lm")
            out.append({x: g.double() for x, g in zip(names, torch.autograd.grad(total / n, [params[x] for x in names]))})
    return out


def brute_cos_d(ga, gb, F, names, eps):
    """Explicit loops: ĝ = g / sqrt(F + eps), cos = ĝa·ĝb / (|ĝa| |ĝb|), d = |ĝa/|ĝa| - ĝb/|ĝb|| / 2."""
    cos = torch.zeros(len(ga), len(gb), dtype=torch.float64)
    d = torch.zeros_like(cos)
    for i, a in enumerate(ga):
        va = torch.cat([(a[n] / torch.sqrt(F[n] + eps)).flatten() for n in names])
        for j, b in enumerate(gb):
            vb = torch.cat([(b[n] / torch.sqrt(F[n] + eps)).flatten() for n in names])
            cos[i, j] = torch.dot(va, vb) / (va.norm() * vb.norm())
            d[i, j] = (va / va.norm() - vb / vb.norm()).norm() / 2
    return cos, d


@pytest.mark.parametrize("groups", ["param", "layer"])
def test_cosines_and_effect_sizes_equal_brute_force(model, groups):
    layers = [1] if groups == "param" else None
    names = attention_params(model, model_layout(model), layers)
    ga, gb = brute_gradients(model, BATCHES_A, names), brute_gradients(model, BATCHES_B, names)
    F = {n: torch.stack([g[n] ** 2 for g in ga + gb]).mean(0) for n in names}  # pooled over both tasks
    eps = 1e-6
    r = sample_conflicts(model, BATCHES_A, BATCHES_B, layers=layers, groups=groups, eps=eps,
                         dtype=torch.float64, progress=False)
    assert r.sample_ids_a == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert r.sample_ids_b == [(0, 0), (0, 1), (0, 2), (0, 3)]
    if groups == "param":
        want_groups = {n: [n] for n in names}
    else:
        want_groups = {f"layer {L}": [n for n in names if f".layers.{L}." in n] for L in (0, 1)}
    want_groups["overall"] = names
    assert r.groups == list(want_groups) and r.group_params == want_groups
    for key, plist in want_groups.items():
        cos, d = brute_cos_d(ga, gb, F, plist, eps)
        assert r.cosine[key].shape == (6, 4)
        torch.testing.assert_close(r.cosine[key], cos, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(r.effect_size[key], d, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(r.effect_size[key], ((1 - cos) / 2).sqrt(), rtol=1e-7, atol=1e-9)
        assert bool(((r.p_values[key] > 0) & (r.p_values[key] <= 1)).all())


def test_given_fisher_is_used(model):
    names = attention_params(model, model_layout(model), [0])
    other = [tm.padded_batch([5, 9], seed=30)]
    fisher = hf_fisher.collect(model, other, reduction="param", progress=False)
    ga, gb = brute_gradients(model, BATCHES_A, names), brute_gradients(model, BATCHES_B, names)
    F = {n: fisher[n].double() for n in names}
    r = sample_conflicts(model, BATCHES_A, BATCHES_B, fisher=fisher, layers=[0],
                         dtype=torch.float64, progress=False)
    assert r.fisher_source == "given"
    for key in (names[1], "overall"):
        cos, _ = brute_cos_d(ga, gb, F, names if key == "overall" else [key], 1e-8)
        torch.testing.assert_close(r.cosine[key], cos, rtol=1e-8, atol=1e-10)


def test_bh_adjustment_equals_scipy_and_a_hand_check(model):
    r = sample_conflicts(model, BATCHES_A, BATCHES_B, layers=[1], progress=False)
    raw = torch.cat([r.p_values[k].reshape(-1) for k in r.groups]).numpy()
    want = torch.from_numpy(false_discovery_control(raw, method="bh"))
    got = torch.cat([r.p_adjusted[k].reshape(-1) for k in r.groups])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-15)
    for k in r.groups:
        assert torch.equal(r.significant[k], (r.p_adjusted[k] < r.alpha) & (r.cosine[k] < 0))
    # hand-made vector: sorted 0.005, 0.01, 0.03, 0.04, 0.5 -> p*m/rank 0.025, 0.025, 0.05, 0.05, 0.5
    p = [0.01, 0.04, 0.03, 0.005, 0.5]
    torch.testing.assert_close(fdr_bh(p), torch.tensor([0.025, 0.05, 0.05, 0.025, 0.5], dtype=torch.float64))
    # and an independent step-up loop on a random vector
    q = torch.rand(200, generator=torch.Generator().manual_seed(1), dtype=torch.float64) ** 3
    order = q.argsort()
    m = len(q)
    adj = torch.empty_like(q)
    running = 1.0
    for rank in range(m, 0, -1):
        idx = order[rank - 1]
        running = min(running, float(q[idx]) * m / rank)
        adj[idx] = running
    torch.testing.assert_close(fdr_bh(q), adj, rtol=1e-12, atol=1e-15)


def test_opposite_gradients_give_the_smallest_p_and_identical_ones_p_1(model):
    store = store_gradients(model, BATCHES_A, layers=[1], dtype=torch.float64, progress=False)
    neg = GradientStore({n: -g for n, g in store.grads.items()}, list(store.sample_ids), task="neg")
    r = sample_conflicts(model, store, neg, progress=False)
    same = sample_conflicts(model, store, GradientStore({n: g.clone() for n, g in store.grads.items()}, list(store.sample_ids)),
                            progress=False)
    eye = torch.eye(6, dtype=torch.bool)
    for k in r.groups:
        torch.testing.assert_close(r.cosine[k][eye], torch.full((6,), -1.0, dtype=torch.float64))
        torch.testing.assert_close(r.effect_size[k][eye], torch.ones(6, dtype=torch.float64))
        torch.testing.assert_close(same.cosine[k][eye], torch.ones(6, dtype=torch.float64))
        torch.testing.assert_close(same.effect_size[k][eye], torch.zeros(6, dtype=torch.float64), rtol=0, atol=1e-7)
        assert bool((same.p_values[k][eye] >= 0.5).all())
        assert not bool(same.significant[k][eye].any())
    # a constructed case straight through sample_conflicts: opposite, identical, zero, among independent samples
    x = torch.randn(12, 400, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = torch.randn(12, 400, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y[0], y[1], y[2] = -x[0], x[1], 0.0
    name = "model.layers.0.self_attn.q_proj.weight"
    c = sample_conflicts(None, GradientStore({name: x.reshape(12, 20, 20)}, [(0, i) for i in range(12)]),
                         GradientStore({name: y.reshape(12, 20, 20)}, [(1, i) for i in range(12)]),
                         eps=1e6, progress=False)
    cos, p = c.cosine["overall"], c.p_values["overall"]
    assert float(cos[0, 0]) == pytest.approx(-1) and float(p[0, 0]) < 1e-4 and float(p[0, 0]) == float(p.min())
    assert float(cos[1, 1]) == pytest.approx(1) and float(p[1, 1]) > 0.999
    assert float(cos[2, 2]) == 0.0 and bool((p[:, 2] == 1.0).all())
    assert c.significant["overall"].nonzero().tolist() == [[0, 0]]


def test_p_values_equal_an_explicit_loop_and_are_deterministic(model):
    """p = P(T_k <= cos / s) with s^2 the mean square of the pair's positive reference cosines
    (its row and column, the pair left out) and k their number; no randomness."""
    from scipy.stats import t as student_t

    store_a = store_gradients(model, BATCHES_A, layers=[1], progress=False)
    store_b = store_gradients(model, BATCHES_B, layers=[1], progress=False)
    r1 = sample_conflicts(model, store_a, store_b, progress=False)
    r2 = sample_conflicts(model, store_a, store_b, progress=False)
    assert all(torch.equal(r1.p_values[k], r2.p_values[k]) for k in r1.groups)
    # a group's p-values do not depend on which other groups are tested
    r4 = sample_conflicts(model, store_a, store_b, groups="layer", progress=False)
    assert torch.equal(r1.p_values["overall"], r4.p_values["overall"])
    for key in r1.groups:
        cos = r1.cosine[key]
        stat, dof = {}, {}
        for i in range(cos.shape[0]):
            for j in range(cos.shape[1]):
                refs = [float(cos[i, jj]) for jj in range(cos.shape[1]) if jj != j]
                refs += [float(cos[ii, j]) for ii in range(cos.shape[0]) if ii != i]
                pos = [c for c in refs if c > 0]
                assert int(r1.n_reference[key][i, j]) == len(pos)
                if pos:
                    stat[i, j] = float(cos[i, j]) / math.sqrt(sum(c * c for c in pos) / len(pos))
                    dof[i, j] = len(pos)
        upper = [t for t in stat.values() if t > 0]
        kurt = sum(t**4 for t in upper) / len(upper) / (sum(t**2 for t in upper) / len(upper)) ** 2
        nu = 4 + 6 / (kurt - 3) if len(upper) >= 8 and kurt > 3 else math.inf
        for i in range(cos.shape[0]):
            for j in range(cos.shape[1]):
                want = float(student_t.cdf(stat[i, j], min(dof[i, j], nu))) if (i, j) in stat else 1.0
                assert float(r1.p_values[key][i, j]) == pytest.approx(want, rel=1e-9, abs=1e-300)
    p, k = conflict_pvalues(torch.tensor([[-0.5]], dtype=torch.float64))
    assert float(p) == 1.0 and int(k) == 0  # a single pair has no reference: it cannot be tested


def two_block_stores():
    """Task A samples 0,1 along e1 and 2,3 along e2; task B samples 0,1 along -e1, 2,3 along -e2,
    sample 4 along e3 (e1, e2, e3 orthonormal), each with a little noise."""
    name = "model.layers.0.self_attn.q_proj.weight"
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(128, 3, generator=g, dtype=torch.float64))
    e1, e2, e3 = q.T

    def noisy(v):
        return v + 0.01 * torch.randn(128, generator=g, dtype=torch.float64) / math.sqrt(128)

    a = torch.stack([noisy(e1), noisy(e1), noisy(e2), noisy(e2)]).reshape(4, 16, 8)
    b = torch.stack([noisy(-e1), noisy(-e1), noisy(-e2), noisy(-e2), noisy(e3)]).reshape(5, 16, 8)
    return (GradientStore({name: a}, [(0, i) for i in range(4)], task="A"),
            GradientStore({name: b}, [(1, i) for i in range(5)], task="B"))


def test_two_disjoint_conflicting_groups_give_two_clusters_and_claims():
    sa, sb = two_block_stores()
    r = sample_conflicts(None, sa, sb, progress=False)
    assert [(c.samples_a, c.samples_b, c.n_conflicts) for c in r.clusters] == [([0, 1], [0, 1], 4), ([2, 3], [2, 3], 4)]
    assert all(c.mean_cosine < -0.99 for c in r.clusters)
    want = torch.zeros(4, 5, dtype=torch.bool)
    want[:2, :2] = True
    want[2:4, 2:4] = True
    assert torch.equal(r.significant["overall"], want)
    assert len(r.claims) == 16  # 8 pairs x (the parameter group + overall)
    assert r.claims[0].startswith("sample ") and " of task A conflicts with sample " in r.claims[0]
    assert any(c.startswith("sample 0 of task A conflicts with sample 1 of task B on layer 0 q_proj (p < 0.001, d = 1.00)")
               for c in r.claims)
    assert any("across all 1 analysed parameter (p < 0.001, d = 1.00)" in c for c in r.claims)
    top = r.top_conflicts[0]
    assert top["cosine"] < -0.99 and top["p_value"] < 1e-6
    recs = r.recommendations
    assert {(s["task"], s["sample"]) for s in recs["samples"]} == {("A", i) for i in range(4)} | {("B", i) for i in range(4)}
    assert all(s["conflicts"] == 2 and s["action"] == "filter" for s in recs["samples"] if s["task"] == "B")
    assert all(s["action"] == "down-weight" for s in recs["samples"] if s["task"] == "A")  # 2 of 5 B samples
    assert recs["hotspots"][0]["label"] == "layer 0 q_proj" and recs["hotspots"][0]["n_significant"] == 8
    assert any(a.startswith("Conflict hotspot: layer 0 q_proj (8 of 20 sample pairs") for a in recs["actions"])
    data = json.loads(r.to_json())
    assert data["clusters"][1]["samples_b"] == [2, 3] and len(data["cosine"]["overall"]) == 4


def test_a_positive_cosine_below_its_null_is_not_a_conflict():
    """A pair with a large common offset and anti-correlated fluctuations has a positive cosine:
    never a conflict (significant needs cos < 0), and a lone pair has no reference: p = 1."""
    name = "model.layers.0.mlp.up_proj.weight"
    noise = torch.randn(256, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    a = GradientStore({name: (1 + 0.3 * noise).reshape(1, 16, 16)}, [(0, 0)])
    b = GradientStore({name: (1 - 0.3 * noise).reshape(1, 16, 16)}, [(0, 0)])
    # eps >> F: ĝ ∝ g (a uniform scale), so the common offset is not whitened away
    r = sample_conflicts(None, a, b, fisher=None, eps=1e6, progress=False)
    assert 0.5 < float(r.cosine["overall"][0, 0]) < 1
    assert float(r.p_values["overall"][0, 0]) == 1.0
    assert not bool(r.significant["overall"].any()) and r.claims == [] and r.clusters == []


def test_format_p_and_short_names():
    assert format_p(0.0004) == "p < 0.001" and format_p(0.0123) == "p = 0.012" and format_p(0.001) == "p = 0.001"
    assert cf._short_module("model.layers.3.self_attn.q_proj.weight") == "q_proj"
    assert cf._short_module("transformer.h.0.attn.c_attn.bias") == "c_attn bias"
    assert cf._short_module("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight") == "q_proj lora_A"
    assert cf._group_phrase("model.layers.3.self_attn.q_proj.weight", 8) == "on layer 3 q_proj"
    assert cf._group_phrase("layer 2", 8) == "on layer 2"


def test_empty_task_is_refused(model):
    """Issue 21: an empty task used to give empty results and a warning; now refused before any work."""
    with pytest.raises(EmptyDataError, match="task B has no batch"):
        sample_conflicts(model, BATCHES_A[:1], [], layers=[0], progress=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"groups": "head"}, "groups"),
        ({"eps": 0}, "eps"),
        ({"eps": -1e-3}, "eps"),
        ({"eps": float("nan")}, "eps"),
        ({"alpha": 0}, "alpha"),
        ({"alpha": 1.0}, "alpha"),
        ({"alpha": 1.5}, "alpha"),
        ({"min_effect_size": -0.1}, "min_effect_size"),
        ({"min_effect_size": 1.0}, "min_effect_size"),
        ({"layers": [7]}, "not attention layers"),
        ({"params": ["nope.weight"]}, "not parameters"),
        ({"memory_budget_mb": 0.001}, "memory_budget_mb"),
        ({"fisher": {"x": torch.zeros(1)}}, "hf_fisher.Fisher"),
    ],
)
def test_bad_input_raises_before_any_work(model, monkeypatch, kwargs, match):
    def boom(*a, **k):
        raise AssertionError("gradients were computed before the arguments were checked")

    monkeypatch.setattr(cf, "store_gradients", boom)
    with pytest.raises(InvalidInputError, match=match):
        sample_conflicts(model, BATCHES_A, BATCHES_B, progress=False, **kwargs)


def test_bad_fisher_raises_before_any_work(model, monkeypatch):
    gpt2 = tm.gpt2()
    other = hf_fisher.collect(gpt2, BATCHES_A[:1], reduction="param", progress=False)
    grouped = hf_fisher.collect(model, BATCHES_A[:1], reduction="group", progress=False)
    m2 = tm.llama(kv_heads=2, layers=2)
    for n, p in m2.named_parameters():
        p.requires_grad_(".layers.1." not in n)
    partial = hf_fisher.collect(m2, BATCHES_A[:1], reduction="param", progress=False)

    def boom(*a, **k):
        raise AssertionError("gradients were computed before the Fisher was checked")

    monkeypatch.setattr(cf, "store_gradients", boom)
    with pytest.raises(InvalidInputError, match="does not belong to this model"):
        sample_conflicts(model, BATCHES_A, BATCHES_B, fisher=other, progress=False)
    with pytest.raises(InvalidInputError, match="reduction='param'"):
        sample_conflicts(model, BATCHES_A, BATCHES_B, fisher=grouped, progress=False)
    with pytest.raises(InvalidInputError, match="does not cover"):
        sample_conflicts(model, BATCHES_A, BATCHES_B, fisher=partial, layers=[1], progress=False)
    with pytest.raises(InvalidInputError, match="model is required"):
        sample_conflicts(None, BATCHES_A, BATCHES_B, progress=False)
    sa, sb = two_block_stores()
    with pytest.raises(InvalidInputError, match="different parameters"):
        sample_conflicts(None, sa, GradientStore({"w": sb.grads[sb.names[0]]}, sb.sample_ids), progress=False)
    with pytest.raises(InvalidInputError, match="normalizations"):
        sample_conflicts(None, sa, GradientStore(dict(sb.grads), sb.sample_ids, normalization="sum"), progress=False)


def test_a_store_for_one_task_and_batches_for_the_other(model):
    store_a = store_gradients(model, BATCHES_A, layers=[0], dtype=torch.float64, progress=False)
    mixed = sample_conflicts(model, store_a, BATCHES_B, dtype=torch.float64, progress=False)
    full = sample_conflicts(model, BATCHES_A, BATCHES_B, layers=[0], dtype=torch.float64,
                            progress=False)
    assert mixed.groups == full.groups
    for k in full.groups:
        torch.testing.assert_close(mixed.cosine[k], full.cosine[k], rtol=1e-10, atol=1e-12)
        assert torch.equal(mixed.p_values[k], full.p_values[k])


def test_registered_as_a_consumer():
    got = {}
    cf.hf_fisher_register_consumers(lambda name, fn: got.setdefault(name, fn))
    assert got == {"sample_conflicts": sample_conflicts}
