"""RegMean: input Grams against a manual, hook-free forward of the tiny models, and the closed form
against least squares and the objective's gradient."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hf_fisher.consumers.merge.regmean import InputGrams, collect_input_grams, regmean_tensor
from hf_fisher.errors import EmptyDataError, InvalidInputError

import tiny_models as tm

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------- manual references
def _attend(q, k, v):
    """Causal softmax attention of one sample: q [H, T, d], k/v [H, T, d] (kv already repeated)."""
    T, d = q.shape[1], q.shape[2]
    s = q @ k.transpose(-1, -2) / math.sqrt(d)
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ v


def llama_inputs(model, ids):
    """{weight name: [T, in] inputs} of one unpadded sample, by a forward written out by hand."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    inner, cfg = model.model, model.config
    T = ids.shape[0]
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = cfg.hidden_size // H
    h = inner.embed_tokens(ids[None])
    cos, sin = inner.rotary_emb(h, torch.arange(T)[None])
    out: dict[str, list] = {}
    for l, layer in enumerate(inner.layers):
        p = f"model.layers.{l}."
        at, mlp = layer.self_attn, layer.mlp
        x = layer.input_layernorm(h)[0]
        for n in ("q_proj", "k_proj", "v_proj"):
            out[p + f"self_attn.{n}.weight"] = x
        q = F.linear(x, at.q_proj.weight).view(T, H, hd).transpose(0, 1)[None]
        k = F.linear(x, at.k_proj.weight).view(T, KV, hd).transpose(0, 1)[None]
        v = F.linear(x, at.v_proj.weight).view(T, KV, hd).transpose(0, 1)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        rep = H // KV
        a = _attend(q[0], k[0].repeat_interleave(rep, 0), v.repeat_interleave(rep, 0))
        a = a.transpose(0, 1).reshape(T, H * hd)
        out[p + "self_attn.o_proj.weight"] = a
        h = h + F.linear(a, at.o_proj.weight)[None]
        x = layer.post_attention_layernorm(h)[0]
        out[p + "mlp.gate_proj.weight"] = out[p + "mlp.up_proj.weight"] = x
        z = F.silu(F.linear(x, mlp.gate_proj.weight)) * F.linear(x, mlp.up_proj.weight)
        out[p + "mlp.down_proj.weight"] = z
        h = h + F.linear(z, mlp.down_proj.weight)[None]
    out["lm_head.weight"] = inner.norm(h)[0]
    return out, model.lm_head(inner.norm(h))


def gpt2_inputs(model, ids):
    tr, cfg = model.transformer, model.config
    T = ids.shape[0]
    H = cfg.n_head
    hd = cfg.n_embd // H
    h = tr.wte(ids) + tr.wpe(torch.arange(T))
    out = {}
    for l, block in enumerate(tr.h):
        p = f"transformer.h.{l}."
        x = block.ln_1(h)
        out[p + "attn.c_attn.weight"] = x
        qkv = x @ block.attn.c_attn.weight + block.attn.c_attn.bias
        q, k, v = (t.view(T, H, hd).transpose(0, 1) for t in qkv.split(cfg.n_embd, -1))
        a = _attend(q, k, v).transpose(0, 1).reshape(T, cfg.n_embd)
        out[p + "attn.c_proj.weight"] = a
        h = h + a @ block.attn.c_proj.weight + block.attn.c_proj.bias
        x = block.ln_2(h)
        out[p + "mlp.c_fc.weight"] = x
        z = F.gelu(x @ block.mlp.c_fc.weight + block.mlp.c_fc.bias, approximate="tanh")
        out[p + "mlp.c_proj.weight"] = z
        h = h + z @ block.mlp.c_proj.weight + block.mlp.c_proj.bias
    return out, model.lm_head(tr.ln_f(h))[None]


REFS = {"llama": (tm.llama, llama_inputs), "gpt2": (tm.gpt2, gpt2_inputs)}


def reference_grams(model, ref, batch):
    """Σ over samples (alone, unpadded) of X^T X, and the row counts."""
    sums, rows = {}, {}
    with torch.no_grad():
        for i in range(batch["input_ids"].shape[0]):
            ids = batch["input_ids"][i][batch["attention_mask"][i].bool()]
            xs, logits = ref(model, ids)
            # the hand-written forward is the model's forward: same logits
            torch.testing.assert_close(logits, model(input_ids=ids[None]).logits, rtol=1e-9, atol=1e-9)
            for n, x in xs.items():
                sums[n] = sums.get(n, 0) + x.T @ x
                rows[n] = rows.get(n, 0) + x.shape[0]
    return sums, rows


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_grams_equal_hand_written_forward(arch):
    make, ref = REFS[arch]
    model = make()
    batch = tm.padded_batch([5, 2, 7], seed=3)
    got = collect_input_grams(model, [batch], normalize="sum", progress=False)
    sums, rows = reference_grams(model, ref, batch)
    assert set(got.grams) == set(sums)
    for n in sums:
        torch.testing.assert_close(got.grams[n], sums[n], rtol=1e-10, atol=1e-10)
        assert got.num_tokens[n] == rows[n] == 14
        assert got.grams[n].dtype == torch.float64
    assert got.num_samples == 3
    kinds = set(got.kinds.values())
    assert kinds == ({"conv1d"} if arch == "gpt2" else {"linear"})
    if arch == "gpt2":  # lm_head is wte: tied, excluded with the reason
        assert "lm_head.weight" in got.skipped and "transformer.wte.weight" in got.skipped["lm_head.weight"]
    mean = collect_input_grams(model, [batch], progress=False)
    for n in sums:
        torch.testing.assert_close(mean.grams[n], sums[n] / 14, rtol=1e-10, atol=1e-12)


def test_padding_and_batching_do_not_change_grams():
    model = tm.llama()
    lengths = [6, 3, 8, 1]
    right = tm.padded_batch(lengths, seed=5)
    left = tm.padded_batch(lengths, seed=5, side="left")
    alone = []
    for i, n in enumerate(lengths):
        m = right["attention_mask"][i].bool()
        alone.append({"input_ids": right["input_ids"][i][m][None], "attention_mask": torch.ones(1, n, dtype=torch.long)})
    a = collect_input_grams(model, alone, progress=False)
    for padded in (right, left):
        b = collect_input_grams(model, [padded], progress=False)
        assert b.num_tokens == a.num_tokens
        for n in a.grams:
            torch.testing.assert_close(b.grams[n], a.grams[n], rtol=1e-10, atol=1e-12)
    # the padded positions would change the Gram if they counted
    nomask = {"input_ids": right["input_ids"]}
    c = collect_input_grams(model, [nomask], progress=False)
    assert c.num_tokens["model.layers.0.self_attn.q_proj.weight"] == 4 * 8
    assert not torch.allclose(c.grams["model.layers.0.mlp.down_proj.weight"], a.grams["model.layers.0.mlp.down_proj.weight"])


class Twice(nn.Module):
    """An embedding and one Linear applied twice (a module called twice per forward), plus a
    Linear subclass with its own forward."""

    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(11, 4, dtype=torch.float64)
        self.lin = nn.Linear(4, 4, bias=False, dtype=torch.float64)
        self.odd = Twice.Scaled(4, 3, dtype=torch.float64)

    def forward(self, input_ids, attention_mask=None):
        return self.odd(self.lin(self.lin(self.emb(input_ids))))


def test_module_called_twice_contributes_every_call():
    model = Twice()
    batch = {"input_ids": torch.tensor([[1, 2, 3], [4, 5, 0]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}
    got = collect_input_grams(model, [batch], normalize="sum", progress=False)
    with torch.no_grad():
        x = model.emb(batch["input_ids"])[batch["attention_mask"].bool()]
        y = model.lin(x)
    torch.testing.assert_close(got.grams["lin.weight"], x.T @ x + y.T @ y)
    assert got.num_tokens["lin.weight"] == 10
    assert "odd.weight" in got.skipped and "overrides the forward" in got.skipped["odd.weight"]
    assert set(got.grams) == {"lin.weight"}


def test_selection_limits_and_state_restored():
    model = tm.llama()
    model.train()
    model.model.layers[0].eval()
    batch = tm.padded_batch([4, 5, 3], seed=1)
    rng = torch.get_rng_state()
    got = collect_input_grams(model, [batch, batch], names=r"layers\.1\..*proj", max_samples=2, progress=False)
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and not model.model.layers[0].training and model.model.layers[1].training
    assert set(got.grams) == {f"model.layers.1.{n}.weight" for n in
                              ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert got.num_samples == 2 and got.num_tokens["model.layers.1.mlp.up_proj.weight"] == 9
    first_two = {k: v[:2] for k, v in batch.items()}
    ref = collect_input_grams(model, [first_two], names=["model.layers.1.mlp.up_proj.weight"], progress=False)
    torch.testing.assert_close(got.grams["model.layers.1.mlp.up_proj.weight"], ref.grams["model.layers.1.mlp.up_proj.weight"])
    assert isinstance(ref, InputGrams) and list(ref.grams) == ["model.layers.1.mlp.up_proj.weight"]


def test_collect_bad_input():
    model = tm.llama()
    batch = tm.padded_batch([3, 2])
    with pytest.raises(EmptyDataError, match="no batches"):
        collect_input_grams(model, [], progress=False)
    with pytest.raises(InvalidInputError, match="input_ids"):
        collect_input_grams(model, [{"attention_mask": batch["attention_mask"]}], progress=False)
    with pytest.raises(InvalidInputError, match="attention_mask has shape"):
        collect_input_grams(model, [{"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"][:, :1]}], progress=False)
    with pytest.raises(InvalidInputError, match="vocabulary"):
        collect_input_grams(model, [{"input_ids": batch["input_ids"] + 1000}], progress=False)
    with pytest.raises(InvalidInputError, match="normalize"):
        collect_input_grams(model, [batch], normalize="avg", progress=False)
    with pytest.raises(InvalidInputError, match="not the weight of an nn.Linear"):
        collect_input_grams(model, [batch], names=["model.embed_tokens.weight"], progress=False)
    with pytest.raises(InvalidInputError, match="matches no"):
        collect_input_grams(model, [batch], names="nothing_like_this", progress=False)
    with pytest.raises(InvalidInputError, match="max_samples"):
        collect_input_grams(model, [batch], max_samples=0, progress=False)


# ---------------------------------------------------------------------------- the closed form
def _problem(seed=0, n_models=3, tokens=(12, 9, 15), n_in=6, n_out=5):
    g = torch.Generator().manual_seed(seed)
    X = [torch.randn(t, n_in, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2, n_in, dtype=torch.float64) for t in tokens[:n_models]]
    W = [torch.randn(n_out, n_in, generator=g, dtype=torch.float64) for _ in range(n_models)]
    return X, W, [x.T @ x for x in X]


def test_linear_closed_form_is_the_least_squares_solution():
    X, W, G = _problem()
    merged = regmean_tensor(W, G, alpha=1.0, kind="linear")
    # independent: least squares on the stacked system [X_i] W^T = [X_i W_i^T]
    A = torch.cat(X)
    b = torch.cat([x @ w.T for x, w in zip(X, W)])
    torch.testing.assert_close(merged, torch.linalg.lstsq(A, b).solution.T, rtol=1e-10, atol=1e-10)
    # the objective's gradient vanishes there, and it is a minimum (any perturbation costs)
    Wv = merged.clone().requires_grad_(True)
    obj = sum(((x @ Wv.T - x @ w.T) ** 2).sum() for x, w in zip(X, W))
    (grad,) = torch.autograd.grad(obj, Wv)
    assert grad.abs().max() < 1e-9
    with torch.no_grad():
        bumped = sum(((x @ (merged + 1e-3).T - x @ w.T) ** 2).sum() for x, w in zip(X, W))
    assert bumped > obj


def test_conv1d_is_the_transposed_linear_and_alpha_regularises():
    _X, W, G = _problem(seed=1)
    for alpha in (1.0, 0.4):
        lin = regmean_tensor(W, G, alpha=alpha, kind="linear")
        conv = regmean_tensor([w.T.contiguous() for w in W], G, alpha=alpha, kind="conv1d")
        torch.testing.assert_close(conv, lin.T, rtol=1e-12, atol=1e-12)
        # stationary point of Σ_i tr((W-W_i) G̃_i (W-W_i)^T), G̃ = αG + (1-α)diag(G)
        Gt = [alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g)) for g in G]
        grad = sum(2 * (lin - w) @ gt for w, gt in zip(W, Gt))
        assert grad.abs().max() < 1e-9


def test_alpha_zero_is_a_per_input_feature_weighted_average():
    _X, W, G = _problem(seed=2)
    merged = regmean_tensor(W, G, alpha=0.0, kind="linear")
    d = torch.stack([torch.diagonal(g) for g in G])  # [models, in]
    expected = sum(w * d[i] for i, w in enumerate(W)) / d.sum(0)  # column j weighted by G_i[j, j]
    torch.testing.assert_close(merged, expected, rtol=1e-12, atol=1e-12)


def test_identical_models_and_dtype():
    _X, W, G = _problem(seed=3)
    w = W[0].float()
    out = regmean_tensor([w, w.clone(), w.clone()], G, alpha=0.7, kind="linear")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, w, rtol=1e-6, atol=1e-6)
    one = regmean_tensor([W[1]], [G[1]], alpha=1.0, kind="linear")
    torch.testing.assert_close(one, W[1], rtol=1e-10, atol=1e-10)


def test_singular_gram_gets_a_logged_ridge_towards_the_average(caplog):
    X, W, _ = _problem(seed=4, tokens=(3, 2, 2), n_in=6)
    X = [x.clone() for x in X]
    for x in X:
        x[:, 5] = 0  # no model ever sees input feature 5; 7 tokens < 6 features... rank 5
    G = [x.T @ x for x in X]
    with caplog.at_level(logging.WARNING, logger="hf_fisher"):
        merged = regmean_tensor(W, G, alpha=1.0, kind="linear", name="layer.weight")
    assert any("singular" in r.message and "layer.weight" in r.message for r in caplog.records)
    assert torch.isfinite(merged).all()
    # the unreachable input column is the models' average
    torch.testing.assert_close(merged[:, 5], sum(w[:, 5] for w in W) / 3, rtol=1e-6, atol=1e-6)
    # on the reachable features it still fits the data as the least-squares solution does
    A = torch.cat(X)[:, :5]
    b = torch.cat([x @ w.T for x, w in zip(X, W)])
    torch.testing.assert_close(merged[:, :5], torch.linalg.lstsq(A, b).solution.T, rtol=1e-5, atol=1e-5)
    with caplog.at_level(logging.WARNING, logger="hf_fisher"):
        caplog.clear()
        regmean_tensor(W, [x.T @ x + torch.eye(6, dtype=torch.float64) for x in X], alpha=1.0, kind="linear")
    assert not caplog.records


def test_regmean_tensor_bad_input():
    _, W, G = _problem(seed=5)
    with pytest.raises(InvalidInputError, match="no weights"):
        regmean_tensor([], [], alpha=1.0, kind="linear")
    with pytest.raises(InvalidInputError, match="one Gram per model"):
        regmean_tensor(W, G[:2], alpha=1.0, kind="linear")
    with pytest.raises(InvalidInputError, match="weight 1 has shape"):
        regmean_tensor([W[0], W[1][:, :4]], G[:2], alpha=1.0, kind="linear")
    with pytest.raises(InvalidInputError, match=r"needs \[5, 5\]"):
        regmean_tensor(W, G, alpha=1.0, kind="conv1d")
    with pytest.raises(InvalidInputError, match="alpha"):
        regmean_tensor(W, G, alpha=1.5, kind="linear")
    with pytest.raises(InvalidInputError, match="kind"):
        regmean_tensor(W, G, alpha=1.0, kind="embedding")
    with pytest.raises(InvalidInputError, match="NaN"):
        regmean_tensor(W, [G[0], G[1], G[2] * float("nan")], alpha=1.0, kind="linear")
