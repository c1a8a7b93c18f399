"""Architecture-independent description of a model: heads, kv-heads, MLP channels, vocab rows.

An architecture adapter (see ``hookspecs.hf_fisher_model_layout``) turns a concrete model into a
:class:`ModelLayout`. Everything downstream (the engine's ``reduction="group"``, pruning, merging,
QK-OV analysis, reports) reads only this description, never the model's module names.

Vocabulary
----------
- :class:`Slice`: a contiguous index range ``[start, stop)`` of one parameter along one axis.
- :class:`ParamGroups`: the partition of one parameter along one axis (or several axes,
  flattened in C order: e.g. (expert, row) of a fused MoE ``gate_up_proj``) into named groups
  that ``reduction="group"`` sums over (square first, then reduce; see DESIGN.md section 2).
  Groups come in *runs* of equal-sized, consecutive groups (e.g. 8 query heads of 64 rows each).
- :class:`HeadSlices`: where one attention head lives (its Q rows, the K/V rows of its kv-head,
  its O columns), :class:`ChannelBlock`: where the MLP channels of one layer live,
  :class:`ExpertBlock`: where the routed experts of one MoE layer (and their router) live.
- :class:`ModelLayout`: all of the above for one model, JSON-serialisable.

Parameter names are the names of ``model.named_parameters()`` of the model the layout was built
for (including a PEFT wrapper's prefixes).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = [
    "AttentionLayer",
    "ChannelBlock",
    "ChannelRole",
    "ExpertBlock",
    "ExpertRole",
    "GroupRun",
    "HeadSlices",
    "ModelLayout",
    "ParamGroups",
    "Slice",
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
    """Partition of a parameter along one axis, or several flattened axes, into groups.

    The groups run over the *group index*: the index along ``axis`` (single-axis groups), or,
    with ``extra_axes``, the flat C-order index over :attr:`axes` ``= (axis, *extra_axes)``
    (e.g. ``axes=(0, 1)`` of an expert tensor ``[E, R, H]``: position ``e * R + r`` is row ``r``
    of expert ``e``). The runs cover the group index exactly, in order: ``axis_size`` (the total
    of the runs) equals ``prod(shape[a] for a in axes)``.

    Group ``g`` of a parameter-level tensor ``F`` has value ``sum(F[j] for j whose group index
    is in g)``: every axis outside :attr:`axes` is summed over (reduction "sum", mass preserving).
    """

    axis: int
    runs: tuple[GroupRun, ...]
    extra_axes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "axis", int(self.axis))
        object.__setattr__(self, "runs", tuple(self.runs))
        object.__setattr__(self, "extra_axes", tuple(int(a) for a in self.extra_axes))
        axes = self.axes
        if any(a < 0 for a in axes) or len(set(axes)) != len(axes):
            raise ValueError(f"ParamGroups axes must be distinct non-negative axes, got {axes}")

    @staticmethod
    def single(axis: int, size: int, label: str = "all") -> ParamGroups:
        """One group covering the whole axis."""
        return ParamGroups(axis, (GroupRun(label, 1, size),))

    @staticmethod
    def per_index(axis: int, size: int, prefix: str) -> ParamGroups:
        """One group per index along ``axis`` (e.g. MLP channels, vocabulary rows)."""
        return ParamGroups(axis, (GroupRun(prefix, size, 1),))

    @property
    def axes(self) -> tuple[int, ...]:
        """The axes the group index runs over, outermost first: ``(axis, *extra_axes)``."""
        return (self.axis, *self.extra_axes)

    @property
    def num_groups(self) -> int:
        return sum(r.count for r in self.runs)

    @property
    def axis_size(self) -> int:
        """Length of the group index (the total of the runs): ``prod(shape[a] for a in axes)``."""
        return sum(r.count * r.size for r in self.runs)

    def group_axes_size(self, shape: Sequence[int]) -> int | None:
        """``prod(shape[a] for a in axes)`` for a parameter of ``shape``; None if an axis is outside
        it. A 0-d parameter counts as shape ``(1,)``."""
        shape = tuple(int(s) for s in shape) or (1,)
        if any(a >= len(shape) for a in self.axes):
            return None
        return math.prod(shape[a] for a in self.axes)

    def fits(self, shape: Sequence[int]) -> bool:
        """Whether these groups partition a parameter of ``shape`` exactly (see :meth:`group_axes_size`)."""
        return self.group_axes_size(shape) == self.axis_size

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
        """Number of group-index positions in each group, shape ``[num_groups]``."""
        return torch.cat([torch.full((r.count,), r.size, dtype=torch.long) for r in self.runs])

    def index(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Group id of every position of the group index (flat over :attr:`axes`), ``[axis_size]`` (int64)."""
        return torch.repeat_interleave(torch.arange(self.num_groups), self.sizes()).to(device)

    def is_uniform(self) -> bool:
        return len({r.size for r in self.runs}) == 1

    def reduce(self, values: torch.Tensor, batch_dims: int = 0) -> torch.Tensor:
        """Sum ``values`` (shape ``[*batch, *param_shape]``) within each group.

        Returns ``[*batch, num_groups]``: first sums every axis outside :attr:`axes`, then
        flattens the group axes in the order of :attr:`axes` (C order), then sums the positions
        of each group (:meth:`reduce_axis`).
        """
        return self.reduce_axis(self.flat_index_values(values, batch_dims))

    def flat_index_values(self, values: torch.Tensor, batch_dims: int = 0) -> torch.Tensor:
        """``[*batch, axis_size]``: ``values`` summed over every axis outside :attr:`axes`, the group
        axes flattened in the order of :attr:`axes` — the input :meth:`reduce_axis` expects."""
        if values.dim() == batch_dims:  # a 0-d parameter: one position
            return values.unsqueeze(-1)
        axes = [batch_dims + a for a in self.axes]
        other = [d for d in range(batch_dims, values.dim()) if d not in axes]
        kept = values.sum(dim=other) if other else values
        # the kept dims are the batch dims, then the group axes in ascending order
        ascending = sorted(axes)
        perm = list(range(batch_dims)) + [batch_dims + ascending.index(a) for a in axes]
        if perm != list(range(kept.dim())):
            kept = kept.permute(perm)
        return kept.reshape(*kept.shape[:batch_dims], -1)

    def reduce_axis(self, per_index: torch.Tensor) -> torch.Tensor:
        """Sum a ``[..., axis_size]`` tensor of per-position values into ``[..., num_groups]``.

        For multi-axis groups the last dim is the flat C-order index over :attr:`axes` (what
        :meth:`flat_index_values` returns), so ``reduce(v, b) == reduce_axis(flat_index_values(v, b))``.
        """
        if self.is_uniform():
            size = self.runs[0].size
            return per_index.reshape(*per_index.shape[:-1], self.num_groups, size).sum(-1)
        out = per_index.new_zeros(*per_index.shape[:-1], self.num_groups)
        return out.index_add_(-1, self.index(per_index.device), per_index)

    def expand(self, values: torch.Tensor, shape: Sequence[int], *, spread: bool = False) -> torch.Tensor:
        """Broadcast group values ``[num_groups]`` back to a parameter of ``shape``.

        Every element gets its group's value; with ``spread=True`` the value is divided by the
        number of elements in the group (its positions times the elements of the axes outside
        :attr:`axes`), so the expanded tensor sums to the same total.
        """
        shape = tuple(int(s) for s in shape)
        idx = self.index(values.device)
        per_index = values[idx]
        if spread:
            numel_per_index = math.prod(s for d, s in enumerate(shape) if d not in self.axes)
            per_index = per_index / (self.sizes().to(values.device)[idx] * numel_per_index)
        if not shape:
            return per_index.reshape(()).clone()
        grid = per_index.reshape([shape[a] for a in self.axes])
        ascending = sorted(self.axes)
        grid = grid.permute([self.axes.index(a) for a in ascending])  # group axes in ascending order
        view = [shape[d] if d in self.axes else 1 for d in range(len(shape))]
        return grid.reshape(view).expand(shape).clone()

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"axis": self.axis, "runs": [asdict(r) for r in self.runs]}
        if self.extra_axes:
            d["extra_axes"] = list(self.extra_axes)
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> ParamGroups:
        return ParamGroups(
            int(d["axis"]),
            tuple(GroupRun(**r) for r in d["runs"]),
            tuple(int(a) for a in d.get("extra_axes") or ()),
        )


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


@dataclass(frozen=True)
class ExpertRole:
    """One weight of the routed experts of a layer, e.g. the gate rows of a fused ``gate_up_proj``.

    Expert ``e`` is index ``e`` of ``param`` along ``expert_axis``; its channel ``c`` is index
    ``offset + c`` along ``channel_axis``. ``channel_axis=None`` marks a weight that belongs to the
    expert as a whole but not to any one channel (e.g. a ``down_proj`` bias ``[E, H]``). ``role``
    is a label: ``"gate"``, ``"up"``, ``"down"``, ``"gate_bias"``, ...
    """

    role: str
    param: str
    expert_axis: int
    channel_axis: int | None
    offset: int = 0


@dataclass(frozen=True)
class ExpertBlock:
    """The routed experts of one mixture-of-experts layer.

    ``num_experts`` experts with ``num_channels`` MLP channels each; ``roles`` say where their
    weights live (HF transformers 5 fused tensors: ``gate_up_proj [E, 2I, H]`` gives a "gate"
    role at offset 0 and an "up" role at offset I on ``channel_axis`` 1, ``down_proj [E, H, I]``
    a "down" role on ``channel_axis`` 2). The router is ``router`` (``[E, H]``, expert ``e`` is
    index ``e`` along ``router_axis``), or None. ``top_k``: experts per token, when known.
    A dense shared expert (Qwen2-MoE) is an ordinary :class:`ChannelBlock`, not part of this.
    """

    layer: int
    num_experts: int
    num_channels: int
    roles: tuple[ExpertRole, ...]
    router: str | None = None
    router_axis: int = 0
    top_k: int | None = None

    def params(self) -> list[str]:
        """The distinct expert-weight parameters (router excluded), in role order."""
        return list(dict.fromkeys(r.param for r in self.roles))

    def expert_axis(self, param: str) -> int:
        """The expert axis of ``param`` (one of :meth:`params`)."""
        for r in self.roles:
            if r.param == param:
                return r.expert_axis
        raise KeyError(f"{param!r} is not an expert weight of layer {self.layer}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "num_experts": self.num_experts,
            "num_channels": self.num_channels,
            "roles": [asdict(r) for r in self.roles],
            "router": self.router,
            "router_axis": self.router_axis,
            "top_k": self.top_k,
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> ExpertBlock:
        return ExpertBlock(
            layer=int(d["layer"]),
            num_experts=int(d["num_experts"]),
            num_channels=int(d["num_channels"]),
            roles=tuple(ExpertRole(**r) for r in d.get("roles", [])),
            router=d.get("router"),
            router_axis=int(d.get("router_axis", 0)),
            top_k=None if d.get("top_k") is None else int(d["top_k"]),
        )


@dataclass
class ModelLayout:
    """Everything the consumers need to know about a model's structure.

    ``groups`` holds the ``reduction="group"`` partition of *every* parameter of the model
    (adapter-defined where the adapter knows the parameter, generic otherwise: per output channel
    for linear-like weights, one group for anything else). ``experts`` describes the routed
    experts of mixture-of-experts layers (empty for dense models).
    """

    adapter: str
    model_type: str | None
    num_layers: int
    attention: list[AttentionLayer] = field(default_factory=list)
    mlp: list[ChannelBlock] = field(default_factory=list)
    vocab: list[Slice] = field(default_factory=list)
    groups: dict[str, ParamGroups] = field(default_factory=dict)
    param_layers: dict[str, int] = field(default_factory=dict)
    experts: list[ExpertBlock] = field(default_factory=list)

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
            "experts": [e.to_dict() for e in self.experts],
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> ModelLayout:
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
            experts=[ExpertBlock.from_dict(e) for e in d.get("experts") or []],
        )
