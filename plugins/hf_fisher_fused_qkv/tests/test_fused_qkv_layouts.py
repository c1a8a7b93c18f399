"""hf-fisher-fused-qkv: GPT-NeoX and Phi-3 layouts, exact Fishers, and head / channel ablations.

Self-contained: tiny models from configs (no downloads) and the brute-force one-sample-at-a-time
reference every plugin shares, ``hf_fisher.testing`` (plain autograd, float64, no engine code).
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
from hf_fisher.layout import ModelLayout
from hf_fisher.testing import IGNORE, assert_close, per_sample_fisher

VOCAB = 61
RTOL, ATOL_REL = 1e-6, 1e-9


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _finish(model, seed):
    # non-trivial values everywhere (biases / norms start at exact constants)
    torch.manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower():
                p.add_(0.05 * torch.randn_like(p))
    return model.double().eval()


def gpt_neox(seed=40):
    torch.manual_seed(seed)
    cfg = tf.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
        max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    return _finish(tf.GPTNeoXForCausalLM(cfg), seed)


def phi3(seed=41, kv_heads=2):
    torch.manual_seed(seed)
    cfg = tf.Phi3Config(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv_heads,
        intermediate_size=40, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False,
    )
    return _finish(tf.Phi3ForCausalLM(cfg), seed)


MODELS = {"gpt_neox": gpt_neox, "phi3": phi3}
ADAPTERS = {"gpt_neox": "fused_qkv.gpt_neox", "phi3": "fused_qkv.phi3"}


def attn_of(model, name, layer):
    if name == "gpt_neox":
        att = model.gpt_neox.layers[layer].attention
        return att.query_key_value, att.dense
    att = model.model.layers[layer].self_attn
    return att.qkv_proj, att.o_proj


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


# --------------------------------------------------------------------------- layout


@pytest.mark.parametrize("name", list(MODELS))
def test_adapter_is_ours_and_round_trips(name):
    model = MODELS[name]()
    layout = plugins.model_layout(model)
    assert layout.adapter == ADAPTERS[name] and layout.model_type == name
    assert layout.num_layers == 2
    again = ModelLayout.from_dict(layout.to_dict())
    assert again.to_dict() == layout.to_dict()
    assert again.groups == layout.groups and again.attention == layout.attention and again.mlp == layout.mlp
    assert set(layout.groups) == {n for n, _ in model.named_parameters()}
    # every head and every layer described, vocabulary rows of both the embedding and the LM head
    assert [a.layer for a in layout.attention] == [0, 1] and [b.layer for b in layout.mlp] == [0, 1]
    assert len(layout.vocab) == 2
    for att in layout.attention:
        assert att.num_heads == 4 and len(att.heads) == 4 and att.head_dim == 8
    qkv, dense = attn_of(model, name, 1)
    names = {id(p): n for n, p in model.named_parameters()}
    g = layout.groups[names[id(qkv.weight)]]
    if name == "gpt_neox":
        assert g.names[:6] == ["q_head_0", "k_head_0", "v_head_0", "q_head_1", "k_head_1", "v_head_1"]
        head1 = layout.attention[1].heads[1]
        assert [(s.start, s.stop) for s in head1.q + head1.k + head1.v if s.param.endswith("weight")] == [(24, 32), (32, 40), (40, 48)]
    else:
        assert g.names == [f"q_head_{h}" for h in range(4)] + [f"k_head_{j}" for j in range(2)] + [f"v_head_{j}" for j in range(2)]
        head3 = layout.attention[1].heads[3]
        assert head3.kv_head == 1
        assert [(s.start, s.stop) for s in head3.q + head3.k + head3.v] == [(24, 32), (40, 48), (56, 64)]
        gu = layout.groups[names[id(model.model.layers[1].mlp.gate_up_proj.weight)]]
        assert gu.names[0] == "gate_channel_0" and gu.names[40] == "up_channel_0" and gu.num_groups == 80
    assert layout.groups[names[id(dense.weight)]].axis == 1


def test_describe_lists_the_distribution():
    rows = [r for r in plugins.describe() if r["kind"] == "adapter" and r["name"] == "fused_qkv"]
    assert rows and rows[0]["distribution"] == "hf-fisher-fused-qkv"
    # tryfirst: asked before every built-in adapter
    adapters = [r["name"] for r in plugins.describe() if r["kind"] == "adapter"]
    assert adapters.index("fused_qkv") < adapters.index("hf_fisher.architectures.generic")


def test_other_models_are_left_to_the_next_adapter():
    from hf_fisher_fused_qkv.adapter import hf_fisher_model_layout

    model = tf.LlamaForCausalLM(
        tf.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=20, num_hidden_layers=1, num_attention_heads=2)
    )
    assert hf_fisher_model_layout(model) is None
    assert plugins.model_layout(model).adapter != "fused_qkv.gpt_neox"


# --------------------------------------------------------------------------- exact Fisher


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("name", list(MODELS))
def test_fisher_exact_param_and_group(name, side):
    model = MODELS[name]()
    batches = batches_for(side)
    contribs = brute_force(model, batches)
    mean = {n: torch.stack([c[n] for c in contribs]).mean(0) for n in contribs[0]}
    var = {n: torch.stack([c[n] for c in contribs]).var(0, unbiased=True) for n in contribs[0]}
    floor_m = 1e-20 * max(float(t.abs().max()) for t in mean.values())
    floor_v = 1e-20 * max(float(t.abs().max()) for t in var.values())

    fisher = hf_fisher.collect(model, batches, reduction="param", task_type="causal_lm", progress=False)
    assert fisher.metadata.extra["per_sample_path"] == "batched", fisher.metadata.extra.get("loop_reason")
    assert fisher.counts.samples == len(contribs)
    assert sorted(fisher.names()) == sorted(mean)
    for n in mean:
        close(fisher[n], mean[n], f"mean {n}", floor_m)
        close(fisher.variances[n], var[n], f"variance {n}", floor_v)

    group = hf_fisher.collect(model, batches, reduction="group", task_type="causal_lm", progress=False)
    assert group.reduction == "group"
    layout = plugins.model_layout(model)
    assert layout.adapter == ADAPTERS[name]
    for n in mean:
        groups = layout.groups[n]
        assert group.groups[n] == groups
        gm = groups.reduce(mean[n])
        gv = torch.stack([groups.reduce(c[n]) for c in contribs]).var(0, unbiased=True)
        close(group[n], gm, f"group mean {n}", floor_m)
        close(group.variances[n], gv, f"group variance {n}", floor_v)

    # head / channel importance: the group Fisher's groups line up with the layout's slices
    hp, hg = fisher.head_importance(), group.head_importance()
    assert set(hp) == set(hg) == {(l, h) for l in range(2) for h in range(4)}
    for key in hp:
        assert hg[key] == pytest.approx(hp[key], rel=1e-9)
    cp, cg = fisher.channel_importance(), group.channel_importance()
    assert set(cp) == set(cg) == {(l, c) for l in range(2) for c in range(40)}
    for key in cp:
        assert cg[key] == pytest.approx(cp[key], rel=1e-9)
    # by hand from the brute-force Fisher, layer 1
    def m(suffix):
        (key,) = [n for n in mean if n.endswith(suffix)]
        return mean[key]
    if name == "gpt_neox":  # head 1: interleaved rows 24:48 of query_key_value, dense columns 8:16
        a = "gpt_neox.layers.1.attention."
        head = float(m(a + "query_key_value.weight")[24:48].sum() + m(a + "query_key_value.bias")[24:48].sum()
                     + m(a + "dense.weight")[:, 8:16].sum())
        mlp = "gpt_neox.layers.1.mlp."
        channel = float(m(mlp + "dense_h_to_4h.weight")[7].sum() + m(mlp + "dense_h_to_4h.bias")[7]
                        + m(mlp + "dense_4h_to_h.weight")[:, 7].sum())
        assert hp[(1, 1)] == pytest.approx(head, rel=1e-6)
    else:  # head 3: Q rows 24:32, its kv-head 1's K rows 40:48 and V rows 56:64 (shared by 2 heads), O columns
        a = "model.layers.1.self_attn."
        qkv = m(a + "qkv_proj.weight")
        head = float(qkv[24:32].sum() + m(a + "o_proj.weight")[:, 24:32].sum() + 0.5 * (qkv[40:48].sum() + qkv[56:64].sum()))
        gu = m("model.layers.1.mlp.gate_up_proj.weight")
        channel = float(gu[7].sum() + gu[47].sum() + m("model.layers.1.mlp.down_proj.weight")[:, 7].sum())
        assert hp[(1, 3)] == pytest.approx(head, rel=1e-6)
    assert cp[(1, 7)] == pytest.approx(channel, rel=1e-6)


# --------------------------------------------------------------------------- ablations


def _capture_input(module, model, ids):
    seen = {}
    handle = module.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0].detach().clone()))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        handle.remove()
    return seen["x"]


def _zeroed(model, slices):
    params = dict(model.named_parameters())
    with torch.no_grad():
        for s in slices:
            params[s.param][s.index()] = 0
    return model


IDS = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("part", ["all", "q", "k", "v"])
@pytest.mark.parametrize("name", list(MODELS))
def test_head_ablation(name, part):
    """Zeroing one head's layout slices touches exactly that head's part of the input of the
    attention-output projection (and, through a shared kv-head, the heads of its kv group)."""
    layer, head = 1, 2
    model = MODELS[name]()
    layout = plugins.model_layout(model)
    att = layout.attention[layer]
    hs = att.heads[head]
    _, out_proj = attn_of(model, name, layer)
    before = _capture_input(out_proj, model, IDS)
    slices = {"all": hs.q + hs.k + hs.v + hs.o, "q": hs.q, "k": hs.k, "v": hs.v}[part]
    assert slices
    after = _capture_input(out_proj, _zeroed(model, slices), IDS)
    hd = att.head_dim
    for h in range(att.num_heads):
        cols = slice(h * hd, (h + 1) * hd)
        shares_kv = att.kv_head(h) == hs.kv_head
        touched = h == head or (part in ("k", "v", "all") and shares_kv)
        if not touched:
            torch.testing.assert_close(after[..., cols], before[..., cols], rtol=0, atol=0, msg=f"head {h} changed")
        elif part in ("all", "v"):  # no values: the head's output is exactly zero
            assert after[..., cols].abs().max() == 0, f"head {h} not ablated"
            assert before[..., cols].abs().max() > 0
        else:  # q or k zeroed: uniform attention, a different (non-zero) output
            assert (after[..., cols] - before[..., cols]).abs().max() > 1e-6, f"head {h} unchanged"
    if name == "phi3":
        assert sum(att.kv_head(h) == hs.kv_head for h in range(att.num_heads)) == 2  # GQA is exercised


@pytest.mark.parametrize("name", list(MODELS))
def test_channel_ablation(name):
    """Zeroing one MLP channel's slices (Phi-3: gate row c and up row ff + c of the fused
    gate_up_proj) zeroes exactly that input column of the down projection."""
    layer, channel = 1, 7
    model = MODELS[name]()
    block = plugins.model_layout(model).mlp[layer]
    mlp = model.gpt_neox.layers[layer].mlp if name == "gpt_neox" else model.model.layers[layer].mlp
    down = mlp.dense_4h_to_h if name == "gpt_neox" else mlp.down_proj
    if name == "phi3":
        gu = [r for r in block.roles if r.param.endswith("gate_up_proj.weight")]
        assert sorted(r.offset for r in gu) == [0, block.num_channels] and block.num_channels == 40
    before = _capture_input(down, model, IDS)
    # the producing slices only (not the down column): the down projection's input must be zero there
    producing = [s for s in block.slices(channel) if not s.param.endswith(("down_proj.weight", "dense_4h_to_h.weight"))]
    after = _capture_input(down, _zeroed(model, producing), IDS)
    assert after[..., channel].abs().max() == 0 and before[..., channel].abs().max() > 0
    others = [c for c in range(block.num_channels) if c != channel]
    torch.testing.assert_close(after[..., others], before[..., others], rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers deprecation inside peft
def test_tied_embeddings_and_peft_names():
    """A tied GPT-NeoX LM head is one vocabulary entry; under a LoRA wrapper the layout names are
    the wrapper's and the LoRA factors of the fused weight inherit its per-head row groups."""
    torch.manual_seed(3)
    cfg = tf.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
        max_position_embeddings=128, pad_token_id=0, tie_word_embeddings=True,
    )
    model = tf.GPTNeoXForCausalLM(cfg).double().eval()
    assert model.lm_head.weight is model.gpt_neox.embed_in.weight
    layout = plugins.model_layout(model)
    assert layout.adapter == "fused_qkv.gpt_neox" and len(layout.vocab) == 1

    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["query_key_value", "dense"]))
    layout = plugins.model_layout(wrapped)
    assert layout.adapter == "fused_qkv.gpt_neox"
    names = {n for n, _ in wrapped.named_parameters()}
    head = layout.attention[0].heads[1]
    assert all(s.param in names for s in head.q + head.k + head.v + head.o)
    base = "base_model.model.gpt_neox.layers.0.attention.query_key_value"
    assert head.q[0].param == base + ".base_layer.weight" and (head.q[0].start, head.k[0].start) == (24, 32)
    lora_b = layout.groups[base + ".lora_B.default.weight"]
    assert lora_b.names[:3] == ["q_head_0", "k_head_0", "v_head_0"] and lora_b.axis == 0
