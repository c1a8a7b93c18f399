"""Analysis helpers over Fisher artifacts, checked against sums computed by hand on real layouts
(tiny Llama with GQA, tiny GPT-2 with fused c_attn)."""

from __future__ import annotations

import math

import pytest
import scipy.stats
import torch

from hf_fisher import analysis, plugins
from hf_fisher.analysis import importance as importance_consumer
from hf_fisher.artifacts.fisher import Counts, Fisher, FisherMetadata
from hf_fisher.errors import InvalidInputError, UnsupportedError
from hf_fisher.layout import GroupRun, ParamGroups

import tiny_models as tm


def build(model, values=None, *, variance=True, seed=0, task="t"):
    """Param-level Fisher of ``model``: random positive values (or ``values(name, shape)``)."""
    layout = plugins.model_layout(model)
    g = torch.Generator().manual_seed(seed)
    mean, var = {}, {}
    for n, p in model.named_parameters():
        mean[n] = values(n, tuple(p.shape)) if values else torch.rand(p.shape, generator=g, dtype=torch.float64)
        var[n] = torch.rand(p.shape, generator=g, dtype=torch.float64)
    return Fisher(
        mean, var if variance else None, reduction="param", groups=None,
        param_shapes={n: tuple(p.shape) for n, p in model.named_parameters()},
        counts=Counts(samples=20, tokens=300, skipped=0), metadata=FisherMetadata(task=task, reduction="param"),
        layout=layout,
    )


@pytest.fixture(scope="module")
def llama_fisher():
    return build(tm.llama(kv_heads=2))


@pytest.fixture(scope="module")
def gpt2_fisher():
    return build(tm.gpt2(), seed=1)


L0 = "model.layers.0."


def test_group_view_preserves_mass_and_matches_hand_sums(llama_fisher):
    f = llama_fisher
    gv = f.to_groups()
    assert gv.reduction == "group" and gv.variances == {}  # variance not derivable (covariances)
    for n in f.names():
        assert float(gv[n].sum()) == pytest.approx(float(f[n].sum()), rel=1e-12), n
    q = f[L0 + "self_attn.q_proj.weight"]
    assert torch.allclose(gv[L0 + "self_attn.q_proj.weight"], q.reshape(4, 8, 32).sum((1, 2)), rtol=1e-12)
    o = f[L0 + "self_attn.o_proj.weight"]
    assert float(gv[L0 + "self_attn.o_proj.weight"][2]) == pytest.approx(float(o[:, 16:24].sum()), rel=1e-12)
    d = f[L0 + "mlp.down_proj.weight"]
    assert torch.allclose(gv[L0 + "mlp.down_proj.weight"], d.sum(0), rtol=1e-12)
    assert analysis.group_view(gv) is gv
    # explicit groups (a dict) win over the layout's
    one = {n: ParamGroups.single(0, f.param_shapes[n][0]) for n in f.names()}
    totals = analysis.group_view(f, one)
    assert float(totals["lm_head.weight"][0]) == pytest.approx(float(f["lm_head.weight"].sum()), rel=1e-12)


def test_expand_inverts_reduce(llama_fisher):
    gv = llama_fisher.to_groups()
    for name in [L0 + "self_attn.k_proj.weight", L0 + "self_attn.o_proj.weight", L0 + "mlp.up_proj.weight"]:
        pg, shape = gv.groups[name], gv.param_shapes[name]
        spread = gv.expand(name, spread=True)
        assert spread.shape == shape
        assert torch.allclose(pg.reduce(spread), gv[name], rtol=1e-12)
        full = gv.expand(name)
        # every element carries its group's value
        idx = pg.index()
        per_index = full.select(1 - pg.axis, 0)
        assert torch.equal(per_index, gv[name][idx])
    assert llama_fisher.expand("lm_head.weight") is llama_fisher["lm_head.weight"]


def test_group_of_and_range():
    pg = ParamGroups(1, (GroupRun("q_", 4, 8), GroupRun("k_", 2, 8), GroupRun("x", 1, 3)))
    assert [analysis.group_of(pg, i) for i in (0, 7, 8, 31, 32, 47, 48, 50)] == [0, 0, 1, 3, 4, 5, 6, 6]
    assert analysis.group_range(pg, 4) == (32, 40) and analysis.group_range(pg, 6) == (48, 51)
    with pytest.raises(IndexError):
        analysis.group_of(pg, 51)


def test_top_k_matches_brute_force(llama_fisher):
    gv = llama_fisher.to_groups()
    brute = sorted(
        ((n, gv.groups[n].names[i], float(v)) for n in gv.names() for i, v in enumerate(gv[n].tolist())),
        key=lambda t: -t[2],
    )
    top = llama_fisher.top_k(7)
    assert top == brute[:7]
    assert [t[2] for t in top] == sorted((t[2] for t in top), reverse=True)
    only = analysis.top_k(llama_fisher, 3, params=[L0 + "self_attn.q_proj.weight"])
    assert [t[1] for t in only] == [x[1] for x in sorted(
        [(L0 + "self_attn.q_proj.weight", f"head_{h}", float(gv[L0 + 'self_attn.q_proj.weight'][h])) for h in range(4)],
        key=lambda t: -t[2])[:3]]
    with pytest.raises(InvalidInputError, match="unknown parameter"):
        analysis.top_k(llama_fisher, 3, params=["nope"])


def test_per_layer_sums(llama_fisher):
    f = llama_fisher
    pl = f.per_layer()
    assert list(pl) == [0, 1, None]
    for layer in (0, 1):
        hand = sum(float(f[n].sum()) for n in f.names() if n.startswith(f"model.layers.{layer}."))
        assert pl[layer] == pytest.approx(hand, rel=1e-12)
    other = float(f["model.embed_tokens.weight"].sum() + f["model.norm.weight"].sum() + f["lm_head.weight"].sum())
    assert pl[None] == pytest.approx(other, rel=1e-12)


def test_normalized_global_and_layer(llama_fisher):
    f = llama_fisher
    g = f.normalized("global")
    assert g.total() == pytest.approx(1.0, rel=1e-12)
    n = L0 + "mlp.gate_proj.weight"
    factor = 1.0 / f.total()
    assert torch.allclose(g[n], f[n] * factor, rtol=1e-12)
    assert torch.allclose(g.variances[n], f.variances[n] * factor**2, rtol=1e-12)
    lay = f.normalized("layer")
    for layer, total in lay.per_layer().items():
        assert total == pytest.approx(1.0, rel=1e-12), layer
    assert float(lay["lm_head.weight"].sum()) == pytest.approx(
        float(f["lm_head.weight"].sum()) / f.per_layer()[None], rel=1e-12
    )
    assert lay.metadata.extra["normalized"] == "layer" and f.metadata.extra == {}
    with pytest.raises(InvalidInputError):
        f.normalized("row")


def _slices_sum(f, layer, names):
    return sum(float(f[f"model.layers.{layer}.self_attn.{p}.weight"].sum()) for p in names)


def test_head_importance_llama_gqa(llama_fisher):
    f = llama_fisher
    heads = f.head_importance()
    assert sorted(heads) == [(l, h) for l in (0, 1) for h in range(4)]
    for layer in (0, 1):
        mass = _slices_sum(f, layer, ["q_proj", "k_proj", "v_proj", "o_proj"])
        assert sum(heads[(layer, h)] for h in range(4)) == pytest.approx(mass, rel=1e-12)
    # head 3 uses kv-head 1 (4 query heads over 2 kv heads): half of kv-head 1's K/V mass
    p = L0 + "self_attn."
    hand = (
        f[p + "q_proj.weight"][24:32].sum() + f[p + "o_proj.weight"][:, 24:32].sum()
        + (f[p + "k_proj.weight"][8:16].sum() + f[p + "v_proj.weight"][8:16].sum()) / 2
    )
    assert heads[(0, 3)] == pytest.approx(float(hand), rel=1e-12)
    # the group view gives the same totals
    grouped = f.to_groups().head_importance()
    for key, v in heads.items():
        assert grouped[key] == pytest.approx(v, rel=1e-12)


def test_head_importance_gpt2_fused(gpt2_fisher):
    f = gpt2_fisher
    heads = f.head_importance()
    for layer in (0, 1):
        p = f"transformer.h.{layer}.attn."
        mass = float(f[p + "c_attn.weight"].sum() + f[p + "c_attn.bias"].sum() + f[p + "c_proj.weight"].sum())
        assert sum(heads[(layer, h)] for h in range(4)) == pytest.approx(mass, rel=1e-12)
    p = "transformer.h.1.attn."
    w, b, o = f[p + "c_attn.weight"], f[p + "c_attn.bias"], f[p + "c_proj.weight"]
    cols = [slice(16, 24), slice(48, 56), slice(80, 88)]  # head 2's q, k, v columns
    hand = sum(float(w[:, c].sum() + b[c].sum()) for c in cols) + float(o[16:24].sum())
    assert heads[(1, 2)] == pytest.approx(hand, rel=1e-12)
    grouped = f.to_groups().head_importance()
    assert grouped[(1, 2)] == pytest.approx(hand, rel=1e-12)


def test_channel_importance(llama_fisher, gpt2_fisher):
    f = llama_fisher
    ch = f.channel_importance()
    p = L0 + "mlp."
    hand = f[p + "gate_proj.weight"][7].sum() + f[p + "up_proj.weight"][7].sum() + f[p + "down_proj.weight"][:, 7].sum()
    assert ch[(0, 7)] == pytest.approx(float(hand), rel=1e-12)
    mlp_mass = sum(float(f[p + s].sum()) for s in ["gate_proj.weight", "up_proj.weight", "down_proj.weight"])
    assert sum(v for (l, _), v in ch.items() if l == 0) == pytest.approx(mlp_mass, rel=1e-12)
    grouped = f.to_groups().channel_importance()
    assert grouped[(0, 7)] == pytest.approx(ch[(0, 7)], rel=1e-12)
    g = gpt2_fisher.channel_importance()
    q = "transformer.h.0.mlp."
    hand = gpt2_fisher[q + "c_fc.weight"][:, 5].sum() + gpt2_fisher[q + "c_fc.bias"][5] + gpt2_fisher[q + "c_proj.weight"][5].sum()
    assert g[(0, 5)] == pytest.approx(float(hand), rel=1e-12)


def test_group_fisher_cannot_split_a_coarse_group(llama_fisher):
    f = llama_fisher
    coarse = {n: ParamGroups.single(0, f.param_shapes[n][0]) for n in f.names()}
    gv = analysis.group_view(f, coarse)
    with pytest.raises(UnsupportedError):
        gv.head_importance()
    with pytest.raises(UnsupportedError):
        gv.channel_importance()


def test_compare(llama_fisher):
    model = tm.llama(kv_heads=2)
    numel = sum(p.numel() for p in model.parameters())

    # values 0..N-1 laid out in sorted-name order, and the reverse order
    names = sorted(n for n, _ in model.named_parameters())
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    offsets, off = {}, 0
    for n in names:
        offsets[n] = off
        off += math.prod(shapes[n])
    up = build(model, lambda n, s: torch.arange(offsets[n], offsets[n] + math.prod(s), dtype=torch.float64).reshape(s) + 1)
    down = build(model, lambda n, s: numel - torch.arange(offsets[n], offsets[n] + math.prod(s), dtype=torch.float64).reshape(s))
    same = up.compare(up, k=50)
    assert same["cosine"] == pytest.approx(1.0) and same["spearman"] == pytest.approx(1.0)
    assert same["pearson"] == pytest.approx(1.0) and same["topk_overlap"] == 1.0
    assert same["num_elements"] == numel and same["unit"] == "element" and same["only_in_a"] == []
    rev = up.compare(down, k=50)
    assert rev["spearman"] == pytest.approx(-1.0) and rev["pearson"] == pytest.approx(-1.0)
    assert rev["topk_overlap"] == 0.0
    x = torch.arange(1, numel + 1, dtype=torch.float64)
    assert rev["cosine"] == pytest.approx(float(x @ x.flip(0) / (x @ x)), rel=1e-12)
    # random pair: against scipy / numpy directly
    a, b = llama_fisher, build(model, seed=5)
    r = a.compare(b, k=100)
    xa = torch.cat([a[n].reshape(-1) for n in a.names()]).numpy()
    xb = torch.cat([b[n].reshape(-1) for n in a.names()]).numpy()
    assert r["spearman"] == pytest.approx(scipy.stats.spearmanr(xa, xb).statistic, rel=1e-10)
    assert r["pearson"] == pytest.approx(scipy.stats.pearsonr(xa, xb).statistic, rel=1e-10)
    ta, tb = set(xa.argsort()[::-1][:100].tolist()), set(xb.argsort()[::-1][:100].tolist())
    assert r["topk_overlap"] == len(ta & tb) / 100
    # mixed reductions compare group values
    mixed = a.compare(a.to_groups(), k=10)
    assert mixed["unit"] == "group" and mixed["cosine"] == pytest.approx(1.0)
    with pytest.raises(InvalidInputError, match="no parameter name in common"):
        a.compare(build(tm.gpt2()))


def test_stderr_and_confidence_interval(llama_fisher):
    f = llama_fisher
    n = L0 + "self_attn.v_proj.weight"
    assert torch.allclose(f.stderr(n), torch.sqrt(f.variances[n] / 20), rtol=1e-12)
    lo, hi = f.confidence_interval(n, level=0.95)
    t = scipy.stats.t.ppf(0.975, df=19)
    assert torch.allclose(hi - f[n], t * torch.sqrt(f.variances[n] / 20), rtol=1e-12)
    assert torch.allclose(f[n] - lo, hi - f[n], rtol=1e-12)
    with pytest.raises(InvalidInputError, match="no variance"):
        f.to_groups().stderr(n)


def test_ema_effective_count(llama_fisher):
    from dataclasses import replace

    from hf_fisher.collection.stats import EMA

    f = llama_fisher._replace(metadata=replace(llama_fisher.metadata, ema_decay=0.9))
    ema = EMA((1,), decay=0.9).update(torch.rand(20, 1, dtype=torch.float64))
    assert analysis.effective_count(f) == pytest.approx(ema.effective_count, rel=1e-12)


def test_importance_consumer(llama_fisher):
    consumers = plugins.consumers()
    assert consumers["importance"] is importance_consumer.importance
    assert consumers["compare"] is importance_consumer.compare_tasks
    table = consumers["importance"](llama_fisher, k=5)
    top = llama_fisher.top_k(5)
    assert [(r["param"], r["group"], r["value"]) for r in table["groups"]] == top
    assert table["groups"][0]["share"] == pytest.approx(top[0][2] / llama_fisher.total(), rel=1e-12)
    assert [r["layer"] for r in table["per_layer"]] == [0, 1, None]
    assert sum(r["share"] for r in table["per_layer"]) == pytest.approx(1.0, rel=1e-12)
    heads = llama_fisher.head_importance()
    best = max(heads, key=heads.get)
    assert (table["heads"][0]["layer"], table["heads"][0]["head"]) == best
    assert len(table["channels"]) == 5
    cmp = consumers["compare"](llama_fisher, llama_fisher, k=10)
    assert cmp["topk_overlap"] == 1.0
