"""QK-OV interference on real tiny models and real gradient stores: every variant equals a
brute-force computation from plain per-sample autograd, heads add up to whole projections,
scale (in)variance, head ablation, symmetry, ridge, GQA/MQA/fused-QKV slicing, the memory
budget, empty tasks and the exports."""

from __future__ import annotations

import json
import logging
import sys

import pytest
import torch

import hf_fisher
from hf_fisher.collection.gradients import (
    GradientStore,
    attention_params,
    store_gradients,
)
from hf_fisher.consumers.circuits import qkov as qkov_mod
from hf_fisher.consumers.circuits.qkov import qkov_interference
from hf_fisher.errors import EmptyDataError, InvalidInputError, ModelMismatchError
from hf_fisher.plugins import model_layout

import reference as ref
import tiny_models as tm

pytestmark = pytest.mark.usefixtures("one_thread")

A = [tm.padded_batch([7, 5, 6], seed=0), tm.padded_batch([4, 6], seed=1)]
B = [tm.padded_batch([6, 5], seed=2), tm.padded_batch([5, 7], seed=3)]
HD = 8  # head_dim of the tiny models (hidden 32, 4 heads)


def autograd_grads(model, batches, names):
    """{name: [n, *shape]} per-sample gradients from plain autograd on each sample alone."""
    params = dict(model.named_parameters())
    out = {n: [] for n in names}
    for b in batches:
        for s in ref.split_batch(b):
            total, n = ref._token_losses(model(input_ids=s["input_ids"]).logits, s["labels"], "causal_lm")
            if n == 0:
                continue
            for name, g in zip(names, torch.autograd.grad(total / n, [params[x] for x in names])):
                out[name].append(g.detach().double())
    return {n: torch.stack(v) for n, v in out.items()}


def brute_force(ga, gb, I, variant, lam, aggregate):
    """Explicit double loop over (i, j) of the formulas on one slice [n, |S|]."""
    out = torch.zeros(ga.shape[0], gb.shape[0], dtype=torch.float64)
    d = I + lam
    for i in range(ga.shape[0]):
        for j in range(gb.shape[0]):
            gi, gj = ga[i], gb[j]
            if variant == "unsigned":
                v = (gi * gi / d * gj.abs()).sum()
            elif variant == "signed":
                v = (gi * gj / d).sum()
            elif variant == "symmetric":
                v = (torch.sqrt(gi * gi * gj * gj) / d).sum()
            else:
                v = (gi * gi / d * gj.abs() / torch.sqrt(d)).sum()
            out[i, j] = v / (I.numel() if aggregate == "mean" else 1)
    return out


def llama_slices(layer, head, kv, num_heads=4, num_kv=2):
    """Explicit Q/K/V/O index slicing of a LLaMA layer (written out, not from the layout)."""
    p = f"model.layers.{layer}.self_attn."
    return {
        "Q": [(p + "q_proj.weight", (slice(None), slice(head * HD, (head + 1) * HD), slice(None)))],
        "K": [(p + "k_proj.weight", (slice(None), slice(kv * HD, (kv + 1) * HD), slice(None)))],
        "V": [(p + "v_proj.weight", (slice(None), slice(kv * HD, (kv + 1) * HD), slice(None)))],
        "O": [(p + "o_proj.weight", (slice(None), slice(None), slice(head * HD, (head + 1) * HD)))],
    }


def flat(grads, pieces):
    return torch.cat([grads[n][idx].reshape(grads[n].shape[0], -1) for n, idx in pieces], dim=1)


@pytest.fixture(scope="module")
def gqa():
    m = tm.llama(kv_heads=2, layers=2)
    names = attention_params(m, model_layout(m), None)
    return m, autograd_grads(m, A, names), autograd_grads(m, B, names)


@pytest.mark.parametrize("variant", ["unsigned", "signed", "symmetric", "natural"])
@pytest.mark.parametrize("relative", [False, True])
def test_values_equal_brute_force_autograd(gqa, variant, relative):
    m, ga, gb = gqa
    kw = {"ridge_rel": 1e-2, "ridge_min": 1e-9} if relative else {"ridge": 1e-6}
    agg = "sum" if relative else "mean"
    r = qkov_interference(m, A, B, variant=variant, aggregate=agg, dtype=torch.float64, progress=False, **kw)
    assert r.scores.shape == (5, 4, 2, 4, 4) and r.scores.dtype == torch.float64
    assert r.sample_ids_a == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    I = {n: torch.cat([ga[n], gb[n]]).pow(2).mean(0) for n in ga}  # fisher_from="both"
    I_n = {n: I[n].unsqueeze(0) for n in I}  # so the same [:, ...] slicing applies
    for layer in range(2):
        for head in range(4):
            kv = head // 2
            for bi, (block, pieces) in enumerate(llama_slices(layer, head, kv).items()):
                Is = flat(I_n, pieces)[0]
                lam = max(1e-9, 1e-2 * float(Is.median())) if relative else 1e-6
                want = brute_force(flat(ga, pieces), flat(gb, pieces), Is, variant, lam, agg)
                torch.testing.assert_close(r.scores[:, :, layer, head, bi], want, rtol=1e-8, atol=1e-14)
                d = r.diagnostics[(layer, head, block)]
                assert d["ridge"] == pytest.approx(lam) and d["ridge_mode"] == ("relative" if relative else "absolute")
                assert d["numel"] == Is.numel() and d["I_max"] == pytest.approx(float(Is.max()))
                assert d["frac_below_ridge"] == pytest.approx(float((Is < lam).double().mean()))


def test_fisher_from_and_given_fisher(gqa):
    m, ga, gb = gqa
    s_a = store_gradients(m, A, dtype=torch.float64, progress=False)
    s_b = store_gradients(m, B, dtype=torch.float64, progress=False)
    name = "model.layers.1.self_attn.q_proj.weight"
    for src, grads in (("a", ga[name]), ("b", gb[name])):
        r = qkov_interference(m, s_a, s_b, fisher_from=src, ridge=0.0, aggregate="sum", progress=False)
        I = grads.pow(2).mean(0)[8:16]
        want = brute_force(ga[name][:, 8:16].flatten(1), gb[name][:, 8:16].flatten(1), I.flatten(), "unsigned", 0.0, "sum")
        torch.testing.assert_close(r.scores[:, :, 1, 1, 0], want, rtol=1e-8, atol=0)
    # a param-level Fisher artifact over A and B gives the scores of fisher_from="both"
    F = hf_fisher.collect(m, A + B, reduction="param", progress=False)
    r1 = qkov_interference(m, s_a, s_b, fisher=F, progress=False)
    r2 = qkov_interference(m, s_a, s_b, fisher_from="both", progress=False)
    assert r1.fisher_from == "fisher"
    torch.testing.assert_close(r1.scores, r2.scores, rtol=1e-8, atol=0)


def test_heads_add_up_to_the_whole_projection(gqa):
    m, _, _ = gqa
    s_a = store_gradients(m, A, dtype=torch.float64, progress=False)
    s_b = store_gradients(m, B, dtype=torch.float64, progress=False)
    lam = 1e-7
    r = qkov_interference(m, s_a, s_b, aggregate="sum", ridge=lam, progress=False)
    for layer in range(2):
        p = f"model.layers.{layer}.self_attn."
        for proj, bi, heads in (("q_proj", 0, [0, 1, 2, 3]), ("k_proj", 1, [0, 2]), ("v_proj", 2, [1, 3]), ("o_proj", 3, [0, 1, 2, 3])):
            ga, gb = s_a.grads[p + proj + ".weight"].flatten(1), s_b.grads[p + proj + ".weight"].flatten(1)
            I = torch.cat([ga, gb]).pow(2).mean(0)
            whole = (ga * ga / (I + lam)) @ gb.abs().T
            got = r.scores[:, :, layer, heads, bi].sum(-1)
            torch.testing.assert_close(got, whole, rtol=1e-9, atol=0)
        # all query heads over K count every kv slice twice (2 query heads per kv-head)
        torch.testing.assert_close(r.scores[:, :, layer, :, 1].sum(-1), 2 * r.scores[:, :, layer, [0, 2], 1].sum(-1))


def test_scale_invariance(gqa):
    m, _, _ = gqa
    s_a = store_gradients(m, A, dtype=torch.float64, progress=False)
    s_b = store_gradients(m, B, dtype=torch.float64, progress=False)
    a = 3.0

    def scaled(s):
        return GradientStore({n: g * a for n, g in s.grads.items()}, list(s.sample_ids), dtype=torch.float64)

    kw = {"ridge_rel": 1e-3, "ridge_min": 0.0, "progress": False}
    for variant, factor in (("unsigned", a), ("natural", 1.0), ("signed", 1.0)):
        r0 = qkov_interference(m, s_a, s_b, variant=variant, **kw)
        r1 = qkov_interference(m, scaled(s_a), scaled(s_b), variant=variant, **kw)
        torch.testing.assert_close(r1.scores, factor * r0.scores, rtol=1e-9, atol=0)
    # with an absolute ridge far above I, "natural" is not invariant: the check can fail
    r0 = qkov_interference(m, s_a, s_b, variant="natural", ridge=1e-2, progress=False)
    r1 = qkov_interference(m, scaled(s_a), scaled(s_b), variant="natural", ridge=1e-2, progress=False)
    assert not torch.allclose(r0.scores, r1.scores, rtol=1e-3)


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_ablated_head_collapses_exactly_the_blocks_whose_gradients_vanish(kv_heads):
    m = tm.llama(kv_heads=kv_heads, layers=2)
    layer, head = 1, 2
    kv = head // (4 // kv_heads)
    att = m.model.layers[layer].self_attn
    with torch.no_grad():
        att.q_proj.weight[head * HD:(head + 1) * HD] = 0
        att.o_proj.weight[:, head * HD:(head + 1) * HD] = 0
        if kv_heads == 4:  # alone in its group: also its K/V
            att.k_proj.weight[kv * HD:(kv + 1) * HD] = 0
            att.v_proj.weight[kv * HD:(kv + 1) * HD] = 0
    r = qkov_interference(m, A, B, dtype=torch.float64, progress=False)
    s = r.scores[:, :, 1, head]  # [nA, nB, 4]
    typical = r.scores[:, :, 1, [0, 1, 3]].abs().mean()
    # Q: no gradient reaches q_h (its output meets zero O columns). K/V: zero only when no other
    # query head reads the kv-head. O: its gradient is delta ⊗ z_h, and z_h = attn · v vanishes
    # only when V does (a zero query still averages the values).
    collapse = {"Q": True, "K": kv_heads == 4, "V": kv_heads == 4, "O": kv_heads == 4}
    for bi, block in enumerate("QKVO"):
        if collapse[block]:
            assert s[..., bi].abs().max() <= 1e-12 * typical, block
        else:
            assert s[..., bi].abs().min() > 1e-4 * typical, block
    assert r.scores[:, :, 1, [0, 1, 3]].abs().min() > 0  # the other heads are untouched


def test_symmetric_variant_is_symmetric_for_one_store():
    m = tm.llama(kv_heads=2, layers=2)
    r = qkov_interference(m, A, A, variant="symmetric", dtype=torch.float64, progress=False)
    assert r.scores.shape[:2] == (5, 5)
    torch.testing.assert_close(r.scores, r.scores.transpose(0, 1), rtol=1e-12, atol=0)
    u = qkov_interference(m, A, A, variant="unsigned", dtype=torch.float64, progress=False)
    assert not torch.allclose(u.scores, u.scores.transpose(0, 1), rtol=1e-3)  # unsigned is asymmetric


def test_ridge_keeps_scores_finite_for_a_zero_fisher(caplog):
    m = tm.llama(kv_heads=2, layers=2)
    F = hf_fisher.collect(m, A, reduction="param", progress=False)
    Z = F._replace(mean={n: torch.zeros_like(t) for n, t in F.items()}, variance=None)
    s_a = store_gradients(m, A, dtype=torch.float64, progress=False)
    lam = 1e-8
    r = qkov_interference(m, s_a, s_a, fisher=Z, ridge=lam, aggregate="sum", progress=False)
    assert torch.isfinite(r.scores).all()
    g = s_a.grads["model.layers.0.self_attn.q_proj.weight"][:, :HD].flatten(1)
    torch.testing.assert_close(r.scores[:, :, 0, 0, 0], (g * g / lam) @ g.abs().T, rtol=1e-10, atol=0)
    assert r.diagnostics[(0, 0, "Q")]["frac_below_ridge"] == 1.0 and r.diagnostics[(0, 0, "Q")]["I_max"] == 0.0
    with caplog.at_level(logging.WARNING, logger="hf_fisher"):
        r0 = qkov_interference(m, s_a, s_a, fisher=Z, ridge=0.0, progress=False)
    assert torch.isfinite(r0.scores).all() and (r0.scores == 0).all()
    assert r0.diagnostics[(0, 0, "Q")]["zero_denominator"] == HD * 32 and "I + ridge = 0" in caplog.text


def test_gqa_and_mqa_kv_mapping():
    m = tm.llama(kv_heads=2, layers=2)
    r = qkov_interference(m, A, B, progress=False)
    assert r.kv_heads[(0, 1)] == 0 and r.kv_heads[(0, 2)] == 1
    for bi in (1, 2):
        assert torch.equal(r.scores[..., 0, bi], r.scores[..., 1, bi])
        assert torch.equal(r.scores[..., 2, bi], r.scores[..., 3, bi])
        assert not torch.allclose(r.scores[..., 0, bi], r.scores[..., 2, bi])
    assert not torch.allclose(r.scores[..., 0, 0], r.scores[..., 1, 0])  # Q is per query head
    q = tm.qwen3(kv_heads=1)
    r = qkov_interference(q, A, B, dtype=torch.float64, progress=False)
    assert all(r.kv_heads[(l, h)] == 0 for l in range(2) for h in range(4))
    for bi in (1, 2):
        for h in (1, 2, 3):
            assert torch.equal(r.scores[..., h, bi], r.scores[..., 0, bi])
    # the shared K slice is the whole k_proj
    s = store_gradients(q, A, dtype=torch.float64, progress=False)
    t = store_gradients(q, B, dtype=torch.float64, progress=False)
    ga, gb = s.grads["model.layers.1.self_attn.k_proj.weight"].flatten(1), t.grads["model.layers.1.self_attn.k_proj.weight"].flatten(1)
    I = torch.cat([ga, gb]).pow(2).mean(0)
    torch.testing.assert_close(r.scores[:, :, 1, 3, 1], brute_force(ga, gb, I, "unsigned", 1e-8, "mean"), rtol=1e-8, atol=0)


def test_gpt2_fused_qkv_reads_the_right_columns():
    m = tm.gpt2()
    d = 32
    s_a = store_gradients(m, A, dtype=torch.float64, progress=False)
    s_b = store_gradients(m, B, dtype=torch.float64, progress=False)
    r = qkov_interference(m, s_a, s_b, variant="signed", ridge=1e-9, progress=False)
    layer = 1
    p = f"transformer.h.{layer}.attn."
    grads = {k: torch.cat([s_a.grads[k], s_b.grads[k]]) for k in s_a.grads}
    nA = s_a.num_samples
    for head in range(4):
        cols = slice(head * HD, (head + 1) * HD)
        for bi, off in enumerate((0, d, 2 * d)):  # Q | K | V column blocks of c_attn
            c = slice(off + head * HD, off + (head + 1) * HD)
            g = torch.cat([grads[p + "c_attn.weight"][:, :, c].flatten(1), grads[p + "c_attn.bias"][:, c]], dim=1)
            I = g.pow(2).mean(0)
            torch.testing.assert_close(r.scores[:, :, layer, head, bi], brute_force(g[:nA], g[nA:], I, "signed", 1e-9, "mean"),
                                       rtol=1e-8, atol=1e-15)
        g = grads[p + "c_proj.weight"][:, cols, :].flatten(1)  # O: input rows of c_proj
        I = g.pow(2).mean(0)
        torch.testing.assert_close(r.scores[:, :, layer, head, 3], brute_force(g[:nA], g[nA:], I, "signed", 1e-9, "mean"),
                                   rtol=1e-8, atol=1e-15)


def test_memory_budget_refuses_before_any_work(monkeypatch):
    m = tm.llama(kv_heads=2, layers=2)
    names = attention_params(m, model_layout(m), None)
    per_sample_mb = sum(dict(m.named_parameters())[n].numel() for n in names) * 4 / 2**20
    monkeypatch.setattr(qkov_mod, "store_gradients", lambda *a, **k: pytest.fail("gradients computed"))
    with pytest.raises(InvalidInputError, match=r"holds 7 samples") as e:
        qkov_interference(m, A, B, memory_budget_mb=per_sample_mb * 7.5, progress=False)
    assert "9 samples (5 of task A + 4 of task B)" in str(e.value)
    monkeypatch.undo()
    r = qkov_interference(m, A, B, memory_budget_mb=per_sample_mb * 7.5, max_samples=3, progress=False)
    assert r.scores.shape[:2] == (3, 3)


def test_empty_task_is_refused():
    """Issue 21: an empty task used to give zero scores and a warning; now refused (either side),
    before any gradient (the full matrix in tests/test_hardening_circuits.py)."""
    m = tm.llama(kv_heads=2, layers=2)
    unlabeled = tm.padded_batch([5, 4], seed=9)
    unlabeled["labels"][:] = -100
    for b in ([], [unlabeled]):
        with pytest.raises(EmptyDataError, match="task B"):
            qkov_interference(m, A, b, progress=False)


def test_json_and_png_exports(tmp_path):
    m = tm.llama(kv_heads=2, layers=2)
    r = qkov_interference(m, A, B, top_k=5, progress=False)
    doc = json.loads(r.to_json(tmp_path / "qkov.json"))
    assert json.loads((tmp_path / "qkov.json").read_text()) == doc
    top = r.top()
    assert len(doc["top"]) == 5 and [t["score"] for t in doc["top"]] == [t["score"] for t in top]
    assert top[0]["score"] == pytest.approx(float(r.scores.max()))
    best = top[0]
    bi = "QKVO".index(best["block"])
    assert r.scores[best["index_a"], best["index_b"], best["layer"], best["head"], bi] == best["score"]
    assert tuple(doc["top"][0]["sample_a"]) == r.sample_ids_a[best["index_a"]]
    assert doc["heatmaps"]["K"] == r.heatmaps()["K"].tolist() and len(doc["diagnostics"]) == 2 * 4 * 4
    assert {"layer": 0, "head": 3, "kv_head": 1} in doc["gqa"]
    heads = r.by_head()
    assert heads[(1, 2)] == pytest.approx(float(r.scores[:, :, 1, 2].mean()))
    paths = r.save_heatmaps(tmp_path / "png")
    assert [p.name for p in paths] == ["qkov_Q.png", "qkov_K.png", "qkov_V.png", "qkov_O.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_png_export_without_matplotlib_is_a_logged_note(monkeypatch, tmp_path, caplog):
    m = tm.llama(kv_heads=2, layers=1)
    r = qkov_interference(m, A[:1], B[:1], progress=False)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails
    with caplog.at_level(logging.INFO, logger="hf_fisher"):
        assert r.save_heatmaps(tmp_path) == []
    assert "matplotlib is not installed" in caplog.text and not list(tmp_path.iterdir())


def _group_fisher(m):
    return hf_fisher.collect(m, A, reduction="group", progress=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"variant": "cosine"}, "variant"),
        ({"aggregate": "max"}, "aggregate"),
        ({"fisher_from": "c"}, "fisher_from"),
        ({"ridge": -1.0}, "ridge"),
        ({"ridge_rel": float("nan")}, "ridge_rel"),
        ({"layers": [7]}, "not attention layers"),
        ({"fisher": "group"}, "reduction='param'"),
        ({"fisher": "other"}, "does not match the model"),
    ],
)
def test_bad_input_raises_before_any_work(monkeypatch, kwargs, match):
    m = tm.llama(kv_heads=2, layers=2)
    if kwargs.get("fisher") == "group":
        kwargs = {"fisher": _group_fisher(m)}
    elif kwargs.get("fisher") == "other":
        kwargs = {"fisher": hf_fisher.collect(tm.llama(kv_heads=4, layers=2), A, progress=False)}
    monkeypatch.setattr(qkov_mod, "store_gradients", lambda *a, **k: pytest.fail("gradients computed"))
    with pytest.raises(InvalidInputError, match=match) as e:
        qkov_interference(m, A, B, progress=False, **kwargs)
    if "fisher" in kwargs and match.startswith("does"):
        assert isinstance(e.value, ModelMismatchError)


def test_registered_as_a_consumer():
    got = {}
    qkov_mod.hf_fisher_register_consumers(lambda name, fn: got.__setitem__(name, fn))
    assert got == {"qkov_interference": qkov_interference}
