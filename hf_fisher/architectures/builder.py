"""Tools for architecture adapters: build a :class:`~hf_fisher.layout.ModelLayout` from modules.

An adapter walks the *underlying* Hugging Face model (PEFT wrappers removed) and hands parameter
*objects* to a :class:`LayoutBuilder`; the builder turns them into the names of the *outer*
model's ``named_parameters()`` (so PEFT prefixes such as ``base_model.model.`` and LoRA's
``.base_layer.weight`` come out right) and assembles the layout.

:func:`complete_groups` gives every parameter the adapter did not describe a default group
partition (the generic rules below) and LoRA factors groups inherited from their base weight.

Generic rules (reduction="group", sums of the parameter's Fisher within each group):

- ``nn.Linear`` weight ``[out, in]`` and bias ``[out]``: one group per output channel (axis 0).
- HF ``Conv1D`` weight ``[in, out]`` (transposed): one group per output channel (axis 1); bias
  ``[out]`` per index (axis 0).
- ``nn.Embedding`` weight ``[V, d]``: one group per vocabulary row (axis 0).
- anything else (norms, scalars, custom parameters): one group ("all") along axis 0.

LoRA (``delta W = B @ A``, ``A: [r, in]``, ``B: [out, r]`` for a base weight with output axis
``o`` and input axis ``i``; ``o, i = 0, 1`` for Linear/Conv, ``1, 0`` for HF Conv1D):

- ``lora_B`` inherits the base weight's runs on its axis 0 when the base is grouped on ``o``,
  else one group per rank column: ``per_index(axis=1, r, "rank_")``.
- ``lora_A`` inherits the base's runs on its axis 1 when the base is grouped on ``i``, else one
  group per rank row: ``per_index(axis=0, r, "rank_")``.
- LoRA embeddings (``E_A: [r, V]``, ``E_B: [d, r]``; ``delta W = (E_B @ E_A).T``) likewise:
  ``E_A`` inherits base axis-0 runs on its axis 1, ``E_B`` base axis-1 runs on its axis 0.
- DoRA magnitudes ``[out]`` inherit the base's runs on ``o``, else one group.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hf_fisher.errors import PluginError
from hf_fisher.layout import (
    AttentionLayer,
    ChannelBlock,
    ChannelRole,
    ExpertBlock,
    ExpertRole,
    HeadSlices,
    ModelLayout,
    ParamGroups,
    Slice,
    layer_of,
)

__all__ = [
    "HeadPart",
    "LayoutBuilder",
    "complete_groups",
    "config_of",
    "default_groups",
    "find_module",
    "is_conv1d",
    "model_type_of",
    "unwrap_peft",
    "validate_layout",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# small helpers


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a ``peft.PeftModel`` (``get_base_model()``), else ``model``."""
    try:
        import peft
    except ImportError:  # pragma: no cover - peft is a dependency, but stay usable without it
        return model
    if isinstance(model, peft.PeftModel):
        return model.get_base_model()
    return model


def config_of(model: nn.Module) -> Any | None:
    """The HF config of ``model`` (PEFT unwrapped), or None for a plain torch module."""
    return getattr(unwrap_peft(model), "config", None)


def model_type_of(model: nn.Module) -> str | None:
    """``config.model_type`` of ``model`` (PEFT unwrapped), or None."""
    return getattr(config_of(model), "model_type", None)


def find_module(root: nn.Module, paths: Iterable[str]) -> nn.Module | None:
    """The first of the dotted attribute ``paths`` that exists below ``root`` (else None)."""
    for path in paths:
        obj: Any = root
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.Module):
            return obj
    return None


def is_conv1d(module: nn.Module) -> bool:
    """True for the transposed linear layer of HF (GPT-2's ``Conv1D``, weight ``[in, out]``)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, Conv1D)


def _axis_len(param: torch.Tensor, axis: int) -> int | None:
    if param.dim() == 0:
        return 1 if axis == 0 else None
    if 0 <= axis < param.dim():
        return int(param.shape[axis])
    return None


def _groups_misfit(param: torch.Tensor, groups: ParamGroups) -> str | None:
    """Why ``groups`` do not partition ``param`` (None when they do): the runs must cover
    ``prod(param.shape[a] for a in groups.axes)`` indices exactly."""
    n = groups.group_axes_size(tuple(param.shape))
    if n is not None and groups.axis_size == n:
        return None
    where = f"axis {groups.axis}" if not groups.extra_axes else f"axes {groups.axes} (flattened, C order)"
    return f"cover {groups.axis_size} indices along {where}, but the parameter has shape {tuple(param.shape)}"


@dataclass(frozen=True, eq=False)
class HeadPart:
    """Where the heads live in one parameter.

    Head ``h`` (or kv-head ``j`` for K and V parts) occupies indices
    ``offset + h * stride ... offset + h * stride + head_dim`` of ``param`` along ``axis``;
    ``stride`` defaults to ``head_dim`` (heads stored one after another). ``param`` may be None
    (e.g. an absent bias): the part is then ignored.
    """

    param: torch.Tensor | None
    axis: int
    offset: int = 0
    stride: int | None = None


# --------------------------------------------------------------------------------------------
# default (generic) groups and LoRA inheritance


def _owners(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Parameter name (of ``model.named_parameters()``) -> (owning module, attribute name)."""
    modules = dict(model.named_modules())
    out: dict[str, tuple[nn.Module, str]] = {}
    for name, _ in model.named_parameters():
        prefix, _, attr = name.rpartition(".")
        out[name] = (modules[prefix] if prefix else model, attr)
    return out


def default_groups(module: nn.Module, attr: str, param: torch.Tensor) -> ParamGroups:
    """The generic partition of parameter ``attr`` of ``module`` (see the module docstring)."""
    if param.dim() == 0:
        return ParamGroups.single(0, 1)
    if isinstance(module, nn.Linear) and attr in ("weight", "bias"):
        return ParamGroups.per_index(0, int(param.shape[0]), "channel_")
    if is_conv1d(module) and attr == "weight" and param.dim() == 2:
        return ParamGroups.per_index(1, int(param.shape[1]), "channel_")
    if is_conv1d(module) and attr == "bias":
        return ParamGroups.per_index(0, int(param.shape[0]), "channel_")
    if isinstance(module, nn.Embedding) and attr == "weight":
        return ParamGroups.per_index(0, int(param.shape[0]), "token_")
    return ParamGroups.single(0, int(param.shape[0]))


def _moved(groups: ParamGroups | None, from_axis: int, to_axis: int, size: int) -> ParamGroups | None:
    """``groups``' runs placed on ``to_axis`` when they partition ``from_axis`` of length ``size``."""
    if groups is None or groups.extra_axes or groups.axis != from_axis or groups.axis_size != size:
        return None
    return ParamGroups(to_axis, groups.runs)


def _lora_groups(
    model: nn.Module, names: Mapping[int, str], groups: Mapping[str, ParamGroups]
) -> dict[str, ParamGroups]:
    """Groups of every LoRA / DoRA parameter of ``model``, inherited from its base weight."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover
        return {}
    out: dict[str, ParamGroups] = {}
    for mod in model.modules():
        if not isinstance(mod, LoraLayer):
            continue
        base = mod.get_base_layer()
        base_w = getattr(base, "weight", None)
        base_g = groups.get(names.get(id(base_w), "")) if isinstance(base_w, torch.Tensor) else None
        out_axis, in_axis = (1, 0) if is_conv1d(base) else (0, 1)

        def put(p: torch.Tensor | None, inherited: ParamGroups | None, fallback: ParamGroups) -> None:
            name = names.get(id(p)) if p is not None else None
            if name is not None:
                out[name] = inherited if inherited is not None else fallback

        for key in mod.lora_A:
            a_mod, b_mod = mod.lora_A[key], (mod.lora_B[key] if key in mod.lora_B else None)  # noqa: SIM401 - a ModuleDict has no get()
            a_w = getattr(a_mod, "weight", None)
            if isinstance(a_w, torch.Tensor) and a_w.dim() >= 2:
                r = int(a_w.shape[0])
                put(a_w, _moved(base_g, in_axis, 1, int(a_w.shape[1])), ParamGroups.per_index(0, r, "rank_"))
            if b_mod is not None:
                b_w = getattr(b_mod, "weight", None)
                if isinstance(b_w, torch.Tensor) and b_w.dim() >= 2:
                    out_g = _moved(base_g, out_axis, 0, int(b_w.shape[0]))
                    put(b_w, out_g, ParamGroups.per_index(1, int(b_w.shape[1]), "rank_"))
                    b_b = getattr(b_mod, "bias", None)
                    if isinstance(b_b, torch.Tensor):
                        put(b_b, out_g, ParamGroups.single(0, int(b_b.shape[0])))
        for key in mod.lora_embedding_A:
            e_a = mod.lora_embedding_A[key]
            put(e_a, _moved(base_g, 0, 1, int(e_a.shape[1])), ParamGroups.per_index(0, int(e_a.shape[0]), "rank_"))
            if key in mod.lora_embedding_B:
                e_b = mod.lora_embedding_B[key]
                put(e_b, _moved(base_g, 1, 0, int(e_b.shape[0])), ParamGroups.per_index(1, int(e_b.shape[1]), "rank_"))
        for key in getattr(mod, "lora_magnitude_vector", {}):
            for p in mod.lora_magnitude_vector[key].parameters(recurse=False):
                if p.dim() == 1:
                    put(p, _moved(base_g, out_axis, 0, int(p.shape[0])), ParamGroups.single(0, int(p.shape[0])))
    return out


def complete_groups(model: nn.Module, groups: Mapping[str, ParamGroups]) -> dict[str, ParamGroups]:
    """``groups`` extended to every parameter of ``model.named_parameters()``.

    Parameters already in ``groups`` keep their partition. LoRA parameters not in ``groups``
    inherit from their base weight (after the base got its own default, if it had none); every
    other parameter gets :func:`default_groups`. The result follows ``named_parameters()`` order.
    """
    params = dict(model.named_parameters())
    names = {id(p): n for n, p in params.items()}
    owners = _owners(model)
    known = dict(groups)
    lora_names = set(_lora_groups(model, names, {}))  # which names are LoRA factors
    for name, p in params.items():
        if name not in known and name not in lora_names:
            module, attr = owners[name]
            known[name] = default_groups(module, attr, p)
    for name, g in _lora_groups(model, names, known).items():
        known.setdefault(name, g)
    for name, p in params.items():  # LoRA-like params that the LoRA pass could not place
        if name not in known:
            module, attr = owners[name]
            known[name] = default_groups(module, attr, p)
    return {name: known[name] for name in params}


def validate_layout(model: nn.Module, layout: ModelLayout, who: str) -> None:
    """Raise :class:`PluginError` naming ``who`` when ``layout`` does not fit ``model``.

    Checks that every group partition, every slice and every expert block names a parameter of
    ``model.named_parameters()`` and stays within its shape (multi-axis groups: the runs cover
    the product of the group axes' sizes).
    """
    params = dict(model.named_parameters())

    def bad(msg: str) -> PluginError:
        return PluginError(
            f"architecture adapter {who!r} returned a layout that does not fit the model: {msg}. "
            "Fix the adapter (or unregister it to fall back to the next one)."
        )

    for name, g in layout.groups.items():
        if name not in params:
            raise bad(f"groups for {name!r}, which is not a parameter of model.named_parameters()")
        why = _groups_misfit(params[name], g)
        if why is not None:
            raise bad(f"groups of {name!r} {why}")
    slices: list[Slice] = list(layout.vocab)
    for head in layout.heads():
        slices.extend(head.q + head.k + head.v + head.o)
    for block in layout.mlp:
        for role in block.roles:
            slices.append(Slice(role.param, role.axis, role.offset, role.offset + block.num_channels))
    for s in slices:
        if s.param not in params:
            raise bad(f"slice of {s.param!r}, which is not a parameter of model.named_parameters()")
        n = _axis_len(params[s.param], s.axis)
        if n is None or not (0 <= s.start < s.stop <= n):
            raise bad(f"slice {s} is outside the parameter's shape {tuple(params[s.param].shape)}")
    for block in getattr(layout, "experts", None) or []:
        for role in block.roles:
            if role.param not in params:
                raise bad(f"experts of layer {block.layer}: {role.param!r} is not a parameter of model.named_parameters()")
            shape = tuple(params[role.param].shape)
            n_e = _axis_len(params[role.param], role.expert_axis)
            if n_e != block.num_experts:
                raise bad(
                    f"experts of layer {block.layer}: {role.param!r} (shape {shape}) does not hold "
                    f"{block.num_experts} experts along axis {role.expert_axis}"
                )
            if role.channel_axis is not None:
                n_c = _axis_len(params[role.param], role.channel_axis)
                if role.channel_axis == role.expert_axis or n_c is None or not (
                    role.offset >= 0 and role.offset + block.num_channels <= n_c
                ):
                    raise bad(
                        f"experts of layer {block.layer}: role {role.role!r} (channels {role.offset}.."
                        f"{role.offset + block.num_channels - 1} along axis {role.channel_axis}) is outside "
                        f"{role.param!r} of shape {shape}"
                    )
        if block.router is not None:
            if block.router not in params:
                raise bad(f"router of layer {block.layer}: {block.router!r} is not a parameter of model.named_parameters()")
            if _axis_len(params[block.router], block.router_axis) != block.num_experts:
                raise bad(
                    f"router {block.router!r} (shape {tuple(params[block.router].shape)}) does not have "
                    f"{block.num_experts} experts along axis {block.router_axis}"
                )


# --------------------------------------------------------------------------------------------
# the builder


class LayoutBuilder:
    """Assemble a :class:`ModelLayout` for ``model`` from parameter objects.

    ``model`` is the model the user passes (possibly a ``peft.PeftModel``); :attr:`base` is the
    underlying HF model that adapters walk; all names in the result are those of
    ``model.named_parameters()``. Parameters that are ``None`` or not parameters of ``model``
    (e.g. absent biases) are silently ignored by every method.
    """

    def __init__(self, model: nn.Module, adapter: str) -> None:
        self.model = model
        self.adapter = adapter
        self.base = unwrap_peft(model)
        self.config = getattr(self.base, "config", None)
        self.model_type: str | None = getattr(self.config, "model_type", None)
        self._names = {id(p): n for n, p in model.named_parameters()}
        self._groups: dict[str, ParamGroups] = {}
        self._layers: dict[str, int] = {}
        self._attention: list[AttentionLayer] = []
        self._mlp: list[ChannelBlock] = []
        self._vocab: list[Slice] = []
        self._experts: list[ExpertBlock] = []

    # -- names --------------------------------------------------------------------------------

    def name(self, param: torch.Tensor | None) -> str | None:
        """Name of ``param`` in the outer model's ``named_parameters()``, or None."""
        return None if param is None else self._names.get(id(param))

    def set_layer(self, param: torch.Tensor | None, layer: int) -> None:
        name = self.name(param)
        if name is not None:
            self._layers[name] = int(layer)

    # -- groups -------------------------------------------------------------------------------

    def set_groups(self, param: torch.Tensor | None, groups: ParamGroups, *, layer: int | None = None) -> None:
        """Use ``groups`` as the partition of ``param`` (checked against its shape)."""
        name = self.name(param)
        if name is None:
            return
        assert param is not None
        why = _groups_misfit(param, groups)
        if why is not None:
            raise PluginError(f"adapter {self.adapter!r}: groups for {name!r} {why}")
        old = self._groups.get(name)
        if old is not None and old != groups:
            raise PluginError(f"adapter {self.adapter!r}: conflicting groups for {name!r}: {old} vs {groups}")
        self._groups[name] = groups
        if layer is not None:
            self._layers[name] = int(layer)

    def per_index(self, param: torch.Tensor | None, axis: int, prefix: str, *, layer: int | None = None) -> None:
        """One group per index of ``param`` along ``axis`` (channels, tokens, positions)."""
        if param is not None:
            self.set_groups(param, ParamGroups.per_index(axis, int(param.shape[axis]), prefix), layer=layer)

    def single(self, param: torch.Tensor | None, *, layer: int | None = None) -> None:
        """One group for the whole parameter."""
        if param is not None:
            size = int(param.shape[0]) if param.dim() else 1
            self.set_groups(param, ParamGroups.single(0, size), layer=layer)

    # -- structure ----------------------------------------------------------------------------

    def _slices(self, parts: Sequence[HeadPart], index: int, head_dim: int) -> tuple[Slice, ...]:
        out = []
        for part in parts:
            name = self.name(part.param)
            if name is None:
                continue
            start = part.offset + index * (part.stride if part.stride is not None else head_dim)
            out.append(Slice(name, part.axis, start, start + head_dim))
        return tuple(out)

    def add_attention(
        self,
        layer: int,
        *,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        q: Sequence[HeadPart],
        k: Sequence[HeadPart],
        v: Sequence[HeadPart],
        o: Sequence[HeadPart],
    ) -> None:
        """Describe one attention layer; head ``h`` uses kv-head ``h // (num_heads // num_kv_heads)``.

        Q and O parts are indexed by the head, K and V parts by its kv-head.
        """
        if num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise PluginError(
                f"adapter {self.adapter!r}: layer {layer} has {num_heads} heads and {num_kv_heads} "
                "kv-heads; the number of heads must be a multiple of the number of kv-heads"
            )
        group = num_heads // num_kv_heads
        heads = []
        for h in range(num_heads):
            kv = h // group
            heads.append(
                HeadSlices(
                    layer=layer,
                    head=h,
                    kv_head=kv,
                    q=self._slices(q, h, head_dim),
                    k=self._slices(k, kv, head_dim),
                    v=self._slices(v, kv, head_dim),
                    o=self._slices(o, h, head_dim),
                )
            )
        for part in (*q, *k, *v, *o):
            self.set_layer(part.param, layer)
        self._attention.append(AttentionLayer(layer, num_heads, num_kv_heads, head_dim, tuple(heads)))

    def add_mlp(
        self, layer: int, num_channels: int, roles: Sequence[tuple[torch.Tensor | None, int] | tuple[torch.Tensor | None, int, int]]
    ) -> None:
        """Describe one MLP block: channel ``c`` is index ``offset + c`` of each role's parameter
        along its axis; roles are ``(param, axis)`` or ``(param, axis, offset)``."""
        out = []
        for role in roles:
            param, axis = role[0], role[1]
            offset = role[2] if len(role) > 2 else 0  # type: ignore[misc]
            name = self.name(param)
            if name is None:
                continue
            out.append(ChannelRole(name, int(axis), int(offset)))
            self._layers[name] = int(layer)
        if out:
            self._mlp.append(ChannelBlock(layer, int(num_channels), tuple(out)))

    def add_experts(
        self,
        layer: int,
        num_experts: int,
        num_channels: int,
        roles: Sequence[tuple[str, torch.Tensor | None, int, int | None] | tuple[str, torch.Tensor | None, int, int | None, int]],
        *,
        router: torch.Tensor | None = None,
        router_axis: int = 0,
        top_k: int | None = None,
    ) -> None:
        """Describe the routed experts of one MoE layer (an :class:`ExpertBlock`).

        ``roles`` are ``(role, param, expert_axis, channel_axis)`` or ``(role, param, expert_axis,
        channel_axis, offset)``: expert ``e``'s channel ``c`` is index ``e`` along ``expert_axis``
        and ``offset + c`` along ``channel_axis`` (``None``: the weight has no channel index).
        ``router``: the router weight, expert ``e`` at index ``e`` along ``router_axis``. Roles
        whose parameter is None or not a parameter of the model are dropped.
        """
        out = []
        for spec in roles:
            role, param, expert_axis, channel_axis = spec[0], spec[1], spec[2], spec[3]
            offset = spec[4] if len(spec) > 4 else 0  # type: ignore[misc]
            name = self.name(param)
            if name is None:
                continue
            out.append(
                ExpertRole(str(role), name, int(expert_axis), None if channel_axis is None else int(channel_axis), int(offset))
            )
            self._layers[name] = int(layer)
        router_name = self.name(router)
        if router_name is not None:
            self._layers[router_name] = int(layer)
        if out or router_name is not None:
            self._experts.append(
                ExpertBlock(
                    layer=int(layer),
                    num_experts=int(num_experts),
                    num_channels=int(num_channels),
                    roles=tuple(out),
                    router=router_name,
                    router_axis=int(router_axis),
                    top_k=None if top_k is None else int(top_k),
                )
            )

    def add_token_rows(self) -> None:
        """The input embeddings' and the LM head's rows (2-D weights only), one group per token
        each and registered as vocabulary rows (a tied pair once): what every language-model
        adapter adds for its vocabulary."""
        embed = self.base.get_input_embeddings() if hasattr(self.base, "get_input_embeddings") else None
        head = self.base.get_output_embeddings() if hasattr(self.base, "get_output_embeddings") else None
        for mod in (embed, head):
            w = getattr(mod, "weight", None) if mod is not None else None
            if w is not None and w.dim() == 2:
                self.per_index(w, 0, "token_")
                self.add_vocab(w, 0)

    def add_vocab(self, param: torch.Tensor | None, axis: int = 0) -> None:
        """A vocabulary-indexed parameter (token embeddings, LM head); tied ones appear once."""
        name = self.name(param)
        if name is None or any(s.param == name for s in self._vocab):
            return
        assert param is not None
        self._vocab.append(Slice(name, axis, 0, int(param.shape[axis])))

    # -- result -------------------------------------------------------------------------------

    def build(self, num_layers: int | None = None) -> ModelLayout:
        """The layout; every parameter of the model gets groups (see :func:`complete_groups`).

        ``num_layers`` defaults to ``config.num_hidden_layers``, else the number of distinct
        layer indices found in parameter names.
        """
        groups = complete_groups(self.model, self._groups)
        layers = dict(self._layers)
        for name in groups:
            if name not in layers:
                idx = layer_of(name)
                if idx is not None:
                    layers[name] = idx
        if num_layers is None:
            num_layers = getattr(self.config, "num_hidden_layers", None)
            if not isinstance(num_layers, int):
                num_layers = len(set(layers.values()))
        layout = ModelLayout(
            adapter=self.adapter,
            model_type=self.model_type,
            num_layers=int(num_layers),
            attention=list(self._attention),
            mlp=list(self._mlp),
            vocab=list(self._vocab),
            groups=groups,
            param_layers={n: layers[n] for n in groups if n in layers},
            experts=list(self._experts),
        )
        validate_layout(self.model, layout, self.adapter)
        return layout
