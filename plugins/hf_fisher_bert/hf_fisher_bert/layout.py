"""A ``tryfirst`` layout adapter for BERT-family encoders.

Model types: ``bert``, ``roberta``, ``xlm-roberta``, ``electra`` (BERT-style layers under
``<base>.encoder.layer``) and ``distilbert`` (under ``<base>.transformer.layer``), bare
(``BertModel``) or with any head (``...ForSequenceClassification``, ``...ForMaskedLM``, ...), and
PEFT-wrapped. Parameter names are those of the outer model's ``named_parameters()``.

Geometry of encoder layer ``l`` (H heads, head size hd, hidden size d, ff MLP channels, V
vocabulary rows; every projection is an ``nn.Linear`` with weight ``[out, in]``; multi-head
attention, so head ``h`` reads kv-head ``h``). Module names are BERT / RoBERTa / ELECTRA's,
DistilBERT's in brackets:

- ``attention.self.query`` (``attention.q_lin``) weight ``[H*hd, d]``: head ``h`` is rows
  ``h*hd:(h+1)*hd`` -> groups ``head_0..head_{H-1}`` on axis 0; the bias ``[H*hd]`` likewise.
- ``attention.self.key`` / ``attention.self.value`` (``k_lin`` / ``v_lin``): the same rows, groups
  ``kv_head_0..`` (the names the built-in LLaMA adapter gives K/V; here kv-head ``h`` = head ``h``).
- ``attention.output.dense`` (``attention.out_lin``) weight ``[d, H*hd]``: head ``h`` is columns
  ``h*hd:(h+1)*hd`` -> ``head_..`` on axis 1; its bias: one group.
- ``intermediate.dense`` (``ffn.lin1``) weight ``[ff, d]``: channel ``c`` is row ``c`` and bias
  entry ``c`` -> ``channel_..`` on axis 0.
- ``output.dense`` (``ffn.lin2``) weight ``[d, ff]``: channel ``c`` is column ``c`` -> ``channel_..``
  on axis 1; its bias: one group.
- LayerNorms (``attention.output.LayerNorm``, ``output.LayerNorm``; ``sa_layer_norm``,
  ``output_layer_norm``): one group each.

A head's :class:`~hf_fisher.layout.HeadSlices` are its query, key and value rows (weights and
biases) and its output-dense columns: zeroing all of them removes exactly head ``h``'s block of
the attention output (its values are zero, so its context vector is zero whatever the
attention pattern), which the plugin's tests check on a real pretrained model. An MLP channel
is its ``intermediate`` row, bias entry and ``output`` column.

Vocabulary: ``layout.vocab`` lists the word embeddings ``[V, e]`` and, when the model has an
MLM head, its decoder weight ``[V, e]`` (tied to the word embeddings in the pretrained
checkpoints: a tied parameter appears once), row ``t`` = token ``t``; both, and the decoder bias
``[V]``, get ``token_t`` groups on axis 0. Position embeddings get
``position_p`` groups, token-type embeddings ``type_t``. Everything else (pooler, classifier,
MLM transform, ELECTRA's ``embeddings_project``, cross-attention of a BERT decoder, relative
position ``distance_embedding``) keeps hf_fisher's generic groups.

A model whose projection shapes do not match ``H`` heads (e.g. a pruned checkpoint with fewer
heads in some layer) is left to the next adapter: the hook returns ``None``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from torch import nn

from hf_fisher.architectures.builder import HeadPart, LayoutBuilder, model_type_of
from hf_fisher.hookspecs import hookimpl
from hf_fisher.layout import GroupRun, ModelLayout, ParamGroups

__all__ = ["ADAPTER", "BERT_STYLE", "DISTILBERT", "MODEL_TYPES", "hf_fisher_model_layout"]

logger = logging.getLogger(__name__)

ADAPTER = "bert_family"
BERT_STYLE = frozenset({"bert", "roberta", "xlm-roberta", "electra"})
DISTILBERT = frozenset({"distilbert"})
MODEL_TYPES = BERT_STYLE | DISTILBERT


@dataclass(frozen=True)
class _Layer:
    """The modules of one encoder layer that carry heads and channels."""

    query: nn.Module
    key: nn.Module
    value: nn.Module
    attn_out: nn.Module  # the attention output projection, input = concatenated heads
    fc_in: nn.Module  # the MLP's first linear layer, output = channels
    fc_out: nn.Module  # the MLP's second linear layer, input = channels
    norms: tuple[nn.Module, ...]


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _layers(inner: nn.Module, model_type: str) -> list[_Layer] | None:
    """The encoder layers of the bare encoder ``inner``, or None when they are not where expected."""
    if model_type in DISTILBERT:
        stack, paths = _get(inner, "transformer.layer"), (
            "attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin", "ffn.lin1", "ffn.lin2",
        )
        norm_paths = ("sa_layer_norm", "output_layer_norm")
    else:
        stack, paths = _get(inner, "encoder.layer"), (
            "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
            "intermediate.dense", "output.dense",
        )
        norm_paths = ("attention.output.LayerNorm", "output.LayerNorm")
    if stack is None:
        return None
    out = []
    for layer in stack:
        mods = [_get(layer, p) for p in paths]
        if any(m is None or not isinstance(getattr(m, "weight", None), nn.Parameter) for m in mods):
            return None
        norms = tuple(m for m in (_get(layer, p) for p in norm_paths) if m is not None)
        out.append(_Layer(*mods, norms=norms))
    return out


def _first_int(config: Any, keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _heads_of(config: Any) -> tuple[int, int] | None:
    """``(H, hd)`` from the config (``hd = d // H``), or None when they are not there."""
    H = _first_int(config, ("num_attention_heads", "n_heads"))
    d = _first_int(config, ("hidden_size", "dim"))
    if H is None or d is None or d % H:
        return None
    return H, d // H


def _attention(b: LayoutBuilder, l: int, layer: _Layer, H: int, hd: int) -> bool:
    """Head groups and the :class:`AttentionLayer` of layer ``l`` (False: shapes do not fit,
    e.g. a layer whose heads were pruned)."""
    q, k, v, o = layer.query.weight, layer.key.weight, layer.value.weight, layer.attn_out.weight
    rows = H * hd
    fits = (
        q.dim() == 2 and q.shape[0] == rows
        and tuple(k.shape) == tuple(q.shape) == tuple(v.shape)
        and o.dim() == 2 and o.shape[1] == rows
        and all(getattr(m, "bias", None) is None or tuple(m.bias.shape) == (rows,) for m in (layer.query, layer.key, layer.value))
    )
    if not fits:
        logger.warning(
            "%s layer %d: projection shapes %s do not match %d heads; leaving the model to the next adapter",
            b.model_type, l, [tuple(t.shape) for t in (q, k, v, o)], H,
        )
        return False
    heads = ParamGroups(0, (GroupRun("head_", H, hd),))
    kv_heads = ParamGroups(0, (GroupRun("kv_head_", H, hd),))
    for module, groups in ((layer.query, heads), (layer.key, kv_heads), (layer.value, kv_heads)):
        b.set_groups(module.weight, groups, layer=l)
        b.set_groups(getattr(module, "bias", None), groups, layer=l)
    b.set_groups(o, ParamGroups(1, (GroupRun("head_", H, hd),)), layer=l)
    b.single(getattr(layer.attn_out, "bias", None), layer=l)

    def rows_of(module: nn.Module) -> list[HeadPart]:
        return [HeadPart(module.weight, 0), HeadPart(getattr(module, "bias", None), 0)]

    b.add_attention(
        l, num_heads=H, num_kv_heads=H, head_dim=hd,
        q=rows_of(layer.query), k=rows_of(layer.key), v=rows_of(layer.value), o=[HeadPart(o, 1)],
    )
    return True


def _mlp(b: LayoutBuilder, l: int, layer: _Layer) -> bool:
    """Channel groups and the :class:`ChannelBlock` of layer ``l`` (False: shapes do not fit)."""
    w_in, w_out = layer.fc_in.weight, layer.fc_out.weight
    b_in = getattr(layer.fc_in, "bias", None)
    ff = int(w_in.shape[0])
    if w_in.dim() != 2 or w_out.dim() != 2 or w_out.shape[1] != ff or (b_in is not None and tuple(b_in.shape) != (ff,)):
        logger.warning("%s layer %d: MLP shapes %s / %s do not fit", b.model_type, l, tuple(w_in.shape), tuple(w_out.shape))
        return False
    b.per_index(w_in, 0, "channel_", layer=l)
    b.per_index(b_in, 0, "channel_", layer=l)
    b.per_index(w_out, 1, "channel_", layer=l)
    b.single(getattr(layer.fc_out, "bias", None), layer=l)
    b.add_mlp(l, ff, [(w_in, 0), (b_in, 0), (w_out, 1)])
    return True


def _embeddings(b: LayoutBuilder, inner: nn.Module) -> None:
    """Vocabulary rows (word embeddings, MLM decoder weight and bias), positions, token types."""
    emb = getattr(inner, "embeddings", None)
    word = _get(emb, "word_embeddings.weight")
    b.per_index(word, 0, "token_")
    b.add_vocab(word, 0)
    b.per_index(_get(emb, "position_embeddings.weight"), 0, "position_")
    b.per_index(_get(emb, "token_type_embeddings.weight"), 0, "type_")
    b.single(_get(emb, "LayerNorm.weight"))
    b.single(_get(emb, "LayerNorm.bias"))
    decoder = b.base.get_output_embeddings() if hasattr(b.base, "get_output_embeddings") else None
    if isinstance(decoder, nn.Linear) and word is not None and decoder.weight.shape[0] == word.shape[0]:
        # a tied decoder weight *is* the word embedding (named once, listed once)
        b.per_index(decoder.weight, 0, "token_")
        b.add_vocab(decoder.weight, 0)
        # the decoder bias (tied to ``cls.predictions.bias`` / ``lm_head.bias``): token groups,
        # but not a vocabulary slice (those are the [V, e] matrices, as for the built-ins)
        b.per_index(decoder.bias, 0, "token_")


@hookimpl(tryfirst=True)
def hf_fisher_model_layout(model: Any) -> ModelLayout | None:
    """Layout of a BERT-family encoder (see the module docstring), else None."""
    model_type = model_type_of(model)
    if model_type not in MODEL_TYPES:
        return None
    b = LayoutBuilder(model, adapter=ADAPTER)
    inner = getattr(b.base, "base_model", None)  # BertForX.bert, or BertModel itself
    if not isinstance(inner, nn.Module):
        inner = b.base
    layers = _layers(inner, model_type)
    heads = _heads_of(b.config)
    if not layers or heads is None:
        logger.warning("%s model %s: encoder layers or head count not found; leaving it to the next adapter",
                       model_type, type(b.base).__name__)
        return None
    H, hd = heads
    for l, layer in enumerate(layers):
        if not (_attention(b, l, layer, H, hd) and _mlp(b, l, layer)):
            return None
        for norm in layer.norms:
            b.single(getattr(norm, "weight", None), layer=l)
            b.single(getattr(norm, "bias", None), layer=l)
    _embeddings(b, inner)
    return b.build(num_layers=len(layers))
