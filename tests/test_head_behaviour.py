"""Tests of hf_fisher.consumers.circuits.head_behaviour (head_categories, aggregate_by_category).

The key test plants a previous-token head and an induction head into a tiny GPT-2 built from
constructed weights (see :func:`planted_gpt2`) and checks that the categoriser finds them.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers as tf

from hf_fisher.consumers.circuits.head_behaviour import (
    CATEGORIES,
    DEFAULT_THRESHOLDS,
    METRICS,
    HeadCategories,
    aggregate_by_category,
    head_categories,
)
from hf_fisher.errors import InvalidInputError, UnsupportedError
from hf_fisher.plugins import model_layout

import tiny_models as tm

D, H, HD = 256, 4, 64  # hidden size, heads, head dim
VOCAB, POS = 40, 64  # vocabulary (ids 0, 1, 2 are special), positions
PREV_HEAD = (0, 2)  # planted previous-token head (layer, head)
IND_HEAD = (1, 1)  # planted induction head
SAME_HEAD = (0, 0)  # planted same-token (duplicate-token) head
FIRST_HEAD = (1, 3)  # planted first-token (attention-sink) head
PLANTED = {PREV_HEAD: "previous_token", IND_HEAD: "induction", SAME_HEAD: "same_token", FIRST_HEAD: "first_token"}


def _zero_mean_orthonormal(d: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """``k`` orthonormal columns in R^d, all orthogonal to the all-ones vector (zero mean)."""
    x = torch.randn(d, k + 1, generator=gen, dtype=torch.float64)
    x[:, 0] = 1.0  # QR keeps column 0 along ones; the remaining columns are orthogonal to it
    q, _ = torch.linalg.qr(x)
    return q[:, 1:]


def _write(model, slices, block: torch.Tensor, which: str = "weight") -> None:
    """Write ``block`` into the weight (or bias) slice of ``slices``.

    GPT-2 ``Conv1D`` weights are ``[in, out]``: a Q/K/V slice is on axis 1 (``block`` is
    ``[d, hd]``), an O slice on axis 0 (``block`` is ``[hd, d]``); a Q/K/V bias slice is ``[hd]``."""
    params = dict(model.named_parameters())
    (s,) = [s for s in slices if s.param.endswith(which)]
    with torch.no_grad():
        params[s.param][s.index()] = block.to(params[s.param].dtype)


def planted_gpt2(dtype=torch.float64) -> tuple[tf.GPT2LMHeadModel, dict]:
    """A 2-layer GPT-2 with planted heads: (0, 2) previous-token, (1, 1) induction, (0, 0)
    same-token, (1, 3) first-token.

    Construction (d = 256, 4 heads of 64 dims, vocabulary 40, 64 positions; every weight and bias
    zero unless stated, so the MLPs output 0 and the other heads attend uniformly and write 0):

    - Embeddings: three mutually orthogonal sets of unit vectors, all orthogonal to the all-ones
      vector: token vectors ``u_v`` (``wte``), position vectors ``w_t`` (``wpe``) and a
      "previous-token" subspace ``s_v`` (used by no embedding). The residual stream is a sum of
      orthogonal zero-mean unit vectors, so each LayerNorm (gain 1, bias 0) only rescales it by
      ``sqrt(d / n)`` (n = number of summed vectors: 2 before layer 0, 3 after it): uniform over
      positions.
    - Head (0, 2), previous-token: ``W_Q w_t = b0 e_{t-1}``, ``W_K w_s = b0 e_s`` (``e`` = basis of
      the head space), so ``q_t . k_s`` is large exactly for ``s = t - 1`` (score ~30 after the
      scales). OV: ``W_V u_v = g e_v`` and ``W_O e_v = s_v``: the head writes ``s_{x_{t-1}}``
      (norm ~1) into the residual at ``t``.
    - Head (1, 1), induction (K-composition): ``W_Q u_v = b1 e_v``, ``W_K s_v = b1 e_v``: query
      = current token, key = the previous token written by (0, 2); ``q_t . k_s`` is large exactly
      when ``x_{s-1} = x_t``, i.e. at the position after an earlier occurrence of the current
      token. Its OV stays zero.
    - Head (0, 0), same-token: ``W_Q u_v = W_K u_v = b0 e_v``: a query attends to the positions
      holding its own token (itself and, in the second half of a repeated probe, the earlier
      occurrence: same-token mass ~0.5). OV zero.
    - Head (1, 3), first-token: a constant query (Q bias ``c e_0``) and ``W_K w_0 = b e_0``: every
      query attends to position 0. OV zero.

    The planted head indices are taken from the layout's slices of the fused ``c_attn``, which
    the caller checks against GPT-2's ``Q | K | V`` split. Returns the model and the vectors.
    """
    torch.manual_seed(0)
    cfg = tf.GPT2Config(
        vocab_size=VOCAB, n_embd=D, n_layer=2, n_head=H, n_positions=POS, n_inner=32,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    model = tf.GPT2LMHeadModel(cfg).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.fill_(1.0)
            else:
                p.zero_()
    gen = torch.Generator().manual_seed(1)
    basis = _zero_mean_orthonormal(D, VOCAB + POS + VOCAB, gen)
    u, w, s = basis[:, :VOCAB], basis[:, VOCAB:VOCAB + POS], basis[:, VOCAB + POS:]
    eye = torch.eye(HD, dtype=torch.float64)
    with torch.no_grad():
        model.transformer.wte.weight.copy_(u.T.to(dtype))  # also the tied LM head
        model.transformer.wpe.weight.copy_(w.T.to(dtype))

    layout = model_layout(model)
    ln0, ln1 = math.sqrt(D / 2), math.sqrt(D / 3)  # LayerNorm rescaling before layer 0 / layer 1
    target = 30.0  # attention logit of the planted match
    b0 = math.sqrt(target * math.sqrt(HD)) / ln0
    b1 = math.sqrt(target * math.sqrt(HD)) / ln1

    prev = layout.attention[PREV_HEAD[0]].heads[PREV_HEAD[1]]
    wq = torch.zeros(D, HD, dtype=torch.float64)
    wk = torch.zeros(D, HD, dtype=torch.float64)
    for t in range(1, POS):
        wq += b0 * torch.outer(w[:, t], eye[t - 1])
    for t in range(POS):
        wk += b0 * torch.outer(w[:, t], eye[t])
    wv = sum(torch.outer(u[:, v], eye[v]) for v in range(VOCAB)) / ln0
    wo = sum(torch.outer(eye[v], s[:, v]) for v in range(VOCAB))
    for slices, block in ((prev.q, wq), (prev.k, wk), (prev.v, wv), (prev.o, wo)):
        _write(model, slices, block)

    ind = layout.attention[IND_HEAD[0]].heads[IND_HEAD[1]]
    wq = b1 * sum(torch.outer(u[:, v], eye[v]) for v in range(VOCAB))
    wk = b1 * sum(torch.outer(s[:, v], eye[v]) for v in range(VOCAB))
    _write(model, ind.q, wq)
    _write(model, ind.k, wk)

    same = layout.attention[SAME_HEAD[0]].heads[SAME_HEAD[1]]
    tok = b0 * sum(torch.outer(u[:, v], eye[v]) for v in range(VOCAB))
    _write(model, same.q, tok)
    _write(model, same.k, tok)

    first = layout.attention[FIRST_HEAD[0]].heads[FIRST_HEAD[1]]
    c = math.sqrt(target * math.sqrt(HD))
    _write(model, first.q, c * eye[0], which="bias")
    _write(model, first.k, (c / ln1) * torch.outer(w[:, 0], eye[0]))
    model.eval()
    return model, {"layout": layout}


@pytest.fixture(scope="module")
def planted():
    return planted_gpt2()


@pytest.fixture(scope="module")
def planted_result(planted):
    model, _ = planted
    return head_categories(model, seq_len=24, n_probes=8, progress=False)


def test_planted_slices_match_gpt2_fused_qkv(planted):
    model, info = planted
    layout = info["layout"]
    assert len(layout.attention) == 2 and all(a.num_heads == H for a in layout.attention)
    for lay, h in (PREV_HEAD, IND_HEAD):
        hs = layout.attention[lay].heads[h]
        assert (hs.layer, hs.head) == (lay, h)
        w = {role: next(s for s in getattr(hs, role) if s.param.endswith("weight")) for role in "qkvo"}
        assert w["q"].param == f"transformer.h.{lay}.attn.c_attn.weight" and w["q"].axis == 1
        # HF GPT-2: c_attn(x).split(d, dim=2) -> Q | K | V, each viewed as [H, hd]
        assert (w["q"].start, w["q"].stop) == (h * HD, (h + 1) * HD)
        assert (w["k"].start, w["k"].stop) == (D + h * HD, D + (h + 1) * HD)
        assert (w["v"].start, w["v"].stop) == (2 * D + h * HD, 2 * D + (h + 1) * HD)
        assert w["o"].param == f"transformer.h.{lay}.attn.c_proj.weight" and w["o"].axis == 0
        assert (w["o"].start, w["o"].stop) == (h * HD, (h + 1) * HD)
    # and the planted weights land on the heads HF computes: check the attention pattern directly
    model.set_attn_implementation("eager")
    try:
        ids = torch.arange(3, 3 + 10).repeat(2)[None]  # [a..j, a..j]
        with torch.no_grad():
            atts = model(input_ids=ids, output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")
    prev = atts[PREV_HEAD[0]][0, PREV_HEAD[1]]
    ind = atts[IND_HEAD[0]][0, IND_HEAD[1]]
    for t in range(1, 20):
        assert prev[t, t - 1] > 0.99
    for t in range(11, 20):
        assert ind[t, t - 10 + 1] > 0.99


def test_planted_heads_are_found(planted_result):
    r = planted_result
    for key, cat in PLANTED.items():
        assert r.categories[key] == cat, (key, r.scores[key])
    assert r.scores[IND_HEAD]["induction"] > 0.95
    assert r.scores[PREV_HEAD]["previous_token"] > 0.95
    assert r.scores[PREV_HEAD]["induction"] < 0.05
    assert r.scores[IND_HEAD]["previous_token"] < 0.2
    assert 0.45 < r.scores[SAME_HEAD]["same_token"] < 0.55  # split between itself and the earlier copy
    assert r.scores[FIRST_HEAD]["first_token"] > 0.95
    for key, cat in r.categories.items():
        if key not in PLANTED:  # all-zero heads: uniform causal attention
            assert cat == "mixed", (key, r.scores[key])
            assert r.scores[key]["entropy"] > 0.99
        if key != IND_HEAD:
            assert r.scores[key]["induction"] < 0.2
    by = r.by_category()
    assert by["induction"] == [IND_HEAD] and by["previous_token"] == [PREV_HEAD]
    assert by["same_token"] == [SAME_HEAD] and by["first_token"] == [FIRST_HEAD]
    assert by["content"] == []


def test_induction_needs_the_previous_token_head():
    # K-composition: without the previous-token head's output the planted (1, 1) is no induction head
    model, info = planted_gpt2()
    prev = info["layout"].attention[PREV_HEAD[0]].heads[PREV_HEAD[1]]
    _write(model, prev.o, torch.zeros(HD, D))
    r = head_categories(model, seq_len=16, n_probes=4, progress=False)
    assert r.categories[IND_HEAD] != "induction"
    assert r.scores[IND_HEAD]["induction"] < 0.2
    assert r.categories[PREV_HEAD] == "previous_token"  # its attention pattern is unchanged


def test_planted_thresholds_change_the_rule(planted):
    model, _ = planted
    r = head_categories(model, seq_len=16, n_probes=4, progress=False, thresholds={"induction": 1.0})
    assert r.categories[IND_HEAD] != "induction"
    assert r.thresholds["induction"] == 1.0 and r.thresholds["previous_token"] == DEFAULT_THRESHOLDS["previous_token"]


def test_llama_runs_restores_state_and_covers_layout():
    model = tm.llama(torch.float32)
    model.train()
    original = model.config._attn_implementation
    assert original != "eager"
    r = head_categories(model, seq_len=8, n_probes=3, batch_size=2, seed=5, progress=False)
    assert model.training is True
    assert model.config._attn_implementation == original
    layout = model_layout(model)
    heads = {(h.layer, h.head) for h in layout.heads()}
    assert set(r.scores) == heads == set(r.categories)
    for s in r.scores.values():
        assert set(s) == set(METRICS)
        assert all(0.0 <= v <= 1.0 for v in s.values())
    assert all(c in CATEGORIES for c in r.categories.values())
    # eval mode restored too
    model.eval()
    head_categories(model, seq_len=6, n_probes=1, progress=False)
    assert model.training is False
    # deterministic in the seed
    r2 = head_categories(model, seq_len=8, n_probes=3, batch_size=3, seed=5, progress=False)
    for k in heads:
        for m in METRICS:
            assert r2.scores[k][m] == pytest.approx(r.scores[k][m], abs=1e-5)
    # JSON round trip
    d = json.loads(json.dumps(r.to_dict()))
    back = HeadCategories.from_dict(d)
    assert back.categories == r.categories
    assert sum(len(v) for v in d["by_category"].values()) == len(heads)


def test_probes_avoid_special_tokens():
    model = tm.qwen2(torch.float32)
    seen = []
    hook = model.register_forward_pre_hook(lambda mod, args, kw: seen.append(kw["input_ids"].clone()), with_kwargs=True)
    try:
        head_categories(model, seq_len=8, n_probes=4, progress=False)
    finally:
        hook.remove()
    ids = torch.cat([x.flatten() for x in seen])
    assert not torch.isin(ids, torch.tensor([0, 1, 2])).any()
    rep = seen[-1]
    assert rep.shape[1] == 16 and torch.equal(rep[:, :8], rep[:, 8:])
    assert all(len(set(row[:8].tolist())) == 8 for row in rep)


def test_aggregate_by_category(planted_result):
    r = planted_result
    keys = sorted(r.categories)
    values = {k: float(1 + 3 * k[0] + k[1]) for k in keys}
    total = sum(values.values())
    agg = aggregate_by_category(values, r)
    assert set(agg) == set(r.categories.values())
    assert math.isclose(sum(a["sum"] for a in agg.values()), total)
    assert math.isclose(sum(a["share"] for a in agg.values()), 1.0)
    assert sum(a["count"] for a in agg.values()) == len(keys)
    assert agg["induction"]["sum"] == values[IND_HEAD] and agg["induction"]["count"] == 1
    assert agg["induction"]["top"] == {"layer": IND_HEAD[0], "head": IND_HEAD[1], "value": values[IND_HEAD]}
    mixed = [k for k in keys if r.categories[k] == "mixed"]
    assert agg["mixed"]["top"]["value"] == max(values[k] for k in mixed)
    per_layer = aggregate_by_category(values, r.categories, per_layer=True)
    for cat, a in agg.items():
        assert math.isclose(sum(v for (c, _), v in per_layer.items() if c == cat), a["sum"])
    assert per_layer[("induction", 1)] == values[IND_HEAD]
    assert ("induction", 0) not in per_layer
    # a subset of the heads is fine; a head without a category or a NaN is not
    sub = aggregate_by_category({IND_HEAD: 2.0}, r)
    assert sub["induction"]["share"] == 1.0 and sub["mixed"]["count"] == 0 and sub["mixed"]["top"] is None
    with pytest.raises(InvalidInputError, match="no category"):
        aggregate_by_category({(7, 0): 1.0}, r)
    with pytest.raises(InvalidInputError, match="finite"):
        aggregate_by_category({IND_HEAD: float("nan")}, r)


def test_aggregate_fisher_head_importance(planted_result):
    # the shape head_importance returns ({(layer, head): float}) aggregates directly
    from hf_fisher import analysis  # noqa: F401 - the documented source of such tables

    values = dict.fromkeys(planted_result.categories, 0.0)
    agg = aggregate_by_category(values, planted_result)
    assert all(a["share"] == 0.0 and a["sum"] == 0.0 for a in agg.values())


class _NoEagerLlama(tf.LlamaForCausalLM):
    """A real Llama whose class refuses to switch attention implementation (as a model with no
    eager path would)."""

    def set_attn_implementation(self, attn_implementation, **kwargs):
        if attn_implementation == "eager":
            raise ValueError("this model does not support eager attention")
        return super().set_attn_implementation(attn_implementation, **kwargs)


def test_model_without_attention_probabilities_is_unsupported():
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=61, hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    model = _NoEagerLlama(cfg).eval()
    original = model.config._attn_implementation
    with pytest.raises(UnsupportedError, match="eager"):
        head_categories(model, seq_len=6, n_probes=1, progress=False)
    assert model.config._attn_implementation == original and model.training is False


@pytest.fixture
def counted_llama():
    model = tm.llama(torch.float32)
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    return model, calls


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"seq_len": 3}, "seq_len"),
        ({"seq_len": 4.0}, "seq_len"),
        ({"n_probes": 0}, "n_probes"),
        ({"batch_size": 0}, "batch_size"),
        ({"thresholds": {"bogus": 0.5}}, "unknown threshold"),
        ({"thresholds": {"induction": 1.5}}, r"\[0, 1\]"),
        ({"thresholds": {"induction": float("nan")}}, r"\[0, 1\]"),
        ({"thresholds": [0.5]}, "dict"),
        ({"vocab_size": 6, "seq_len": 4}, "non-special"),
        ({"vocab_size": 1000}, "rows"),
    ],
)
def test_bad_inputs_raise_before_any_forward(counted_llama, kwargs, match):
    model, calls = counted_llama
    with pytest.raises(InvalidInputError, match=match):
        head_categories(model, progress=False, **kwargs)
    assert calls == []


def test_probes_longer_than_the_position_limit_are_rejected(planted):
    model, _ = planted  # 64 positions, 37 non-special tokens: seq_len 33 gives 66-token repeated probes
    calls = []
    hook = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(InvalidInputError, match="positions"):
            head_categories(model, seq_len=33, progress=False)
    finally:
        hook.remove()
    assert calls == []


def test_model_without_heads_is_rejected():
    cfg = tf.MambaConfig(vocab_size=61, hidden_size=16, num_hidden_layers=1, state_size=4)
    torch.manual_seed(0)
    model = tf.MambaForCausalLM(cfg).eval()
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(InvalidInputError, match="no attention heads"):
        head_categories(model, progress=False)
    assert calls == []


def test_registered_as_consumers():
    from hf_fisher.consumers.circuits import head_behaviour

    got = {}
    head_behaviour.hf_fisher_register_consumers(lambda name, fn: got.setdefault(name, fn))
    assert got == {"head_categories": head_categories, "aggregate_by_category": aggregate_by_category}


@pytest.mark.parametrize("factory", [tm.lora_llama, tm.gpt_bigcode, tm.qwen3])
def test_other_architectures_run(factory):
    model = factory(torch.float32)
    original = model.config._attn_implementation
    r = head_categories(model, seq_len=6, n_probes=2, progress=False)
    assert set(r.categories) == {(h.layer, h.head) for h in model_layout(model).heads()}
    assert model.config._attn_implementation == original and model.training is False
