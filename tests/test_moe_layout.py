"""Mixture-of-experts layouts (Mixtral, Qwen2-MoE, Qwen3-MoE in transformers 5) and multi-axis groups.

The fused expert tensors ``gate_up_proj [E, 2I, d]`` and ``down_proj [E, d, I]`` are grouped over
two axes at once (expert, row) and (expert, column). Checked here: the layouts (names, counts,
axes, JSON), the multi-axis ``ParamGroups`` algebra (``reduce`` / ``reduce_axis`` / ``expand``,
the engine's flattened per-index convention), that the groups are the slices the HF forward uses
(zeroing an expert channel's gate row, up row or down column gives the same output; perturbing
expert e changes only the tokens routed to e), and the expert totals of ``analysis``. Nothing
here needs the engine to compute an MoE Fisher: the Fishers are built from tensors.
"""

from __future__ import annotations

import json
import logging
import math
from functools import cache

import pytest
import torch
import transformers as tf

from hf_fisher import analysis, plugins
from hf_fisher.architectures import moe
from hf_fisher.architectures.builder import LayoutBuilder
from hf_fisher.artifacts.fisher import Counts, Fisher, FisherMetadata
from hf_fisher.errors import InvalidInputError, PluginError, UnsupportedError
from hf_fisher.layout import ExpertBlock, GroupRun, ModelLayout, ParamGroups, Slice, layer_of

import extra_models as em

# name -> (factory, model_type, experts E, channels per expert I, shared expert channels or None, has qk norm)
MODELS = {
    "mixtral": (em.mixtral, "mixtral", 4, 40, None, False),
    "qwen2_moe": (em.qwen2_moe, "qwen2_moe", 4, 24, 40, False),
    "qwen3_moe": (em.qwen3_moe, "qwen3_moe", 4, 24, None, True),
}
L0 = "model.layers.0.mlp."


pytestmark = pytest.mark.usefixtures("one_thread")


@cache
def _model(name: str):
    return MODELS[name][0]()[0]


@cache
def _layout(name: str) -> ModelLayout:
    return plugins.model_layout(_model(name))


def _lora(name: str):
    import peft

    return peft.get_peft_model(
        MODELS[name][0]()[0],
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )


def _param_fisher(model, layout, seed=0) -> Fisher:
    g = torch.Generator().manual_seed(seed)
    mean = {n: torch.rand(p.shape, generator=g, dtype=torch.float64) for n, p in model.named_parameters()}
    return Fisher(
        mean, None, reduction="param", groups=None,
        param_shapes={n: tuple(p.shape) for n, p in model.named_parameters()},
        counts=Counts(samples=8, tokens=80), metadata=FisherMetadata(task="t", reduction="param"), layout=layout,
    )


# ---------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("name", list(MODELS))
def test_layout_groups_names_and_axes(name):
    model, layout = _model(name), _layout(name)
    _, model_type, E, I, shared, qk_norm = MODELS[name]
    assert (layout.adapter, layout.model_type, layout.num_layers) == ("moe", model_type, 2)
    params = dict(model.named_parameters())
    assert list(layout.groups) == list(params)
    for pname, pg in layout.groups.items():
        assert pg.fits(tuple(params[pname].shape)), (pname, pg.axes, tuple(params[pname].shape))
        assert pg.axis_size == pg.group_axes_size(params[pname].shape)
        assert len(set(pg.names)) == pg.num_groups, pname
        if layer_of(pname) is not None:
            assert layout.param_layers[pname] == layer_of(pname)
    for l in range(2):
        p = f"model.layers.{l}.mlp."
        gu, down, router = layout.groups[p + "experts.gate_up_proj"], layout.groups[p + "experts.down_proj"], layout.groups[p + "gate.weight"]
        assert params[p + "experts.gate_up_proj"].shape == (E, 2 * I, 32)
        assert gu.axes == (0, 1) and gu.axis == 0 and gu.extra_axes == (1,) and gu.num_groups == E * 2 * I
        assert gu.names[3 * 2 * I + 5] == "expert3.gate_5" and gu.names[3 * 2 * I + I + 5] == "expert3.up_5"
        assert gu.names[0] == "expert0.gate_0" and gu.names[-1] == f"expert{E - 1}.up_{I - 1}"
        assert down.axes == (0, 2) and down.num_groups == E * I
        assert down.names[3 * I + 5] == "expert3.channel_5"
        assert router.axes == (0,) and router.names == [f"expert{e}" for e in range(E)]
        assert all(r.size == 1 for r in gu.runs + down.runs + router.runs)
        assert layout.param_layers[p + "experts.gate_up_proj"] == l
    # attention as in the llama adapter (4 heads, 2 kv-heads of 8)
    assert [(a.layer, a.num_heads, a.num_kv_heads, a.head_dim) for a in layout.attention] == [(0, 4, 2, 8), (1, 4, 2, 8)]
    assert layout.groups["model.layers.0.self_attn.k_proj.weight"].names == ["kv_head_0", "kv_head_1"]
    assert layout.groups["model.layers.0.self_attn.o_proj.weight"].axes == (1,)
    assert [s.param for s in layout.vocab] == ["model.embed_tokens.weight", "lm_head.weight"]
    assert ("model.layers.0.self_attn.q_norm.weight" in layout.groups) == qk_norm
    # experts
    assert [b.layer for b in layout.experts] == [0, 1]
    for b in layout.experts:
        p = f"model.layers.{b.layer}.mlp."
        assert (b.num_experts, b.num_channels, b.top_k) == (E, I, 2)
        assert b.router == p + "gate.weight" and b.router_axis == 0
        assert [(r.role, r.param, r.expert_axis, r.channel_axis, r.offset) for r in b.roles] == [
            ("gate", p + "experts.gate_up_proj", 0, 1, 0),
            ("up", p + "experts.gate_up_proj", 0, 1, I),
            ("down", p + "experts.down_proj", 0, 2, 0),
        ]
        assert b.params() == [p + "experts.gate_up_proj", p + "experts.down_proj"]
    # dense shared expert (Qwen2-MoE) is an ordinary MLP
    if shared is None:
        assert layout.mlp == []
    else:
        assert [(b.layer, b.num_channels) for b in layout.mlp] == [(0, shared), (1, shared)]
        assert [(r.param, r.axis) for r in layout.mlp[0].roles] == [
            (L0 + "shared_expert.gate_proj.weight", 0),
            (L0 + "shared_expert.up_proj.weight", 0),
            (L0 + "shared_expert.down_proj.weight", 1),
        ]
        assert layout.groups[L0 + "shared_expert.down_proj.weight"].names[7] == "channel_7"
        sg = layout.groups[L0 + "shared_expert_gate.weight"]
        assert sg.num_groups == 1 and sg.axes == (0,)


@pytest.mark.parametrize("name", list(MODELS))
def test_layout_json_round_trip(name):
    layout = _layout(name)
    d = json.loads(json.dumps(layout.to_dict()))
    assert d["groups"][L0 + "experts.gate_up_proj"]["extra_axes"] == [1]
    assert "extra_axes" not in d["groups"][L0 + "gate.weight"]  # single-axis dicts unchanged
    back = ModelLayout.from_dict(d)
    assert back == layout
    assert back.experts[0] == ExpertBlock.from_dict(layout.experts[0].to_dict())


def test_old_layout_dict_without_experts_loads():
    d = _layout("mixtral").to_dict()
    del d["experts"]
    for g in d["groups"].values():
        g.pop("extra_axes", None)
    back = ModelLayout.from_dict(d)
    assert back.experts == []
    assert back.groups[L0 + "experts.gate_up_proj"].extra_axes == ()


def test_moe_adapter_registered_before_generic():
    adapters = [d["name"] for d in plugins.describe() if d["kind"] == "adapter"]
    mods = [d["plugin"] for d in plugins.describe() if d["kind"] == "adapter"]
    assert any("moe" in a for a in adapters + mods)
    assert plugins.BUILTIN_PLUGINS.index("hf_fisher.architectures.moe") < plugins.BUILTIN_PLUGINS.index(
        "hf_fisher.architectures.generic"
    )


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_peft_wrapped(name):
    model = _lora(name)
    layout = plugins.model_layout(model)
    assert layout.adapter == "moe"
    params = dict(model.named_parameters())
    assert list(layout.groups) == list(params)
    prefix = "base_model.model.model.layers.0."
    assert layout.groups[prefix + "mlp.experts.gate_up_proj"].axes == (0, 1)
    assert layout.groups[prefix + "self_attn.q_proj.base_layer.weight"].names == [f"head_{h}" for h in range(4)]
    assert layout.experts[0].router == prefix + "mlp.gate.weight"
    assert layout.experts[0].params() == [prefix + "mlp.experts.gate_up_proj", prefix + "mlp.experts.down_proj"]
    lora_b = [n for n in params if "q_proj.lora_B" in n and ".layers.0." in n][0]
    assert layout.groups[lora_b].names == [f"head_{h}" for h in range(4)]  # inherited from the base weight


def test_dense_layers_of_qwen2_moe():
    torch.manual_seed(0)
    cfg = tf.Qwen2MoeConfig(
        **dict(em.DECODER, num_key_value_heads=2), num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
        shared_expert_intermediate_size=40, decoder_sparse_step=1, mlp_only_layers=[1],
    )
    model = tf.Qwen2MoeForCausalLM(cfg).eval()
    layout = plugins.model_layout(model)
    assert [b.layer for b in layout.experts] == [0]
    assert [(b.layer, b.num_channels) for b in layout.mlp] == [(0, 40), (1, 40)]  # shared expert, dense MLP
    assert layout.groups["model.layers.1.mlp.down_proj.weight"].names[3] == "channel_3"


def test_unknown_expert_storage_keeps_generic_groups(caplog):
    model = em.mixtral()[0]
    for layer in model.model.layers:
        layer.mlp.experts.is_transposed = True
    with caplog.at_level(logging.WARNING, logger="hf_fisher.architectures.moe"):
        layout = plugins.model_layout(model)
    assert layout.adapter == "moe" and layout.experts == []
    assert "generic groups" in caplog.text
    assert layout.groups[L0 + "experts.gate_up_proj"].num_groups == 1
    assert len(layout.attention) == 2


# ---------------------------------------------------------------------------- ParamGroups algebra
def test_param_groups_api_and_dict_round_trip():
    pg = moe.expert_row_groups(4, 6)
    assert pg.axes == (0, 1) and pg.axis == 0 and pg.extra_axes == (1,)
    assert pg.axis_size == 4 * 12 and pg.num_groups == 48
    assert pg.group_axes_size((4, 12, 32)) == 48 and pg.fits((4, 12, 32))
    assert not pg.fits((4, 13, 32)) and pg.group_axes_size((4,)) is None
    d = json.loads(json.dumps(pg.to_dict()))
    assert d["extra_axes"] == [1]
    back = ParamGroups.from_dict(d)
    assert back == pg and back.extra_axes == (1,) and back.names == pg.names
    # backward compatible: an old single-axis dict (no extra_axes) loads, and single-axis dicts stay as they were
    old = {"axis": 1, "runs": [{"prefix": "head_", "count": 4, "size": 8, "first": 0}]}
    assert ParamGroups.from_dict(old) == ParamGroups(1, (GroupRun("head_", 4, 8),))
    assert ParamGroups.from_dict(old).to_dict() == old
    assert ParamGroups(0, (GroupRun("x", 2, 1),), [2]).extra_axes == (2,)  # lists are normalised
    with pytest.raises(ValueError):
        ParamGroups(0, (GroupRun("x", 2, 1),), extra_axes=(0,))
    with pytest.raises(ValueError):
        ParamGroups(-1, (GroupRun("x", 2, 1),))


@pytest.mark.parametrize("axes", [(0, 1), (1, 0), (0, 2), (2, 1), (0, 1, 2), (1,)])
def test_reduce_reduce_axis_expand_consistency(axes):
    shape = (3, 8, 5)
    size = math.prod(shape[a] for a in axes)
    # irregular runs covering the flat index: sizes 1, then 3s, then a remainder
    n1 = size // 4
    rest = size - n1
    runs = [GroupRun("a_", n1, 1), GroupRun("b_", rest // 3, 3)]
    if rest % 3:
        runs.append(GroupRun("c", 1, rest % 3))
    pg = ParamGroups(axes[0], tuple(runs), extra_axes=axes[1:])
    assert pg.fits(shape) and not pg.is_uniform()
    g = torch.Generator().manual_seed(1)
    c = torch.rand((6, *shape), generator=g, dtype=torch.float64)
    red = pg.reduce(c, batch_dims=1)
    assert red.shape == (6, pg.num_groups)
    # mass preserved
    assert torch.allclose(red.sum(1), c.sum((1, 2, 3)), rtol=1e-12)
    # the engine's convention: per-index values flattened in C order over `axes`
    other = [d + 1 for d in range(3) if d not in axes]
    kept = c.sum(other) if other else c
    ascending = sorted(axes)
    per_index = kept.permute(0, *[1 + ascending.index(a) for a in axes]).reshape(6, -1)
    assert torch.allclose(pg.flat_index_values(c, 1), per_index, rtol=1e-12)
    assert torch.allclose(red, pg.reduce_axis(per_index), rtol=1e-12)
    if list(axes) == ascending:  # the plain `c.sum(other dims).flatten(1)` form
        assert torch.allclose(red, pg.reduce_axis(kept.flatten(1)), rtol=1e-12)
    # a uniform partition of the same axes agrees with the irregular one where they coincide
    uni = ParamGroups(axes[0], (GroupRun("u_", size, 1),), extra_axes=axes[1:])
    assert torch.allclose(uni.reduce(c, 1), per_index, rtol=1e-12)
    # no batch dims
    assert torch.allclose(pg.reduce(c[2]), red[2], rtol=1e-12)
    # expand: every element gets its group's value; spread=True sums back to the group values
    v = red[0]
    full = pg.expand(v, shape)
    assert full.shape == shape
    per_pos = v[pg.index()]
    assert torch.allclose(pg.flat_index_values(full), per_pos * math.prod(shape[d] for d in range(3) if d not in axes))
    spread = pg.expand(v, shape, spread=True)
    assert torch.allclose(pg.reduce(spread), v, rtol=1e-12)
    assert float(spread.sum()) == pytest.approx(float(v.sum()), rel=1e-12)
    # the element -> group map agrees between expand and reduce: expanding one-hot group values
    for gid in (0, pg.num_groups // 2, pg.num_groups - 1):
        onehot = torch.zeros(pg.num_groups, dtype=torch.float64)
        onehot[gid] = 1.0
        mask = pg.expand(onehot, shape)
        assert float(pg.reduce(c[0] * mask)[gid]) == pytest.approx(float(red[0, gid]), rel=1e-12)
        assert float((c[0] * mask).sum()) == pytest.approx(float(red[0, gid]), rel=1e-12)


def test_groups_are_the_right_slices_of_a_param_shaped_tensor():
    E, I, d = 4, 6, 5
    c = torch.rand(E, 2 * I, d, dtype=torch.float64)
    pg = moe.expert_row_groups(E, I)
    red = pg.reduce(c)
    names = pg.names
    assert float(red[names.index("expert3.up_5")]) == pytest.approx(float(c[3, I + 5, :].sum()), rel=1e-12)
    assert float(red[names.index("expert3.gate_5")]) == pytest.approx(float(c[3, 5, :].sum()), rel=1e-12)
    assert float(red[names.index("expert1.gate_0")]) == pytest.approx(float(c[1, 0, :].sum()), rel=1e-12)
    assert torch.allclose(red.reshape(E, 2 * I), c.sum(-1), rtol=1e-12)
    cd = torch.rand(E, d, I, dtype=torch.float64)
    pd = moe.expert_column_groups(E, I)
    rd = pd.reduce(cd)
    assert float(rd[pd.names.index("expert3.channel_5")]) == pytest.approx(float(cd[3, :, 5].sum()), rel=1e-12)
    assert torch.allclose(rd.reshape(E, I), cd.sum(1), rtol=1e-12)
    # expand puts each value on exactly its slice
    ex = pd.expand(rd, cd.shape)
    assert torch.allclose(ex[3, :, 5], rd[3 * I + 5].expand(d))
    # batched, as the engine's dense path calls it
    cb = torch.rand(2, E, 2 * I, d, dtype=torch.float64)
    assert torch.allclose(pg.reduce(cb, batch_dims=1), cb.sum(-1).reshape(2, -1), rtol=1e-12)


# ---------------------------------------------------------------------------- the slices the HF forward uses
def _role_index(role, expert: int, channel: int | None) -> tuple:
    idx: list = [slice(None)] * 3
    idx[role.expert_axis] = expert
    if channel is not None:
        idx[role.channel_axis] = role.offset + channel
    return tuple(idx)


@pytest.mark.parametrize("name", list(MODELS))
def test_expert_slices_against_the_forward(name):
    model, layout = _model(name), _layout(name)
    block = layout.experts[0]
    params = dict(model.named_parameters())
    mlp = model.get_submodule(block.router.rpartition(".")[0].rpartition(".")[0])  # model.layers.0.mlp
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 24, 32, generator=g, dtype=torch.float64)
    with torch.no_grad():
        base = mlp(x)
        top = mlp.gate(x.reshape(-1, 32))[2]  # [tokens, top_k] expert indices
    routed = lambda e: (top == e).any(-1)
    e, ch = 2, 5
    assert routed(e).any() and (~routed(e)).any()

    def out_with(changes):
        saved = []
        with torch.no_grad():
            for pname, index, fn in changes:
                p = params[pname]
                saved.append((p, p.detach().clone()))
                fn(p[index])
            try:
                return mlp(x)
            finally:
                for p, old in reversed(saved):
                    p.copy_(old)

    # expert e's weights (all of its roles) only matter for the tokens routed to e
    noise = lambda v: v.add_(torch.randn(v.shape, generator=g, dtype=v.dtype))
    changed = out_with([(r.param, _role_index(r, e, None), noise) for r in block.roles])
    diff = (changed - base).abs().reshape(-1, 32).amax(-1)
    assert bool((diff[routed(e)] > 1e-9).all()) and bool((diff[~routed(e)] == 0).all())
    # channel ch of expert e: zeroing its gate row, its up row or its down column removes the same
    # contribution (silu(0) = 0), so the three role slices are one channel
    outs = {r.role: out_with([(r.param, _role_index(r, e, ch), torch.Tensor.zero_)]) for r in block.roles}
    assert not torch.allclose(outs["down"], base)
    assert torch.allclose(outs["gate"], outs["down"], atol=1e-12)
    assert torch.allclose(outs["up"], outs["down"], atol=1e-12)
    # a different channel is not the same one
    other = out_with([(block.roles[0].param, _role_index(block.roles[0], e, ch + 1), torch.Tensor.zero_)])
    assert not torch.allclose(other, outs["down"])
    # the router row of expert e is the router logit of expert e
    with torch.no_grad():
        logits = mlp.gate(x.reshape(-1, 32))[0]
    assert torch.allclose(logits[:, e], x.reshape(-1, 32) @ params[block.router][e])


# ---------------------------------------------------------------------------- expert totals
@pytest.fixture(scope="module")
def qwen2_fisher():
    return _param_fisher(_model("qwen2_moe"), _layout("qwen2_moe"))


@pytest.mark.parametrize("name", list(MODELS))
def test_expert_importance_hand_sums_param_and_group(name):
    model, layout = _model(name), _layout(name)
    f = _param_fisher(model, layout, seed=4)
    E, I = MODELS[name][2], MODELS[name][3]
    imp = f.expert_importance()
    assert sorted(imp) == [(l, e) for l in range(2) for e in range(E)]
    with_router = f.expert_importance(include_router=True)
    chans = f.expert_channel_importance()
    assert len(chans) == 2 * E * I
    for l in range(2):
        p = f"model.layers.{l}.mlp."
        gu, down, router = f[p + "experts.gate_up_proj"], f[p + "experts.down_proj"], f[p + "gate.weight"]
        for e in range(E):
            want = float(gu[e].sum() + down[e].sum())
            assert imp[(l, e)] == pytest.approx(want, rel=1e-12)
            assert with_router[(l, e)] == pytest.approx(want + float(router[e].sum()), rel=1e-12)
            for c in (0, 5, I - 1):
                hand = float(gu[e, c].sum() + gu[e, I + c].sum() + down[e, :, c].sum())
                assert chans[(l, e, c)] == pytest.approx(hand, rel=1e-12)
            assert sum(chans[(l, e, c)] for c in range(I)) == pytest.approx(want, rel=1e-12)
    # the same from the group view, and from a slice over the expert axis
    gv = f.to_groups()
    assert gv.reduction == "group"
    gi, gr, gc = gv.expert_importance(), gv.expert_importance(include_router=True), gv.expert_channel_importance()
    for k in imp:
        assert gi[k] == pytest.approx(imp[k], rel=1e-12) and gr[k] == pytest.approx(with_router[k], rel=1e-12)
    for k in chans:
        assert gc[k] == pytest.approx(chans[k], rel=1e-12)
    s = Slice("model.layers.1.mlp.experts.gate_up_proj", 0, 1, 3)
    assert analysis.slice_value(gv, s) == pytest.approx(analysis.slice_value(f, s), rel=1e-12)
    # the router rows are available by group name
    rname = "model.layers.0.mlp.gate.weight"
    assert float(gv[rname][gv.group_names(rname).index("expert3")]) == pytest.approx(float(f[rname][3].sum()), rel=1e-12)
    # mass of each expert parameter is preserved by the group view
    for n in layout.experts[0].params():
        assert float(gv[n].sum()) == pytest.approx(float(f[n].sum()), rel=1e-12)
    # heads still work on an MoE layout
    assert len(gv.head_importance()) == 8


def test_group_fisher_artifact_round_trip_and_shared_expert(qwen2_fisher, tmp_path):
    gv = qwen2_fisher.to_groups()
    g = Fisher(
        gv.means, None, reduction="group", groups=None, param_shapes=gv.param_shapes, counts=gv.counts,
        metadata=gv.metadata, layout=gv.layout,
    )  # groups taken from the layout
    assert g.groups[L0 + "experts.down_proj"].axes == (0, 2)
    g.save_pretrained(tmp_path / "f")
    back = Fisher.from_pretrained(tmp_path / "f", model=_model("qwen2_moe"))
    assert back.groups == g.groups and back.layout == g.layout
    assert back.expert_importance() == pytest.approx(qwen2_fisher.expert_importance())
    # the shared expert is the layout's MLP: channel totals from group and param Fisher agree
    assert back.channel_importance() == pytest.approx(qwen2_fisher.channel_importance())
    f = qwen2_fisher
    c = 7
    hand = float(
        f[L0 + "shared_expert.gate_proj.weight"][c].sum() + f[L0 + "shared_expert.up_proj.weight"][c].sum()
        + f[L0 + "shared_expert.down_proj.weight"][:, c].sum()
    )
    assert back.channel_importance()[(0, c)] == pytest.approx(hand, rel=1e-12)


def test_multi_axis_misfits_and_unsupported_splits(qwen2_fisher):
    f = qwen2_fisher
    name = L0 + "experts.gate_up_proj"
    shape = f.param_shapes[name]
    bad = ParamGroups(0, (GroupRun("x_", shape[0] * shape[1], 1),), extra_axes=(2,))  # sized for axes (0, 1)
    assert not bad.fits(shape) and ParamGroups(0, bad.runs, extra_axes=(1,)).fits(shape)
    gv = f.to_groups()
    with pytest.raises(InvalidInputError, match="axes"):
        Fisher(
            {name: torch.zeros(bad.num_groups, dtype=torch.float64)}, None, reduction="group",
            groups={name: bad},
            param_shapes={name: shape}, counts=f.counts, metadata=gv.metadata,
        )
    b = LayoutBuilder(_model("qwen2_moe"), adapter="test")
    p = _model("qwen2_moe").model.layers[0].mlp.experts.gate_up_proj
    with pytest.raises(PluginError, match="axes"):
        b.set_groups(p, ParamGroups(0, (GroupRun("x_", 5, 1),), extra_axes=(1,)))
    # a slice that cuts through (expert, row) groups, or runs along an axis the groups sum over
    with pytest.raises(UnsupportedError):
        analysis.slice_value(gv, Slice(name, 2, 0, 3))
    # groups spanning experts cannot give expert totals
    coarse = {n: ParamGroups.single(0, s[0] if s else 1) for n, s in f.param_shapes.items()}
    with pytest.raises(UnsupportedError):
        f.to_groups(coarse).expert_importance()
    with pytest.raises(UnsupportedError):
        f.to_groups(coarse).expert_channel_importance()


def test_expert_importance_needs_experts():
    import tiny_models as tm

    model = tm.llama()
    f = _param_fisher(model, plugins.model_layout(model))
    with pytest.raises(InvalidInputError, match="mixture-of-experts"):
        f.expert_importance()
