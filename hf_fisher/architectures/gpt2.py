"""Built-in adapter for fused-QKV models: GPT-2 (HF ``Conv1D``) and GPTBigCode (``nn.Linear``).

GPT-2 (model_type ``gpt2``; ``Conv1D`` weights are ``[in, out]``, transposed w.r.t. Linear):

- ``attn.c_attn`` weight ``[d, 3d]``, bias ``[3d]``: the output splits as ``Q | K | V`` (HF:
  ``c_attn(x).split(d, dim=2)``), each viewed as ``[H, hd]``. Groups on weight axis 1 / bias
  axis 0: runs ``q_head_`` (H x hd), ``k_head_`` (H x hd), ``v_head_`` (H x hd).
- ``attn.c_proj`` weight ``[d, d]``: its input rows are the concatenated heads -> ``head_`` on
  axis 0; bias: one group.
- ``mlp.c_fc`` weight ``[d, ff]`` -> ``channel_`` on axis 1 (bias on axis 0); ``mlp.c_proj``
  weight ``[ff, d]`` -> ``channel_`` on axis 0; bias: one group.
- ``wte`` ``[V, d]`` -> ``token_``; ``wpe`` ``[P, d]`` -> ``position_``; the LM head is tied to
  ``wte``. LayerNorms: one group.

GPTBigCode (model_type ``gpt_bigcode``; ``nn.Linear`` weights ``[out, in]``):

- multi-query (``config.multi_query``, Hkv = 1): ``c_attn`` weight ``[d + 2*hd, d]``; the output
  splits as ``Q (d) | K (hd) | V (hd)`` -> runs ``q_head_`` (H x hd), ``k_head_`` (1 x hd),
  ``v_head_`` (1 x hd) on axis 0; every head reads kv-head 0.
- multi-head (Hkv = H): ``c_attn`` weight ``[3d, d]`` whose output HF views as ``[H, 3*hd]`` and
  splits per head into ``q, k, v`` -- i.e. rows are *interleaved* per head:
  ``[q_0 k_0 v_0 q_1 k_1 v_1 ...]``; the groups follow that order.
- ``attn.c_proj`` ``[d, d]``: ``head_`` on axis 1. ``mlp.c_fc`` ``[ff, d]``: ``channel_`` on axis 0
  (bias too); ``mlp.c_proj`` ``[d, ff]``: ``channel_`` on axis 1; bias one group.
"""

from __future__ import annotations

import logging
from typing import Any

from hf_fisher.architectures.builder import HeadPart, LayoutBuilder, find_module, model_type_of
from hf_fisher.hookspecs import hookimpl
from hf_fisher.layout import GroupRun, ModelLayout, ParamGroups

logger = logging.getLogger(__name__)

MODEL_TYPES = frozenset({"gpt2", "gpt_bigcode"})


def _embeddings(b: LayoutBuilder) -> None:
    tr = find_module(b.base, ("transformer",)) or b.base
    wte = getattr(getattr(tr, "wte", None), "weight", None)
    wpe = getattr(getattr(tr, "wpe", None), "weight", None)
    b.per_index(wte, 0, "token_")
    b.add_vocab(wte, 0)
    b.per_index(wpe, 0, "position_")
    head = b.base.get_output_embeddings() if hasattr(b.base, "get_output_embeddings") else None
    w = getattr(head, "weight", None) if head is not None else None
    if w is not None and w.dim() == 2:
        b.per_index(w, 0, "token_")
        b.add_vocab(w, 0)


def _geometry(b: LayoutBuilder):
    """(blocks, num_heads, hidden, head_dim) of a GPT-2-style model, or None if it is not one."""
    blocks = find_module(b.base, ("transformer.h", "h"))
    if blocks is None:
        return None
    H = int(b.config.n_head)
    d = int(b.config.n_embd)
    hd = d // H
    if hd * H != d:
        return None
    return blocks, H, d, hd


def _gpt2(model: Any) -> ModelLayout | None:
    b = LayoutBuilder(model, adapter="gpt2")
    geometry = _geometry(b)
    if geometry is None:
        return None
    blocks, H, d, hd = geometry
    for l, block in enumerate(blocks):
        attn = block.attn
        if getattr(attn, "is_cross_attention", False):
            return None
        w, bias = attn.c_attn.weight, attn.c_attn.bias
        if tuple(w.shape) != (d, 3 * d):
            return None
        runs = (GroupRun("q_head_", H, hd), GroupRun("k_head_", H, hd), GroupRun("v_head_", H, hd))
        b.set_groups(w, ParamGroups(1, runs), layer=l)
        b.set_groups(bias, ParamGroups(0, runs), layer=l)
        pw = attn.c_proj.weight
        b.set_groups(pw, ParamGroups(0, (GroupRun("head_", H, hd),)), layer=l)
        b.single(attn.c_proj.bias, layer=l)
        b.add_attention(
            l,
            num_heads=H,
            num_kv_heads=H,
            head_dim=hd,
            q=[HeadPart(w, 1, 0), HeadPart(bias, 0, 0)],
            k=[HeadPart(w, 1, d), HeadPart(bias, 0, d)],
            v=[HeadPart(w, 1, 2 * d), HeadPart(bias, 0, 2 * d)],
            o=[HeadPart(pw, 0)],
        )
        _mlp_and_norms(b, block, l, conv1d=True)
    _embeddings(b)
    return b.build(num_layers=len(blocks))


def _gpt_bigcode(model: Any) -> ModelLayout | None:
    b = LayoutBuilder(model, adapter="gpt_bigcode")
    geometry = _geometry(b)
    if geometry is None:
        return None
    blocks, H, d, hd = geometry
    mq = bool(getattr(b.config, "multi_query", True))
    Hkv = 1 if mq else H
    for l, block in enumerate(blocks):
        attn = block.attn
        if getattr(attn, "is_cross_attention", False):
            return None
        w, bias = attn.c_attn.weight, attn.c_attn.bias
        if tuple(w.shape) != (d + 2 * Hkv * hd, d):
            return None
        if mq:
            runs: tuple[GroupRun, ...] = (
                GroupRun("q_head_", H, hd),
                GroupRun("k_head_", 1, hd),
                GroupRun("v_head_", 1, hd),
            )
            q_part, k_part, v_part = (0, hd), (d, hd), (d + hd, hd)
        else:  # rows interleaved per head: [q_h, k_h, v_h] for h = 0..H-1
            runs = tuple(
                GroupRun(f"{role}_head_", 1, hd, first=h) for h in range(H) for role in ("q", "k", "v")
            )
            q_part, k_part, v_part = (0, 3 * hd), (hd, 3 * hd), (2 * hd, 3 * hd)
        b.set_groups(w, ParamGroups(0, runs), layer=l)
        b.set_groups(bias, ParamGroups(0, runs), layer=l)
        pw = attn.c_proj.weight
        b.set_groups(pw, ParamGroups(1, (GroupRun("head_", H, hd),)), layer=l)
        b.single(attn.c_proj.bias, layer=l)
        b.add_attention(
            l,
            num_heads=H,
            num_kv_heads=Hkv,
            head_dim=hd,
            q=[HeadPart(w, 0, *q_part), HeadPart(bias, 0, *q_part)],
            k=[HeadPart(w, 0, *k_part), HeadPart(bias, 0, *k_part)],
            v=[HeadPart(w, 0, *v_part), HeadPart(bias, 0, *v_part)],
            o=[HeadPart(pw, 1)],
        )
        _mlp_and_norms(b, block, l, conv1d=False)
    _embeddings(b)
    return b.build(num_layers=len(blocks))


@hookimpl
def hf_fisher_model_layout(model: Any) -> ModelLayout | None:
    """Layout of a GPT-2 or GPTBigCode model (see the module docstring), else None."""
    mt = model_type_of(model)
    if mt == "gpt2":
        return _gpt2(model)
    if mt == "gpt_bigcode":
        return _gpt_bigcode(model)
    return None


def _mlp_and_norms(b, block, layer: int, *, conv1d: bool) -> None:
    """MLP channels and LayerNorms of one GPT-2-style block.

    Channel c is output c of ``c_fc`` (its weight column under HF Conv1D, row under Linear, and
    its bias entry) and input c of ``c_proj``; ``c_proj``'s bias and the LayerNorms are one group.
    """
    mlp = block.mlp
    fc_w, fc_b, proj_w = mlp.c_fc.weight, mlp.c_fc.bias, mlp.c_proj.weight
    fc_axis, proj_axis = (1, 0) if conv1d else (0, 1)
    b.per_index(fc_w, fc_axis, "channel_", layer=layer)
    b.per_index(fc_b, 0, "channel_", layer=layer)
    b.per_index(proj_w, proj_axis, "channel_", layer=layer)
    b.single(mlp.c_proj.bias, layer=layer)
    b.add_mlp(layer, int(fc_w.shape[fc_axis]), [(fc_w, fc_axis), (fc_b, 0), (proj_w, proj_axis)])
    for ln in ("ln_1", "ln_2"):
        mod = getattr(block, ln, None)
        b.single(getattr(mod, "weight", None), layer=layer)
        b.single(getattr(mod, "bias", None), layer=layer)
