"""Built-in adapter for ViT-style encoders: ViT, DeiT, CLIP's vision tower, wav2vec2, HuBERT.

Every layer is a pre/post-norm transformer block of ``nn.Linear`` projections (weights
``[out, in]``), H heads of size hd = d / H (no grouped keys and values):

- ``q_proj`` / ``k_proj`` / ``v_proj`` ``[H*hd, d]`` (and biases): head ``h`` is rows
  ``h*hd:(h+1)*hd`` -> groups ``head_0..`` on axis 0;
- the output projection (``o_proj`` in ViT/DeiT, ``out_proj`` in CLIP and wav2vec2/HuBERT)
  ``[d, H*hd]``: head ``h`` is columns ``h*hd:(h+1)*hd`` -> ``head_..`` on axis 1; its bias one group;
- the MLP (``mlp.fc1`` / ``mlp.fc2``, or wav2vec2's ``feed_forward.intermediate_dense`` /
  ``output_dense``): channel ``c`` is row ``c`` of the first (and its bias entry) and column
  ``c`` of the second -> ``channel_..``; the second's bias one group;
- the block's LayerNorms: one group each;
- every ``nn.Conv1d`` / ``nn.Conv2d`` (ViT's patch embedding, wav2vec2's feature encoder; not a
  weight-normed one, whose weight is computed): one group per output filter (``filter_..``,
  weight axis 0 and bias).

Where the layers live: ``vit.layers`` / ``deit.layers`` (transformers 5), ``vit.encoder.layer``
(4.x), ``vision_model.encoder.layers`` (CLIP; a CLIP model with a text tower is left to the
generic adapter), ``wav2vec2.encoder.layers`` / ``hubert.encoder.layers``. Everything else
(position embeddings, CLS tokens, the positional convolution's weight norm, the classifier) keeps
the generic groups. A model whose projections do not have these shapes gets the generic adapter.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from hf_fisher.architectures.builder import HeadPart, LayoutBuilder, find_module, model_type_of
from hf_fisher.hookspecs import hookimpl
from hf_fisher.layout import GroupRun, ModelLayout, ParamGroups

logger = logging.getLogger(__name__)

ADAPTER = "vit"
MODEL_TYPES = frozenset({"vit", "deit", "clip", "clip_vision_model", "wav2vec2", "hubert"})
_LAYERS = (
    "vit.layers", "deit.layers", "vit.encoder.layer", "deit.encoder.layer", "encoder.layer", "layers",
    "vision_model.encoder.layers", "encoder.layers",
    "wav2vec2.encoder.layers", "hubert.encoder.layers",
)
_ATTENTION = ("attention", "self_attn", "attention.attention")
_OUT = ("o_proj", "out_proj")
_MLP = (("mlp.fc1", "mlp.fc2"), ("feed_forward.intermediate_dense", "feed_forward.output_dense"))
_NORMS = ("layernorm_before", "layernorm_after", "layer_norm1", "layer_norm2", "layer_norm", "final_layer_norm")


def _bias(module: Any):
    return getattr(module, "bias", None)


def _attention(b: LayoutBuilder, l: int, layer: Any, H: int) -> bool:
    attn = find_module(layer, _ATTENTION)
    out = next((getattr(attn, n) for n in _OUT if attn is not None and hasattr(attn, n)), None)
    if attn is None or out is None or not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj")):
        return False
    q, k, v, o = attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, out.weight
    rows = int(q.shape[0])
    if rows % H or any(int(t.shape[0]) != rows for t in (k, v)) or o.dim() != 2 or int(o.shape[1]) != rows:
        logger.warning("%s layer %d: projection shapes %s do not fit %d heads; using the generic adapter",
                       b.model_type, l, [tuple(t.shape) for t in (q, k, v, o)], H)
        return False
    hd = rows // H
    heads = ParamGroups(0, (GroupRun("head_", H, hd),))
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        b.set_groups(proj.weight, heads, layer=l)
        b.set_groups(_bias(proj), heads, layer=l)
    b.set_groups(o, ParamGroups(1, (GroupRun("head_", H, hd),)), layer=l)
    b.single(_bias(out), layer=l)
    b.add_attention(
        l, num_heads=H, num_kv_heads=H, head_dim=hd,
        q=[HeadPart(q, 0), HeadPart(_bias(attn.q_proj), 0)],
        k=[HeadPart(k, 0), HeadPart(_bias(attn.k_proj), 0)],
        v=[HeadPart(v, 0), HeadPart(_bias(attn.v_proj), 0)],
        o=[HeadPart(o, 1)],
    )
    return True


def _mlp(b: LayoutBuilder, l: int, layer: Any) -> None:
    for up_path, down_path in _MLP:
        up, down = find_module(layer, (up_path,)), find_module(layer, (down_path,))
        if up is None or down is None:
            continue
        ff = int(up.weight.shape[0])
        if down.weight.dim() != 2 or int(down.weight.shape[1]) != ff:
            return
        b.per_index(up.weight, 0, "channel_", layer=l)
        b.per_index(_bias(up), 0, "channel_", layer=l)
        b.per_index(down.weight, 1, "channel_", layer=l)
        b.single(_bias(down), layer=l)
        b.add_mlp(l, ff, [(up.weight, 0), (_bias(up), 0), (down.weight, 1)])
        return


@hookimpl
def hf_fisher_model_layout(model: Any) -> ModelLayout | None:
    """Layout of a ViT-style encoder (see the module docstring), else None."""
    if model_type_of(model) not in MODEL_TYPES:
        return None
    b = LayoutBuilder(model, adapter=ADAPTER)
    if find_module(b.base, ("text_model",)) is not None:  # CLIP with its text tower: not described here
        return None
    layers = find_module(b.base, _LAYERS)
    config = getattr(b.config, "vision_config", None) if b.model_type == "clip" else b.config
    H = getattr(config, "num_attention_heads", None)
    if layers is None or not isinstance(H, int) or H <= 0:
        return None
    for l, layer in enumerate(layers):
        if not _attention(b, l, layer, H):
            return None
        _mlp(b, l, layer)
        for norm in _NORMS:
            mod = getattr(layer, norm, None)
            b.single(getattr(mod, "weight", None), layer=l)
            b.single(getattr(mod, "bias", None), layer=l)
    for m in b.base.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)) and "weight" in m._parameters:
            b.per_index(m.weight, 0, "filter_")
            b.per_index(m.bias, 0, "filter_")
    return b.build(num_layers=len(layers))
