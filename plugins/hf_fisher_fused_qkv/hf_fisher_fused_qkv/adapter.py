"""A ``tryfirst`` layout adapter for fused-QKV architectures: GPT-NeoX and Phi-3.

Every projection is an ``nn.Linear`` with weight ``[out, in]``; ``H`` heads, ``Hkv`` kv-heads,
head size ``hd``, ``ff`` MLP channels, ``V`` vocabulary rows.

GPT-NeoX (``model_type == "gpt_neox"``, adapter ``fused_qkv.gpt_neox``; HF transformers 5
``GPTNeoXAttention``: ``qkv = query_key_value(x).view(..., H, 3 * hd)`` then
``q, k, v = qkv.chunk(3, dim=-1)``):

- ``attention.query_key_value`` weight ``[3d, d]`` (bias ``[3d]``): the rows are *interleaved per
  head*, ``[q_0 k_0 v_0 q_1 k_1 v_1 ...]`` with ``hd`` rows each: head ``h``'s Q rows start at
  ``3*hd*h``, its K rows at ``3*hd*h + hd``, its V rows at ``3*hd*h + 2*hd``. Groups on axis 0
  follow that order: ``q_head_0, k_head_0, v_head_0, q_head_1, ...`` (the bias likewise).
- ``attention.dense`` weight ``[d, d]``: head ``h`` is columns ``h*hd:(h+1)*hd`` -> ``head_`` on
  axis 1; bias: one group.
- ``mlp.dense_h_to_4h`` ``[ff, d]``: channel ``c`` is row ``c`` (and bias entry ``c``);
  ``mlp.dense_4h_to_h`` ``[d, ff]``: column ``c`` -> ``channel_``; its bias: one group.
- ``embed_in`` and the LM head (``lm_head``, the historical ``embed_out``) ``[V, d]``: ``token_``
  rows; LayerNorms: one group.

Phi-3 (``model_type == "phi3"``, adapter ``fused_qkv.phi3``; ``Phi3Attention`` slices
``qkv[..., :H*hd]``, ``[H*hd : H*hd + Hkv*hd]``, ``[H*hd + Hkv*hd :]``):

- ``self_attn.qkv_proj`` ``[(H + 2*Hkv)*hd, d]`` = ``Q | K | V`` blocks: head ``h`` is Q rows
  ``h*hd..``, kv-head ``j`` is K rows ``H*hd + j*hd..`` and V rows ``(H + Hkv)*hd + j*hd..``; head
  ``h`` reads kv-head ``h // (H // Hkv)`` (GQA). Groups on axis 0: ``q_head_`` (H x hd),
  ``k_head_`` (Hkv x hd), ``v_head_`` (Hkv x hd).
- ``self_attn.o_proj`` ``[d, H*hd]``: ``head_`` on axis 1.
- ``mlp.gate_up_proj`` ``[2*ff, d]``: ``gate, up = gate_up_proj(x).chunk(2, -1)``, so channel
  ``c`` is rows ``c`` (gate) and ``ff + c`` (up) -> groups ``gate_channel_`` (ff) then
  ``up_channel_`` (ff) on axis 0; ``mlp.down_proj`` ``[d, ff]``: column ``c`` -> ``channel_``.
- ``embed_tokens`` / ``lm_head``: ``token_`` rows; RMSNorms: one group.

A model whose shapes do not fit (e.g. a GPT-NeoX config with ``hidden_size % heads != 0``) is
left to the next adapter (the hook returns ``None``).
"""

from __future__ import annotations

import logging
from typing import Any

from hf_fisher.architectures.builder import HeadPart, LayoutBuilder, find_module, model_type_of
from hf_fisher.hookspecs import hookimpl
from hf_fisher.layout import GroupRun, ModelLayout, ParamGroups

logger = logging.getLogger(__name__)

ADAPTER_GPT_NEOX = "fused_qkv.gpt_neox"
ADAPTER_PHI3 = "fused_qkv.phi3"
MODEL_TYPES = {"gpt_neox": ADAPTER_GPT_NEOX, "phi3": ADAPTER_PHI3}


def _bias(module: Any):
    return getattr(module, "bias", None)


def _norms(b: LayoutBuilder, layer: int, block: Any, names: tuple[str, ...]) -> None:
    for norm in names:
        mod = getattr(block, norm, None)
        b.single(getattr(mod, "weight", None), layer=layer)
        b.single(getattr(mod, "bias", None), layer=layer)


def _vocab_and_final_norm(b: LayoutBuilder, final_norm_paths: tuple[str, ...]) -> None:
    b.add_token_rows()
    norm = find_module(b.base, final_norm_paths)
    if norm is not None:
        b.single(getattr(norm, "weight", None))
        b.single(getattr(norm, "bias", None))


# --------------------------------------------------------------------------------------------
# GPT-NeoX


def gpt_neox_layout(model: Any) -> ModelLayout | None:
    """The layout of a GPT-NeoX model (see the module docstring), or None when it does not fit."""
    b = LayoutBuilder(model, adapter=ADAPTER_GPT_NEOX)
    layers = find_module(b.base, ("gpt_neox.layers", "layers"))
    if layers is None:
        return None
    cfg = b.config
    H, d = int(cfg.num_attention_heads), int(cfg.hidden_size)
    hd = d // H
    if hd * H != d:
        logger.warning("gpt_neox: hidden_size %d is not a multiple of %d heads; using the next adapter", d, H)
        return None
    for l, layer in enumerate(layers):
        attn = getattr(layer, "attention", None)
        qkv_mod, dense = getattr(attn, "query_key_value", None), getattr(attn, "dense", None)
        if qkv_mod is None or dense is None:
            return None
        qkv, o = qkv_mod.weight, dense.weight
        if tuple(qkv.shape) != (3 * d, d) or o.dim() != 2 or o.shape[1] != d:
            logger.warning("gpt_neox layer %d: unexpected shapes %s, %s; using the next adapter", l, tuple(qkv.shape), tuple(o.shape))
            return None
        # rows interleaved per head: [q_h, k_h, v_h] for h = 0..H-1
        runs = tuple(GroupRun(f"{role}_head_", 1, hd, first=h) for h in range(H) for role in ("q", "k", "v"))
        b.set_groups(qkv, ParamGroups(0, runs), layer=l)
        b.set_groups(_bias(qkv_mod), ParamGroups(0, runs), layer=l)
        b.set_groups(o, ParamGroups(1, (GroupRun("head_", H, hd),)), layer=l)
        b.single(_bias(dense), layer=l)
        stride = 3 * hd
        b.add_attention(
            l,
            num_heads=H,
            num_kv_heads=H,
            head_dim=hd,
            q=[HeadPart(qkv, 0, 0, stride), HeadPart(_bias(qkv_mod), 0, 0, stride)],
            k=[HeadPart(qkv, 0, hd, stride), HeadPart(_bias(qkv_mod), 0, hd, stride)],
            v=[HeadPart(qkv, 0, 2 * hd, stride), HeadPart(_bias(qkv_mod), 0, 2 * hd, stride)],
            o=[HeadPart(o, 1)],
        )
        mlp = getattr(layer, "mlp", None)
        fc, proj = getattr(mlp, "dense_h_to_4h", None), getattr(mlp, "dense_4h_to_h", None)
        if fc is not None and proj is not None:
            ff = int(fc.weight.shape[0])
            if proj.weight.dim() != 2 or proj.weight.shape[1] != ff:
                return None
            b.per_index(fc.weight, 0, "channel_", layer=l)
            b.per_index(_bias(fc), 0, "channel_", layer=l)
            b.per_index(proj.weight, 1, "channel_", layer=l)
            b.single(_bias(proj), layer=l)
            b.add_mlp(l, ff, [(fc.weight, 0), (_bias(fc), 0), (proj.weight, 1)])
        _norms(b, l, layer, ("input_layernorm", "post_attention_layernorm"))
    _vocab_and_final_norm(b, ("gpt_neox.final_layer_norm", "final_layer_norm"))
    return b.build(num_layers=len(layers))


# --------------------------------------------------------------------------------------------
# Phi-3


def phi3_layout(model: Any) -> ModelLayout | None:
    """The layout of a Phi-3 model (see the module docstring), or None when it does not fit."""
    b = LayoutBuilder(model, adapter=ADAPTER_PHI3)
    layers = find_module(b.base, ("model.layers", "layers"))
    if layers is None:
        return None
    cfg = b.config
    H = int(cfg.num_attention_heads)
    Hkv = int(getattr(cfg, "num_key_value_heads", None) or H)
    if Hkv <= 0 or H % Hkv:
        logger.warning("phi3: %d heads are not a multiple of %d kv-heads; using the next adapter", H, Hkv)
        return None
    for l, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        qkv_mod, o_mod = getattr(attn, "qkv_proj", None), getattr(attn, "o_proj", None)
        if qkv_mod is None or o_mod is None:
            return None
        hd = int(getattr(attn, "head_dim", None) or getattr(cfg, "head_dim", None) or cfg.hidden_size // H)
        qkv, o = qkv_mod.weight, o_mod.weight
        if qkv.shape[0] != (H + 2 * Hkv) * hd or o.dim() != 2 or o.shape[1] != H * hd:
            logger.warning("phi3 layer %d: unexpected shapes %s, %s; using the next adapter", l, tuple(qkv.shape), tuple(o.shape))
            return None
        runs = (GroupRun("q_head_", H, hd), GroupRun("k_head_", Hkv, hd), GroupRun("v_head_", Hkv, hd))
        b.set_groups(qkv, ParamGroups(0, runs), layer=l)
        b.set_groups(_bias(qkv_mod), ParamGroups(0, runs), layer=l)
        b.set_groups(o, ParamGroups(1, (GroupRun("head_", H, hd),)), layer=l)
        b.single(_bias(o_mod), layer=l)
        k0, v0 = H * hd, (H + Hkv) * hd
        b.add_attention(
            l,
            num_heads=H,
            num_kv_heads=Hkv,
            head_dim=hd,
            q=[HeadPart(qkv, 0, 0), HeadPart(_bias(qkv_mod), 0, 0)],
            k=[HeadPart(qkv, 0, k0), HeadPart(_bias(qkv_mod), 0, k0)],
            v=[HeadPart(qkv, 0, v0), HeadPart(_bias(qkv_mod), 0, v0)],
            o=[HeadPart(o, 1)],
        )
        mlp = getattr(layer, "mlp", None)
        gu_mod, down_mod = getattr(mlp, "gate_up_proj", None), getattr(mlp, "down_proj", None)
        if gu_mod is not None and down_mod is not None:
            gu, down = gu_mod.weight, down_mod.weight
            ff = int(down.shape[1]) if down.dim() == 2 else -1
            if ff <= 0 or gu.shape[0] != 2 * ff:
                return None
            gu_runs = ParamGroups(0, (GroupRun("gate_channel_", ff, 1), GroupRun("up_channel_", ff, 1)))
            b.set_groups(gu, gu_runs, layer=l)
            b.set_groups(_bias(gu_mod), gu_runs, layer=l)
            b.per_index(down, 1, "channel_", layer=l)
            b.single(_bias(down_mod), layer=l)
            # channel c: gate row c, up row ff + c (and their bias entries), down column c
            b.add_mlp(
                l, ff,
                [(gu, 0, 0), (gu, 0, ff), (down, 1), (_bias(gu_mod), 0, 0), (_bias(gu_mod), 0, ff)],
            )
        _norms(b, l, layer, ("input_layernorm", "post_attention_layernorm"))
    _vocab_and_final_norm(b, ("model.norm", "norm"))
    return b.build(num_layers=len(layers))


@hookimpl(tryfirst=True)
def hf_fisher_model_layout(model: Any) -> ModelLayout | None:
    """Layout of a GPT-NeoX or Phi-3 model (see the module docstring), else None."""
    mt = model_type_of(model)
    if mt == "gpt_neox":
        return gpt_neox_layout(model)
    if mt == "phi3":
        return phi3_layout(model)
    return None
