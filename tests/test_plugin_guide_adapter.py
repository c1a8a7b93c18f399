"""The adapter example of plugins/README.md runs as written and is exact.

The ``python`` block after "A complete example" is extracted from the guide, run as a module,
and registered as a plugin; on a tiny OPT (no built-in adapter) its layout must give the
brute-force Fisher (:mod:`hf_fisher.testing`) at parameter and group level, head and channel
totals that agree between the two, and zeroing a head's / channel's slices must remove exactly
that unit. The guide's claim that structure without groups is not enough is checked too.
"""

from __future__ import annotations

import re
import types
from pathlib import Path

import pytest
import torch

import hf_fisher
from hf_fisher import plugins
from hf_fisher.errors import UnsupportedError
from hf_fisher.testing import assert_fisher_close, per_sample_fisher

import extra_models as em
import tiny_models as tm

pytestmark = pytest.mark.usefixtures("one_thread")

GUIDE = Path(__file__).resolve().parent.parent / "plugins" / "README.md"


def guide_example() -> str:
    text = GUIDE.read_text(encoding="utf-8")
    after = text.split("**A complete example**", 1)[1]
    return re.search(r"```python\n(.*?)```", after, re.S).group(1)


def load_guide_adapter() -> types.ModuleType:
    module = types.ModuleType("guide_opt_adapter")
    exec(compile(guide_example(), str(GUIDE), "exec"), module.__dict__)
    return module


@pytest.fixture(autouse=True)
def fresh_manager():
    plugins.reset()
    yield
    plugins.reset()


@pytest.fixture
def opt():
    return em.opt()[0]


def _batches(side):
    return [
        tm.padded_batch([5, 3, 7], seed=1, side=side, vocab=em.VOCAB),
        tm.padded_batch([6, 4, 2], seed=2, side=side, vocab=em.VOCAB),
    ]


def test_opt_has_no_other_adapter(opt):
    assert plugins.model_layout(opt).adapter == "generic"


@pytest.mark.parametrize("side", ["right", "left"])
def test_guide_adapter_is_used_and_exact(opt, side):
    plugins.register(load_guide_adapter(), name="guide_opt")
    layout = plugins.model_layout(opt)
    assert layout.adapter == "my_opt" and layout.num_layers == 2
    assert [(a.layer, a.num_heads, a.head_dim) for a in layout.attention] == [(0, 4, 8), (1, 4, 8)]
    assert [(m.layer, m.num_channels) for m in layout.mlp] == [(0, 40), (1, 40)]
    assert [s.param for s in layout.vocab] == ["model.decoder.embed_tokens.weight"]
    assert layout.groups["model.decoder.layers.1.self_attn.out_proj.weight"].axis == 1
    assert {d["name"]: d["model_types"] for d in plugins.describe() if d["kind"] == "adapter"}["guide_opt"] == ["opt"]

    batches = _batches(side)
    ref = per_sample_fisher(opt, batches, groups=layout.groups)
    param = hf_fisher.collect(opt, batches, reduction="param", task_type="causal_lm", progress=False)
    group = hf_fisher.collect(opt, batches, reduction="group", task_type="causal_lm", progress=False)
    assert group.layout.adapter == "my_opt"
    assert_fisher_close(param, ref)
    assert_fisher_close(group, ref)
    for unit in ("head_importance", "channel_importance"):
        p, g = getattr(param, unit)(), getattr(group, unit)()
        assert set(p) == set(g) and len(p) == (8 if unit == "head_importance" else 80)
        for key in p:
            assert g[key] == pytest.approx(p[key], rel=1e-9)


def test_guide_slices_ablate_exactly_their_unit(opt):
    plugins.register(load_guide_adapter(), name="guide_opt")
    layout = plugins.model_layout(opt)
    params = dict(opt.named_parameters())
    ids = tm.padded_batch([7], seed=3, vocab=em.VOCAB)["input_ids"]
    att = opt.model.decoder.layers[1].self_attn
    seen = {}
    att.out_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].detach().clone()))
    with torch.no_grad():
        opt(input_ids=ids)
        before = seen["x"]
        head = layout.attention[1].heads[2]
        for s in (*head.q, *head.k, *head.v):
            params[s.param][s.index()] = 0.0
        opt(input_ids=ids)
    after = seen["x"]  # the per-head context vectors entering out_proj, [1, T, H*hd]
    hd = layout.attention[1].head_dim
    changed = (after - before).abs().amax(dim=(0, 1)).reshape(-1, hd).amax(-1)
    assert changed[2] > 0 and (changed[[0, 1, 3]] == 0).all()


def test_structure_without_groups_is_not_enough_for_a_group_fisher(opt):
    """What the guide says: drop the set_groups lines and a group Fisher cannot give head totals."""
    code = re.sub(r"b\.set_groups\(.*\)", "pass", guide_example())
    assert code != guide_example()
    module = types.ModuleType("guide_opt_no_groups")
    exec(compile(code, "guide-without-set_groups", "exec"), module.__dict__)
    plugins.register(module, name="guide_opt_no_groups")
    group = hf_fisher.collect(opt, _batches("right"), reduction="group", task_type="causal_lm", progress=False)
    with pytest.raises(UnsupportedError, match="cannot be split that way"):
        group.head_importance()
    param = hf_fisher.collect(opt, _batches("right"), reduction="param", task_type="causal_lm", progress=False)
    assert len(param.head_importance()) == 8
