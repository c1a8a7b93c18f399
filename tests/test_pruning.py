"""hf_fisher.prune: budgets, GQA validity, scores against independent references, rescale,
physical removal (outputs equal to the masked model's, reload with from_pretrained), vocabulary
pruning, confidence, restore, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers as tf

import hf_fisher
from hf_fisher.consumers.prune.core import prune
from hf_fisher.errors import InvalidInputError, UnsupportedError

import reference as ref
import tiny_models as tm

pytestmark = pytest.mark.usefixtures("one_thread")

BATCHES = [tm.padded_batch([7, 5, 6], seed=s) for s in range(3)]


def inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


def logits(model, batch=BATCHES[0]):
    with torch.no_grad():
        return model(**inputs(batch)).logits


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def same(model, snap) -> bool:
    return all(torch.equal(p, snap[n]) for n, p in model.named_parameters()) and len(snap) == len(list(model.parameters()))


@pytest.fixture(scope="module")
def llama_and_fisher():
    m = tm.llama(kv_heads=2, layers=2)
    return m, hf_fisher.collect(m, BATCHES, reduction="param", progress=False)


# ----------------------------------------------------------------------------- budgets
@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.5])
def test_sparsity_hit_within_one_group(llama_and_fisher, scope, sparsity):
    m, F = llama_and_fisher
    r = prune(m, F, sparsity=sparsity, scope=scope, progress=False)
    try:
        st = r.stats
        biggest = 512  # a query head here: 8 Q rows + 8 O columns of width 32
        assert abs(st["removed_params"] - sparsity * st["candidate_params"]) <= biggest
        assert st["removed_params"] == sum(int((~mk).sum()) for mk in r.masks.values())
        # the masked weights are exactly the zeros of the model where the masks say False
        params = dict(m.named_parameters())
        for name, mk in r.masks.items():
            assert bool((params[name][~mk] == 0).all())
    finally:
        r.restore()


def test_layer_scope_same_counts_every_layer_and_kv_group(llama_and_fisher):
    m, F = llama_and_fisher
    r = prune(m, F, sparsity=0.5, scope="layer", progress=False)
    r.restore()
    per = r.stats["per_layer"]
    # 2 of 4 heads (512 parameters each) and channels (96 each) up to half the layer's 5888
    assert per["0"]["removed"] == per["1"]["removed"] == {"head": 2, "channel": round((0.5 * 5888 - 1024) / 96)}
    for layer in (0, 1):  # one query head of each kv group (4 heads, 2 kv-heads)
        groups = sorted(u["kv_head"] for u in r.removed if u["kind"] == "head" and u["layer"] == layer)
        assert groups == [0, 1]


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_gqa_and_mqa_masks_keep_a_head_per_kv_group(kv_heads):
    m = tm.llama(kv_heads=kv_heads, layers=2, seed=3)
    F = hf_fisher.collect(m, BATCHES, reduction="group", progress=False)
    for scope in ("global", "layer"):
        r = prune(m, F, sparsity=0.9, structured="heads", scope=scope, progress=False)
        try:
            g = 4 // kv_heads
            for layer in (0, 1):
                for j in range(kv_heads):
                    gone = [u for u in r.removed if u["layer"] == layer and u["kv_head"] == j]
                    assert len(gone) <= g - 1
            assert torch.isfinite(logits(m)).all()
        finally:
            r.restore()


def test_kv_group_units_remove_their_kv_rows(llama_and_fisher):
    m, F = llama_and_fisher
    r = prune(m, F, sparsity=0.5, structured="kv_heads", scope="layer", progress=False)
    r.restore()
    k = r.masks["model.layers.0.self_attn.k_proj.weight"]
    q = r.masks["model.layers.0.self_attn.q_proj.weight"]
    j = next(u["index"] for u in r.removed if u["layer"] == 0)
    assert not k[j * 8 : (j + 1) * 8].any() and k.sum() == 8 * 32
    assert not q[j * 16 : (j + 1) * 16].any()  # both query heads of group j


# ----------------------------------------------------------------------------- scores
def head_rows(h, hd=8):
    return slice(h * hd, (h + 1) * hd)


def test_fisher_and_obd_scores_equal_hand_sums(llama_and_fisher):
    from hf_fisher.consumers.prune.statistics import score_units
    from hf_fisher.consumers.prune.units import structured_units

    m, F = llama_and_fisher
    units = structured_units(m, F.layout, ["heads", "channels"])
    fisher_s, _ = score_units(m, units, "fisher", fisher=F)
    obd_s, _ = score_units(m, units, "obd", fisher=F)
    P = dict(m.named_parameters())
    for k, u in enumerate(units):
        pre = f"model.layers.{u.layer}."
        if u.kind == "head":
            parts = [(pre + "self_attn.q_proj.weight", (head_rows(u.index), slice(None))),
                     (pre + "self_attn.o_proj.weight", (slice(None), head_rows(u.index)))]
        else:
            c = u.index
            parts = [(pre + "mlp.gate_proj.weight", (c, slice(None))), (pre + "mlp.up_proj.weight", (c, slice(None))),
                     (pre + "mlp.down_proj.weight", (slice(None), c))]
        want = sum(float(F[n][ix].sum()) for n, ix in parts)
        want_obd = sum(float((0.5 * F[n] * P[n].detach() ** 2)[ix].sum()) for n, ix in parts)
        assert fisher_s[k] == pytest.approx(want, rel=1e-12)
        assert obd_s[k] == pytest.approx(want_obd, rel=1e-12)


def test_group_fisher_gives_the_same_scores_as_param_fisher(llama_and_fisher):
    m, F = llama_and_fisher
    G = hf_fisher.collect(m, BATCHES, reduction="group", progress=False)
    a = prune(m, F, sparsity=0.4, scope="global", progress=False)
    a.restore()
    b = prune(m, G, sparsity=0.4, scope="global", progress=False)
    b.restore()
    assert a.removed == b.removed


def _mask_fisher_reference(model, units, batches):
    """Per sample alone: d loss / d m_u for a mask m_u on the unit's output, squared, averaged."""
    samples = [s for b in batches for s in ref.split_batch(b)]
    totals = torch.zeros(len(units), dtype=torch.float64)
    modules = {}
    for k, u in enumerate(units):
        name = f"model.layers.{u.layer}." + ("self_attn.o_proj" if u.kind == "head" else "mlp.down_proj")
        modules.setdefault(name, []).append((k, head_rows(u.index) if u.kind == "head" else slice(u.index, u.index + 1)))
    for s in samples:
        masks = torch.ones(len(units), dtype=torch.float64, requires_grad=True)
        handles = []
        for name, members in modules.items():
            def pre(mod, args, members=members):
                x = args[0]
                v = torch.ones(x.shape[-1], dtype=x.dtype)
                for k, cols in members:
                    idx = torch.arange(x.shape[-1])[cols]
                    v = v.index_put((idx,), masks[k].expand(len(idx)))
                return (x * v,)

            handles.append(model.get_submodule(name).register_forward_pre_hook(pre))
        try:
            out = model(input_ids=s["input_ids"])
            total, n = ref._token_losses(out.logits, s["labels"], "causal_lm")
            (g,) = torch.autograd.grad(total / n, masks)
        finally:
            for h in handles:
                h.remove()
        totals += g.detach() ** 2
    return totals / len(samples)


def test_mask_fisher_equals_per_sample_mask_gradients():
    from hf_fisher.consumers.prune.statistics import score_units
    from hf_fisher.consumers.prune.units import structured_units

    m = tm.llama(kv_heads=2, layers=2, seed=5)
    units = structured_units(m, hf_fisher.plugins.model_layout(m), ["heads", "channels"])
    got, _ = score_units(m, units, "mask_fisher", batches=BATCHES, progress=False)
    want = _mask_fisher_reference(m, units, BATCHES)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-14)


def test_activation_and_taylor_scores_equal_references():
    from hf_fisher.consumers.prune.statistics import score_units
    from hf_fisher.consumers.prune.units import structured_units

    m = tm.llama(kv_heads=2, layers=1, seed=6)
    units = structured_units(m, hf_fisher.plugins.model_layout(m), ["heads", "channels"])
    # inputs of o_proj / down_proj at the real tokens, by hooks written here
    xs = {"o": [], "d": []}
    hs = [m.model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda mod, a: xs["o"].append(a[0])),
          m.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda mod, a: xs["d"].append(a[0]))]
    with torch.no_grad():
        for b in BATCHES:
            m(**inputs(b))
    for h in hs:
        h.remove()
    mask = torch.cat([b["attention_mask"].bool().reshape(-1) for b in BATCHES])
    X = {k: torch.cat([x.reshape(-1, x.shape[-1]) for x in v])[mask].double() for k, v in xs.items()}
    Wo = m.model.layers[0].self_attn.o_proj.weight.detach().double()
    Wd = m.model.layers[0].mlp.down_proj.weight.detach().double()
    wanda, flap = [], []
    for u in units:
        W, x, cols = (Wo, X["o"], head_rows(u.index)) if u.kind == "head" else (Wd, X["d"], slice(u.index, u.index + 1))
        wanda.append(float((x[:, cols].norm(dim=0) * W[:, cols].abs().sum(0)).sum()))
        flap.append(float((x[:, cols].var(dim=0, unbiased=True) * (W[:, cols] ** 2).sum(0)).sum()))
    torch.testing.assert_close(score_units(m, units, "wanda_sp", batches=BATCHES, progress=False)[0], torch.tensor(wanda, dtype=torch.float64))
    torch.testing.assert_close(score_units(m, units, "flap", batches=BATCHES, progress=False)[0], torch.tensor(flap, dtype=torch.float64))
    # LLM-Pruner: batch gradient of the mean batch loss, Fisher = mean of per-sample squared gradients
    P = dict(m.named_parameters())
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight",
             "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight"]
    grad = {n: torch.zeros_like(P[n]) for n in names}
    for b in BATCHES:
        g = torch.autograd.grad(m(**b).loss, [P[n] for n in names])
        for n, t in zip(names, g):
            grad[n] += t / len(BATCHES)
    fis = ref.reference_fisher(m, [x for b in BATCHES for x in ref.split_batch(b)])[0]
    t1, t2 = [], []
    for u in units:
        pre = "model.layers.0."
        if u.kind == "head":
            parts = [(pre + "self_attn.q_proj.weight", (head_rows(u.index), slice(None))), (pre + "self_attn.o_proj.weight", (slice(None), head_rows(u.index)))]
        else:
            c = u.index
            parts = [(pre + "mlp.gate_proj.weight", (c, slice(None))), (pre + "mlp.up_proj.weight", (c, slice(None))), (pre + "mlp.down_proj.weight", (slice(None), c))]
        w = {n: P[n].detach() for n, _ in parts}
        t1.append(sum(float((w[n] * grad[n]).abs()[ix].sum()) for n, ix in parts))
        t2.append(sum(float((-w[n] * grad[n] + 0.5 * w[n] ** 2 * fis[n]).abs()[ix].sum()) for n, ix in parts))
    torch.testing.assert_close(score_units(m, units, "taylor1", batches=BATCHES, progress=False)[0], torch.tensor(t1, dtype=torch.float64))
    torch.testing.assert_close(score_units(m, units, "taylor2", batches=BATCHES, progress=False)[0], torch.tensor(t2, dtype=torch.float64))


def test_random_scores_reproducible_and_seeded(llama_and_fisher):
    m, F = llama_and_fisher
    a = prune(m, None, sparsity=0.5, score="random", scope="layer", seed=1, progress=False)
    a.restore()
    b = prune(m, None, sparsity=0.5, score="random", scope="layer", seed=1, progress=False)
    b.restore()
    c = prune(m, None, sparsity=0.5, score="random", scope="layer", seed=2, progress=False)
    c.restore()
    assert a.removed == b.removed != c.removed


# ----------------------------------------------------------------------------- rescale
def test_rescale_scales_are_the_least_squares_solution():
    """One layer, heads only: the folded scales equal a brute-force lstsq on explicit per-head
    outputs of the unpruned model."""
    m = tm.llama(kv_heads=2, layers=1, seed=7)
    F = hf_fisher.collect(m, BATCHES, reduction="param", progress=False)
    o = m.model.layers[0].self_attn.o_proj
    W0 = o.weight.detach().clone()
    zs = []
    h = o.register_forward_pre_hook(lambda mod, a: zs.append(a[0]))
    with torch.no_grad():
        for b in BATCHES:
            m(**inputs(b))
    h.remove()
    mask = torch.cat([b["attention_mask"].bool().reshape(-1) for b in BATCHES])
    Z = torch.cat([z.reshape(-1, z.shape[-1]) for z in zs])[mask].double()
    r = prune(m, F, sparsity=0.5, structured="heads", score="fisher", scope="layer", rescale_batches=BATCHES, progress=False)
    try:
        gone = {u["index"] for u in r.removed}
        kept = [h for h in range(4) if h not in gone]
        Y = [Z[:, head_rows(h)] @ W0[:, head_rows(h)].T.double() for h in range(4)]
        target = sum(Y).reshape(-1)
        A = torch.stack([Y[h].reshape(-1) for h in kept], dim=1)
        want = torch.linalg.lstsq(A, target.unsqueeze(1)).solution.squeeze(1)
        W1 = o.weight.detach().double()
        got = torch.tensor([float((W1[:, head_rows(h)] / W0[:, head_rows(h)].double()).mean()) for h in kept], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
        assert r.stats["rescaled"] and r.stats["rescaled"][0]["kept"] == 2
    finally:
        r.restore()


def test_rescale_lowers_the_layer_reconstruction_error():
    """Least squares can only lower the first layer's attention-output error on the calibration
    tokens (its inputs are the same with and without the rescale)."""
    m = tm.llama(kv_heads=2, layers=2, seed=8)
    F = hf_fisher.collect(m, BATCHES, reduction="param", progress=False)
    outs = []
    hook = m.model.layers[0].self_attn.o_proj.register_forward_hook(lambda mod, a, out: outs.append(out))
    mask = torch.cat([b["attention_mask"].bool().reshape(-1) for b in BATCHES])

    def o_out():
        outs.clear()
        with torch.no_grad():
            for b in BATCHES:
                m(**inputs(b))
        return torch.cat([x.reshape(-1, x.shape[-1]) for x in outs])[mask]

    full, full_logits = o_out(), logits(m)
    plain = prune(m, F, sparsity=0.5, score="fisher", scope="layer", progress=False)
    err_plain = float((o_out() - full).pow(2).sum())
    plain.restore()
    scaled = prune(m, F, sparsity=0.5, score="fisher", scope="layer", rescale_batches=BATCHES, progress=False)
    err_scaled = float((o_out() - full).pow(2).sum())
    scaled.restore()
    hook.remove()
    assert err_scaled < err_plain  # s = 1 is feasible: least squares cannot do worse, and here it does better
    assert torch.equal(logits(m), full_logits)


def test_flap_bias_compensation_keeps_the_mean_output():
    m = tm.llama(kv_heads=2, layers=1, seed=9)
    outs = []
    o = m.model.layers[0].self_attn.o_proj
    hook = o.register_forward_hook(lambda mod, a, out: outs.append(out))

    def mean_out():
        outs.clear()
        with torch.no_grad():
            for b in BATCHES:
                m(**inputs(b))
        mask = torch.cat([b["attention_mask"].bool().reshape(-1) for b in BATCHES])
        return torch.cat([x.reshape(-1, x.shape[-1]) for x in outs])[mask].double().mean(0)

    before = mean_out()
    r = prune(m, None, sparsity=0.5, structured="heads", score="flap", scope="layer", calibration_batches=BATCHES, progress=False)
    assert r.stats["compensated"] and o.bias is not None
    after = mean_out()
    r.restore()
    hook.remove()
    assert o.bias is None
    torch.testing.assert_close(after, before, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- physical
@pytest.mark.parametrize("factory", [tm.llama, tm.mistral, tm.qwen2, tm.qwen3])
def test_physical_model_equals_masked_and_reloads(tmp_path, factory):
    m = factory()
    F = hf_fisher.collect(m, BATCHES, reduction="group", progress=False)
    before = snapshot(m)
    masked = prune(m, F, sparsity=0.5, scope="layer", rescale_batches=BATCHES, progress=False)
    want = logits(m)
    masked.restore()
    assert same(m, before)
    r = prune(m, F, sparsity=0.5, scope="layer", rescale_batches=BATCHES, physical=True, progress=False)
    assert same(m, before)  # the given model is left as it was
    small = r.model
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in m.parameters())
    torch.testing.assert_close(logits(small), want, rtol=1e-9, atol=1e-10)
    r.save_pretrained(tmp_path / "small")
    again = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "small", dtype=torch.float64).eval()
    torch.testing.assert_close(logits(again), want, rtol=1e-9, atol=1e-10)
    cfg = again.config
    assert cfg.intermediate_size == 20 and cfg.num_attention_heads * cfg.head_dim == 16
    info = json.loads((tmp_path / "small" / "pruning.json").read_text())
    assert info["stats"]["removed_units"] == len(r.removed)


def test_physical_kv_group_removal_and_flap_biases(tmp_path):
    m = tm.llama(kv_heads=2, layers=2, seed=10)
    masked = prune(m, None, sparsity=0.5, structured=("kv_heads", "channels"), score="flap", scope="layer",
                   calibration_batches=BATCHES, progress=False)
    want = logits(m)
    masked.restore()
    r = prune(m, None, sparsity=0.5, structured=("kv_heads", "channels"), score="flap", scope="layer",
              calibration_batches=BATCHES, physical=True, progress=False)
    assert r.model.config.num_key_value_heads == 1 and r.model.config.num_attention_heads == 2
    torch.testing.assert_close(logits(r.model), want, rtol=1e-9, atol=1e-10)
    r.save_pretrained(tmp_path / "flap")
    again = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "flap", dtype=torch.float64).eval()
    torch.testing.assert_close(logits(again), want, rtol=1e-9, atol=1e-10)


# ----------------------------------------------------------------------------- vocabulary
@pytest.mark.parametrize("tied", [False, True])
def test_vocabulary_pruning_keeps_kept_tokens_and_maps_ids(tmp_path, tied):
    torch.manual_seed(11)
    cfg = tf.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=tied)
    m = tf.LlamaForCausalLM(cfg).double().eval()
    # data using tokens 3..30 only: tokens 31..60 get (almost) no Fisher
    data = [{"input_ids": torch.randint(3, 31, (4, 9), generator=torch.Generator().manual_seed(s))} for s in range(3)]
    F = hf_fisher.collect(m, data, reduction="group", progress=False)
    r = prune(m, F, sparsity=0.4, structured="vocab", physical=True, progress=False)
    vm = r.vocab_map
    assert all(vm[t] >= 0 for t in (0, 1, 2))  # special tokens kept
    kept_old = [o for o, n in enumerate(vm) if n >= 0]
    assert len(kept_old) == r.model.config.vocab_size == 61 - round(0.4 * 58)
    # an input of kept tokens: the pruned model's log-probabilities are the original's renormalised over the kept ids
    x = data[0]["input_ids"]
    x = x[:, [all(vm[int(t)] >= 0 for t in x[:, j]) for j in range(x.shape[1])]] if not all(vm[t] >= 0 for t in range(3, 31)) else x
    with torch.no_grad():
        full = m(input_ids=x).logits[..., kept_old]
        small = r.model(input_ids=torch.tensor([[vm[int(t)] for t in row] for row in x])).logits
    torch.testing.assert_close(small.log_softmax(-1), full.log_softmax(-1), rtol=1e-9, atol=1e-10)
    r.save_pretrained(tmp_path / "v")
    saved = json.loads((tmp_path / "v" / "vocab_map.json").read_text())
    assert saved["old_to_new"] == vm and [vm[o] for o in saved["new_to_old"]] == list(range(len(kept_old)))
    again = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "v", dtype=torch.float64)
    assert again.config.vocab_size == len(kept_old)
    assert (again.get_output_embeddings().weight.data_ptr() == again.get_input_embeddings().weight.data_ptr()) == tied


# ----------------------------------------------------------------------------- unstructured, confidence
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_unstructured_masks_remove_the_lowest_fisher_weights(llama_and_fisher, scope):
    m, F = llama_and_fisher
    r = prune(m, F, sparsity=0.3, structured=None, scope=scope, progress=False)
    r.restore()
    flat_scores = torch.cat([F[n].reshape(-1) for n in r.masks])
    flat_masks = torch.cat([mk.reshape(-1) for mk in r.masks.values()])
    assert int((~flat_masks).sum()) == round(0.3 * flat_masks.numel()) or scope == "layer"
    if scope == "global":
        assert float(flat_scores[~flat_masks].max()) <= float(flat_scores[flat_masks].min())
    else:
        for n, mk in r.masks.items():
            assert int((~mk).sum()) == round(0.3 * mk.numel())
    assert all(n.endswith(".weight") and F[n].dim() == 2 for n in r.masks)


def test_confidence_withholds_units_not_clearly_cheaper(llama_and_fisher):
    from scipy import stats

    from hf_fisher.consumers.prune.statistics import score_units, slice_stderr
    from hf_fisher.consumers.prune.units import structured_units

    m, F = llama_and_fisher
    plain = prune(m, F, sparsity=0.5, scope="layer", progress=False)
    plain.restore()
    conf = prune(m, F, sparsity=0.5, scope="layer", confidence=0.95, progress=False)
    conf.restore()
    assert conf.stats["withheld_by_confidence"] > 0
    key = lambda u: (u["kind"], u["layer"], u["index"])
    assert {key(u) for u in conf.removed} < {key(u) for u in plain.removed}
    units = structured_units(m, F.layout, ["heads", "channels"])
    s, _ = score_units(m, units, "fisher", fisher=F)
    ucb = s + stats.t.ppf(0.975, F.counts.samples - 1) * slice_stderr(F, units)
    gone = {key(u) for u in plain.removed}
    for k, u in enumerate(units):
        if (u.kind, u.layer, u.index) in {key(x) for x in conf.removed}:
            kept_min = min(float(s[j]) for j, v in enumerate(units) if v.bucket == u.bucket and (v.kind, v.layer, v.index) not in gone)
            assert float(ucb[k]) < kept_min


def test_restore_is_bitwise(llama_and_fisher):
    m, F = llama_and_fisher
    before = snapshot(m)
    r = prune(m, F, sparsity=0.6, scope="layer", rescale_batches=BATCHES, progress=False)
    assert not same(m, before)
    r.restore()
    assert same(m, before)


def test_gpt2_masks_work_and_physical_is_refused():
    m = tm.gpt2()
    data = [tm.padded_batch([6, 5], seed=s, vocab=m.config.vocab_size) for s in range(2)]
    F = hf_fisher.collect(m, data, reduction="group", progress=False)
    before = snapshot(m)
    r = prune(m, F, sparsity=0.5, scope="layer", rescale_batches=data, progress=False)
    assert torch.isfinite(logits(m, data[0])).all() and r.stats["removed_units"] > 0
    r.restore()
    assert same(m, before)
    with pytest.raises(UnsupportedError, match="physical=False"):
        prune(m, F, sparsity=0.5, scope="layer", physical=True, progress=False)
    assert same(m, before)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sparsity": 1.0}, "sparsity"),
        ({"sparsity": -0.1}, "sparsity"),
        ({"sparsity": 0.3, "score": "nope"}, "unknown score"),
        ({"sparsity": 0.3, "scope": "model"}, "scope"),
        ({"sparsity": 0.3, "structured": ("heads", "kv_heads")}, "overlap"),
        ({"sparsity": 0.3, "structured": "rows"}, "structured"),
        ({"sparsity": 0.3, "score": "wanda_sp"}, "calibration"),
        ({"sparsity": 0.3, "physical": True}, "scope='layer'"),
        ({"sparsity": 0.3, "structured": None, "score": "flap"}, "structured units only"),
        ({"sparsity": 0.3, "structured": "vocab", "score": "mask_fisher", "calibration_batches": BATCHES}, "vocabulary"),
        ({"sparsity": 0.3, "rescale": True}, "rescale_batches"),
        ({"sparsity": 0.3, "confidence": 2.0}, "confidence"),
        ({"sparsity": 0.3, "rescale_batches": []}, "empty"),
        ({"sparsity": 0.3, "min_per_layer": -1}, "min_per_layer"),
    ],
)
def test_bad_input_raises_before_any_change(llama_and_fisher, kwargs, match):
    m, F = llama_and_fisher
    before = snapshot(m)
    with pytest.raises(InvalidInputError, match=match):
        prune(m, F, progress=False, **kwargs)
    assert same(m, before)


def test_obd_needs_a_param_fisher_and_fisher_must_match_the_model(llama_and_fisher):
    m, F = llama_and_fisher
    G = hf_fisher.collect(m, BATCHES, reduction="group", progress=False)
    with pytest.raises(InvalidInputError, match="reduction='param'"):
        prune(m, G, sparsity=0.3, score="obd", progress=False)
    other = tm.llama(kv_heads=1, layers=2)
    with pytest.raises(Exception, match="(?i)mismatch|does not match|differ"):
        prune(other, F, sparsity=0.3, progress=False)


def test_registered_as_a_consumer():
    assert hf_fisher.plugins.consumers()["prune"] is prune
    assert hf_fisher.prune is prune
    assert math.isclose(0.5, 0.5)


# ----------------------------------------------------------------------------- KFAC OBS (the default with data)
def _fake_units(n_units, width, name="w"):
    from hf_fisher.consumers.prune.units import Unit
    from hf_fisher.layout import Slice

    return [Unit("channel", 0, k, None, (), (Slice(name, 1, k * width, (k + 1) * width),), width) for k in range(n_units)]


def test_obs_greedy_equals_brute_force_weighted_least_squares():
    """Each greedy step removes the unit whose removal, with the other scales re-fitted by
    G-weighted least squares on explicit per-unit outputs, raises ½ Σ_t δyᵀ G δy least."""
    from hf_fisher.consumers.prune.obs import obs_select

    g = torch.Generator().manual_seed(0)
    n_units, width, out, T = 6, 2, 5, 40
    W = torch.randn(out, n_units * width, generator=g, dtype=torch.float64)
    X = torch.randn(T, n_units * width, generator=g, dtype=torch.float64)
    R = torch.randn(out, out, generator=g, dtype=torch.float64)
    G = R @ R.T + 0.1 * torch.eye(out, dtype=torch.float64)
    units = _fake_units(n_units, width)
    removed, scales, cost = obs_select(W, 1, "w", units, {("channel", 0, None): 3}, lambda u: (u.kind, u.layer, None),
                                       X.T @ X, G, False)
    L = torch.linalg.cholesky(G)  # G = L Lᵀ: ½ δyᵀ G δy = ½ ‖Lᵀ δy‖²
    Y = [X[:, k * width:(k + 1) * width] @ W[:, k * width:(k + 1) * width].T for k in range(n_units)]  # [T, out]
    target = (sum(Y) @ L).reshape(-1)

    def fit(kept):
        A = torch.stack([(Y[k] @ L).reshape(-1) for k in kept], 1)
        s = torch.linalg.lstsq(A, target.unsqueeze(1)).solution.squeeze(1)
        return s, 0.5 * float(((A @ s) - target).pow(2).sum())

    kept = list(range(n_units))
    for _ in range(3):
        best = min(kept, key=lambda k: fit([j for j in kept if j != k])[1])
        kept.remove(best)
    s_ref, e_ref = fit(kept)
    assert removed == sorted(set(range(n_units)) - set(kept))
    torch.testing.assert_close(scales, s_ref, rtol=1e-7, atol=1e-9)
    assert cost == pytest.approx(e_ref, rel=1e-6)


def test_default_score_with_calibration_is_kfac_obs():
    m = tm.llama(kv_heads=2, layers=2, seed=12)
    F = hf_fisher.collect(m, BATCHES, reduction="group", progress=False)
    full = logits(m)
    r = prune(m, F, sparsity=0.5, scope="layer", rescale_batches=BATCHES, progress=False)
    try:
        assert r.stats["score"] == "kfac" and r.stats["rescaled"]
        assert r.stats["per_layer"]["0"]["removed"] == {"head": 2, "channel": round((0.5 * 5888 - 1024) / 96)}
    finally:
        r.restore()
    assert torch.equal(logits(m), full)
    plain = prune(m, F, sparsity=0.5, scope="layer", progress=False)  # no data: the Fisher
    plain.restore()
    assert plain.stats["score"] == "fisher"
    with pytest.raises(InvalidInputError, match="scope='layer'"):
        prune(m, F, sparsity=0.5, score="kfac", rescale_batches=BATCHES, progress=False)


def test_sequential_scores_each_layer_on_the_pruned_model():
    m = tm.llama(kv_heads=2, layers=2, seed=13)
    one_shot = prune(m, None, sparsity=0.5, score="mask_fisher", scope="layer", calibration_batches=BATCHES, progress=False)
    one_shot.restore()
    seq = prune(m, None, sparsity=0.5, score="mask_fisher", scope="layer", calibration_batches=BATCHES,
                sequential=True, progress=False)
    seq.restore()
    assert seq.stats["sequential"] and seq.stats["per_layer"] == one_shot.stats["per_layer"]
    first = [u for u in one_shot.removed if u["layer"] == 0 and u["kind"] == "head"]
    assert [u for u in seq.removed if u["layer"] == 0 and u["kind"] == "head"] == first  # nothing pruned below it yet
    with pytest.raises(InvalidInputError, match="sequential"):
        prune(m, None, sparsity=0.5, score="mask_fisher", scope="global", calibration_batches=BATCHES, sequential=True)
