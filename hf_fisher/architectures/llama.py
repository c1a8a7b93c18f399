"""Built-in adapter for the dense LLaMA family: llama, mistral, qwen2, qwen3.

Geometry (H heads, Hkv kv-heads, head_dim hd, ff MLP channels, V vocabulary rows); every
projection is an ``nn.Linear`` with weight ``[out, in]``:

- ``q_proj`` ``[H*hd, d]``: head ``h`` is rows ``h*hd:(h+1)*hd`` -> groups ``head_0..`` on axis 0
  (the bias, if any, likewise).
- ``k_proj`` / ``v_proj`` ``[Hkv*hd, d]``: kv-head ``j`` is rows ``j*hd:(j+1)*hd`` -> groups
  ``kv_head_0..`` on axis 0. Head ``h`` reads kv-head ``h // (H // Hkv)`` (GQA; MQA when Hkv = 1),
  which is how HF's ``repeat_kv`` expands the keys and values.
- ``o_proj`` ``[d, H*hd]``: head ``h`` is columns ``h*hd:(h+1)*hd`` -> groups ``head_..`` on axis 1.
- ``gate_proj`` / ``up_proj`` ``[ff, d]``: channel ``c`` is row ``c``; ``down_proj`` ``[d, ff]``:
  column ``c`` -> groups ``channel_..``.
- ``embed_tokens`` / ``lm_head`` ``[V, d]``: groups ``token_..`` on axis 0.
- norms (incl. Qwen3's per-head ``q_norm`` / ``k_norm``, shared by all heads): one group.

Mixture-of-experts variants: :mod:`~hf_fisher.architectures.moe`, which reuses the helpers here.
"""

from __future__ import annotations

import logging
from typing import Any

from hf_fisher.architectures.builder import HeadPart, LayoutBuilder, find_module, model_type_of
from hf_fisher.hookspecs import hookimpl
from hf_fisher.layout import GroupRun, ModelLayout, ParamGroups

logger = logging.getLogger(__name__)

MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
ADAPTER = "llama"


def _bias(module: Any):
    return getattr(module, "bias", None)


def start(model: Any, adapter: str) -> tuple[LayoutBuilder, Any, int, int] | None:
    """``(builder, decoder layers, H, Hkv)`` of a LLaMA-like model, or None when it does not fit."""
    b = LayoutBuilder(model, adapter=adapter)
    layers = find_module(b.base, ("model.layers", "layers"))
    if layers is None:
        return None
    cfg = b.config
    H = int(cfg.num_attention_heads)
    Hkv = int(getattr(cfg, "num_key_value_heads", None) or H)
    if Hkv <= 0 or H % Hkv:
        logger.warning(
            "%s model with %d heads and %d kv-heads (not a divisor): using the generic adapter",
            b.model_type, H, Hkv,
        )
        return None
    return b, layers, H, Hkv


def attention_layer(b: LayoutBuilder, l: int, attn: Any, H: int, Hkv: int) -> bool:
    """Head groups and :class:`AttentionLayer` of one LLaMA-like attention block (False: misfit)."""
    cfg = b.config
    if attn is None or not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return False
    hd = int(getattr(attn, "head_dim", None) or getattr(cfg, "head_dim", None) or cfg.hidden_size // H)
    q, k, v, o = attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight
    if q.shape[0] != H * hd or k.shape[0] != Hkv * hd or v.shape[0] != Hkv * hd or o.shape[1] != H * hd:
        logger.warning(
            "%s layer %d: projection shapes %s do not match %d heads / %d kv-heads of size %d; "
            "using the generic adapter", b.model_type, l, [tuple(t.shape) for t in (q, k, v, o)], H, Hkv, hd,
        )
        return False
    heads_rows = ParamGroups(0, (GroupRun("head_", H, hd),))
    kv_rows = ParamGroups(0, (GroupRun("kv_head_", Hkv, hd),))
    b.set_groups(q, heads_rows, layer=l)
    b.set_groups(_bias(attn.q_proj), heads_rows, layer=l)
    for proj in (attn.k_proj, attn.v_proj):
        b.set_groups(proj.weight, kv_rows, layer=l)
        b.set_groups(_bias(proj), kv_rows, layer=l)
    b.set_groups(o, ParamGroups(1, (GroupRun("head_", H, hd),)), layer=l)
    b.single(_bias(attn.o_proj), layer=l)
    b.add_attention(
        l,
        num_heads=H,
        num_kv_heads=Hkv,
        head_dim=hd,
        q=[HeadPart(q, 0), HeadPart(_bias(attn.q_proj), 0)],
        k=[HeadPart(k, 0), HeadPart(_bias(attn.k_proj), 0)],
        v=[HeadPart(v, 0), HeadPart(_bias(attn.v_proj), 0)],
        o=[HeadPart(o, 1)],
    )
    for norm in ("q_norm", "k_norm"):
        if hasattr(attn, norm):
            b.single(getattr(getattr(attn, norm), "weight", None), layer=l)
    return True


def layer_norms(b: LayoutBuilder, l: int, layer: Any) -> None:
    """The decoder layer's input / post-attention norms: one group each."""
    for norm in ("input_layernorm", "post_attention_layernorm"):
        if hasattr(layer, norm):
            b.single(getattr(getattr(layer, norm), "weight", None), layer=l)


def gated_mlp(b: LayoutBuilder, l: int, mlp: Any) -> None:
    """Channel groups and :class:`ChannelBlock` of a gate/up/down ``nn.Linear`` MLP."""
    if mlp is None or not all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj")):
        return
    gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    ff = int(gate.shape[0])
    if up.shape[0] != ff or down.dim() != 2 or down.shape[1] != ff:
        return
    b.per_index(gate, 0, "channel_", layer=l)
    b.per_index(up, 0, "channel_", layer=l)
    b.per_index(down, 1, "channel_", layer=l)
    for proj in (mlp.gate_proj, mlp.up_proj):
        b.per_index(_bias(proj), 0, "channel_", layer=l)
    b.single(_bias(mlp.down_proj), layer=l)
    # a channel owns its gate/up bias entries too (mlp_bias=True): zeroing its weights alone
    # would leave act(b_gate) * b_up flowing into the down projection
    b.add_mlp(l, ff, [(gate, 0), (up, 0), (down, 1), (_bias(mlp.gate_proj), 0), (_bias(mlp.up_proj), 0)])


def finish(b: LayoutBuilder, num_layers: int) -> ModelLayout:
    """Vocabulary rows of the embeddings / LM head, the final norm, and the built layout."""
    b.add_token_rows()
    final_norm = find_module(b.base, ("model.norm", "norm"))
    if final_norm is not None:
        b.single(getattr(final_norm, "weight", None))
    return b.build(num_layers=num_layers)


@hookimpl
def hf_fisher_model_layout(model: Any) -> ModelLayout | None:
    """Layout of a dense LLaMA-family model (see the module docstring), else None."""
    if model_type_of(model) not in MODEL_TYPES:
        return None
    started = start(model, ADAPTER)
    if started is None:
        return None
    b, layers, H, Hkv = started
    for l, layer in enumerate(layers):
        if not attention_layer(b, l, getattr(layer, "self_attn", None), H, Hkv):
            return None
        layer_norms(b, l, layer)
        gated_mlp(b, l, getattr(layer, "mlp", None))
    return finish(b, len(layers))
