"""Architecture-independent description of a model: heads, kv-heads, MLP channels, vocab rows.

An architecture adapter (see ``hookspecs.hf_fisher_model_layout``) turns a concrete model into a
:class:`ModelLayout`. Everything downstream (the engine's ``reduction="group"``, pruning, merging,
QK-OV analysis, reports) reads only this description, never the model's module names.

Vocabulary
----------
- :class:`Slice`: a contiguous index range ``[start, stop)`` of one parameter along one axis.
- :class:`ParamGroups`: the partition of one parameter along one axis into named groups that
  ``reduction="group"`` sums over (square first, then reduce; see DESIGN.md section 2). Groups
  come in *runs* of equal-sized, consecutive groups (e.g. 8 query heads of 64 rows each).
- :class:`HeadSlices`: where one attention head lives (its Q rows, the K/V rows of its kv-head,
  its O columns), :class:`ChannelBlock`: where the MLP channels of one layer live.
- :class:`ModelLayout`: all of the above for one model, JSON-serialisable.

Parameter names are the names of ``model.named_parameters()`` of the model the layout was built
for (including a PEFT wrapper's prefixes).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import torch

__all__ = [
    "Slice",
    "GroupRun",
    "ParamGroups",
    "HeadSlices",
    "AttentionLayer",
    "ChannelRole",
    "ChannelBlock",
    "ModelLayout",
    "layer_of",
]

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")


def layer_of(param_name: str) -> int | None:
    """Layer index parsed from a parameter name (``...layers.3...`` or ``...h.3...``), else None."""
    m = _LAYER_RE.search(param_name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class Slice:
    """Indices ``start:stop`` of parameter ``param`` along ``axis``."""

    param: str
    axis: int
    start: int
    stop: int

    def index(self) -> tuple:
        """An index tuple selecting this slice from the parameter tensor."""
        return (slice(None),) * self.axis + (slice(self.start, self.stop),)

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class GroupRun:
    """``count`` consecutive groups of ``size`` elements each, labelled ``f"{prefix}{first + k}"``."""

    prefix: str
    count: int
    size: int
    first: int = 0


@dataclass(frozen=True)
class ParamGroups:
    """Partition of a parameter along ``axis`` into groups, given as consecutive runs.

    The runs cover the axis exactly, in order. Group ``g`` of a parameter-level tensor ``F`` has
    value ``sum(F[..., idx in g, ...])`` (reduction "sum", mass preserving).
    """

    axis: int
    runs: tuple[GroupRun, ...]

    @staticmethod
    def single(axis: int, size: int, label: str = "all") -> "ParamGroups":
        """One group covering the whole axis."""
        return ParamGroups(axis, (GroupRun(label, 1, size),))

    @staticmethod
    def per_index(axis: int, size: int, prefix: str) -> "ParamGroups":
        """One group per index along ``axis`` (e.g. MLP channels, vocabulary rows)."""
        return ParamGroups(axis, (GroupRun(prefix, size, 1),))

    @property
    def num_groups(self) -> int:
        return sum(r.count for r in self.runs)

    @property
    def axis_size(self) -> int:
        return sum(r.count * r.size for r in self.runs)

    @property
    def names(self) -> list[str]:
        out: list[str] = []
        for r in self.runs:
            if r.count == 1 and r.first == 0 and not r.prefix.endswith("_"):
                out.append(r.prefix)
            else:
                out.extend(f"{r.prefix}{r.first + k}" for k in range(r.count))
        return out

    def sizes(self) -> torch.Tensor:
        """Number of elements along ``axis`` in each group, shape ``[num_groups]``."""
        return torch.cat([torch.full((r.count,), r.size, dtype=torch.long) for r in self.runs])

    def index(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Group id of every index along ``axis``, shape ``[axis_size]`` (int64)."""
        return torch.repeat_interleave(torch.arange(self.num_groups), self.sizes()).to(device)

    def is_uniform(self) -> bool:
        return len({r.size for r in self.runs}) == 1

    def reduce(self, values: torch.Tensor, batch_dims: int = 0) -> torch.Tensor:
        """Sum ``values`` (shape ``[*batch, *param_shape]``) within each group.

        Returns ``[*batch, num_groups]``: first sums every axis but ``axis``, then the indices of
        each group.
        """
        axis = batch_dims + self.axis
        other = [d for d in range(batch_dims, values.dim()) if d != axis]
        per_index = values.sum(dim=other) if other else values
        return self.reduce_axis(per_index)

    def reduce_axis(self, per_index: torch.Tensor) -> torch.Tensor:
        """Sum a ``[..., axis_size]`` tensor of per-index values into ``[..., num_groups]``."""
        if self.is_uniform():
            size = self.runs[0].size
            return per_index.reshape(*per_index.shape[:-1], self.num_groups, size).sum(-1)
        out = per_index.new_zeros(*per_index.shape[:-1], self.num_groups)
        return out.index_add_(-1, self.index(per_index.device), per_index)

    def expand(self, values: torch.Tensor, shape: Sequence[int], *, spread: bool = False) -> torch.Tensor:
        """Broadcast group values ``[num_groups]`` back to a parameter of ``shape``.

        Every element gets its group's value; with ``spread=True`` the value is divided by the
        number of elements in the group, so the expanded tensor sums to the same total.
        """
        shape = tuple(shape)
        idx = self.index(values.device)
        per_index = values[idx]
        if spread:
            numel_per_index = 1
            for d, s in enumerate(shape):
                if d != self.axis:
                    numel_per_index *= s
            per_index = per_index / (self.sizes().to(values.device)[idx] * numel_per_index)
        view = [1] * len(shape)
        view[self.axis] = shape[self.axis]
        return per_index.reshape(view).expand(shape).clone()

    def to_dict(self) -> dict[str, Any]:
        return {"axis": self.axis, "runs": [asdict(r) for r in self.runs]}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "ParamGroups":
        return ParamGroups(int(d["axis"]), tuple(GroupRun(**r) for r in d["runs"]))


@dataclass(frozen=True)
class HeadSlices:
    """One attention head: its Q slices, the K/V slices of its kv-head, its O slices."""

    layer: int
    head: int
    kv_head: int
    q: tuple[Slice, ...]
    k: tuple[Slice, ...]
    v: tuple[Slice, ...]
    o: tuple[Slice, ...]


@dataclass(frozen=True)
class AttentionLayer:
    """Attention geometry of one layer. ``kv_head(h) == h // (num_heads // num_kv_heads)``."""

    layer: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    heads: tuple[HeadSlices, ...]

    def kv_head(self, head: int) -> int:
        return head // (self.num_heads // self.num_kv_heads)


@dataclass(frozen=True)
class ChannelRole:
    """Channel ``c`` of the block is index ``offset + c`` of ``param`` along ``axis``."""

    param: str
    axis: int
    offset: int = 0


@dataclass(frozen=True)
class ChannelBlock:
    """MLP channels of one layer: e.g. gate/up rows (axis 0) and down columns (axis 1)."""

    layer: int
    num_channels: int
    roles: tuple[ChannelRole, ...]

    def slices(self, channel: int) -> tuple[Slice, ...]:
        return tuple(Slice(r.param, r.axis, r.offset + channel, r.offset + channel + 1) for r in self.roles)


@dataclass
class ModelLayout:
    """Everything the consumers need to know about a model's structure.

    ``groups`` holds the ``reduction="group"`` partition of *every* parameter of the model
    (adapter-defined where the adapter knows the parameter, generic otherwise: per output channel
    for linear-like weights, one group for anything else).
    """

    adapter: str
    model_type: str | None
    num_layers: int
    attention: list[AttentionLayer] = field(default_factory=list)
    mlp: list[ChannelBlock] = field(default_factory=list)
    vocab: list[Slice] = field(default_factory=list)
    groups: dict[str, ParamGroups] = field(default_factory=dict)
    param_layers: dict[str, int] = field(default_factory=dict)

    def layer(self, param_name: str) -> int | None:
        """Layer index of a parameter (from the adapter, else parsed from the name)."""
        if param_name in self.param_layers:
            return self.param_layers[param_name]
        return layer_of(param_name)

    def group_names(self, param_name: str) -> list[str]:
        return self.groups[param_name].names

    def heads(self) -> Iterable[HeadSlices]:
        for att in self.attention:
            yield from att.heads

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter,
            "model_type": self.model_type,
            "num_layers": self.num_layers,
            "attention": [
                {
                    "layer": a.layer,
                    "num_heads": a.num_heads,
                    "num_kv_heads": a.num_kv_heads,
                    "head_dim": a.head_dim,
                    "heads": [
                        {
                            "layer": h.layer,
                            "head": h.head,
                            "kv_head": h.kv_head,
                            **{role: [asdict(s) for s in getattr(h, role)] for role in "qkvo"},
                        }
                        for h in a.heads
                    ],
                }
                for a in self.attention
            ],
            "mlp": [
                {"layer": b.layer, "num_channels": b.num_channels, "roles": [asdict(r) for r in b.roles]}
                for b in self.mlp
            ],
            "vocab": [asdict(s) for s in self.vocab],
            "groups": {k: g.to_dict() for k, g in self.groups.items()},
            "param_layers": dict(self.param_layers),
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "ModelLayout":
        def slices(items):
            return tuple(Slice(**s) for s in items)

        attention = [
            AttentionLayer(
                layer=a["layer"],
                num_heads=a["num_heads"],
                num_kv_heads=a["num_kv_heads"],
                head_dim=a["head_dim"],
                heads=tuple(
                    HeadSlices(
                        layer=h["layer"],
                        head=h["head"],
                        kv_head=h["kv_head"],
                        q=slices(h["q"]),
                        k=slices(h["k"]),
                        v=slices(h["v"]),
                        o=slices(h["o"]),
                    )
                    for h in a["heads"]
                ),
            )
            for a in d.get("attention", [])
        ]
        mlp = [
            ChannelBlock(b["layer"], b["num_channels"], tuple(ChannelRole(**r) for r in b["roles"]))
            for b in d.get("mlp", [])
        ]
        return ModelLayout(
            adapter=d["adapter"],
            model_type=d.get("model_type"),
            num_layers=int(d.get("num_layers", 0)),
            attention=attention,
            mlp=mlp,
            vocab=[Slice(**s) for s in d.get("vocab", [])],
            groups={k: ParamGroups.from_dict(g) for k, g in d.get("groups", {}).items()},
            param_layers={k: int(v) for k, v in d.get("param_layers", {}).items()},
        )
