"""The structured units pruning removes, read from a model's :class:`~hf_fisher.layout.ModelLayout`.

A :class:`Unit` lists *exactly* the parameter slices removing it removes — the definition every
score of :mod:`hf_fisher.consumers.prune.statistics` sums over:

- ``"head"`` (query head ``h`` of layer ``l``): its Q rows (and Q bias) and its O columns. Under
  GQA/MQA the K/V rows of its kv-head stay (other query heads still read them): no share of them
  belongs to the head, and its kv group keeps at least one query head. With one query head per
  kv-head (plain multi-head attention: GPT-2, BERT, LLaMA with as many kv-heads as heads)
  removing the head removes its kv group — its K/V rows are part of it — and the head's budget
  is its layer's, not its group's (:attr:`Unit.budget`).
- ``"kv_head"`` (kv group ``j`` of layer ``l``): the K/V rows of kv-head ``j`` and every query
  head reading it (their Q rows and O columns).
- ``"channel"`` (MLP channel ``c`` of layer ``l``): every slice of the layout's
  :class:`~hf_fisher.layout.ChannelBlock` for ``c`` (gate row, up row, their biases, down column).
- ``"vocab"`` (token ``t``): row ``t`` of the input embedding and of the LM head (one row when
  they are tied). The config's special tokens (pad, bos, eos, ...) are never units.

``out`` holds the unit's slices on the *input* axis of its output projection (the head's O
columns, the channel's down column): where the activation criteria (Wanda-sp, FLAP), the mask
Fisher and the least-squares rescale read the unit's contribution to the layer output.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from hf_fisher.errors import InvalidInputError
from hf_fisher.layout import ModelLayout, Slice

__all__ = ["KINDS", "Unit", "input_axis", "owner", "special_token_ids", "structured_units"]

#: what ``prune(structured=...)`` accepts, and the unit kind each builds
KINDS = {"heads": "head", "kv_heads": "kv_head", "channels": "channel", "vocab": "vocab"}


@dataclass(frozen=True)
class Unit:
    """One prunable structure: ``kind`` in {"head", "kv_head", "channel", "vocab"}; ``layer``
    (None for vocabulary rows); ``index`` (head, kv-head, channel or token id); ``group`` (the
    kv-head of a query head: budgets are balanced over it); ``slices`` (everything removing it
    removes); ``out`` (its slices on the output projection's input axis); ``size`` (parameters
    in ``slices``); ``shares_kv`` (a query head whose kv-head other query heads read: GQA/MQA)."""

    kind: str
    layer: int | None
    index: int
    group: int | None
    slices: tuple[Slice, ...]
    out: tuple[Slice, ...]
    size: int
    shares_kv: bool = False

    @property
    def budget(self) -> tuple[str, int | None, int | None]:
        """Units with the same budget key are counted together by the selection (and keep at
        least the floor): ``(kind, layer, kv group)`` for a query head sharing its kv-head
        (its group must keep one), else ``(kind, layer, None)``."""
        return (self.kind, self.layer, self.group if self.kind == "head" and self.shares_kv else None)

    @property
    def bucket(self) -> tuple[str, int | None]:
        """Units with the same bucket share a per-layer budget: (kind, layer)."""
        return (self.kind, self.layer)


def owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding parameter ``name`` and the attribute name."""
    prefix, _, attr = name.rpartition(".")
    return (model.get_submodule(prefix) if prefix else model), attr


def input_axis(model: nn.Module, name: str) -> int | None:
    """Axis of weight ``name`` that indexes its module's input features: 1 for ``nn.Linear``
    (``[out, in]``), 0 for HF ``Conv1D`` (``[in, out]``), None for anything else (biases...)."""
    from hf_fisher.collection.activations import conv1d_type

    module, attr = owner(model, name)
    if attr != "weight":
        return None
    if isinstance(module, nn.Linear):
        return 1
    conv1d = conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return 0
    return None


def _size(shapes: dict[str, tuple[int, ...]], s: Slice) -> int:
    shape = shapes[s.param]
    return math.prod(shape) // max(1, shape[s.axis]) * (s.stop - s.start)


def special_token_ids(model: nn.Module) -> set[int]:
    """Token ids the config names (pad, bos, eos, unk, sep, cls, mask, decoder start)."""
    cfg = getattr(model, "config", None)
    out: set[int] = set()
    for key in ("pad_token_id", "bos_token_id", "eos_token_id", "unk_token_id", "sep_token_id",
                "cls_token_id", "mask_token_id", "decoder_start_token_id"):
        v = getattr(cfg, key, None)
        for t in v if isinstance(v, (list, tuple)) else [v]:
            if isinstance(t, int) and t >= 0:
                out.add(t)
    return out


def structured_units(model: nn.Module, layout: ModelLayout, kinds: Iterable[str], *, keep_tokens: Sequence[int] = ()) -> list[Unit]:
    """Every unit of the requested kinds (``"heads"``, ``"kv_heads"``, ``"channels"``,
    ``"vocab"``) of ``model``, in layout order."""
    kinds = list(kinds)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    missing = sorted({s.param for s in _all_slices(layout) if s.param not in shapes})
    if missing:
        raise InvalidInputError(
            f"the layout names parameters the model does not have ({', '.join(missing[:3])}); build the layout "
            "from this model (hf_fisher.plugins.model_layout(model)) or give a Fisher collected on it"
        )
    units: list[Unit] = []

    def unit(kind, layer, index, group, slices, out, shares_kv=False):
        slices = tuple(slices)
        units.append(Unit(kind, layer, index, group, slices, tuple(out), sum(_size(shapes, s) for s in slices), shares_kv))

    def out_of(slices) -> list[Slice]:
        return [s for s in slices if input_axis(model, s.param) == s.axis]

    if "heads" in kinds or "kv_heads" in kinds:
        if not layout.attention:
            raise InvalidInputError(f"layout {layout.adapter!r} describes no attention heads: structured pruning of heads needs them")
    if "channels" in kinds and not layout.mlp:
        raise InvalidInputError(f"layout {layout.adapter!r} describes no MLP channels: structured pruning of channels needs them")
    if "vocab" in kinds and not layout.vocab:
        raise InvalidInputError(f"layout {layout.adapter!r} describes no vocabulary rows: vocabulary pruning needs them")
    for att in layout.attention:
        g = att.num_heads // att.num_kv_heads
        if "heads" in kinds:
            for h in att.heads:
                own = list(h.q) + list(h.o) + (list(h.k) + list(h.v) if g == 1 else [])
                unit("head", att.layer, h.head, h.kv_head, own, out_of(h.o), g > 1)
        if "kv_heads" in kinds:
            for j in range(att.num_kv_heads):
                members = [h for h in att.heads if h.kv_head == j]
                own = list(members[0].k) + list(members[0].v)
                out: list[Slice] = []
                for h in members:
                    own += list(h.q) + list(h.o)
                    out += out_of(h.o)
                unit("kv_head", att.layer, j, None, own, out)
    if "channels" in kinds:
        for block in layout.mlp:
            for c in range(block.num_channels):
                sl = block.slices(c)
                unit("channel", block.layer, c, None, sl, out_of(sl))
    if "vocab" in kinds:
        rows = {s.stop - s.start for s in layout.vocab}
        if len(rows) != 1:
            raise InvalidInputError(f"the vocabulary parameters have different numbers of rows {sorted(rows)}; cannot prune rows together")
        protected = special_token_ids(model) | {int(t) for t in keep_tokens}
        for t in range(rows.pop()):
            if t in protected:
                continue
            sl = [Slice(s.param, s.axis, s.start + t, s.start + t + 1) for s in layout.vocab]
            unit("vocab", None, t, None, sl, [])
    return units


def _all_slices(layout: ModelLayout) -> Iterable[Slice]:
    for h in layout.heads():
        yield from (*h.q, *h.k, *h.v, *h.o)
    for b in layout.mlp:
        if b.num_channels:
            yield from b.slices(0)
    yield from layout.vocab


def slice_of(t: torch.Tensor, s: Slice) -> torch.Tensor:
    """The view of tensor ``t`` (of ``s.param``'s shape) that slice ``s`` selects."""
    return t[s.index()]


def describe(unit: Unit) -> dict[str, Any]:
    """JSON-ready description of a unit."""
    return {"kind": unit.kind, "layer": unit.layer, "index": unit.index, "kv_head": unit.group, "params": unit.size}
