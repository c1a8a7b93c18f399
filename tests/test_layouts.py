"""Architecture adapters: groups cover every parameter, and the slices are the ones the model uses.

The head and channel slices are checked numerically against the real HF forward pass: perturbing
the Q rows of head h changes only head h's block of the attention output (the input of the
output projection), perturbing the K/V rows of kv-head j changes exactly the heads that read j,
and the O slice of head h only ever multiplies head h's block. Likewise for MLP channels.
"""

from __future__ import annotations

import json
import logging
from functools import cache

import pytest
import torch
import transformers as tf
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_fisher import plugins
from hf_fisher.architectures import generic
from hf_fisher.layout import ModelLayout, ParamGroups, Slice, layer_of

import extra_models as em
import tiny_models as tm


def _bigcode_mha(dtype=torch.float64):
    torch.manual_seed(9)
    cfg = tf.GPTBigCodeConfig(
        vocab_size=tm.VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, multi_query=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return tf.GPTBigCodeForCausalLM(cfg).to(dtype).eval()


def _lora_gpt2(dtype=torch.float64):
    import peft

    model = peft.get_peft_model(
        tm.gpt2(dtype),
        peft.LoraConfig(r=3, lora_alpha=6, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, lora_dropout=0.0),
    )
    torch.manual_seed(10)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model.eval()


def _tied_llama(dtype=torch.float64):
    torch.manual_seed(11)
    cfg = tf.LlamaConfig(
        vocab_size=tm.VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )
    return tf.LlamaForCausalLM(cfg).to(dtype).eval()


pytestmark = pytest.mark.usefixtures("one_thread")


# name -> (factory, adapter, model_type, num_heads, num_kv_heads)
MODELS = {
    "llama_kv2": (lambda: tm.llama(kv_heads=2), "llama", "llama", 4, 2),
    "llama_kv1": (lambda: tm.llama(kv_heads=1), "llama", "llama", 4, 1),
    "llama_kv4": (lambda: tm.llama(kv_heads=4), "llama", "llama", 4, 4),
    "tied_llama": (_tied_llama, "llama", "llama", 4, 2),
    "mistral": (tm.mistral, "llama", "mistral", 4, 2),
    "qwen2": (tm.qwen2, "llama", "qwen2", 4, 2),
    "qwen3": (tm.qwen3, "llama", "qwen3", 4, 1),
    "gpt2": (tm.gpt2, "gpt2", "gpt2", 4, 4),
    "gpt_bigcode": (tm.gpt_bigcode, "gpt_bigcode", "gpt_bigcode", 4, 1),
    "gpt_bigcode_mha": (_bigcode_mha, "gpt_bigcode", "gpt_bigcode", 4, 4),
    "lora_llama": (tm.lora_llama, "llama", "llama", 4, 2),
    "lora_gpt2": (_lora_gpt2, "gpt2", "gpt2", 4, 4),
    # BERT's layout comes from the hf-fisher-bert plugin the set-up installs (plugins/hf_fisher_bert);
    # its heads are checked there, on the real MiniLM weights
    "bert_classifier": (tm.bert_classifier, "bert_family", "bert", None, None),
}
WITH_HEADS = [k for k, v in MODELS.items() if v[3] is not None]


@cache
def _model(name: str) -> nn.Module:
    return MODELS[name][0]()


@cache
def _layout(name: str) -> ModelLayout:
    return plugins.model_layout(_model(name))


def _ids(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, tm.VOCAB, (2, 7), generator=g)


def _owner(model: nn.Module, param_name: str) -> nn.Module:
    return model.get_submodule(param_name.rpartition(".")[0])


def _input_axis(module: nn.Module) -> int:
    """Axis of ``module.weight`` that multiplies the module's input features (independent of layouts)."""
    if isinstance(module, Conv1D):
        return 0
    assert isinstance(module, nn.Linear), type(module)
    return 1


def _capture(model: nn.Module, module: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The input of ``module`` during a forward pass of ``model`` on ``ids``."""
    seen = []
    handle = module.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        handle.remove()
    assert len(seen) == 1
    return seen[0]


class _perturbed:
    """Add noise to the given slices of a model's parameters; restore on exit."""

    def __init__(self, model: nn.Module, slices, seed: int = 0):
        self.params = dict(model.named_parameters())
        self.slices = list(slices)
        self.seed = seed

    def __enter__(self):
        g = torch.Generator().manual_seed(self.seed)
        self.saved = []
        with torch.no_grad():
            for s in self.slices:
                p = self.params[s.param]
                self.saved.append((p, p.detach().clone()))
                view = p[s.index()]
                view.add_(torch.randn(view.shape, generator=g, dtype=p.dtype))
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for p, old in reversed(self.saved):
                p.copy_(old)


def _group_ranges(pg: ParamGroups) -> dict[tuple[int, int], str]:
    out, start = {}, 0
    names = pg.names
    k = 0
    for run in pg.runs:
        for _ in range(run.count):
            out[(start, start + run.size)] = names[k]
            start += run.size
            k += 1
    return out


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_groups_cover_every_parameter(name):
    model, layout = _model(name), _layout(name)
    _, adapter, model_type, _, _ = MODELS[name]
    assert layout.adapter == adapter
    assert layout.model_type == model_type
    assert layout.num_layers == 2
    params = dict(model.named_parameters())
    assert list(layout.groups) == list(params)
    for pname, pg in layout.groups.items():
        p = params[pname]
        assert 0 <= pg.axis < p.dim(), pname
        assert pg.axis_size == p.shape[pg.axis], (pname, pg, tuple(p.shape))
        assert len(set(pg.names)) == pg.num_groups, pname
        if layer_of(pname) is not None:
            assert layout.param_layers[pname] == layer_of(pname)


@pytest.mark.parametrize("name", WITH_HEADS)
def test_kv_head_mapping_and_counts(name):
    layout = _layout(name)
    _, _, _, H, Hkv = MODELS[name]
    assert [a.layer for a in layout.attention] == [0, 1]
    for att in layout.attention:
        assert (att.num_heads, att.num_kv_heads, att.head_dim) == (H, Hkv, 8)
        assert [h.head for h in att.heads] == list(range(H))
        for h in att.heads:
            assert h.kv_head == h.head // (H // Hkv) == att.kv_head(h.head)
            assert h.q and h.k and h.v and h.o
            for s in h.q + h.k + h.v + h.o:
                assert s.size == 8
                assert layer_of(s.param) == att.layer == layout.layer(s.param)
    assert [b.layer for b in layout.mlp] == [0, 1]
    for block in layout.mlp:
        assert {layer_of(r.param) for r in block.roles} == {block.layer}


@pytest.mark.parametrize("name", WITH_HEADS)
def test_head_slices_are_the_heads_the_model_uses(name):
    model, layout = _model(name), _layout(name)
    ids = _ids()
    for att in layout.attention[-1:]:  # the last layer (slices naming another layer would show up)
        o_name = att.heads[0].o[0].param
        o_mod = _owner(model, o_name)
        in_axis = _input_axis(o_mod)
        hd = att.head_dim
        # HF concatenates the heads' outputs in head order before the output projection.
        for h in att.heads:
            assert [(s.param, s.axis, s.start, s.stop) for s in h.o] == [(o_name, in_axis, h.head * hd, (h.head + 1) * hd)]
        base = _capture(model, o_mod, ids)
        B, T, D = base.shape
        assert att.num_heads * hd == D

        def changed_heads(slices, seed):
            with _perturbed(model, slices, seed):
                new = _capture(model, o_mod, ids)
            diff = (new - base).abs().reshape(B, T, att.num_heads, hd).amax(dim=(0, 1, 3))
            return {h for h in range(att.num_heads) if diff[h] > 1e-9}, diff

        for h in att.heads:
            got, diff = changed_heads(h.q, seed=h.head)
            assert got == {h.head}, (h.head, diff)
            assert all(diff[g] < 1e-12 for g in range(att.num_heads) if g != h.head)
        for kv in range(att.num_kv_heads):
            readers = {h.head for h in att.heads if h.kv_head == kv}
            first = next(h for h in att.heads if h.kv_head == kv)
            for role in ("k", "v"):
                got, diff = changed_heads(getattr(first, role), seed=100 + kv)
                assert got == readers, (role, kv, diff)
        # The O slice of head h multiplies head h's block only.
        for h in att.heads:
            masked = base.clone()
            masked[..., h.head * hd : (h.head + 1) * hd] = 0
            with torch.no_grad():
                ref_masked, ref_full = o_mod(masked), o_mod(base)
                with _perturbed(model, h.o, seed=7):
                    new_masked, new_full = o_mod(masked), o_mod(base)
            torch.testing.assert_close(new_masked, ref_masked, rtol=0, atol=1e-12)
            assert (new_full - ref_full).abs().max() > 1e-6


@pytest.mark.parametrize("name", WITH_HEADS)
def test_mlp_channel_slices(name):
    model, layout = _model(name), _layout(name)
    ids = _ids(1)
    for block in layout.mlp[-1:]:
        *producers, down = block.roles
        down_mod = _owner(model, down.param)
        assert down.axis == _input_axis(down_mod)
        base = _capture(model, down_mod, ids)
        assert base.shape[-1] == block.num_channels
        for c in (0, 13, block.num_channels - 1):
            sl = block.slices(c)
            with _perturbed(model, sl[:-1], seed=c):
                new = _capture(model, down_mod, ids)
            diff = (new - base).abs().amax(dim=(0, 1))
            assert diff[c] > 1e-9
            diff[c] = 0
            assert diff.max() < 1e-12
            masked = base.clone()
            masked[..., c] = 0
            with torch.no_grad():
                ref_masked, ref_full = down_mod(masked), down_mod(base)
                with _perturbed(model, sl[-1:], seed=c):
                    new_masked, new_full = down_mod(masked), down_mod(base)
            torch.testing.assert_close(new_masked, ref_masked, rtol=0, atol=1e-12)
            assert (new_full - ref_full).abs().max() > 1e-6


@pytest.mark.parametrize("name", WITH_HEADS)
def test_groups_agree_with_slices(name):
    """Every head / channel slice is exactly one group of its parameter, labelled by its index."""
    layout = _layout(name)
    for h in layout.heads():
        for role, idx in (("q", h.head), ("k", h.kv_head), ("v", h.kv_head), ("o", h.head)):
            for s in getattr(h, role):
                pg = layout.groups[s.param]
                assert pg.axis == s.axis, (s, pg)
                label = _group_ranges(pg).get((s.start, s.stop))
                assert label is not None and label.endswith(f"_{idx}"), (s, label)
                if role in "qkv" and pg.runs[0].prefix.startswith("q_head_"):  # fused QKV
                    assert label == f"{role}_head_{idx}"
    for block in layout.mlp:
        for c in (0, block.num_channels - 1):
            for s in block.slices(c):
                pg = layout.groups[s.param]
                assert pg.axis == s.axis
                assert _group_ranges(pg)[(s.start, s.stop)] == f"channel_{c}"


@pytest.mark.parametrize("name", WITH_HEADS)
def test_vocab_slices(name):
    model, layout = _model(name), _layout(name)
    params = dict(model.named_parameters())
    emb = model.get_input_embeddings().weight
    names = [s.param for s in layout.vocab]
    assert len(names) == len(set(names))
    assert any(params[n] is emb for n in names)
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is emb
    assert len(names) == (1 if tied else 2)
    for s in layout.vocab:
        assert (s.axis, s.start, s.stop) == (0, 0, tm.VOCAB)
        assert layout.groups[s.param].names[5] == "token_5"


def test_gpt2_position_and_fused_groups():
    layout = _layout("gpt2")
    assert layout.group_names("transformer.wpe.weight")[:2] == ["position_0", "position_1"]
    names = layout.group_names("transformer.h.0.attn.c_attn.weight")
    assert names[:4] == ["q_head_0", "q_head_1", "q_head_2", "q_head_3"]
    assert names[4] == "k_head_0" and names[8] == "v_head_0" and len(names) == 12
    assert layout.groups["transformer.h.0.attn.c_attn.weight"].axis == 1
    assert layout.groups["transformer.h.0.attn.c_attn.bias"].axis == 0
    assert layout.group_names("transformer.h.0.attn.c_proj.bias") == ["all"]
    mha = _layout("gpt_bigcode_mha").group_names("transformer.h.0.attn.c_attn.weight")
    assert mha[:6] == ["q_head_0", "k_head_0", "v_head_0", "q_head_1", "k_head_1", "v_head_1"]


@pytest.mark.parametrize("name", ["lora_llama", "lora_gpt2"])
def test_lora_factors_inherit_groups(name):
    """lora_B rows follow the base's output groups, lora_A columns its input groups (else per rank);
    and the inherited groups are right: perturbing lora_B's head-h rows moves head h only."""
    model, layout = _model(name), _layout(name)
    params = dict(model.named_parameters())
    lora = [n for n in params if ".lora_" in n]
    assert lora
    for n in lora:
        base = n.split(".lora_")[0] + ".base_layer.weight"
        bg, g = layout.groups[base], layout.groups[n]
        base_mod = _owner(model, base)
        out_axis = 1 - _input_axis(base_mod)
        if ".lora_B." in n:
            if bg.axis == out_axis:
                assert (g.axis, g.runs) == (0, bg.runs)
            else:
                assert (g.axis, g.names) == (1, [f"rank_{i}" for i in range(params[n].shape[1])])
        else:
            if bg.axis == 1 - out_axis:
                assert (g.axis, g.runs) == (1, bg.runs)
            else:
                assert (g.axis, g.names) == (0, [f"rank_{i}" for i in range(params[n].shape[0])])
    # numeric check on layer 0: lora_B rows of the group of head h (V rows for GPT-2's fused c_attn)
    att = layout.attention[0]
    h = att.heads[1]
    v_base = h.v[0].param
    lora_b = v_base.replace("base_layer.weight", "lora_B.default.weight")
    ranges = {label: r for r, label in _group_ranges(layout.groups[lora_b]).items()}
    label = f"kv_head_{h.kv_head}" if f"kv_head_{h.kv_head}" in ranges else f"v_head_{h.kv_head}"
    start, stop = ranges[label]
    o_mod = _owner(model, h.o[0].param)
    ids = _ids(2)
    base = _capture(model, o_mod, ids)
    with _perturbed(model, [Slice(lora_b, 0, start, stop)], seed=3):
        new = _capture(model, o_mod, ids)
    diff = (new - base).abs().reshape(*base.shape[:2], att.num_heads, att.head_dim).amax(dim=(0, 1, 3))
    readers = {x.head for x in att.heads if x.kv_head == h.kv_head}
    assert {i for i in range(att.num_heads) if diff[i] > 1e-9} == readers


def test_layout_dict_round_trip():
    for name in ("lora_llama", "gpt_bigcode_mha", "bert_classifier"):
        layout = _layout(name)
        d = json.loads(json.dumps(layout.to_dict()))
        assert ModelLayout.from_dict(d) == layout


def test_generic_rules_and_log_once(caplog):
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 4)
            self.lin = nn.Linear(4, 6)
            self.conv = Conv1D(5, 6)  # weight [6, 5]
            self.norm = nn.LayerNorm(5)
            self.scale = nn.Parameter(torch.tensor(2.0))

    model = Custom()
    generic.reset_log_once()
    with caplog.at_level(logging.INFO, logger="hf_fisher"):
        layout = plugins.model_layout(model)
        plugins.model_layout(model)
        for _ in range(2):
            plugins.model_layout(em.opt()[0])  # a model type no adapter knows: logged once
        plugins.model_layout(em.opt(seed=40)[0])
    msgs = [r.getMessage() for r in caplog.records if "no adapter for model type" in r.getMessage()]
    assert len(msgs) == 2, msgs
    assert sum("opt" in m for m in msgs) == 1
    assert layout.adapter == "generic" and layout.model_type is None
    assert layout.attention == [] and layout.mlp == [] and layout.num_layers == 0
    g = layout.groups
    assert g["emb.weight"] == ParamGroups.per_index(0, 11, "token_")
    assert g["lin.weight"] == ParamGroups.per_index(0, 6, "channel_") == g["lin.bias"]
    assert g["conv.weight"] == ParamGroups.per_index(1, 5, "channel_")
    assert g["conv.bias"] == ParamGroups.per_index(0, 5, "channel_")
    assert g["norm.weight"] == ParamGroups.single(0, 5) == g["norm.bias"]
    assert g["scale"] == ParamGroups.single(0, 1)
    bert = _layout("bert_classifier")
    assert bert.num_layers == 2
    assert bert.group_names("classifier.weight") == ["channel_0", "channel_1", "channel_2"]
