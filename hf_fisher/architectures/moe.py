"""Built-in adapter for LLaMA-like mixture-of-experts models: mixtral, qwen2_moe, qwen3_moe.

Transformers 5 stores the routed experts of a layer as fused 3-D parameters (E experts, I
channels per expert, hidden size d); every group below is the *sum* of the parameter's Fisher
over the named slice (mass preserving):

- ``mlp.experts.gate_up_proj`` ``[E, 2I, d]``: expert ``e`` computes
  ``gate, up = F.linear(x, gate_up_proj[e]).chunk(2, -1)``, so rows ``0..I-1`` of expert ``e``
  are its gate rows and rows ``I..2I-1`` its up rows. Groups run over axes ``(0, 1)``
  (expert, row), flattened: ``E * 2I`` groups ``expert{e}.gate_{c}`` (row ``c`` of expert ``e``,
  summed over its d elements) and ``expert{e}.up_{c}`` (row ``I + c``).
- ``mlp.experts.down_proj`` ``[E, d, I]``: channel ``c`` of expert ``e`` is column ``c`` of
  ``down_proj[e]``. Groups over axes ``(0, 2)`` (expert, column): ``expert{e}.channel_{c}``
  (summed over the d rows).
- biases of the experts, when a model has them (``gate_up_proj_bias [E, 2I]``: the same labels on
  axes (0, 1); ``down_proj_bias [E, d]``: one group ``expert{e}`` per expert).
- ``mlp.gate.weight`` (the router) ``[E, d]``: one group ``expert{e}`` per row (the router
  logit of expert ``e``).
- Qwen2-MoE's dense ``mlp.shared_expert`` (``gate_proj``/``up_proj``/``down_proj``
  ``nn.Linear``): an ordinary MLP, groups ``channel_{c}`` (gate/up row, down column);
  ``mlp.shared_expert_gate`` (``nn.Linear(d, 1)``): one group.
- dense layers (Qwen's ``mlp_only_layers`` / ``decoder_sparse_step``): an ordinary MLP.
- attention as in :mod:`~hf_fisher.architectures.llama`: ``q_proj`` rows ``head_{h}``,
  ``k_proj``/``v_proj`` rows ``kv_head_{j}`` (GQA: head ``h`` reads kv-head ``h // (H / Hkv)``),
  ``o_proj`` columns ``head_{h}``; biases alike; Qwen3's ``q_norm``/``k_norm`` one group each.
- ``embed_tokens`` / ``lm_head`` rows ``token_{v}``; norms one group.

The layout's :attr:`~hf_fisher.layout.ModelLayout.experts` lists, per MoE layer, an
:class:`~hf_fisher.layout.ExpertBlock` with roles "gate" (gate_up_proj, channel axis 1,
offset 0), "up" (channel axis 1, offset I) and "down" (down_proj, channel axis 2), and the
router. The shared expert and dense MLPs are :class:`~hf_fisher.layout.ChannelBlock`\\ s in
``mlp``. Experts stored differently (e.g. ``is_transposed`` implementations) keep the generic
groups and no :class:`ExpertBlock` (a warning is logged); the rest of the layout still applies.
"""

from __future__ import annotations

import logging
from typing import Any

from hf_fisher.architectures import llama
from hf_fisher.architectures.builder import LayoutBuilder, model_type_of
from hf_fisher.hookspecs import hookimpl
from hf_fisher.layout import GroupRun, ModelLayout, ParamGroups

logger = logging.getLogger(__name__)

MODEL_TYPES = frozenset({"mixtral", "qwen2_moe", "qwen3_moe"})
ADAPTER = "moe"

__all__ = ["ADAPTER", "MODEL_TYPES", "expert_column_groups", "expert_row_groups", "hf_fisher_model_layout"]


def _bias(module: Any):
    return getattr(module, "bias", None)


def expert_row_groups(num_experts: int, num_channels: int) -> ParamGroups:
    """Groups of a fused ``gate_up_proj [E, 2I, d]`` over axes (0, 1): per expert, ``I`` groups
    ``expert{e}.gate_{c}`` (row ``c``) then ``I`` groups ``expert{e}.up_{c}`` (row ``I + c``)."""
    runs = []
    for e in range(num_experts):
        runs.append(GroupRun(f"expert{e}.gate_", num_channels, 1))
        runs.append(GroupRun(f"expert{e}.up_", num_channels, 1))
    return ParamGroups(0, tuple(runs), extra_axes=(1,))


def expert_column_groups(num_experts: int, num_channels: int, channel_axis: int = 2) -> ParamGroups:
    """Groups of a ``down_proj [E, d, I]`` over axes (0, ``channel_axis``): ``expert{e}.channel_{c}``."""
    runs = tuple(GroupRun(f"expert{e}.channel_", num_channels, 1) for e in range(num_experts))
    return ParamGroups(0, runs, extra_axes=(channel_axis,))


def _experts(b: LayoutBuilder, l: int, mlp: Any, hidden: int) -> bool:
    """Groups and :class:`ExpertBlock` of the routed experts of ``mlp`` (False: not recognised)."""
    experts, router = getattr(mlp, "experts", None), getattr(mlp, "gate", None)
    gu, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    rw = getattr(router, "weight", None)
    if gu is None or down is None or rw is None or gu.dim() != 3 or down.dim() != 3 or rw.dim() != 2:
        return False
    E, two_i = int(gu.shape[0]), int(gu.shape[1])
    I = two_i // 2
    expected = ((E, 2 * I, hidden), (E, hidden, I), (E, hidden))
    if getattr(experts, "is_transposed", False) or two_i % 2 or (tuple(gu.shape), tuple(down.shape), tuple(rw.shape)) != expected:
        logger.warning(
            "%s layer %d: expert shapes gate_up_proj %s, down_proj %s, router %s are not the "
            "[E, 2I, d], [E, d, I], [E, d] layout this adapter knows; the experts keep generic groups",
            b.model_type, l, tuple(gu.shape), tuple(down.shape), tuple(rw.shape),
        )
        return False
    b.set_groups(gu, expert_row_groups(E, I), layer=l)
    b.set_groups(down, expert_column_groups(E, I), layer=l)
    gub, db = getattr(experts, "gate_up_proj_bias", None), getattr(experts, "down_proj_bias", None)
    if gub is not None and tuple(gub.shape) == (E, 2 * I):
        b.set_groups(gub, expert_row_groups(E, I), layer=l)
    else:
        gub = None
    if db is not None and tuple(db.shape) == (E, hidden):
        b.set_groups(db, ParamGroups.per_index(0, E, "expert"), layer=l)
    else:
        db = None
    b.set_groups(rw, ParamGroups.per_index(0, E, "expert"), layer=l)
    rb = _bias(router)
    if rb is not None and tuple(rb.shape) == (E,):
        b.set_groups(rb, ParamGroups.per_index(0, E, "expert"), layer=l)
    b.add_experts(
        l,
        E,
        I,
        [
            ("gate", gu, 0, 1, 0),
            ("up", gu, 0, 1, I),
            ("down", down, 0, 2, 0),
            ("gate_bias", gub, 0, 1, 0),
            ("up_bias", gub, 0, 1, I),
            ("down_bias", db, 0, None),
        ],
        router=rw,
        router_axis=0,
        top_k=getattr(router, "top_k", None) or getattr(b.config, "num_experts_per_tok", None),
    )
    return True


@hookimpl
def hf_fisher_model_layout(model: Any) -> ModelLayout | None:
    """Layout of a Mixtral / Qwen2-MoE / Qwen3-MoE model (see the module docstring), else None."""
    if model_type_of(model) not in MODEL_TYPES:
        return None
    started = llama.start(model, ADAPTER)
    if started is None:
        return None
    b, layers, H, Hkv = started
    hidden = int(b.config.hidden_size)
    for l, layer in enumerate(layers):
        if not llama.attention_layer(b, l, getattr(layer, "self_attn", None), H, Hkv):
            return None
        llama.layer_norms(b, l, layer)
        mlp = getattr(layer, "mlp", None)
        if mlp is not None and hasattr(mlp, "experts"):
            _experts(b, l, mlp, hidden)
            llama.gated_mlp(b, l, getattr(mlp, "shared_expert", None))
            sg = getattr(mlp, "shared_expert_gate", None)
            if sg is not None:
                b.single(getattr(sg, "weight", None), layer=l)
                b.single(_bias(sg), layer=l)
        else:
            llama.gated_mlp(b, l, mlp)
    return llama.finish(b, len(layers))
