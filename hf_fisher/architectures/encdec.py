"""Built-in adapter for encoder-decoder models: T5 / mT5, BART / mBART / Marian / Pegasus, Whisper.

Every projection is an ``nn.Linear`` with weight ``[out, in]``; H heads of size hd per attention.

T5 (``t5``, ``mt5``; no biases): in every ``T5Attention`` (encoder self-attention, decoder
self-attention, decoder cross-attention ``EncDecAttention``):

- ``q`` / ``k`` / ``v`` ``[H*hd, d]``: head ``h`` is rows ``h*hd:(h+1)*hd`` -> ``head_`` on axis 0;
  ``o`` ``[d, H*hd]``: columns -> ``head_`` on axis 1.
- ``relative_attention_bias`` ``[buckets, H]`` (first layer of each stack): column ``h`` is head
  ``h``'s bias -> ``head_`` on axis 1.
- feed-forward ``wi`` (or gated ``wi_0`` / ``wi_1``) ``[ff, d]`` -> ``channel_`` on axis 0,
  ``wo`` ``[d, ff]`` -> ``channel_`` on axis 1. Layer norms: one group.

BART family (``bart``, ``mbart``, ``marian``, ``pegasus``) and Whisper (``whisper``): in every
``self_attn`` and ``encoder_attn`` (cross-attention), ``q_proj`` / ``k_proj`` / ``v_proj``
``[H*hd, d]`` (and their biases) -> ``head_`` on axis 0; ``out_proj`` ``[d, H*hd]`` ->
``head_`` on axis 1, its bias one group. ``fc1`` ``[ff, d]`` (and bias) -> ``channel_`` on axis
0, ``fc2`` ``[d, ff]`` -> ``channel_`` on axis 1, its bias one group. Learned position tables
-> ``position_`` rows. Whisper's ``conv1`` / ``conv2`` ``[out, in, k]`` -> ``channel_`` on axis 0.

Token embeddings and the LM head ``[V, d]`` -> ``token_`` rows. Layer indices: encoder layers
``0 .. E-1``, decoder layers ``E .. E+D-1`` (``num_layers = E + D``).

Only groups are described: no :class:`~hf_fisher.layout.AttentionLayer` /
:class:`~hf_fisher.layout.ChannelBlock`, so head / channel pruning, QK-OV and head circuits
refuse these models (their cross-attention heads and relative bias are not modelled there).
"""

from __future__ import annotations

import logging
from typing import Any

from hf_fisher.architectures.builder import LayoutBuilder, find_module, model_type_of
from hf_fisher.hookspecs import hookimpl
from hf_fisher.layout import GroupRun, ModelLayout, ParamGroups

logger = logging.getLogger(__name__)

T5_TYPES = frozenset({"t5", "mt5"})
BART_TYPES = frozenset({"bart", "mbart", "marian", "pegasus", "whisper"})
MODEL_TYPES = T5_TYPES | BART_TYPES
ADAPTER = "encdec"


def _heads(b: LayoutBuilder, l: int, H: int, rows: list, cols: list, columns_of: list = ()) -> bool:
    """Head groups: ``rows`` (Linear modules whose output rows are heads), ``cols`` (whose input
    columns are heads); ``columns_of``: weights whose columns are heads (T5's relative bias)."""
    for mod in (*rows, *cols):
        if mod is None or getattr(mod, "weight", None) is None:
            return False
    inner = int(rows[0].weight.shape[0])
    if inner % H or any(int(m.weight.shape[0]) != inner for m in rows) or any(int(m.weight.shape[1]) != inner for m in cols):
        logger.warning("%s layer %d: projections do not split into %d heads; using the generic adapter", b.model_type, l, H)
        return False
    hd = inner // H
    on = lambda axis: ParamGroups(axis, (GroupRun("head_", H, hd),))  # noqa: E731
    for m in rows:
        b.set_groups(m.weight, on(0), layer=l)
        b.set_groups(getattr(m, "bias", None), on(0), layer=l)
    for m in cols:
        b.set_groups(m.weight, on(1), layer=l)
        b.single(getattr(m, "bias", None), layer=l)
    for w in columns_of:
        if w is not None:
            b.set_groups(w, ParamGroups(1, (GroupRun("head_", H, 1),)), layer=l)
    return True


def _channels(b: LayoutBuilder, l: int, ins: list, out: Any) -> None:
    for m in ins:
        b.per_index(m.weight, 0, "channel_", layer=l)
        b.per_index(getattr(m, "bias", None), 0, "channel_", layer=l)
    b.per_index(out.weight, 1, "channel_", layer=l)
    b.single(getattr(out, "bias", None), layer=l)


def _t5(model: Any) -> ModelLayout | None:
    b = LayoutBuilder(model, adapter=ADAPTER)
    H = int(b.config.num_heads)
    enc, dec = find_module(b.base, ("encoder.block",)), find_module(b.base, ("decoder.block",))
    if enc is None or dec is None:
        return None
    for l, block in enumerate([*enc, *dec]):
        for sub in block.layer:
            attn = getattr(sub, "SelfAttention", None) or getattr(sub, "EncDecAttention", None)
            if attn is not None:
                rel = getattr(getattr(attn, "relative_attention_bias", None), "weight", None)
                if not _heads(b, l, H, [attn.q, attn.k, attn.v], [attn.o], [rel]):
                    return None
            ff = getattr(sub, "DenseReluDense", None)
            if ff is not None:
                ins = [getattr(ff, n) for n in ("wi", "wi_0", "wi_1") if hasattr(ff, n)]
                _channels(b, l, ins, ff.wo)
            b.single(getattr(getattr(sub, "layer_norm", None), "weight", None), layer=l)
    b.add_token_rows()
    return b.build(num_layers=len(enc) + len(dec))


def _bart(model: Any) -> ModelLayout | None:
    b = LayoutBuilder(model, adapter=ADAPTER)
    cfg = b.config
    enc = find_module(b.base, ("model.encoder.layers", "encoder.layers"))
    dec = find_module(b.base, ("model.decoder.layers", "decoder.layers"))
    if enc is None or dec is None:
        return None
    heads = [int(cfg.encoder_attention_heads)] * len(enc) + [int(cfg.decoder_attention_heads)] * len(dec)
    for l, (layer, H) in enumerate(zip([*enc, *dec], heads)):
        for name in ("self_attn", "encoder_attn"):
            attn = getattr(layer, name, None)
            if attn is None:
                continue
            if not _heads(b, l, H, [getattr(attn, p, None) for p in ("q_proj", "k_proj", "v_proj")], [getattr(attn, "out_proj", None)]):
                return None
        if not (hasattr(layer, "fc1") and hasattr(layer, "fc2")):
            return None
        _channels(b, l, [layer.fc1], layer.fc2)
    for stack in ("encoder", "decoder"):
        pos = find_module(b.base, (f"model.{stack}.embed_positions", f"{stack}.embed_positions"))
        w = getattr(pos, "weight", None)
        if w is not None and w.dim() == 2:
            b.per_index(w, 0, "position_")
    for conv in ("conv1", "conv2"):  # Whisper's convolutional stem: one group per output channel
        mod = find_module(b.base, (f"model.encoder.{conv}", f"encoder.{conv}"))
        if mod is not None:
            b.per_index(mod.weight, 0, "channel_")
            b.per_index(getattr(mod, "bias", None), 0, "channel_")
    b.add_token_rows()
    return b.build(num_layers=len(enc) + len(dec))


@hookimpl
def hf_fisher_model_layout(model: Any) -> ModelLayout | None:
    """Layout of a T5 / BART-family / Whisper encoder-decoder (see the module docstring), else None."""
    kind = model_type_of(model)
    if kind in T5_TYPES:
        return _t5(model)
    if kind in BART_TYPES:
        return _bart(model)
    return None
