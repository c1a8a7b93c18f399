"""mergekit's ``slices:`` recipes (layer ranges of several models, frankenmerges with ``passthrough``)
as whole-model merges of virtual models.

A slices recipe lists output slices, each a list of ``sources`` (``model``, ``layer_range: [a, b)``,
``parameters``) with the same number of layers. As mergekit 0.1.5 plans it (``mergekit/plan.py``):
output layer ``k`` of slice ``s`` is the merge of layer ``a_j + k`` of every source ``j`` of the
slice; the tensors before the layers (embeddings) are merged from the first slice's sources, those
after them (final norm, head) from the last slice's; the output config is the ``base_model``'s
(else the first source's) with ``num_hidden_layers`` = Σ_s (b_s − a_s) (and ``layer_types``, when the
config has one, cut the same way). Within a slice of ``n`` layers a gradient is read at
``t = k / (n − 1)`` (``t = 1`` for ``n = 1``), outside the layers at ``t = 0``; a setting is looked
up in the source's own ``parameters`` (for that model), then the slice's, then the recipe's.

Here the ``j``-th source of every slice (after the base is set apart, as for a ``models:`` recipe)
forms the virtual model ``j`` (:class:`SlicedSource`: its tensors read lazily from the real
folders under the output names), and :class:`SliceParameters` resolves every tensor's settings; the
merge itself is the ordinary streaming merge. Refused before any work: slices with different
numbers of models or a base in some slices only, a layer range outside its model, a base-model
method whose base is not among a slice's sources, ``residual_weight``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hf_fisher.errors import InvalidInputError, ModelMismatchError

from .io import TensorInfo, TensorSource, open_source
from .parameters import PER_MODEL_KEYS, evaluate, mergekit_names

__all__ = ["SliceParameters", "SlicePlan", "SlicedSource", "check_slices"]

logger = logging.getLogger(__name__)

_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_NUMBERED = re.compile(r"^(.*?)\.(\d+)\.(.+)$")


def _bad(path: str, problem: str, where: str) -> InvalidInputError:
    return InvalidInputError(f"recipe {where}: key '{path}' {problem}")


def check_slices(slices: Any, where: str, check_params) -> None:
    """The form of a recipe's ``slices:`` (types, ranges), each ``parameters`` mapping checked by
    ``check_params(params, path)``; :class:`InvalidInputError` naming the key."""
    if not isinstance(slices, list) or not slices:
        raise _bad("slices", "must be a non-empty list of {sources: [{model, layer_range: [start, end]}, ...]}", where)
    for s, sl in enumerate(slices):
        p = f"slices[{s}]"
        if not isinstance(sl, dict):
            raise _bad(p, "must be a mapping {sources: [...], parameters: {...}}", where)
        extra = sorted(set(sl) - {"sources", "base_model", "parameters", "residual_weight"})
        if extra:
            raise _bad(f"{p}.{extra[0]}", "is not a known key (expected sources, base_model, parameters)", where)
        if sl.get("residual_weight") is not None:
            raise _bad(f"{p}.residual_weight", "is not supported by hf-fisher merge (mergekit 0.1.5 does not apply it "
                       "either); leave it out", where)
        if sl.get("base_model") is not None and (not isinstance(sl["base_model"], str) or not sl["base_model"]):
            raise _bad(f"{p}.base_model", f"must be a model folder or Hub id, got {sl['base_model']!r}", where)
        if not isinstance(sl.get("parameters") or {}, dict):
            raise _bad(f"{p}.parameters", "must be a mapping", where)
        check_params(sl.get("parameters") or {}, f"{p}.parameters")
        sources = sl.get("sources")
        if not isinstance(sources, list) or not sources:
            raise _bad(f"{p}.sources", "must be a non-empty list of {model, layer_range: [start, end]}", where)
        lengths = set()
        for j, src in enumerate(sources):
            q = f"{p}.sources[{j}]"
            if not isinstance(src, dict) or not isinstance(src.get("model"), str) or not src["model"]:
                raise _bad(f"{q}.model", "must be a model folder or Hub id (a string)", where)
            extra = sorted(set(src) - {"model", "layer_range", "parameters"})
            if extra:
                raise _bad(f"{q}.{extra[0]}", "is not a known key (expected model, layer_range, parameters)", where)
            lr = src.get("layer_range")
            if (not isinstance(lr, list) or len(lr) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in lr)
                    or not 0 <= lr[0] < lr[1]):
                raise _bad(f"{q}.layer_range", f"must be [start, end] with 0 <= start < end (layers start..end-1), got {lr!r}",
                           where)
            lengths.add(lr[1] - lr[0])
            if not isinstance(src.get("parameters") or {}, dict):
                raise _bad(f"{q}.parameters", "must be a mapping", where)
            check_params(src.get("parameters") or {}, f"{q}.parameters")
        if len(lengths) > 1:
            raise _bad(f"{p}.sources", f"have layer ranges of different lengths {sorted(lengths)}; every source of a "
                       "slice must give the same number of layers", where)
        models = [src["model"] for src in sources]
        if len(set(models)) != len(models):
            raise _bad(f"{p}.sources", f"name a model twice ({models}); each model once per slice", where)


def _num_layers(config: Mapping[str, Any]) -> int | None:
    for key in _LAYER_KEYS:
        if isinstance(config.get(key), int):
            return config[key]
    return None


@dataclass(frozen=True)
class _Piece:
    """One source of one slice: ``ref`` layers ``start .. start + length − 1`` as output layers
    ``out_start ..``, with the source's own ``parameters``."""

    ref: str
    start: int
    parameters: Mapping[str, Any]


class SlicePlan:
    """Where every output tensor of a slices recipe comes from.

    ``columns[j][s]``: the ``j``-th model (a :class:`_Piece`) of slice ``s``; ``base[s]`` the base
    of slice ``s`` (None: the method has no base); ``lengths[s]`` its number of layers. Sources are
    opened (headers only) on first use, once per folder."""

    def __init__(self, columns: list[list[_Piece]], base: list[_Piece] | None, lengths: list[int],
                 slice_params: list[Mapping[str, Any]], donor: str, hub_options: Mapping[str, Any] | None = None) -> None:
        self.columns, self.base, self.lengths, self.slice_params = columns, base, lengths, slice_params
        self.donor = donor
        self.hub_options = dict(hub_options or {})
        self.out_starts = [sum(lengths[:s]) for s in range(len(lengths))]
        self._sources: dict[str, TensorSource] = {}
        self._layout: tuple[str, list[str], list[str]] | None = None

    # ------------------------------------------------------------------ inputs
    def refs(self) -> list[str]:
        """Every model the plan reads (for the output-folder checks)."""
        pieces = [p for col in self.columns for p in col] + list(self.base or [])
        return list(dict.fromkeys([*(p.ref for p in pieces), self.donor]))

    def source(self, ref: str) -> TensorSource:
        if ref not in self._sources:
            self._sources[ref] = open_source(ref, what=f"model {ref!r} of slices", hub_options=self.hub_options)
        return self._sources[ref]

    def _layers_of(self, src: TensorSource) -> tuple[str, int]:
        """``(prefix, L)``: the numbered container of the model's layers (``model.layers``) and
        their number; refused when the config or the tensor names do not give them."""
        n = _num_layers(src.config)
        if n is None:
            raise InvalidInputError(f"slices: model {src.ref!r} has no layer count ({'/'.join(_LAYER_KEYS)}) in its config; "
                                    "cannot cut it into layer ranges")
        found: dict[str, set[int]] = {}
        for name in src.infos():
            m = _NUMBERED.match(name)
            if m:
                found.setdefault(m.group(1), set()).add(int(m.group(2)))
        prefixes = [p for p, idx in found.items() if idx == set(range(n))]
        if len(prefixes) != 1:
            raise InvalidInputError(f"slices: cannot tell the {n} layers of model {src.ref!r} from its tensor names "
                                    f"(numbered containers {sorted(found)}); slices need one stack of layers")
        return prefixes[0], n

    def layout(self) -> tuple[str, list[str], list[str]]:
        """``(prefix, pre, post)``: the layer container and the tensors before and after the layers
        (in the order of the model's modules), every source's layer ranges checked first (their
        architectures: by ``merge_with_fisher``, through :meth:`SlicedSource.parts`)."""
        if self._layout is not None:
            return self._layout
        donor = self.source(self.donor)
        prefix, _ = self._layers_of(donor)
        for s, length in enumerate(self.lengths):
            for piece in [col[s] for col in self.columns] + ([self.base[s]] if self.base else []):
                src = self.source(piece.ref)
                pfx, n = self._layers_of(src)
                if pfx != prefix:
                    raise ModelMismatchError(f"slices: model {piece.ref!r} has another architecture than {self.donor!r} "
                                             f"(layers in {pfx!r}, not {prefix!r}); slices need models of one architecture")
                if piece.start + length > n:
                    raise InvalidInputError(f"slices: layer_range [{piece.start}, {piece.start + length}] of model "
                                            f"{piece.ref!r} is past its {n} layers (layers 0..{n - 1})")
        outside = [k for k in donor.infos() if not k.startswith(prefix + ".")]
        pre, post = _split_outside(donor, outside, prefix)
        self._layout = (prefix, pre, post)
        return self._layout

    def layer_suffixes(self, ref: str, layer: int) -> list[str]:
        """The tensor names of layer ``layer`` of model ``ref`` after ``<prefix>.<layer>.``."""
        head = f"{self.layout()[0]}.{layer}."
        return [k[len(head):] for k in self.source(ref).infos() if k.startswith(head)]

    def config(self) -> dict[str, Any]:
        """The donor's config with the output layer count (and ``layer_types`` cut like the layers)."""
        cfg = dict(self.source(self.donor).config)
        total = sum(self.lengths)
        for key in _LAYER_KEYS:
            if isinstance(cfg.get(key), int):
                cfg[key] = total
        if isinstance(cfg.get("layer_types"), list):
            types = []
            for s, length in enumerate(self.lengths):
                piece = self.columns[0][s]
                own = self.source(piece.ref).config.get("layer_types")
                types += list(own[piece.start:piece.start + length]) if isinstance(own, list) else \
                    [cfg["layer_types"][0]] * length
            cfg["layer_types"] = types
        return cfg

    # ------------------------------------------------------------------ output names
    def locate(self, name: str) -> tuple[int, int | None]:
        """``(slice, layer offset in it)`` of output tensor ``name`` (offset None: outside the layers;
        slice 0 for the tensors before the layers, the last for those after)."""
        prefix, pre, _ = self.layout()
        if name.startswith(prefix + "."):
            k = int(name[len(prefix) + 1:].split(".", 1)[0])
            for s in reversed(range(len(self.lengths))):
                if k >= self.out_starts[s]:
                    return s, k - self.out_starts[s]
        return (0 if name in pre else len(self.lengths) - 1), None

    def input_name(self, piece_of, name: str) -> tuple[_Piece, str]:
        """The piece (``piece_of(slice)``) and its tensor name that output tensor ``name`` reads."""
        prefix = self.layout()[0]
        s, off = self.locate(name)
        piece = piece_of(s)
        if off is None:
            return piece, name
        rest = name[len(prefix) + 1:].split(".", 1)[1]
        return piece, f"{prefix}.{piece.start + off}.{rest}"

    def t(self, name: str) -> float:
        """mergekit's gradient position of ``name``: ``k / (n − 1)`` in its slice of ``n`` layers."""
        s, off = self.locate(name)
        if off is None:
            return 0.0
        n = self.lengths[s]
        return off / (n - 1) if n > 1 else 1.0


def _split_outside(src: TensorSource, outside: list[str], prefix: str) -> tuple[list[str], list[str]]:
    """The tensors outside the layers split into those before them (embeddings) and after them
    (final norm, head), by the order of the model's modules (a model built on the meta device)."""
    if not outside:
        return [], []
    try:
        import torch
        import transformers

        cfg = transformers.AutoConfig.for_model(**src.config)
        archs = src.config.get("architectures") or []
        cls = getattr(transformers, archs[0], None) if archs else None
        with torch.device("meta"):
            model = cls._from_config(cfg) if cls is not None else transformers.AutoModel.from_config(cfg)
        order = list(model.state_dict())
    except Exception as e:  # any failure to build the model: refuse, naming it
        raise InvalidInputError(f"slices: cannot build {src.ref!r} to tell the tensors before its layers from those after "
                                f"them ({type(e).__name__}: {e})") from None
    first_layer = next((i for i, k in enumerate(order) if k.startswith(prefix + ".")), None)
    pos = {k: i for i, k in enumerate(order)}
    missing = [k for k in outside if k not in pos]
    if first_layer is None or missing:
        raise InvalidInputError(f"slices: cannot place tensors {missing[:3] or outside[:3]} of {src.ref!r} before or after "
                                "its layers")
    return [k for k in outside if pos[k] < first_layer], [k for k in outside if pos[k] > first_layer]


class SlicedSource(TensorSource):
    """Virtual model ``j`` of a :class:`SlicePlan` (``j = "base"``: the slices' bases): for every
    slice, its ``j``-th source's layers under the output layer numbers; outside the layers the
    first slice's (before) or last slice's (after) source's tensors."""

    def __init__(self, plan: SlicePlan, column: int | str) -> None:
        self.plan = plan
        self.column = column
        pieces = plan.base if column == "base" else plan.columns[column]
        self.pieces = pieces
        self.ref = "slices[" + ", ".join(f"{p.ref} layers {p.start}..{p.start + n - 1}"
                                         for p, n in zip(pieces, plan.lengths)) + "]"
        self.hub_id = None
        self._infos: dict[str, TensorInfo] | None = None
        self._config: dict[str, Any] | None = None

    def input_refs(self) -> list[str]:
        return self.plan.refs()

    def parts(self) -> list[TensorSource]:
        """The models this virtual model reads, and the donor of its config and tokenizer (checked
        against the other inputs: one architecture, one vocabulary)."""
        return [self.plan.source(ref) for ref in dict.fromkeys([*(p.ref for p in self.pieces), self.plan.donor])]

    @property
    def config(self) -> dict[str, Any]:  # type: ignore[override]
        if self._config is None:
            self._config = self.plan.config()
        return self._config

    @property
    def folder(self):  # type: ignore[override]
        """The donor's folder (tokenizer, generation config)."""
        return self.plan.source(self.plan.donor).folder

    def _read(self, name: str) -> tuple[TensorSource, str]:
        piece, in_name = self.plan.input_name(lambda s: self.pieces[s], name)
        return self.plan.source(piece.ref), in_name

    def infos(self) -> dict[str, TensorInfo]:
        if self._infos is None:
            plan = self.plan
            prefix, pre, post = plan.layout()
            names = list(pre)
            for s, (piece, length) in enumerate(zip(self.pieces, plan.lengths)):
                for off in range(length):  # each output layer has the tensors of the layer it reads
                    k = plan.out_starts[s] + off
                    names += [f"{prefix}.{k}.{suffix}" for suffix in plan.layer_suffixes(piece.ref, piece.start + off)]
            names += list(post)
            out = {}
            for name in names:
                src, in_name = self._read(name)
                info = src.infos().get(in_name)
                if info is None:
                    raise InvalidInputError(f"slices: model {src.ref!r} has no tensor {in_name!r} (for output {name!r})")
                out[name] = TensorInfo(name, info.shape, info.dtype)
            self._infos = out
        return self._infos

    def get(self, name: str):
        src, in_name = self._read(name)
        return src.get(in_name)


class SliceParameters:
    """The settings of a slices merge, tensor by tensor (the interface of
    :class:`~hf_fisher.consumers.merge.parameters.TensorParameters`): per-model keys from the
    source's ``parameters``, then the slice's, then the recipe's; method options from the slice's,
    then the recipe's; each read at the tensor's slice position :meth:`SlicePlan.t`."""

    def __init__(self, plan: SlicePlan, shared: Mapping[str, Any]) -> None:
        self.plan = plan
        self.shared = dict(shared)

    def __repr__(self) -> str:
        return f"SliceParameters(slices={len(self.plan.lengths)}, shared={self.shared!r})"

    def write_to(self, recipe: dict) -> None:
        """Record the recipe's merge-wide settings in a written recipe (the slices, with their own
        and their sources' settings, are written whole by ``build_recipe``)."""
        recipe.setdefault("parameters", {}).update(mergekit_names(self.shared))

    def bind(self, config: Mapping[str, Any]) -> None:
        """Nothing to read: positions come from the slices."""

    def resolve(self, name: str, method: Any, default_weights: Sequence[float]) -> tuple[dict, dict[str, list]]:
        plan = self.plan
        s, _ = plan.locate(name)
        t = plan.t(name)
        scopes = [plan.slice_params[s], self.shared]
        options = {}
        for scope in scopes:
            for k, v in scope.items():
                if k in PER_MODEL_KEYS or k in options:
                    continue
                got = evaluate(v, name, t)
                if got is not None:
                    options[k] = got
        per_model: dict[str, list] = {}
        keys = {k for scope in scopes for k in scope if k in PER_MODEL_KEYS}
        keys |= {k for col in plan.columns for p in col for k in p.parameters}
        for k in sorted(keys):
            values = []
            for j, col in enumerate(plan.columns):
                piece, in_name = plan.input_name(lambda sl, c=col: c[sl], name)
                got = None
                for scope, at in ((piece.parameters, in_name), (plan.slice_params[s], name), (self.shared, name)):
                    if k in scope:
                        got = evaluate(scope[k], at, t)
                        if got is not None:
                            break
                if got is None:
                    got = default_weights[j] if k == "weight" else options.get(k, getattr(method, k, None))
                values.append(got)
            per_model[k] = values
        return options, per_model
